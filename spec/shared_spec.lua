-- Limits and breakers shared through Redis (sturdy.shared), against a real
-- redis-server (and a 3-node Redis Cluster) on loopback and the mock API.
-- Two clients in one process have a scope each: to Redis they are two
-- processes of a fleet. The multi-process figures are in shared_fleet_spec.
local sturdy = require "sturdy"
local shared = require "sturdy.shared"
local sturdy_redis = require "sturdy.redis"
local anthropic = require "sturdy.anthropic"
local mock = require "spec.support.mock"
local redis_server = require "spec.support.redis"
local socket = require "socket"

local PASSWORD = "fleet-pw-5e4d3c2b1a"
local MESSAGE = '{"model":"claude-fleet","max_tokens":8,"messages":[{"role":"user","content":"hi"}]}'

local now = sturdy.monotime

-- Drives every client until each handle is done.
local function drive(clients, handles, timeout)
  local deadline = now() + (timeout or 30)
  while now() < deadline do
    local all = true
    for _, h in ipairs(handles) do all = all and h:done() end
    if all then return true end
    for _, c in ipairs(clients) do c:poll(0.002) end
  end
  error("calls still running after " .. tostring(timeout or 30) .. " s")
end

-- Redis's own clock, in µs.
local function redis_time(conn)
  local t = conn:time()
  return tonumber(t[1]) * 1e6 + tonumber(t[2])
end

describe("sturdy.shared", function()
  local m, rs, conn

  local function settings(extra)
    local s = { port = rs.port, password = PASSWORD, prefix = "spec:" }
    for k, v in pairs(extra or {}) do s[k] = v end
    return s
  end

  local function client(opts)
    local cfg = { base_url = m.http_url, shared = { redis = settings(), sync = 0.05 } }
    for k, v in pairs(opts or {}) do
      if k == "shared" then
        for sk, sv in pairs(v) do cfg.shared[sk] = sv end
      else
        cfg[k] = v
      end
    end
    return sturdy.client(cfg)
  end

  local function post(extra)
    local r = { method = "POST", path = "/v1/messages", body = MESSAGE, key = "fleet" }
    for k, v in pairs(extra or {}) do r[k] = v end
    return r
  end

  setup(function()
    m = assert(mock.start())
    rs = assert(redis_server.start { password = PASSWORD })
    conn = assert(sturdy_redis.connect(sturdy_redis.settings { port = rs.port, password = PASSWORD }))
  end)
  teardown(function()
    if conn then pcall(conn.quit, conn) end
    if rs then rs:stop() end
    m:stop()
  end)
  before_each(function()
    m:reset()
    conn:flushall()
  end)

  describe("the limiter script", function()
    local link
    before_each(function() link = sturdy_redis.link(sturdy_redis.settings(settings())) end)
    after_each(function() link:close() end)

    -- LIMIT with a configured 600/min (one request per 100 ms, a burst of 10);
    -- the reply, with the local times just before and after it ran.
    local function limit(max_wait_ms, extra)
      extra = extra or {}
      local before = now()
      local r = assert(link:eval(shared.LIMIT, { "spec:{k}:limit" }, {
        max_wait_ms * 1000, (extra.at or 0) * 1000, 1, extra.lease or 1,
        600, 0, 0, extra.tpm or 0, 1, 0, 0, extra.tokens or 0, extra.extra or 0, 60000,
      }))
      r.before, r.after, r.at = before, now(), (extra.at or 0) * 1000
      return r
    end

    -- Waits come from Redis's clock when each call runs; the places they name
    -- (that time + the wait) are what the GCRA fixes. Checks that b's place is
    -- `us` after a's, within what the time between the two calls allows.
    local function spaced(a, b, us)
      local wait_diff = (b[3] + b.at) - (a[3] + a.at)
      local lo = wait_diff + (b.before - a.after) * 1e6
      local hi = wait_diff + (b.after - a.before) * 1e6
      assert.is_true(us >= lo - 1000 and us <= hi + 1000,
                     ("places %.0f us apart, want %.0f (%.0f..%.0f)"):format((lo + hi) / 2, us, lo, hi))
    end

    it("reserves a place and says how long to wait for it (reserve, then wait)", function()
      -- a key Redis has no state for starts with nothing left: one interval to the first place
      local r1 = limit(1000)
      assert.equal(0, r1[1])                   -- not limited
      assert.equal(0, r1[2])                   -- nothing left at once
      assert.near(100000, r1[3], 1)            -- retry_after: the wait, µs
      assert.near(1100000, r1[4], 1)           -- reset_after: clear again after burst + one
      assert.equal("600", r1[8])
      local r2 = limit(1000)
      spaced(r1, r2, 100000)                   -- the next place is one interval later
      -- a place beyond max_wait is refused and not taken: the next asker gets it
      local refused = limit(150)
      assert.equal(1, refused[1])
      spaced(r2, refused, 100000)
      assert.is_true(refused[3] > 150000)
      local r3 = limit(1000)
      assert.equal(0, r3[1])
      spaced(r2, r3, 100000)
      -- a place for later (a retry 200 ms from now) is the next free one, from then
      local later = limit(1000, { at = 200 })
      spaced(r3, later, 100000)
    end)

    it("takes the cost as an argument and paces every dimension with a limit", function()
      -- 6000 tokens/min: 100 per second, a burst of 100; 250 tokens wait for
      -- the bucket to be clear (an oversize cost) and then owe 2.5 s
      local r1 = limit(5000, { tpm = 6000, tokens = 250 })
      assert.equal(0, r1[1])
      assert.near(1000000, r1[3], 1)          -- from nothing left: the whole burst's time
      local r2 = limit(5000, { tpm = 6000, tokens = 10 })
      spaced(r1, r2, 2500000 + 100000 - 1000000) -- the 10 tokens' place: after the debt
      assert.equal("6000", r2[11])
    end)

    it("grants a lease of permits, one interval apart, within the wait allowed", function()
      local r = limit(350, { lease = 8 })
      assert.equal(0, r[1])
      assert.equal(3, r[5])                    -- 100, 200 and 300 ms; 400 would pass 350
      assert.near(100000, r[6], 1)             -- the first permit's place
      assert.near(100000, tonumber(r[7]), 1)   -- the interval
      spaced(r, limit(1000), 300000)           -- the next place is after the three
    end)

    it("charges calls sent unpaced and gives back unused permits", function()
      local r1 = limit(5000, { extra = 5 })    -- 5 sent before the limit was known
      assert.near(600000, r1[3], 1)
      local r2 = limit(5000, { extra = -3 })   -- 3 leased permits never used
      spaced(r1, r2, -200000)
      -- never beyond a full bucket: no debt, no wait, and one permit less
      -- than the burst left
      local r3 = limit(5000, { extra = -1000 })
      assert.equal(0, r3[3])
      assert.equal(9, r3[2])
    end)

    it("is sent with EVALSHA, and with EVAL again after the script cache is flushed", function()
      assert(link:eval(shared.LIMIT, { "spec:{k}:limit" }, { 0, 0, 1, 1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1000 }))
      local sha = shared.LIMIT.sha
      assert.matches("^%x+$", sha)
      assert.equal(40, #sha)
      conn:script("flush")
      assert.same({ 0 }, conn:script("exists", sha))
      local r = assert(link:eval(shared.LIMIT, { "spec:{k}:limit" }, { 0, 0, 1, 1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1000 }))
      assert.equal(0, r[1])
      assert.same({ 1 }, conn:script("exists", sha)) -- EVAL ran it, and cached it again
    end)
  end)

  it("places every call of the fleet in one limit, whichever process sends it", function()
    local a, b = client { limits = { rpm = 600 } }, client { limits = { rpm = 600 } }
    local handles = {}
    local scenario = mock.steps("fleet-two", "200")
    for i = 1, 12 do
      handles[#handles + 1] = a:submit(post { headers = scenario })
      handles[#handles + 1] = b:submit(post { headers = scenario })
      if i == 1 then assert.equal(2, #handles) end
    end
    drive({ a, b }, handles)
    for _, h in ipairs(handles) do assert(h:result()) end
    local times = m:scenario("fleet-two").times
    assert.equal(24, #times)
    table.sort(times)
    -- one shared 10/s from an empty bucket: 24 calls span 2.3 s; two local
    -- limiters of 10/s (a burst of 10 each) would send 20 at once
    assert.is_true(times[24] - times[1] >= 2.2, "span " .. (times[24] - times[1]))
    for i = 11, 24 do
      assert.is_true(times[i] - times[i - 10] >= 0.9, "10 intervals between call " .. i - 10 .. " and " .. i)
    end
    assert.is_not_nil(conn:hget("spec:{fleet}:limit", "t1"))
    a:close()
    b:close()
  end)

  it("refuses a call whose place is beyond its deadline without taking the place", function()
    local a = client { limits = { rpm = 60 } } -- one a second, from an empty bucket
    local scenario = mock.steps("deadline", "200")
    local t0 = socket.gettime()
    local first = a:submit(post { headers = scenario })
    local late = a:submit(post { headers = scenario, timeout = { total = 1.5 } })
    local third = a:submit(post { headers = scenario })
    drive({ a }, { first, late, third })
    assert(first:result())
    local _, err = late:result()
    assert.equal("total_timeout", err.kind)
    assert.matches("deadline", err.detail)
    assert(third:result())
    -- places at +1 s and +2 s: the third took the one the late call was refused
    local times = m:scenario("deadline").times
    assert.equal(2, #times)
    assert.near(1, times[1] - t0, 0.2)
    assert.near(2, times[2] - t0, 0.2)
    a:close()
  end)

  it("writes what one process learns from headers to Redis, and another paces to it", function()
    m:config { rate_limit = { rpm = 120, burst = 2 } }
    local a = client()
    assert(a:request(post()))
    assert.equal("120", conn:hget("spec:{fleet}:limit", "l1"))
    a:close()
    -- a process that never had a reply paces to it from its first call
    local b = client()
    local handles = {}
    for i = 1, 4 do handles[i] = b:submit(post { headers = mock.steps("learned", "200") }) end
    drive({ b }, handles)
    for _, h in ipairs(handles) do assert(h:result()) end
    local times = m:scenario("learned").times
    for i = 2, 4 do assert.is_true(times[i] - times[i - 1] >= 0.4, "spacing " .. (times[i] - times[i - 1])) end
    assert.equal(0, m:counters().rate_limited)
    assert.equal(120, b:stats().shared.keys.fleet.limits.requests)
    b:close()
  end)

  it("reserves input + max_tokens, then charges or refunds the real usage by moving the TAT", function()
    local c = client { limits = { tpm = 60000 } } -- 1000 tokens a second, a burst of 1000
    local claude = anthropic.new { client = c, api_key = "sk-ant-fleet", base_url = m.http_url,
                                   model = "claude-fleet" }
    local t0 = redis_time(conn)
    local r = assert(claude:messages { max_tokens = 2000, messages = { { role = "user", content = "count me" } } })
    local used = r.usage.input + r.usage.output
    assert.is_true(used < 100)
    local key = c:stats().keys[1]
    local tat = tonumber(conn:hget("spec:{" .. key .. "}:limit", "t4"))
    -- reserved: an empty bucket (1 s) + the estimate (> 2 s); after the reply
    -- only what was used is still owed
    local owed = tat - t0
    assert.is_true(owed >= 1e6 + used * 1000 - 5000, "owed " .. owed)
    assert.is_true(owed <= 1e6 + used * 1000 + 150000, "owed " .. owed) -- not the 2 s estimate
    c:close()
  end)

  it("gives each retry of a call its own place", function()
    local c = client { limits = { rpm = 600 }, retry = { base = 0.01, attempts = 3 } }
    local t0 = redis_time(conn)
    assert(c:request(post { headers = mock.steps("retried", "503|200") }))
    local tat = tonumber(conn:hget("spec:{fleet}:limit", "t1"))
    -- two places from a bucket with nothing left: burst + 2 intervals
    assert.is_true(tat - t0 >= 1e6 + 2e5 - 5000 and tat - t0 <= 1e6 + 2e5 + 100000, "owed " .. (tat - t0))
    c:close()
  end)

  it("falls back to limit / processes when Redis is away, says so, and shares again when it is back", function()
    local away = assert(redis_server.start())
    local port = away.port
    away:kill()
    local events = {}
    local c = sturdy.client { base_url = m.http_url, limits = { rpm = 2400 },
                              shared = { redis = { port = port }, processes = 4 },
                              observe = function(rec) if rec.type == "shared" then events[#events + 1] = rec end end }
    local handles = {}
    for i = 1, 12 do handles[i] = c:submit(post()) end
    drive({ c }, handles)
    for _, h in ipairs(handles) do assert(h:result()) end
    assert.equal("local", events[1].state)
    assert.equal(4, events[1].processes)
    assert.matches("limit / 4", events[1].detail)
    assert.equal(600, c:stats("fleet").limits.requests.limit)
    assert.equal("local", c:stats().shared.mode)
    -- back: the next call after the backoff places through Redis again
    assert(away:restart())
    local deadline = now() + 5
    repeat
      assert(c:request(post()))
      socket.sleep(0.05)
    until c:stats().shared.mode == "redis" or now() > deadline
    assert.equal("redis", events[#events].state)
    assert.equal(2400, c:stats("fleet").limits.requests.limit)
    local back = assert(sturdy_redis.connect(sturdy_redis.settings { port = port }))
    assert.is_not_nil(back:hget("sturdy:{fleet}:limit", "t1"))
    back:quit()
    c:close()
    away:stop()
  end)

  it("fails no call when Redis answers with errors (a key of another type), and says so", function()
    conn:set("spec:{fleet}:limit", "not a hash")
    local events = {}
    local c = client { limits = { rpm = 600 },
                       observe = function(rec) if rec.type == "shared" then events[#events + 1] = rec end end }
    for _ = 1, 3 do assert(c:request(post())) end
    assert.equal("local", events[1].state)
    assert.matches("WRONGTYPE", events[1].detail)
    assert.equal("local", c:stats().shared.mode)
    -- fixed: the next call places through Redis again
    conn:del("spec:{fleet}:limit")
    assert(c:request(post()))
    assert.equal("redis", c:stats().shared.mode)
    assert.equal("redis", events[#events].state)
    c:close()
  end)

  describe("the shared breaker", function()
    local BREAKER = { min_calls = 4, failure_rate = 0.5, open_for = 1, probes = 1 }

    local function breaker_client()
      return client { breaker = BREAKER, retry = { attempts = 1 }, shared = { sync = 0.01 } }
    end

    -- one call, after a pause long enough for its admission to sync
    local function call(c, id, step)
      socket.sleep(0.015)
      return c:request(post { headers = mock.steps(id, step) })
    end

    it("opens a process's breaker within a sync when another one opened", function()
      local a, b = breaker_client(), breaker_client()
      for _ = 1, 4 do call(a, "down-a", "503") end
      assert.equal("open", a:stats("fleet").breaker.state)
      local pttl = conn:pttl("spec:{fleet}:open")
      assert.is_true(pttl > 500 and pttl <= 1000, "pttl " .. pttl)
      -- b never saw a failure: its first call finds the fleet's breaker open
      local _, err = call(b, "down-b", "200")
      assert.equal("circuit_open", err.kind)
      assert.is_true(err.retry_after > 0.4 and err.retry_after <= 1)
      assert.equal(0, m:scenario("down-b").count)
      a:close()
      b:close()
    end)

    it("opens on the fleet's window when no process has enough calls of its own", function()
      local a, b = breaker_client(), breaker_client()
      -- each admission adds the calls before it: a's third failure is added
      -- when it calls next, b's second when it calls next
      for _ = 1, 3 do assert.equal("overloaded", select(2, call(a, "half-a", "503")).kind) end
      for _ = 1, 2 do assert.equal("overloaded", select(2, call(b, "half-b", "503")).kind) end
      -- the fleet: a's 2 + b's 2 = 4 calls, 4 failures; b alone has 2, a 3
      assert.equal("circuit_open", select(2, call(b, "half-b", "200")).kind)
      assert.equal("circuit_open", select(2, call(a, "half-a", "200")).kind)
      assert.equal(3, m:scenario("half-a").count)
      assert.equal(2, m:scenario("half-b").count)
      a:close()
      b:close()
    end)

    it("lets one process probe when the open time ends; the others wait for its verdict", function()
      local a, b = breaker_client(), breaker_client()
      for _ = 1, 4 do call(a, "probe", "503") end
      assert.equal("circuit_open", select(2, call(b, "probe", "503")).kind)
      socket.sleep(1.05)
      -- a probes (still down) and opens again for twice as long; b is kept out
      assert.equal("overloaded", select(2, call(a, "probe", "503")).kind)
      assert.equal("circuit_open", select(2, call(b, "probe", "503")).kind)
      assert.equal(5, m:scenario("probe").count)
      local pttl = conn:pttl("spec:{fleet}:open")
      assert.is_true(pttl > 1400 and pttl <= 2000, "pttl " .. pttl)
      a:close()
      b:close()
    end)

    it("lets the others through once the probe closed it", function()
      local a, b = breaker_client(), breaker_client()
      for _ = 1, 4 do call(a, "heal", "503") end
      assert.equal("circuit_open", select(2, call(b, "heal", "200")).kind)
      socket.sleep(1.05)
      assert(call(a, "heal", "200"))
      assert.equal("closed", a:stats("fleet").breaker.state)
      assert.equal("closed", conn:get("spec:{fleet}:probe"))
      assert(call(b, "heal", "200"))
      assert.equal("closed", b:stats("fleet").breaker.state)
      assert.equal(6, m:scenario("heal").count)
      a:close()
      b:close()
    end)
  end)

  it("leases several places per round trip for a hot key, and gives unused ones back on close", function()
    -- /echo: no rate-limit headers, so no limit is learned (and written)
    -- a burst of 10 s: the key stays in debt (so a give-back is not clamped)
    -- however slow the machine
    local c = client { limits = { rpm = 6000, burst = 10 }, shared = { lease = 4 }, breaker = false }
    local function scripts_run()
      local info = conn:raw_cmd("INFO commandstats")
      return tonumber(info:match("cmdstat_evalsha:calls=(%d+)") or 0)
           + tonumber(info:match("cmdstat_eval:calls=(%d+)") or 0)
    end
    -- a lease is at most the key's calls of the last second: on the scope's
    -- clock, stopped here, so a machine that stalls cannot shrink it
    local shared_module = require "sturdy.shared"
    local real_clock = shared_module.clock
    local stopped = real_clock()
    shared_module.clock = function() return stopped end
    finally(function() shared_module.clock = real_clock end)
    -- 1, 2, then 4
    conn:config("resetstat")
    for _ = 1, 4 do assert(c:request(post { path = "/echo" })) end
    assert.equal(3, scripts_run())
    conn:config("resetstat")
    for _ = 1, 8 do assert(c:request(post { path = "/echo" })) end
    assert.equal(2, scripts_run()) -- the 4th call's lease, then two more of 4
    assert.equal(3, c:stats().shared.keys.fleet.lease)
    local before = tonumber(conn:hget("spec:{fleet}:limit", "t1"))
    c:close()
    local after = tonumber(conn:hget("spec:{fleet}:limit", "t1"))
    assert.near(3 * 10000, before - after, 10) -- 3 permits of 10 ms given back
  end)

  it("checks its options when the client is made", function()
    local function bad(shared_opts, msg)
      assert.has_error(function() sturdy.client { shared = shared_opts } end, msg)
    end
    bad({ bogus = 1 }, "sturdy: unknown option 'bogus' in client options.shared")
    bad({ processes = 0 },
        "sturdy: option 'processes' in client options.shared must be a whole number >= 1, got number")
    bad({ lease = 1.5 }, "sturdy: option 'lease' in client options.shared must be a whole number >= 1, got number")
    bad({ sync = 2 }, "sturdy: option 'sync' in client options.shared must be a number from 0.01 to 1, got number")
    bad({ redis = { prot = 1 } }, "sturdy: unknown option 'prot' in client options.shared.redis")
    bad({ redis = { port = 70000 } },
        "sturdy: option 'port' in client options.shared.redis must be a whole number from 1 to 65535")
    assert.has_error(function() sturdy.client { shared = 5 } end,
      "sturdy: option 'shared' in client options must be a table, got number")
  end)

  it("keeps the Redis password out of the client, its stats and its events", function()
    local seen = {}
    local c = client { observe = function(rec) seen[#seen + 1] = rec end }
    assert(c:request(post()))
    local all = {}
    local visited = {}
    local function walk(v)
      if type(v) == "string" then
        all[#all + 1] = v
      elseif type(v) == "table" and not visited[v] then
        visited[v] = true
        for k, x in pairs(v) do
          walk(k)
          walk(x)
        end
      end
    end
    walk(c)
    walk(c:stats())
    walk(seen)
    assert.is_nil(table.concat(all, "\n"):find(PASSWORD, 1, true))
    assert.is_nil(tostring(c):find(PASSWORD, 1, true))
    c:close()
  end)

  it("survives hostile values handed to the engine's fleet methods", function()
    local core = require "sturdy.core"
    local compiled = require("sturdy.options").client { base_url = m.http_url }
    local e = core.engine(compiled)
    for _, v in ipairs { 0 / 0, -1, 1e300, math.huge, -math.huge } do
      e:open_until("k", v)
      e:share("k", v)
      assert.is_boolean(e:fleet_window("k", v, v, v))
    end
    local calls, failures, slow, state = e:fleet_counts("k")
    assert.equal(0, calls + failures + slow)
    assert.is_string(state)
    assert.is_nil(e:fleet_counts("never named"))
    local h = {}
    local r = e:submit(h, { url = m.http_url .. "/echo" }, nil, true)
    assert.equal("held", select(7, r:admission()))
    assert.is_true(r:gate(0 / 0)) -- no time at all: admitted now
    for _, v in ipairs { -5, 1e300, -math.huge } do assert.is_boolean(r:gate(v)) end
    e:cancel_all()
    e:close()
  end)

  it("works through a Redis Cluster: MOVED and ASK redirections are followed", function()
    local cl = assert(redis_server.cluster { nodes = 3 })
    local ok, err = pcall(function()
      local function node(port) return assert(sturdy_redis.connect(sturdy_redis.settings { port = port })) end
      local probe = node(cl.ports[1])
      local slot = probe:raw_cmd("CLUSTER KEYSLOT spec:{fleet}:limit")
      -- the owner of the key's slot, and a seed that is not it
      local owner, seed
      for _, port in ipairs(cl.ports) do
        local n = node(port)
        local count = n:raw_cmd("CLUSTER COUNTKEYSINSLOT " .. slot)
        local mine = pcall(n.hget, n, "spec:{fleet}:limit", "t1")
        if mine then owner = port else seed = seed or port end
        assert.equal(0, count)
        n:quit()
      end
      assert.truthy(owner and seed)
      local c = sturdy.client { base_url = m.http_url, limits = { rpm = 600 },
                                shared = { redis = { port = seed, prefix = "spec:" } } }
      assert(c:request(post()))
      assert.equal("redis", c:stats().shared.mode)
      local o = node(owner)
      assert.is_not_nil(o:hget("spec:{fleet}:limit", "t1"))
      -- ASK: the slot of another key migrates from its owner to another node;
      -- a key not yet on the owner is asked for on the importing node
      local kslot = probe:raw_cmd("CLUSTER KEYSLOT spec:{moving}:limit")
      local ids, src, dst = {}, nil, nil
      for _, port in ipairs(cl.ports) do
        local n = node(port)
        ids[port] = n:raw_cmd("CLUSTER MYID")
        if pcall(n.hget, n, "spec:{moving}:limit", "t1") then src = port end
        n:quit()
      end
      for _, port in ipairs(cl.ports) do if port ~= src then dst = port end end
      local d, s = node(dst), node(src)
      d:raw_cmd("CLUSTER SETSLOT " .. kslot .. " IMPORTING " .. ids[src])
      s:raw_cmd("CLUSTER SETSLOT " .. kslot .. " MIGRATING " .. ids[dst])
      assert(c:request(post { key = "moving" }))
      d:raw_cmd("ASKING")
      assert.is_not_nil(d:hget("spec:{moving}:limit", "t1"))
      assert.equal(0, s:raw_cmd("CLUSTER COUNTKEYSINSLOT " .. kslot))
      d:quit()
      s:quit()
      o:quit()
      probe:quit()
      c:close()
    end)
    cl:stop()
    assert(ok, err)
  end)
end)
