-- sturdy.alerts in virtual time: real calls to the mock API, a clock the
-- spec moves. Each rule fires exactly once on crossing its threshold and
-- clears exactly once, and noise inside the band fires nothing.
local sturdy = require "sturdy"
local alerts = require "sturdy.alerts"
local anthropic = require "sturdy.anthropic"
local mock = require "spec.support.mock"

local steps = mock.steps

describe("alerts", function()
  local m

  setup(function() m = assert(mock.start()) end)
  teardown(function() m:stop() end)

  -- A client watched by alerts on a virtual clock; returns the client, the
  -- alerts, the list of alerts fired, and a function to move the clock.
  local function watched(rules, client_options)
    local now = 1000
    local fired = {}
    local cfg = { base_url = m.http_url, retry = { attempts = 1 }, breaker = false }
    for k, v in pairs(client_options or {}) do cfg[k] = v end
    local c = sturdy.client(cfg)
    local a = alerts.new { rules = rules, clock = function() return now end,
                           on_alert = function(x) fired[#fired + 1] = x end }
    a:watch(c)
    return c, a, fired, function(dt) now = now + dt end
  end

  local function states(fired)
    local s = {}
    for i, x in ipairs(fired) do s[i] = x.state end
    return table.concat(s, ",")
  end

  it("success rate: one fire on crossing, none for noise in the band, one clear", function()
    local c, _, fired, tick = watched { { metric = "success_rate", below = 0.5, clear = 0.8, min_calls = 10,
                                         window = 60 } }
    local n = 0
    local function call(ok)
      n = n + 1
      tick(0.1)
      c:request { path = "/echo", key = "k", headers = steps("s" .. n, ok and "200" or "400") }
    end
    -- ten calls, 6 good: 0.6 is in the band (0.5 .. 0.8), nothing fires
    for i = 1, 10 do call(i <= 6) end
    assert.equal("", states(fired))
    -- 2 good then bad ones: it fires at the first call below 0.5 (8 of 17), once
    for i = 1, 10 do call(i <= 2) end
    assert.equal("firing", states(fired))
    assert.equal("success_rate", fired[1].rule)
    assert.equal("k", fired[1].key)
    assert.near(8 / 17, fired[1].value, 1e-12)
    assert.equal(0.5, fired[1].threshold)
    -- noise back and forth inside the band (0.55 .. 0.75): no second fire, no clear
    for _ = 1, 30 do
      call(true)
      call(true)
      call(false)
    end
    local r = fired[#fired]
    assert.equal("firing", states(fired))
    assert.equal(1, #fired)
    -- good calls until the rate is above 0.8: one clear
    for _ = 1, 200 do call(true) end
    assert.equal("firing,cleared", states(fired))
    assert.is_true(fired[2].value > 0.8)
    assert.equal(r, fired[1])
    c:close()
  end)

  it("p99: fires once on slow calls, clears once the slow ones leave the window", function()
    local c, a, fired, tick = watched { { metric = "p99", above = 0.15, clear = 0.05, min_calls = 5, window = 60 } }
    for i = 1, 5 do
      tick(1)
      assert(c:request { path = "/echo", key = "slow", headers = steps("p" .. i, "200") })
    end
    assert.equal("", states(fired))
    tick(1)
    assert(c:request { path = "/echo", key = "slow", headers = steps("p-slow", "200;delay=200") })
    assert.equal("firing", states(fired))
    assert.is_true(fired[1].value >= 0.15)
    -- fast calls do not bring p99 of this window below clear while the slow one is in it
    for i = 1, 5 do
      tick(1)
      assert(c:request { path = "/echo", key = "slow", headers = steps("q" .. i, "200") })
    end
    assert.equal("firing", states(fired))
    -- a minute later, fast calls only: it clears, once
    tick(61)
    for i = 1, 6 do
      tick(1)
      assert(c:request { path = "/echo", key = "slow", headers = steps("r" .. i, "200") })
    end
    assert.equal("firing,cleared", states(fired))
    a:check()
    assert.equal(2, #fired)
    c:close()
  end)

  it("429 rate and retry rate fire and clear; a check after the window empties clears", function()
    local c, a, fired, tick = watched({
      { metric = "rate_429", above = 0.3, clear = 0.1, min_calls = 4, window = 10 },
      { metric = "retry_rate", above = 0.3, clear = 0.1, min_calls = 4, window = 10, name = "retries" },
    }, { retry = { attempts = 2, base = 0.001, cap = 0.002 } })
    for i = 1, 4 do
      tick(0.5)
      assert(c:request { path = "/echo", key = "t", headers = steps("ok" .. i, "200") })
    end
    assert.equal("", states(fired))
    for i = 1, 3 do
      tick(0.5)
      assert(c:request { path = "/echo", key = "t", headers = steps("thr" .. i, "429;retry-after=0|200") })
    end
    -- 3 of 10 attempts were 429s and retries: not above 0.3 yet
    assert.equal("", states(fired))
    tick(0.5)
    assert(c:request { path = "/echo", key = "t", headers = steps("thr4", "429;retry-after=0|200") })
    assert.equal("firing,firing", states(fired))
    local names = { fired[1].rule, fired[2].rule }
    table.sort(names)
    assert.same({ "rate_429", "retries" }, names)
    -- traffic stops: a check after the window has passed clears both, once each
    tick(11)
    a:check()
    a:check()
    assert.equal("firing,firing,cleared,cleared", states(fired))
    assert.is_nil(fired[3].value)
    assert.same({}, a:firing())
    c:close()
  end)

  it("cost per hour sums provider costs; per-day windows hold a day", function()
    local price = 3.3e-05 -- the mock's usage (1 in, 2 out) at sturdy.prices' claude-sonnet-4-5 price
    local c, a, fired, tick = watched {
      { metric = "cost_per_hour", above = 3.5 * price, clear = 1.5 * price },
      { metric = "cost_per_day", above = 5.5 * price, clear = 0.5 * price },
    }
    local claude = anthropic.new { client = c, api_key = "sk-ant-alerts", model = "claude-sonnet-4-5" }
    local ask = { max_tokens = 16, messages = { { role = "user", content = "hi" } } }
    for _ = 1, 4 do
      tick(60)
      local r = assert(claude:messages(ask))
      assert.near(price, r.cost, 1e-12)
    end
    assert.equal("firing", states(fired))
    assert.equal("cost_per_hour", fired[1].rule)
    -- two hours later: one more call; the hour holds one call (below clear 1.5), the day five
    tick(7200)
    assert(claude:messages(ask))
    assert.equal("firing,cleared", states(fired))
    assert(claude:messages(ask))
    assert.equal("firing,cleared,firing", states(fired))
    assert.equal("cost_per_day", fired[3].rule)
    -- a day later it clears
    tick(86400)
    a:check()
    assert.equal("firing,cleared,firing,cleared", states(fired))
    c:close()
  end)

  it("works as client options, and refuses bad rules naming them", function()
    local fired = {}
    local c = sturdy.client { base_url = m.http_url, retry = { attempts = 1 },
                              alerts = { { metric = "success_rate", below = 0.9, clear = 0.95, min_calls = 2 } },
                              on_alert = function(x) fired[#fired + 1] = x end }
    for i = 1, 2 do c:request { path = "/echo", headers = steps("opt" .. i, "404") } end
    assert.equal(1, #fired)
    assert.equal(0, fired[1].value)
    c:close()
    assert.has_error(function() alerts.new { rules = { { metric = "p95", above = 1, clear = 0 } } } end,
                     "sturdy: alert rule #1: metric must be success_rate, p99, rate_429, retry_rate, "
                     .. "cost_per_hour or cost_per_day, got p95")
    assert.has_error(function() alerts.new { rules = { { metric = "p99", above = 1 } } } end,
                     "sturdy: alert rule #1 (p99) needs clear: the value where the alert clears")
    assert.has_error(function() alerts.new { rules = { { metric = "p99", above = 1, clear = 2 } } } end,
                     "sturdy: alert rule #1 (p99): clear (2) must be at most above (1)")
    assert.has_error(function() alerts.new { rules = { { metric = "p99", above = 0 / 0, clear = 0 } } } end)
    assert.has_error(function() alerts.new { rules = { { metric = "p99", above = 1, below = 0, clear = 0 } } } end,
                     "sturdy: alert rule #1 (p99) needs one of above or below")
    assert.has_error(function() sturdy.client { on_alert = function() end } end,
                     "sturdy: option 'on_alert' needs option 'alerts' or 'budget'")
    assert.has_error(function() alerts.new { rules = { { metric = "p99", above = 1, clear = 0 } }, clock = 5 } end,
                     "sturdy: option 'clock' must be a function, got number")
  end)
end)
