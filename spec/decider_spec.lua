-- sturdy.policy.decider, the decision core's binding for transports written in
-- Lua, driven directly (no nginx, no network): requests read as the curl
-- engine reads them, admission, queue and pump, reports and retry decisions,
-- the shared state as a blob, secrets masked, calls dropped while they hold.
local policy = require "sturdy.policy"
local options = require "sturdy.options"

local function decider(cfg)
  cfg = cfg or {}
  cfg.base_url = cfg.base_url or "https://api.example.com"
  local compiled = options.client(cfg)
  compiled.notices = { events = true }
  return policy.decider(compiled), compiled
end

-- A response head from "Name: value" lines.
local function head(lines)
  local h = policy.head()
  for _, line in ipairs(lines) do assert(h:add(line)) end
  return h
end

describe("policy.decider", function()
  it("reads requests as the curl engine does: URL, key, header lines, timeouts, and the same errors", function()
    local d = decider { headers = { ["x-api-key"] = "sk-secret-123456", ["anthropic-version"] = "2023-06-01" },
                        timeout = { connect = 2, first_byte = false }, user_agent = "agent/1" }
    local call, spec = d:call({ path = "/v1/messages", json = {}, headers = { ["X-Trace"] = "t1" },
                                timeout = { idle = 3 }, max_response = 1000 }, '{"model":"m"}')
    assert.equal("userdata", type(call))
    assert.equal("https://api.example.com/v1/messages", spec.url)
    assert.equal("POST", spec.method)
    assert.equal('{"model":"m"}', spec.body)
    assert.equal("api.example.com", spec.key) -- the model is read from json, which is empty here
    assert.same({ connect = 2, first_byte = false, idle = 3 }, spec.timeout)
    assert.equal(1000, spec.max_response)
    local lines = {}
    for _, l in ipairs(spec.headers) do lines[l:match("^[^:]+"):lower()] = l end
    assert.equal("X-Trace: t1", lines["x-trace"])
    assert.equal("x-api-key: sk-secret-123456", lines["x-api-key"])
    assert.equal("Content-Type: application/json", lines["content-type"])
    assert.equal("User-Agent: agent/1", lines["user-agent"])
    local _, s2 = d:call({ path = "/x", headers = { ["User-Agent"] = "mine" } })
    assert.equal(1, #(function() local n = {} for _, l in ipairs(s2.headers) do
      if l:lower():find("^user%-agent") then n[#n + 1] = l end end return n end)())
    assert.equal("GET", s2.method)
    assert.is_nil(s2.stream)
    assert.equal("auto", select(2, d:call({ path = "/x", on_data = function() end })).stream)
    assert.equal("manual", select(2, d:call({ path = "/x", on_data = function() end, commit = "manual" })).stream)
    assert.equal("api.example.com/claude", d:key_for { path = "/x", json = { model = "claude" } })
    assert.has_error(function() d:call({ path = "/x", bogus = 1 }) end, "sturdy: unknown option 'bogus' in request")
    assert.has_error(function() d:call({ path = "/x", headers = { Host = "h" } }) end)
    assert.has_error(function() d:check({ url = "ftp://x" }) end)
    assert.has_error(function() d:call({ path = "/x", headers = { ["x-a"] = "a\r\nb: c" } }) end)
    d:close()
    assert.has_error(function() d:call({ path = "/x" }) end, "sturdy: the client is closed")
  end)

  it("admits, queues past the concurrency cap, pumps a freed slot to the next, and reports", function()
    local d = decider { limits = { concurrency = 1 } }
    local a = d:call { path = "/x" }
    local b = d:call { path = "/x" }
    assert.equal("start", a:admit("owner a"))
    local verdict, wake = b:admit("owner b")
    assert.equal("queued", verdict)
    assert.is_nil(wake) -- on a free slot
    assert.equal(1, d:queued())
    local reply = head { "request-id: req_1", "anthropic-ratelimit-requests-limit: 600" }
    local kind, class, id = a:report(200, reply, nil, nil, 0.01, 0.02)
    assert.is_nil(kind)
    assert.equal("success", class)
    assert.equal("req_1", id)
    local owners = d:pump("api.example.com")
    assert.same({ "owner b" }, owners)
    assert.equal("start", b:verdict())
    assert.equal(0, d:queued())
    assert.is_false((a:decide(200, nil)))
    local s = d:upstream_stats("api.example.com")
    assert.equal(1, s.in_flight)
    assert.equal(600, s.limits.requests.learned)
    assert.equal(1, s.latency.count)
    local events = d:events()
    assert.equal("limit_learned", events[1].type)
    assert.is_nil(d:events())
    b:release()
    assert.equal(0, d:upstream_stats("api.example.com").in_flight)
    b:release() -- twice is harmless
    assert.same({ "api.example.com" }, d:keys())
  end)

  it("decides retries: class delays, hints, attempts, and a fatal status", function()
    local d = decider { retry = { base = 0.1, jitter = "none", attempts = 2 } }
    local c = d:call { path = "/x" }
    assert.equal("start", c:admit())
    assert.same({ "overloaded", "overloaded" }, { c:report(503, head {}, nil, nil, 0, 0.01) })
    local retry, delay, hinted, retryable, stop = c:decide(503, head {})
    assert.same({ true, 100, false, true }, { retry, delay, hinted, retryable })
    assert.is_nil(stop)
    assert.equal("start", c:admit())
    local h = head { "retry-after: 3" }
    c:report(429, h, nil, nil, 0, 0.01)
    local _
    retry, _, _, retryable, stop = c:decide(429, h)
    assert.same({ false, true, "attempts" }, { retry, retryable, stop })
    local attempts, committed, retry_after = c:info()
    assert.same({ 2, false, 3 }, { attempts, committed, retry_after })
    local f = d:call { path = "/y", key = "other" }
    f:admit()
    f:report(400, head {}, nil, nil, 0, 0)
    assert.same({ false, 0, false, false }, { f:decide(400, head {}) })
    -- a transport failure the caller names
    local t = d:call { path = "/z", key = "t" }
    t:admit()
    assert.same({ "connection", "transient" }, { t:report(0, nil, "connection", "transient", 0, 0) })
    assert.is_true((t:decide(0, nil, "connection", "transient")))
    assert.has_error(function() t:report(0, nil, "x", "nonsense") end, "sturdy: unknown failure class 'nonsense'")
    assert.has_error(function() t:report(0, nil, "x", "success") end, "sturdy: unknown failure class 'success'")
    -- committed: never retried
    local m = d:call { path = "/z", key = "m" }
    m:admit()
    m:commit()
    m:report(0, nil, "connection", "transient", 0, 0)
    assert.same({ false, 0, false, true, "committed" }, { m:decide(0, nil, "connection", "transient") })
  end)

  it("opens the breaker after min_calls failures and refuses with a retry_after", function()
    local d = decider { breaker = { min_calls = 3, open_for = 10 }, retry = { attempts = 1 } }
    for _ = 1, 3 do
      local c = d:call { path = "/x" }
      assert.equal("start", c:admit())
      c:report(503, head {}, nil, nil, 0, 0)
    end
    local c = d:call { path = "/x" }
    local verdict, kind, class, detail = c:admit()
    assert.same({ "refused", "circuit_open", "overloaded" }, { verdict, kind, class })
    assert.matches("nothing was sent", detail, 1, true)
    local _, _, retry_after = c:info()
    assert.is_true(retry_after > 9 and retry_after <= 10)
    local saw
    for _, ev in ipairs(d:events() or {}) do if ev.type == "breaker" then saw = ev.from .. ">" .. ev.to end end
    assert.equal("closed>open", saw)
  end)

  it("takes what a fleet's store answered: a place, the fleet's window, its open time, a share", function()
    local d = decider { breaker = { min_calls = 4, failure_rate = 0.5, open_for = 10 },
                        retry = { honor_retry_after = 30 } }
    local key = "api.example.com"
    local c = d:call { path = "/x", timeout = { total = 5 } }
    -- what a shared limiter needs: the longest wait the call may sit through, its cost
    local max_wait, requests = c:admission(0)
    assert.is_true(max_wait > 4000 and max_wait < 5000, tostring(max_wait)) -- the deadline bounds it
    assert.equal(1, requests)
    assert.is_true(c:admission(1000) < max_wait)
    -- a place 200 ms off queues the call until then; one past its deadline is refused
    c:not_before(200)
    local verdict, wake = c:admit("c")
    assert.equal("queued", verdict)
    assert.is_true(wake > 100 and wake <= 200, tostring(wake))
    local late = d:call { path = "/x", timeout = { total = 1 } }
    late:not_before(5000)
    assert.equal("refused", (late:admit()))
    c:release()
    -- the fleet's window trips the breaker as its own would; counts are this decider's
    local calls, failures, slow, state, open_in = d:fleet_counts(key)
    assert.same({ 0, 0, 0, "closed", 0 }, { calls, failures, slow, state, open_in })
    assert.is_false(d:fleet_window(key, 4, 1, 0))
    assert.is_true(d:fleet_window(key, 4, 3, 0))
    calls, failures, slow, state, open_in = d:fleet_counts(key)
    assert.equal("open", state)
    assert.is_true(open_in > 9000 and open_in <= 10000)
    assert.same({ 0, 0, 0 }, { calls, failures, slow })
    local saw
    for _, ev in ipairs(d:events() or {}) do if ev.type == "breaker" then saw = ev.from .. ">" .. ev.to end end
    assert.equal("closed>open", saw)
    -- another process opened it until later: this one stays open until then
    d:open_until(key, 20000)
    assert.is_true(select(5, d:fleet_counts(key)) > 19000)
    assert.is_nil(d:fleet_counts("nobody.example.com"))
    -- a share is kept in the key's state
    d:share(key, 4)
    assert.is_not_nil(d:save(key))
  end)

  it("moves a key's shared state as a blob between deciders of the same settings only", function()
    local cfg = function() return { breaker = { min_calls = 2 }, retry = { attempts = 1 } } end
    local a, b = decider(cfg()), decider(cfg())
    assert.equal(a:fingerprint(), b:fingerprint())
    assert.matches("^%x+$", a:fingerprint())
    assert.is_nil(a:save("api.example.com"))
    for _ = 1, 2 do
      local c = a:call { path = "/x" }
      c:admit()
      c:report(503, head {}, nil, nil, 0, 0)
    end
    local blob = a:save("api.example.com")
    assert.equal("open", a:upstream_stats("api.example.com").breaker.state)
    assert.is_true(b:load("api.example.com", blob))
    assert.equal("open", b:upstream_stats("api.example.com").breaker.state)
    assert.equal("refused", (b:call { path = "/x" }):admit())
    -- a call's own load and save are the same blob's
    local c = b:call { path = "/x" }
    assert.is_true(c:load(blob))
    assert.is_true(c:load(nil)) -- nothing stored yet: the call keeps what it has
    assert.equal(#blob, #c:save())
    local other = decider { breaker = { min_calls = 5 } }
    assert.are_not.equal(a:fingerprint(), other:fingerprint())
    assert.same({ false, "config" }, { other:load("api.example.com", blob) })
    assert.same({ false, "size" }, { other:load("api.example.com", blob:sub(2)) })
    assert.same({ false, "magic" }, { b:load("api.example.com", blob:sub(1, 4) .. "XXXX" .. blob:sub(9)) })
    assert.same({ false, "size" }, { b:load("api.example.com", 42) })
    assert.has_error(function() b:load("api.example.com", {}) end)
  end)

  it("masks the secrets a request carries in what an error hands out", function()
    local d = decider { headers = { Authorization = "Bearer sk-live-abcdef123456" } }
    local c = d:call { url = "https://user:hunter2-pass@api.example.com/x",
                       headers = { ["x-api-key"] = "key-987654321" } }
    local body = 'echo: "sk-live-abcdef123456", key-987654321 and user:hunter2-pass; ok'
    local scrubbed = c:scrub(body)
    assert.equal(#body, #scrubbed)
    assert.is_nil(scrubbed:find("sk-live-abcdef123456", 1, true))
    assert.is_nil(scrubbed:find("key-987654321", 1, true))
    assert.is_nil(scrubbed:find("hunter2-pass", 1, true))
    assert.matches("; ok$", scrubbed)
    assert.equal("plain", d:call({ path = "/x" }):scrub("plain"))
  end)

  it("gives back the slot and queue place of calls dropped by the garbage collector", function()
    local d = decider { limits = { concurrency = 1 } }
    local key = "api.example.com"
    do
      local holder = d:call { path = "/x" }
      assert.equal("start", holder:admit())
      local waiter = d:call { path = "/x" }
      assert.equal("queued", waiter:admit({}))
    end
    collectgarbage()
    collectgarbage()
    local s = d:upstream_stats(key)
    assert.equal(0, s.in_flight)
    assert.equal(0, s.queued)
    assert.equal("start", (d:call { path = "/x" }):admit())
  end)
end)
