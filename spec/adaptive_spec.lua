-- Adaptive concurrency against the mock's capacity model: an upstream that
-- serves 8 calls at full speed, shares its capacity among more (each slower),
-- and answers 529 to a call that would make more than 16 in service. The same
-- batch of calls goes out with a fixed limit of 64 and with the adaptive one
-- (to a path of the mock without rate-limit headers, so only the cap paces them).
local sturdy = require "sturdy"
local mock = require "spec.support.mock"

local CALLS = 600

describe("adaptive concurrency", function()
  local m

  setup(function() m = assert(mock.start()) end)
  teardown(function() m:stop() end)
  before_each(function() m:reset() end)

  -- windows of a quarter second: about five latencies of this upstream
  local ADAPTIVE = { adaptive = { window = 0.25 } }

  local function run(concurrency)
    m:reset()
    assert(m:config { capacity = { knee = 8, cliff = 16, work = 40 } })
    local client = sturdy.client {
      base_url = m.http_url, breaker = false,
      retry = { attempts = 6, base = 0.02, cap = 0.2, budget = false },
      limits = { concurrency = concurrency, queue = CALLS },
    }
    local reqs = {}
    for i = 1, CALLS do
      reqs[i] = { path = "/v1/work", json = { model = "claude-sonnet-4-5", max_tokens = 8,
                                                  messages = { { role = "user", content = "call " .. i } } } }
    end
    local t0 = sturdy.monotime()
    local results = client:batch(reqs, { concurrency = 64 })
    local seconds = sturdy.monotime() - t0
    local ok = 0
    for _, r in ipairs(results) do
      if getmetatable(r) == sturdy.Response then ok = ok + 1 end
    end
    local key = client:key_for(reqs[1])
    local stats = client:stats(key)
    client:close()
    local counters = m:counters()
    assert(m:config { capacity = false })
    return { ok = ok, seconds = seconds, rejected = counters.capacity.rejected,
             max_in = counters.capacity.max_in_service, stats = stats }
  end

  it("sends far fewer calls into the cliff than a fixed limit of 64", function()
    local fixed = run(64)
    local adaptive = run(ADAPTIVE)
    print(string.format("\n    %d calls, knee 8, cliff 16: fixed 64: %d 529s, %d ok in %.2f s (most in service %d); "
                        .. "adaptive: %d 529s, %d ok in %.2f s (most in service %d, limit now %d)",
                        CALLS, fixed.rejected, fixed.ok, fixed.seconds, fixed.max_in, adaptive.rejected, adaptive.ok,
                        adaptive.seconds, adaptive.max_in, adaptive.stats.adaptive.limit))
    assert.is_true(fixed.rejected >= 50)
    assert.is_true(adaptive.rejected * 5 <= fixed.rejected)
    assert.equal(CALLS, adaptive.ok)
    -- the limit settled near the knee, not at the cliff
    assert.is_true(adaptive.stats.adaptive.limit >= 4 and adaptive.stats.adaptive.limit <= 16)
    assert.is_nil(fixed.stats.adaptive)
  end)

  it("keeps the limit within min and max, and shows it in the key's stats", function()
    -- one call at a time at full speed: each call more in service slows every one, an
    -- inflation no scheduling noise hides; the limit starts at its min and learns that
    assert(m:config { capacity = { knee = 1, cliff = 100, work = 10 } })
    local client = sturdy.client {
      base_url = m.http_url,
      limits = { concurrency = { adaptive = { min = 6, max = 10, initial = 6, window = 0.1 } } },
    }
    local reqs = {}
    for i = 1, 200 do reqs[i] = { path = "/v1/work", json = { model = "m", messages = {} } } end
    client:batch(reqs, { concurrency = 40 })
    local s = client:stats(client:key_for(reqs[1]))
    client:close()
    assert(m:config { capacity = false })
    -- growing inflated the latency: the limit shrank back, never below its min
    assert.is_true(s.adaptive.shrinks_latency >= 1)
    assert.is_true(s.adaptive.limit >= 6 and s.adaptive.limit <= 8)
    assert.is_true(m:counters().capacity.max_in_service <= 10)
    assert.is_true(s.adaptive.baseline > 0.005 and s.adaptive.baseline < 0.2)
  end)

  it("refuses a mistyped setting, naming it", function()
    assert.has_error(function() sturdy.client { limits = { concurrency = "adaptve" } } end,
      'sturdy: option \'concurrency\' in client options.limits must be a whole number, "adaptive" or '
      .. '{ adaptive = { min =, max = } }, got "adaptve"')
    assert.has_error(function() sturdy.client { limits = { concurrency = { adaptive = { min = 0 } } } } end,
      "sturdy: option 'min' in client options.limits.concurrency.adaptive must be a whole number >= 1, got number")
    assert.has_error(function() sturdy.client { limits = { concurrency = { adaptive = { max = 2, min = 3 } } } } end,
      "sturdy: option 'max' in client options.limits.concurrency.adaptive must be at least its min (3), got 2")
    assert.has_error(function() sturdy.client { limits = { concurrency = { adaptiv = {} } } } end,
      "sturdy: unknown option 'adaptiv' in client options.limits.concurrency")
  end)
end)
