-- Retries against the mock API: classes, server hints, deadlines, budgets,
-- and the error model. What reached the server is read from the mock's counters.
local sturdy = require "sturdy"
local mock = require "spec.support.mock"

local steps = mock.steps

-- Small backoffs so the suite stays quick; a class keeps its own base.
local FAST = { throttled = 0.01, overloaded = 0.02, transient = 0.01, timeout = 0.01, fatal = 0.01 }

describe("retries", function()
  local m

  setup(function() m = assert(mock.start()) end)
  teardown(function() m:stop() end)
  before_each(function() m:reset() end)

  local function client(retry, extra)
    local cfg = { base_url = m.http_url, retry = retry or { base = FAST } }
    for k, v in pairs(extra or {}) do cfg[k] = v end
    return sturdy.client(cfg)
  end

  it("succeeds on the third attempt of 529,529,200 with overloaded-class delays", function()
    local seen = {}
    local c = client({ base = { overloaded = 0.2, transient = 0.01 }, jitter = "none" },
                     { on_retry = function(info) seen[#seen + 1] = info end })
    local res, err = c:request { path = "/v1/messages", body = "{}", headers = steps("ovl", "529|529|200") }
    assert.is_nil(err)
    assert.equal(200, res.status)
    assert.equal(3, m:scenario("ovl").count)
    assert.equal(3, #res.attempts)
    assert.equal(529, res.attempts[1].status)
    assert.equal("overloaded", res.attempts[1].kind)
    -- jitter none: exactly base * 2^(n-1) of the overloaded class
    assert.near(0.2, res.attempts[1].delay, 1e-9)
    assert.near(0.4, res.attempts[2].delay, 1e-9)
    assert.equal(0, res.attempts[3].delay)
    assert.equal(2, #seen)
    assert.equal("overloaded", seen[1].class)
    assert.equal(529, seen[1].status)
    assert.equal(1, seen[1].attempt)
    assert.equal(2, seen[2].attempt)
    assert.is_false(seen[1].hinted)
    c:close()
  end)

  it("draws full-jitter delays within the overloaded class bounds", function()
    local c = client({ base = { overloaded = 0.05 } })
    local res = assert(c:request { path = "/echo", headers = steps("jit", "503|503|200") })
    assert.is_true(res.attempts[1].delay >= 0 and res.attempts[1].delay <= 0.05)
    assert.is_true(res.attempts[2].delay >= 0 and res.attempts[2].delay <= 0.1)
    c:close()
  end)

  it("waits at least retry-after seconds, measured at the server", function()
    local c = client()
    local res = assert(c:request { path = "/v1/messages", body = "{}", headers = steps("ra", "429;retry-after=2|200") })
    assert.equal(200, res.status)
    local times = m:counters().scenarios.ra.times
    assert.equal(2, #times)
    assert.is_true(times[2] - times[1] >= 1.999, "waited " .. (times[2] - times[1]))
    assert.near(2, res.attempts[1].delay, 1e-9)
    c:close()
  end)

  it("honours retry-after as an HTTP-date and retry-after-ms", function()
    local c = client()
    local date = os.date("!%a, %d %b %Y %H:%M:%S GMT", os.time() + 2)
    local res = assert(c:request { path = "/echo", headers = steps("date", "503;retry-after=" .. date .. "|200") })
    assert.is_true(res.attempts[1].delay > 0 and res.attempts[1].delay <= 2.001)
    res = assert(c:request { path = "/echo", headers = steps("ms", "429;retry-after-ms=150|200") })
    assert.near(0.15, res.attempts[1].delay, 1e-9)
    c:close()
  end)

  it("falls back to computed backoff for a garbage or past retry-after", function()
    local c = client({ base = FAST, jitter = "none" })
    local res = assert(c:request { path = "/echo", headers = steps("junk", "503;retry-after=soon|200") })
    assert.near(0.02, res.attempts[1].delay, 1e-9)
    res = assert(c:request { path = "/echo",
                             headers = steps("past", "503;retry-after=Sun, 06 Nov 1994 08:49:37 GMT|200") })
    assert.near(0.02, res.attempts[1].delay, 1e-9)
    c:close()
  end)

  it("returns at once with retry_after set when the hint is beyond honor_retry_after", function()
    local c = client()
    local res, err = c:request { path = "/v1/messages", body = "{}",
                                 headers = steps("long", "429;retry-after=3600|200") }
    assert.is_nil(res)
    assert.equal("rate_limited", err.kind)
    assert.equal(3600, err.retry_after)
    assert.equal(1, m:scenario("long").count)
    assert.matches("retry after 3600s", tostring(err))
    c:close()
  end)

  for _, status in ipairs { 400, 401, 403, 404, 413, 422 } do
    it("tries a " .. status .. " exactly once", function()
      local c = client()
      local _, err = c:request { path = "/v1/messages", body = "{}", headers = steps("f" .. status, tostring(status)) }
      assert.equal(status, err.status)
      assert.equal("fatal", err.class)
      assert.is_false(err.retryable)
      assert.equal(1, m:scenario("f" .. status).count)
      c:close()
    end)
  end

  it("retries 408 and 409 like transient errors", function()
    local c = client()
    assert(c:request { path = "/echo", headers = steps("r408", "408|200") })
    assert(c:request { path = "/echo", headers = steps("r409", "409|200") })
    assert.equal(2, m:scenario("r408").count)
    assert.equal(2, m:scenario("r409").count)
    c:close()
  end)

  it("retries a connection dropped before the headers", function()
    local c = client()
    local res = assert(c:request { path = "/v1/messages", body = "{}", headers = steps("drop", "drop|200") })
    assert.equal(200, res.status)
    assert.equal("connection", res.attempts[1].kind)
    assert.equal(2, m:scenario("drop").count)
    c:close()
  end)

  it("obeys x-should-retry in both directions", function()
    local c = client()
    local _, err = c:request { path = "/echo", headers = steps("nsr", "500;should-retry=false|200") }
    assert.equal(500, err.status)
    assert.equal(1, m:scenario("nsr").count)
    local res = assert(c:request { path = "/echo", headers = steps("sr", "400;should-retry=true|200") })
    assert.equal(200, res.status)
    assert.equal(2, m:scenario("sr").count)
    c:close()
  end)

  it("makes at most two attempts with a 3 s deadline and 2 s backoffs", function()
    local c = client({ base = { overloaded = 2 }, jitter = "none" }, { timeout = { total = 3 } })
    local _, err = c:request { path = "/echo", headers = steps("dl", "503") }
    assert.equal("overloaded", err.kind)
    assert.equal(2, m:scenario("dl").count)
    assert.equal(2, #err.attempts)
    c:close()
  end)

  it("gives up after the configured number of attempts", function()
    local c = client({ base = FAST, attempts = 3 })
    local _, err = c:request { path = "/v1/messages", body = "{}", headers = steps("max", "529") }
    assert.equal("overloaded", err.kind)
    assert.equal("overloaded_error", err.type)
    assert.is_true(err.retryable)
    assert.equal(3, #err.attempts)
    assert.equal(3, m:scenario("max").count)
    assert.truthy(err.request_id)
    c:close()
  end)

  it("lets retry_on and never_retry_on change the class table", function()
    local c = client({ base = FAST, never_retry_on = { 503 }, retry_on = { "fatal" } })
    local _, err = c:request { path = "/echo", headers = steps("n503", "503|200") }
    assert.equal(503, err.status)
    assert.equal(1, m:scenario("n503").count)
    assert(c:request { path = "/echo", headers = steps("y400", "400|200") })
    assert.equal(2, m:scenario("y400").count)
    c:close()
  end)

  describe("streamed calls", function()
    local STREAM = '{"model":"claude-test","max_tokens":16,"stream":true,'
      .. '"messages":[{"role":"user","content":"hello there"}]}'

    it("hands the body out as it arrives", function()
      local c = client()
      local chunks = {}
      local res = assert(c:request { path = "/v1/messages", body = STREAM,
                                     on_data = function(chunk) chunks[#chunks + 1] = chunk end })
      local all = table.concat(chunks)
      assert.matches("event: message_start", all, 1, true)
      assert.matches("event: message_stop", all, 1, true)
      assert.equal("", res.body)
      c:close()
    end)

    it("retries a failure that came before any byte reached the caller", function()
      local c = client()
      local chunks = {}
      local res = assert(c:request { path = "/v1/messages", body = STREAM, headers = steps("s-drop", "drop|200"),
                                     on_data = function(chunk) chunks[#chunks + 1] = chunk end })
      assert.equal(2, #res.attempts)
      assert.matches("message_stop", table.concat(chunks), 1, true)
      c:close()
    end)

    it("never retries once bytes reached the caller, and says so", function()
      local c = client()
      local got = 0
      local _, err = c:request { path = "/v1/messages", body = STREAM, timeout = { idle = 0.2 },
                                 headers = steps("s-stall", "stall_mid;stall=1000|200"),
                                 on_data = function(chunk) got = got + #chunk end }
      assert.is_true(got > 0)
      assert.equal("idle_timeout", err.kind)
      assert.is_true(err.committed)
      assert.equal(1, m:scenario("s-stall").count)
      c:close()
    end)

    it("cancels when on_data returns false", function()
      local c = client()
      local _, err = c:request { path = "/v1/messages", body = STREAM, headers = steps("s-cancel", "200;drip=100"),
                                 on_data = function() return false end }
      assert.equal("canceled", err.kind)
      assert.equal("canceled", err.class)
      c:close()
    end)

    it("lets an error raised in on_data reach the caller", function()
      local c = client()
      assert.has_error(function()
        c:request { path = "/v1/messages", body = STREAM, on_data = function() error("boom", 0) end }
      end, "boom")
      assert(c:request { path = "/echo" })
      c:close()
    end)
  end)

  it("stops a retry storm with the budget: 300 calls against a constant 503", function()
    -- the breaker is off here: this is the budget's own bound
    local c = client({ base = { overloaded = 0.001 }, attempts = 4 }, { breaker = false })
    local started = os.time()
    local exhausted = 0
    for _ = 1, 300 do
      local _, err = c:request { path = "/echo", headers = steps("storm", "503") }
      assert.truthy(err)
      if err.stopped == "budget_exhausted" then
        -- the last attempt's error stays, and says the budget stopped the retries
        exhausted = exhausted + 1
        assert.equal("overloaded", err.kind)
        assert.equal(503, err.status)
        assert.is_true(err.retryable)
        assert.matches("retry budget is spent", tostring(err), 1, true)
      end
    end
    local elapsed = os.time() - started + 1
    -- the default budget: 3 retries/s over a 10 s window, plus 20% of successes (none here)
    local allowance = 3 * math.max(10, elapsed + 10)
    local got = m:scenario("storm").count
    assert.is_true(got <= 300 + allowance, ("mock received %d, allowance %d"):format(got, allowance))
    assert.is_true(got >= 300)
    assert.is_true(exhausted > 250)
    c:close()
  end)
end)
