-- Nginx workers sharing limits through Redis: 2 nginx instances x 2 workers
-- each (spec/support/ngx_runner.lua), one Redis, a driver in every worker
-- (spec/ngx/shared_cases.lua) making 250 calls on the ngx transport against
-- the mock's limiter, with no limit configured; then a hard-down upstream
-- seen from every worker. The figures are printed.
local mock = require "spec.support.mock"
local redis_server = require "spec.support.redis"
local runner = require "spec.support.ngx_runner"
local sturdy_redis = require "sturdy.redis"
local socket = require "socket"

local RPM = 3000 -- the mock's limiter: 50 a second, a burst of one second's worth
local CALLS = 250

describe("nginx workers sharing limits through Redis", function()
  local m, rs, nginxes

  setup(function()
    m = assert(mock.start())
    rs = assert(redis_server.start())
    nginxes = {}
    for i = 1, 2 do
      nginxes[i] = assert(runner.start { mock = m, workers = 2, shared_dicts = { sturdy = "4m", results = "1m" } })
    end
  end)

  before_each(function() m:reset() end)

  teardown(function()
    for _, r in ipairs(nginxes or {}) do r:stop() end
    if rs then rs:stop() end
    if m then m:stop() end
  end)

  -- A driver in each worker of each nginx, started together; their outputs.
  local function run_drivers(args, timeout)
    local drivers = {}
    for i = 1, 2 do
      for w = 0, 1 do drivers[#drivers + 1] = { r = nginxes[i], worker = w, id = ("nginx%d-worker%d"):format(i, w) } end
    end
    -- every driver is started before the shared start time; each then runs in its worker's timer
    local start_at = socket.gettime() + 2
    for _, d in ipairs(drivers) do
      local a = { id = d.id, url = m.http_url, redis_port = rs.port, processes = 2, start_at = start_at }
      for k, v in pairs(args) do a[k] = v end
      local out = d.r:run_on(d.worker, "shared_cases", "start", a)
      assert.equal(d.worker, out.worker)
    end
    assert.is_true(socket.gettime() < start_at, "the drivers were not all started before the start time")
    local outs, deadline = {}, socket.gettime() + timeout
    for i, d in ipairs(drivers) do
      repeat
        outs[i] = d.r:run("shared_cases", "result", { id = d.id })
        if not outs[i] then socket.sleep(0.2) end
      until outs[i] or socket.gettime() > deadline
      assert(outs[i], d.id .. " did not finish")
      assert(not outs[i].failed, d.id .. " failed: " .. tostring(outs[i].failed))
      assert.equal(d.worker, outs[i].worker)
      assert.is_true(outs[i].resty and not outs[i].blocking, d.id .. " did not use resty.redis alone")
      outs[i].id = d.id
    end
    return outs
  end

  it("hold one quota across 2 nginx x 2 workers that configure no limit", function()
    m:config { rate_limit = { rpm = RPM, burst = RPM / 60 } }
    local outs = run_drivers({ prefix = "ngxfleet:", n = CALLS, concurrency = 32 }, 60)
    local ok, first, last, errors = 0, math.huge, 0, {}
    for _, o in ipairs(outs) do
      assert.equal("redis", o.mode, o.id .. " left Redis")
      assert.same({}, o.events, o.id .. " left Redis")
      ok = ok + o.ok
      first, last = math.min(first, o.started), math.max(last, o.finished)
      for kind, n in pairs(o.errors) do errors[kind] = (errors[kind] or 0) + n end
    end
    local c = m:counters()
    local n = #outs * CALLS
    local wall, ideal = last - first, n / (RPM / 60)
    print(("shared limit (ngx): 2 nginx x 2 workers x %d calls, %d/%d succeeded in %.2f s (ideal %.1f s, "
      .. "ratio %.3f); 429s %d (%.2f%% of %d requests)"):format(CALLS, ok, n, wall, ideal, wall / ideal,
      c.rate_limited, 100 * c.rate_limited / c.requests, c.requests))
    assert.same({}, errors)
    assert.equal(n, ok)
    assert.is_true(c.rate_limited <= 0.01 * n, c.rate_limited .. " 429s")
    assert.is_true(wall <= 1.1 * ideal, ("wall %.2f s, ideal %.1f s"):format(wall, ideal))
    -- the limit learned from the mock's headers is the fleet's, in Redis
    local back = assert(sturdy_redis.connect(sturdy_redis.settings { port = rs.port }))
    local key = "ngxfleet:{" .. m.http_url:match("^http://(.*)$") .. "}:limit"
    local learned = back:hget(key, "l1")
    back:quit()
    assert.equal("3000", learned)
  end)

  it("keep a hard-down upstream to about one breaker's min_calls, its probes and a second of traffic", function()
    local outs = run_drivers({
      prefix = "ngxdown:", n = 60, every = 0.1, steps = "503", scenario = "down",
      client = { retry = { attempts = 1 }, breaker = { min_calls = 20, failure_rate = 0.5, open_for = 2, probes = 3 } },
    }, 60)
    -- the workers of one nginx share its breaker: the worker whose call opened it hears the event
    local opened = {}
    for _, o in ipairs(outs) do
      assert.equal(0, o.ok)
      assert.is_true((o.errors.circuit_open or 0) > 0, o.id .. " refused no call")
      for _, e in ipairs(o.events) do if e == "breaker:open" then opened[o.id:match("^nginx%d")] = true end end
    end
    local got = m:scenario("down").count
    local traffic = #outs * 10 -- calls a second
    print(("hard-down upstream (ngx): 2 nginx x 2 workers x 10 calls/s for 6 s sent %d calls (bound: min_calls 20 "
      .. "+ probes 3 + one second of traffic %d = %d)"):format(got, traffic, 20 + 3 + traffic))
    assert.same({ nginx1 = true, nginx2 = true }, opened)
    -- each call counts once in the fleet's window: the breaker needs min_calls of them
    assert.is_true(got >= 20, got .. " calls reached the upstream")
    assert.is_true(got <= 20 + 3 + traffic, got .. " calls reached the upstream")
  end)
end)
