-- Non-blocking use against the mock API: submit and poll, cancel, batches,
-- callbacks that fail, closing with calls in flight, a game loop, coroutines.
local sturdy = require "sturdy"
local cjson = require "cjson"
local mock = require "spec.support.mock"

local steps = mock.steps

local now = sturdy.monotime

local FAST = { throttled = 0.01, overloaded = 0.01, transient = 0.01, timeout = 0.01 }

describe("non-blocking use", function()
  local m, client

  setup(function() m = assert(mock.start()) end)
  teardown(function() m:stop() end)
  before_each(function()
    m:reset()
    client = sturdy.client { base_url = m.http_url, retry = { base = FAST } }
  end)
  after_each(function() client:close() end)

  it("returns from 100 submits at once and completes them through poll", function()
    local started = now()
    local handles, fired = {}, 0
    for i = 1, 100 do
      handles[i] = client:submit({ path = "/echo", headers = steps("slow" .. i, "200;delay=500") },
                                 function(res) if res then fired = fired + 1 end end)
    end
    local submitted = now() - started
    assert.is_true(submitted < 0.4, "100 submits took " .. submitted .. " s")
    assert.equal(0, fired)          -- never from submit
    assert.is_false(handles[1]:done())
    assert.is_nil(handles[1]:result())
    while client:poll(0.05) > 0 do end
    assert.equal(100, fired)
    for i = 1, 100 do
      local res = assert(handles[i]:result())
      assert.equal(200, res.status)
    end
  end)

  it("runs until idle and waits on one handle", function()
    local a = client:submit { path = "/echo", headers = steps("wa", "200;delay=200") }
    local b = client:submit { path = "/echo", headers = steps("wb", "200;delay=50") }
    local res = assert(b:wait(5))
    assert.equal(200, res.status)
    assert.is_nil(client:run())
    assert.is_true(a:done())
    assert.equal(0, client:pending())
  end)

  it("gives up waiting after the wait timeout without ending the call", function()
    local h = client:submit { path = "/echo", headers = steps("wt", "200;delay=600") }
    local res, err = h:wait(0.1)
    assert.is_nil(res)
    assert.equal("wait_timeout", err.kind)
    assert.is_false(h:done())
    assert(h:wait(5))
  end)

  it("keeps other requests moving while one waits for its retry", function()
    local slow = client:submit { path = "/echo", headers = steps("rw", "503;retry-after=1|200") }
    local started = now()
    local quick = client:submit { path = "/echo" }
    assert(quick:wait(5))
    assert.is_true(now() - started < 0.5)
    assert.is_false(slow:done())
    assert(slow:wait(5))
  end)

  it("keeps input order in a batch with mixed successes and typed errors", function()
    local reqs = {}
    local want = { "200", "404", "200", "529|200", "401", "200", "drop|200", "429;retry-after=3600", "200", "400" }
    for i, script in ipairs(want) do
      reqs[i] = { path = "/v1/messages", body = '{"model":"m","max_tokens":5,"messages":[]}',
                  headers = steps("b" .. i, script) }
    end
    reqs[8].key = "paused-for-an-hour" -- its 429 pauses its own key, not the others'

    local progress = {}
    local results = client:batch(reqs, { concurrency = 3, on_progress = function(done, total, failed)
      progress[#progress + 1] = { done, total, failed }
    end })
    assert.equal(#want, #results)
    local kinds = {}
    for i, r in ipairs(results) do
      kinds[i] = sturdy.is_error(r) and r.kind or r.status
    end
    assert.same({ 200, "not_found", 200, 200, "auth", 200, 200, "rate_limited", 200, "bad_request" }, kinds)
    assert.equal(#want, #progress)
    assert.same({ #want, #want, 4 }, progress[#progress])
    for i = 2, #progress do assert.equal(progress[i - 1][1] + 1, progress[i][1]) end
  end)

  it("keeps at most `concurrency` requests in flight in a batch", function()
    local reqs = {}
    for i = 1, 12 do reqs[i] = { path = "/echo", headers = steps("c" .. i, "200;delay=100") } end
    local peak = 0
    local results = client:batch(reqs, { concurrency = 4, on_progress = function()
      local s = client:stats()
      if s.running > peak then peak = s.running end
    end })
    assert.equal(12, #results)
    assert.is_true(peak <= 4)
    assert.equal(12, m:counters().requests)
  end)

  it("checks every request of a batch before sending any", function()
    assert.has_error(function()
      client:batch({ { path = "/echo" }, { path = "/echo", bogus = 1 } })
    end, "sturdy: unknown option 'bogus' in request")
    assert.equal(0, m:counters().requests)
  end)

  it("cancels a call in flight: canceled, callback once, nothing more sent", function()
    local calls = {}
    local h = client:submit({ path = "/echo", headers = steps("cx", "200;delay=1000") },
                            function(res, err) calls[#calls + 1] = { res, err } end)
    client:poll(0.1)
    assert.equal(1, m:scenario("cx").count)
    h:cancel()
    assert.equal(0, #calls) -- fires from the next poll
    client:poll(0)
    assert.equal(1, #calls)
    assert.is_nil(calls[1][1])
    assert.equal("canceled", calls[1][2].kind)
    local _, err = h:result()
    assert.equal("canceled", err.kind)
    h:cancel()
    client:poll(0.2)
    assert.equal(1, #calls)
    assert.equal(1, m:scenario("cx").count)
  end)

  it("cancels a call waiting for its retry; no further attempt reaches the server", function()
    local c = sturdy.client { base_url = m.http_url, retry = { base = { overloaded = 0.5 }, jitter = "none" } }
    local h = c:submit { path = "/echo", headers = steps("cw", "503|200") }
    while c:stats().waiting == 0 do c:poll(0.05) end
    h:cancel()
    local _, err = h:wait(1)
    assert.equal("canceled", err.kind)
    local t = now()
    while now() - t < 0.7 do c:poll(0.1) end
    assert.equal(1, m:scenario("cw").count)
    c:close()
  end)

  it("reports a callback that raises and still completes the others", function()
    local ok = 0
    for i = 1, 5 do
      client:submit({ path = "/echo" }, function()
        if i == 3 then error("callback " .. i .. " failed", 0) end
        ok = ok + 1
      end)
    end
    local errors = client:run()
    assert.equal(4, ok)
    assert.same({ "callback 3 failed" }, errors)
    -- with an on_error hook the error goes there instead
    local seen = {}
    local c = sturdy.client { base_url = m.http_url, on_error = function(e) seen[#seen + 1] = e end }
    c:submit({ path = "/echo" }, function() error("boom", 0) end)
    assert.is_nil(c:run())
    assert.same({ "boom" }, seen)
    c:close()
  end)

  it("fires the callbacks of 50 calls in flight once on close, and none after", function()
    local c = sturdy.client { base_url = m.http_url }
    local fired = {}
    for i = 1, 50 do
      c:submit({ path = "/echo", headers = steps("close" .. i, "200;delay=2000") }, function(_, err)
        fired[#fired + 1] = err and err.kind
      end)
    end
    c:poll(0.05)
    c:close()
    assert.equal(50, #fired)
    for _, kind in ipairs(fired) do assert.equal("canceled", kind) end
    c:close()
    assert.equal(50, #fired)
    assert.has_error(function() c:submit { path = "/echo" } end, "sturdy: the client is closed")
  end)

  it("keeps a game loop's poll(0) short while slow requests run", function()
    local durations = {}
    local done = 0
    for i = 1, 32 do
      client:submit({ path = "/echo", headers = steps("g" .. i, "200;delay=200") }, function() done = done + 1 end)
    end
    local frames = 0
    while done < 32 and frames < 600 do
      local t = now()
      client:poll(0)
      durations[#durations + 1] = now() - t
      frames = frames + 1
      local frame_end = t + 0.016
      while now() < frame_end do end -- the rest of the frame: game work
    end
    assert.equal(32, done)
    table.sort(durations)
    local function pct(p) return durations[math.max(1, math.ceil(p * #durations))] * 1000 end
    print(("\n    poll(0) over %d frames: p50 %.3f ms, p95 %.3f ms, p99 %.3f ms, max %.3f ms")
      :format(#durations, pct(0.5), pct(0.95), pct(0.99), pct(1)))
    assert.is_true(pct(0.95) < 10)
    assert.is_true(pct(1) < 100) -- far below the server's 200 ms: nothing waited on it
  end)

  it("lets coroutines wait without blocking each other when the client yields", function()
    local c = sturdy.client { base_url = m.http_url, yield = coroutine.yield }
    local order = {}
    local cos = {}
    for i, delay in ipairs { 300, 50 } do
      cos[i] = coroutine.create(function()
        local res = assert(c:request { path = "/echo", headers = steps("co" .. i, "200;delay=" .. delay) })
        order[#order + 1] = i
        return res.status
      end)
    end
    local alive = #cos
    while alive > 0 do
      alive = 0
      for _, co in ipairs(cos) do
        if coroutine.status(co) ~= "dead" then
          assert(coroutine.resume(co))
          alive = alive + 1
        end
      end
    end
    assert.same({ 2, 1 }, order)
    c:close()
  end)

  it("exposes the sockets and timeout an event loop waits on", function()
    assert.is_nil(client:timeout())
    local h = client:submit { path = "/echo", headers = steps("fd", "200;delay=300") }
    client:poll(0.05)
    local fds = client:fds()
    assert.equal(1, #fds)
    assert.is_number(fds[1].fd)
    assert.is_true(fds[1].read)
    assert.is_number(client:timeout())
    assert(h:wait(5))
  end)

  it("holds the retry budget against 200 concurrent calls to a failing upstream", function()
    local c = sturdy.client { base_url = m.http_url, retry = { base = { overloaded = 0.001 }, attempts = 4 },
                              breaker = false, limits = { concurrency = 200 } }
    local reqs = {}
    for i = 1, 200 do reqs[i] = { path = "/echo", headers = steps("storm", "503") } end
    local started = now()
    local results = c:batch(reqs, { concurrency = 200 })
    local elapsed = now() - started
    local exhausted = 0
    for _, r in ipairs(results) do
      assert.is_true(sturdy.is_error(r))
      if r.stopped == "budget_exhausted" then exhausted = exhausted + 1 end
    end
    local allowance = 3 * (10 + math.ceil(elapsed))
    local got = m:scenario("storm").count
    print(("\n    200 concurrent calls against 503: mock received %d (allowance %d), %d budget_exhausted")
      :format(got, allowance, exhausted))
    assert.is_true(got >= 200)
    assert.is_true(got <= 200 + allowance)
    c:close()
  end)

  it("decodes the echo of a batch request", function()
    local results = client:batch({ { path = "/echo", json = { n = 1 } } })
    assert.same({ n = 1 }, cjson.decode(cjson.decode(results[1].body).body))
  end)
end)
