-- Spend caps on the ngx transport, shared by the workers of one nginx through
-- its lua_shared_dict: nginx with 2 workers (spec/support/ngx_runner.lua), a
-- driver in each (spec/ngx/budget_cases.lua), against the mock. The figures
-- are printed.
local anthropic = require "sturdy.anthropic"
local provider = require "sturdy.provider"
local mock = require "spec.support.mock"
local runner = require "spec.support.ngx_runner"
local socket = require "socket"

local PARAMS = { max_tokens = 1000, messages = { { role = "user", content = "What is the capital of France?" } } }

describe("spend caps shared by the workers of one nginx", function()
  local m, r

  setup(function()
    m = assert(mock.start())
    r = assert(runner.start { mock = m, workers = 2, shared_dicts = { sturdy = "4m", results = "1m" } })
  end)

  before_each(function()
    m:reset()
    r:run_on(0, "budget_cases", "reset")
  end)

  teardown(function()
    if r then r:stop() end
    if m then m:stop() end
  end)

  -- The worst case the provider reserves for PARAMS (the drivers' calls).
  local function worst()
    local c = anthropic.new { api_key = "sk-test", base_url = m.http_url, model = "claude-sonnet-4-5" }
    local _, body, estimated = c:_request(PARAMS)
    local usd = provider.reservation(c, body.model, estimated).usd
    c.client:close()
    return usd
  end

  local function state(w, budget)
    local s = r:run_on(w, "budget_cases", "state", { url = m.http_url, budget = budget })
    assert.equal(w, s.worker)
    return s
  end

  -- A driver in each worker, n calls each, started together; their outputs.
  local function round(name, budget, n)
    local start_at = socket.gettime() + 2
    for w = 0, 1 do
      local a = { id = name .. w, round = name, drivers = 2, url = m.http_url, budget = budget, n = n,
                  start_at = start_at }
      assert.equal(w, r:run_on(w, "budget_cases", "start", a).worker)
    end
    assert.is_true(socket.gettime() < start_at, "the drivers were not both started before the start time")
    local outs, deadline = {}, socket.gettime() + 60
    for w = 0, 1 do
      repeat
        outs[w + 1] = r:run("budget_cases", "result", { id = name .. w })
        if not outs[w + 1] then socket.sleep(0.1) end
      until outs[w + 1] or socket.gettime() > deadline
      local o = assert(outs[w + 1], "the driver of worker " .. w .. " did not finish")
      assert(not o.failed, "the driver of worker " .. w .. " failed: " .. tostring(o.failed))
      assert.equal(w, o.worker)
    end
    local ok, spent, refused, by_worker = 0, 0, 0, {}
    for w, o in ipairs(outs) do
      ok, spent, refused = ok + o.ok, spent + o.spent, refused + #o.refusals
      by_worker[w] = o.ok
      for _, e in ipairs(o.refusals) do
        assert.equal("budget_exceeded", e.kind)
        assert.equal("throttled", e.class)
        assert.is_false(e.retryable)
        assert.matches("client's spend cap usd_per_hour would be crossed; nothing was sent", e.detail, 1, true)
        assert.equal(0, e.status or 0)
      end
    end
    return ok, spent, refused, by_worker
  end

  it("hold one cap under 200 concurrent calls split across both workers, and free what replies did not cost",
     function()
    local per_call = worst()
    local cap = per_call * 50
    local budget = { usd_per_hour = cap }
    local ok, spent, refused, by_worker = round("first", budget, 100)
    -- exactly the cap's worth of worst cases went out from both workers
    -- together (a cap kept per worker would have let 100 go); how they split
    -- depends on which worker's calls came first
    assert.equal(50, ok)
    assert.equal(150, refused)
    -- the refused calls never reached the server
    assert.equal(50, m:counters().requests)
    -- each worker sees the whole nginx's settled spend, and nothing reserved
    local seen = state(0, budget)
    assert.same(seen.used, state(1, budget).used)
    assert.near(spent, seen.used, 1e-4)
    assert.is_true(seen.used <= cap)
    assert.equal(0, seen.reserved)
    assert.is_true(spent < cap / 10) -- replies cost a fraction of their worst case
    -- the freed part admits more: as many as its worst cases fit, across both workers
    local expect = math.floor((cap - seen.used) / per_call + 1e-9)
    local ok2, spent2, _, by_worker2 = round("second", budget, 100)
    print(("\n    ngx, 2 workers: cap $%.4f (50 worst cases of $%.6f): %d+%d of 200 sent, spent $%.6f; "
      .. "then %d+%d more of 200 (%d fit), spent $%.6f"):format(cap, per_call, by_worker[1], by_worker[2], spent,
      by_worker2[1], by_worker2[2], expect, spent2))
    assert.equal(expect, ok2)
    assert.is_true(ok2 >= 40)
    assert.equal(50 + ok2, m:counters().requests)
    seen = state(1, budget)
    assert.near(spent + spent2, seen.used, 1e-4)
    assert.is_true(seen.used <= cap)
    assert.equal(0, seen.reserved)
    -- once settled spend fills the cap, a refusal says when the hour frees it
    local filled = r:run_on(0, "budget_cases", "charge", { url = m.http_url, budget = budget, usd = cap - seen.used })
    assert.near(cap, filled.used, 1e-5)
    local out = r:run_on(1, "budget_cases", "raw", { id = "late", url = m.http_url, budget = budget, usd = per_call })
    assert.equal("budget_exceeded", out.kind)
    assert.is_true(out.retry_after > 3500 and out.retry_after <= 3600, tostring(out.retry_after))
    assert.equal(50 + ok2, m:counters().requests)
  end)

  it("let one worker's reservation in flight count in the other's admission, and its settlement free it", function()
    local cap = 1
    local budget = { usd_per_hour = cap }
    -- worker 0: a 2xx whose hold is not settled yet keeps 0.6 of the cap reserved
    local a = r:run_on(0, "budget_cases", "raw", { id = "a", url = m.http_url, budget = budget, usd = 0.6 })
    assert.equal(200, a.status)
    assert.is_true(a.hold)
    assert.near(0.6, a.state.reserved, 1e-9)
    -- worker 1 sees it, and refuses a call that would cross the cap with it, sending nothing
    assert.near(0.6, state(1, budget).reserved, 1e-9)
    local b = r:run_on(1, "budget_cases", "raw", { id = "b", url = m.http_url, budget = budget, usd = 0.6 })
    assert.equal(1, b.worker)
    assert.equal("budget_exceeded", b.kind)
    assert.matches("client's spend cap usd_per_hour would be crossed; nothing was sent", b.detail, 1, true)
    assert.is_nil(b.retry_after) -- the reservation in flight decides when it can pass
    assert.equal(1, m:counters().requests)
    -- worker 0 settles its reply at 0.1: worker 1 sees the spend, and the freed part admits its call
    local settled = r:run_on(0, "budget_cases", "settle", { id = "a", usd = 0.1 })
    assert.near(0.1, settled.used, 1e-9)
    assert.equal(0, settled.reserved)
    local seen = state(1, budget)
    assert.near(0.1, seen.used, 1e-9)
    assert.equal(0, seen.reserved)
    b = r:run_on(1, "budget_cases", "raw", { id = "b", url = m.http_url, budget = budget, usd = 0.6 })
    assert.equal(200, b.status)
    assert.near(0.6, b.state.reserved, 1e-9)
    assert.near(0.6, state(0, budget).reserved, 1e-9)
    assert.equal(2, m:counters().requests)
    r:run_on(1, "budget_cases", "settle", { id = "b", usd = 0.2 })
    seen = state(0, budget)
    assert.near(0.3, seen.used, 1e-9)
    assert.equal(0, seen.reserved)
    -- a client closed before its reply is settled charges the hold in full, for every worker to see
    local c = r:run_on(0, "budget_cases", "raw", { id = "c", url = m.http_url, budget = budget, usd = 0.4 })
    assert.equal(200, c.status)
    assert.near(0.4, state(1, budget).reserved, 1e-9)
    local dropped = r:run_on(0, "budget_cases", "drop", { id = "c" }) -- its state just before the close
    assert.near(0.4, dropped.reserved, 1e-9)
    seen = state(1, budget)
    assert.near(0.7, seen.used, 1e-9)
    assert.equal(0, seen.reserved)
  end)

  it("share a key's cap and a tag's cap the same way", function()
    local budget = { keys = { k1 = { usd_per_hour = 1 } }, tags = { ["*"] = { usd_per_hour = 0.7 } } }
    local function raw(w, id, tag, usd)
      local out = r:run_on(w, "budget_cases", "raw", { id = id, url = m.http_url, budget = budget, usd = usd,
                                                       key = "k1", tag = tag })
      assert.equal(w, out.worker)
      return out
    end
    local a = raw(0, "a", "t1", 0.6)
    assert.equal(200, a.status)
    assert.near(0.6, a.key_reserved, 1e-9)
    -- another tag: its own cap has room, the key's does not
    local b = raw(1, "b", "t2", 0.6)
    assert.equal("budget_exceeded", b.kind)
    assert.matches("key's spend cap usd_per_hour would be crossed", b.detail, 1, true)
    assert.near(0.6, b.key_reserved, 1e-9)
    -- the same tag: the key's cap has room, the tag's does not
    b = raw(1, "b", "t1", 0.2)
    assert.equal("budget_exceeded", b.kind)
    assert.matches("tag's spend cap usd_per_hour would be crossed", b.detail, 1, true)
    assert.equal(1, m:counters().requests)
    r:run_on(0, "budget_cases", "settle", { id = "a", usd = 0.1 })
    b = raw(1, "b", "t1", 0.2)
    assert.equal(200, b.status)
    assert.near(0.2, b.key_reserved, 1e-9)
    assert.near(0.1, b.key_used, 1e-9)
    r:run_on(1, "budget_cases", "settle", { id = "b", usd = 0.1 })
    assert.equal(2, m:counters().requests)
  end)
end)
