-- Per-upstream policies against the mock API: circuit breaker through an
-- outage, rate limits learned from headers, 429 pauses, the priority queue
-- and its bounds, and what client:stats(key) shows.
local sturdy = require "sturdy"
local mock = require "spec.support.mock"

local steps = mock.steps

local now = sturdy.monotime

local MESSAGE = '{"model":"claude-test","max_tokens":8,"messages":[{"role":"user","content":"hi"}]}'

describe("upstream policies", function()
  local m

  setup(function() m = assert(mock.start()) end)
  teardown(function() m:stop() end)
  before_each(function() m:reset() end)

  it("keys requests by host and model", function()
    local c = sturdy.client { base_url = m.http_url }
    assert(c:request { path = "/v1/messages", json = { model = "m-one", max_tokens = 5, messages = {} } })
    assert(c:request { path = "/echo" })
    local keys = c:stats().keys
    table.sort(keys)
    local host = m.http_url:match("^http://(.*)$")
    assert.same({ host, host .. "/m-one" }, keys)
    assert.is_nil(c:stats("nobody"))
    c:close()
  end)

  it("learns the provider's limits from headers and shows them in stats", function()
    local events = {}
    local c = sturdy.client { base_url = m.http_url, on_event = function(ev) events[#events + 1] = ev end }
    assert(c:request { path = "/v1/messages", body = MESSAGE, key = "anthropic" })
    local s = c:stats("anthropic")
    assert.equal(4000, s.limits.requests.limit)
    assert.equal(4000, s.limits.requests.learned)
    assert.is_number(s.limits.requests.remaining)
    assert.is_number(s.limits.input_tokens.limit)
    local learned = {}
    for _, ev in ipairs(events) do
      if ev.type == "limit_learned" then learned[ev.dimension] = ev.limit end
    end
    assert.equal(4000, learned.requests)
    assert(c:request { path = "/v1/chat/completions", key = "openai",
                       body = '{"model":"gpt-test","messages":[{"role":"user","content":"hi"}]}' })
    local o = c:stats("openai")
    assert.is_number(o.limits.requests.limit)
    assert.is_number(o.limits.tokens.limit)
    assert.is_number(o.limits.requests.reset_in)
    c:close()
  end)

  it("reports latency percentiles per key, and none for an empty window", function()
    local c = sturdy.client { base_url = m.http_url }
    assert(c:request { path = "/echo", key = "lat" })
    local before = c:stats("lat")
    assert.equal(1, before.latency.count)
    for i = 1, 9 do assert(c:request { path = "/echo", key = "lat", headers = steps("l" .. i, "200;delay=20") }) end
    local s = c:stats("lat")
    assert.equal(10, s.latency.count)
    assert.equal(10, s.ttfb.count)
    assert.is_true(s.latency.p50 >= 0.02)
    assert.is_true(s.latency.p99 >= s.latency.p50)
    assert.is_true(s.latency.max >= s.latency.p99)
    assert.is_true(s.latency.min <= s.latency.p50)
    local fresh = sturdy.client { base_url = m.http_url, breaker = { mode = "disabled" } }
    local h = fresh:submit { path = "/echo", key = "empty", headers = steps("e", "200;delay=300") }
    fresh:poll(0.02)
    local empty = fresh:stats("empty")
    assert.equal(0, empty.latency.count)
    assert.is_nil(empty.latency.p50)
    assert.equal(1, empty.in_flight)
    assert(h:wait(5))
    fresh:close()
    c:close()
  end)

  it("pauses the whole key after a 429 until its retry-after", function()
    local events = {}
    local c = sturdy.client { base_url = m.http_url, on_event = function(ev) events[#events + 1] = ev end }
    assert(c:request { path = "/echo", key = "k429" }) -- ends slow start
    local a = c:submit { path = "/echo", key = "k429", headers = steps("p-a", "429;retry-after=1|200") }
    while m:scenario("p-a").count == 0 do c:poll(0.01) end
    while c:stats("k429").limits.paused_for == nil do c:poll(0.01) end
    local b = c:submit { path = "/echo", key = "k429", headers = steps("p-b", "200") }
    assert(b:wait(5))
    assert(a:wait(5))
    local t_a = m:scenario("p-a").times[1]
    local t_b = m:scenario("p-b").times[1]
    assert.is_true(t_b - t_a >= 0.99, "b went " .. (t_b - t_a) .. " s after the 429")
    local paused
    for _, ev in ipairs(events) do if ev.type == "paused" then paused = ev end end
    assert.equal("k429", paused.key)
    assert.near(1, paused.pause, 1e-9)
    c:close()
  end)

  it("serves the queue by priority, FIFO within a level", function()
    local c = sturdy.client { base_url = m.http_url, limits = { concurrency = 1 } }
    assert(c:request { path = "/echo", key = "prio" })
    local order = {}
    local function go(name, priority, delay)
      c:submit({ path = "/echo", key = "prio", priority = priority,
                 headers = steps("q-" .. name, "200;delay=" .. (delay or 0)) },
               function() order[#order + 1] = name end)
    end
    go("first", "normal", 200)
    go("low1", "low"); go("norm1", "normal"); go("high1", "high"); go("low2", "low"); go("high2", "high")
    assert.equal(5, c:stats("prio").queued)
    assert.equal(1, c:stats("prio").in_flight)
    c:run()
    assert.same({ "first", "high1", "high2", "norm1", "low1", "low2" }, order)
    c:close()
  end)

  it("ends calls with queue_full past the queue bound, and timeout past their deadline while queued", function()
    local c = sturdy.client { base_url = m.http_url, limits = { concurrency = 1, queue = 2 } }
    assert(c:request { path = "/echo", key = "bound" })
    local running = c:submit { path = "/echo", key = "bound", headers = steps("b0", "200;delay=600") }
    local q1 = c:submit { path = "/echo", key = "bound", timeout = { total = 0.2 } }
    local q2 = c:submit { path = "/echo", key = "bound" }
    local over = c:submit { path = "/echo", key = "bound" }
    local _, err = over:wait(1)
    assert.equal("queue_full", err.kind)
    _, err = q1:wait(2)
    assert.equal("total_timeout", err.kind)
    assert(q2:wait(5))
    assert(running:wait(5))
    assert.equal(1, c:stats("bound").queue_full)
    c:close()
  end)

  it("paces requests under a configured rpm", function()
    local c = sturdy.client { base_url = m.http_url, limits = { rpm = 600, burst = 0.1 } }
    local reqs = {}
    for i = 1, 6 do reqs[i] = { path = "/echo", key = "paced", headers = steps("pace", "200") } end
    local t = now()
    c:batch(reqs, { concurrency = 6 })
    local times = m:scenario("pace").times
    assert.equal(6, #times)
    -- 600/min is one every 100 ms: six take at least ~0.5 s
    assert.is_true(times[6] - times[1] >= 0.45, "spread " .. (times[6] - times[1]))
    assert.is_true(now() - t < 3)
    c:close()
  end)

  it("opens on an outage, sends only probes while open, and lets traffic back after it", function()
    local open_for, min_calls, probes = 2, 10, 2
    local events = {}
    local c = sturdy.client {
      base_url = m.http_url,
      retry = { attempts = 1 },
      breaker = { window = 10, min_calls = min_calls, failure_rate = 0.5, open_for = open_for,
                  max_open_for = open_for, probes = probes },
      on_event = function(ev) if ev.type == "breaker" then events[#events + 1] = ev end end,
    }
    local outage = tonumber(os.getenv("STURDY_OUTAGE_S")) or 20
    local started = now()
    local refused, outage_id = 0, "outage"
    -- 20 calls a second against an upstream that answers 503 for `outage` seconds
    while now() - started < outage do
      local _, err = c:request { path = "/echo", key = "sick", headers = steps(outage_id, "503") }
      if err.kind == "circuit_open" then
        refused = refused + 1
        assert.is_true(err.retry_after > 0 and err.retry_after <= open_for)
      end
      local tick = now()
      while now() - tick < 0.05 do c:poll(0.01) end
    end
    local half_opens = 0
    for _, ev in ipairs(events) do if ev.to == "half_open" then half_opens = half_opens + 1 end end
    local got = m:scenario(outage_id).count
    print(("\n    %ds outage: mock received %d calls (min_calls %d + %d probes x %d half-opens), %d refused at once")
      :format(outage, got, min_calls, probes, half_opens, refused))
    assert.is_true(got <= min_calls + probes * half_opens, "received " .. got)
    assert.is_true(half_opens >= 1)
    assert.is_true(refused > outage * 10) -- about 20 calls a second, nearly all refused at once
    -- the upstream is well again: traffic is back within open_for and one probe
    local recovered = now()
    local ok
    repeat
      local res = c:request { path = "/echo", key = "sick" }
      ok = res ~= nil
      if not ok then c:poll(0.05) end
    until ok or now() - recovered > open_for + 5
    local back = now() - recovered
    print(("    traffic back %.2f s after the outage ended"):format(back))
    assert.is_true(ok)
    assert.is_true(back <= open_for + 0.5)
    assert.are_not.equal("open", c:stats("sick").breaker.state)
    c:close()
  end)
end)
