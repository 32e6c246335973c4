-- The client on both transports: every case of spec/ngx/transport_cases.lua
-- runs in busted on the curl transport and inside nginx on the ngx transport
-- (cosockets, light threads, state in a shared dict), and the same things are
-- asserted of both. Then what only nginx has: the phases, the curl engine never
-- loaded there, state shared by clients and by two workers, misconfiguration.
local mock = require "spec.support.mock"
local runner = require "spec.support.ngx_runner"
local cases = require "spec.ngx.transport_cases"

local TRANSPORTS = { "curl", "ngx" }

-- Locations where nginx allows no cosocket: a call forced onto ngx there must
-- raise naming the phase. The filter and log phases leave the message in the dict.
local PHASE_LOCATIONS = [[
    location = /phase/set {
      set_by_lua_block $phase_error {
        local c = require("sturdy").client { base_url = "http://127.0.0.1:1", transport = "ngx" }
        local ok, err = pcall(c.request, c, { path = "/echo" })
        return ok and "no error" or tostring(err)
      }
      return 200 $phase_error;
    }
    location = /phase/header_filter {
      return 200 "body";
      header_filter_by_lua_block {
        local c = require("sturdy").client { base_url = "http://127.0.0.1:1", transport = "ngx" }
        local ok, err = pcall(c.request, c, { path = "/echo" })
        ngx.shared.sturdy:set("phase:header_filter", ok and "no error" or tostring(err))
      }
    }
    location = /phase/log {
      return 200 "ok";
      log_by_lua_block {
        local c = require("sturdy").client { base_url = "http://127.0.0.1:1", transport = "ngx" }
        local ok, err = pcall(c.request, c, { path = "/echo" })
        ngx.shared.sturdy:set("phase:log", ok and "no error" or tostring(err))
      }
    }
    location = /phase/result {
      content_by_lua_block { ngx.print(ngx.shared.sturdy:get("phase:" .. ngx.var.arg_name) or "none") }
    }
]]

describe("both transports", function()
  local m, r, dns
  local n = 0

  setup(function()
    m = assert(mock.start())
    dns = assert(runner.spawn("dns_server.lua"))
    r = assert(runner.start { mock = m, shared_dicts = { sturdy = "4m" }, server = PHASE_LOCATIONS,
                              resolver = "127.0.0.1:" .. dns.port .. " ipv6=off" })
  end)

  teardown(function()
    if r then r:stop() end
    if dns then dns:stop() end
    if m then m:stop() end
  end)

  local function mock_info()
    return { http_url = m.http_url, https_url = m.https_url, port = m.port, tls_port = m.tls_port, ca_file = m.ca_file }
  end

  -- Runs a case on one transport: its output and the scenario id it used.
  local function run(case, transport, args)
    n = n + 1
    local a = { transport = transport, id = ("t%d%s"):format(n, transport) }
    for k, v in pairs(args or {}) do a[k] = v end
    if transport == "ngx" then return r:run("transport_cases", case, a), a.id end
    return cases[case]({ args = a, mock = mock_info(), phase = "busted", vars = {} }), a.id
  end

  -- One `it` per transport, with the same assertions.
  local function both(name, case, check, args)
    for _, transport in ipairs(TRANSPORTS) do
      it(name .. " (" .. transport .. ")", function()
        local out, id = run(case, transport, args)
        check(out, id, transport)
      end)
    end
  end

  describe("providers", function()
    both("decode a reply with usage, cost, request id and learned limits", "anthropic messages", function(out)
      assert.equal("Echo: Hello there", out.text)
      assert.equal("end_turn", out.stop_reason)
      assert.equal("claude-sonnet-4-5", out.model)
      assert.matches("^req_", out.request_id)
      assert.is_true(out.input > 0 and out.output > 0)
      assert.near((out.input * 3 + out.output * 15) / 1e6, out.cost, 1e-12)
      assert.equal(1, out.attempts)
      assert.equal(4000, out.learned)
      assert.equal(1, out.calls)
      assert.is_true(out.latency > 0)
    end)

    both("speak OpenAI's chat completions", "openai chat", function(out)
      assert.matches("^Echo: Hello", out.text)
      assert.is_true(out.input > 0 and out.output > 0)
      assert.equal(1, out.attempts)
    end)

    both("retry an overloaded reply", "provider retries", function(out, id)
      assert.equal(3, #out.attempts)
      assert.equal("overloaded", out.attempts[1].kind)
      assert.equal(529, out.attempts[1].status)
      assert.is_nil(out.attempts[3].kind)
      assert.equal(3, m:scenario(id).count)
    end)

    both("type errors by status, with the provider's type and no key", "provider errors", function(out)
      assert.same({ "bad_request", 400, "invalid_request_error", false, 1 },
                  { out["400"].kind, out["400"].status, out["400"].type, out["400"].retryable, out["400"].attempts })
      assert.equal("auth", out["401"].kind)
      assert.equal("not_found", out["404"].kind)
      local long = out["529;retry-after=3600"]
      assert.same({ "overloaded", "hint_too_long", 3600, true },
                  { long.kind, long.stopped, long.retry_after, long.retryable })
      for _, e in pairs(out) do
        assert.is_true(e.is_error)
        assert.is_false(e.got_reply)
        assert.is_nil(e.text:find("sk-ant-transport", 1, true))
      end
    end)
  end)

  describe("streams", function()
    both("yield events in order and collect the non-streamed message", "anthropic stream", function(out)
      assert.equal("message_start", out.types[1])
      assert.equal("message_stop", out.types[#out.types])
      assert.equal(out.plain, out.text)
      assert.equal(out.plain_output, out.output)
      assert.equal(1, out.attempts)
    end)

    both("retry an error event that comes before any delta", "stream error before a delta", function(out, id)
      assert.equal("message_start", out.types[1])
      assert.equal("message_stop", out.types[#out.types])
      for _, t in ipairs(out.types) do assert.are_not.equal("error", t) end
      assert.equal(2, #out.attempts)
      assert.equal("overloaded", out.attempts[1].kind)
      assert.equal(2, m:scenario(id).count)
    end)

    both("report an error event after a delta as committed", "stream error after a delta", function(out, id)
      assert.equal("error", out.types[#out.types])
      assert.is_true(#out.types >= 3)
      assert.same({ "overloaded", "overloaded_error", true }, { out.err.kind, out.err.type, out.err.committed })
      assert.equal(1, m:scenario(id).count)
    end)

    both("turn a cut stream into stream_truncated", "stream truncated", function(out)
      assert.equal("error", out.types[#out.types])
      assert.equal("stream_truncated", out.err.kind)
      assert.equal("stream_truncated", out.openai.kind)
    end)

    both("read OpenAI's chunks to [DONE], and retry an early error chunk", "openai stream", function(out)
      assert.equal("done", out.last)
      assert.equal(out.plain, out.text)
      assert.equal(2, #out.retried)
      assert.equal("server", out.retried[1].kind)
    end)

    both("deliver events to on_event from poll", "stream on_event", function(out)
      assert.equal(0, out.before)
      assert.equal("message_stop", out.last)
      assert.matches("^Echo: ", out.text)
    end)

    both("hand the body to on_data as it arrives, commit, retry before, cancel", "on_data", function(out, id)
      assert.equal("", out.body)
      assert.is_true(out.has_start and out.has_stop)
      assert.same({ "idle_timeout", true }, { out.stalled.kind, out.stalled.committed })
      assert.is_true(out.got > 0)
      assert.equal(1, m:scenario(id).count)
      assert.equal(2, out.retried_attempts)
      assert.is_true(out.retried_stop)
      assert.is_true(out.raised)
      assert.equal(200, out.after)
    end)
  end)

  describe("retries", function()
    both("wait base * 2^n per class and tell on_retry", "retry delays", function(out, id)
      assert.equal(200, out.status)
      assert.near(0.2, out.attempts[1].delay, 1e-9)
      assert.near(0.4, out.attempts[2].delay, 1e-9)
      assert.equal(0, out.attempts[3].delay)
      assert.equal(2, #out.retries)
      assert.same({ "overloaded", 529, 1, false }, { out.retries[1].class, out.retries[1].status,
                                                      out.retries[1].attempt, out.retries[1].hinted })
      assert.equal(2, out.retries[2].attempt)
      assert.equal(3, m:scenario(id).count)
    end)

    both("wait retry-after, measured at the server", "retry after", function(out, id)
      assert.equal(200, out.status)
      local times = m:scenario(id).times
      assert.is_true(times[2] - times[1] >= 0.99, "waited " .. (times[2] - times[1]))
    end)

    both("stop for a long hint, a fatal status, the attempts, the deadline; obey x-should-retry", "retry stops",
      function(out)
        assert.same({ "overloaded", "hint_too_long", 3600 }, { out.hint.kind, out.hint.stopped, out.hint.retry_after })
        assert.same({ "bad_request", false, 1 }, { out.fatal.kind, out.fatal.retryable, out.fatal.attempts })
        assert.is_nil(out.fatal.stopped)
        assert.same({ "overloaded", "attempts", 2 }, { out.attempts.kind, out.attempts.stopped, out.attempts.attempts })
        assert.same({ "overloaded", "deadline" }, { out.deadline.kind, out.deadline.stopped })
        assert.equal("total_timeout", out.total.kind)
        assert.same({ false, 1 }, { out.should_not.retryable, out.should_not.attempts })
        assert.equal(2, out.should)
      end)

    both("stop a retry storm with the budget", "retry budget", function(out)
      assert.is_true(out.exhausted > 80, "exhausted " .. out.exhausted)
    end)

    both("type transport failures as the curl engine does", "transport failures", function(out)
      assert.same({ "connection", "transient" }, { out.drop.kind, out.drop.class })
      assert.same({ "first_byte_timeout", "timeout" }, { out.first_byte.kind, out.first_byte.class })
      assert.same({ "idle_timeout", "timeout", 200 }, { out.idle.kind, out.idle.class, out.idle.status })
      -- libcurl refuses a garbage status line before sturdy sees a byte of it, and
      -- the server did answer, with garbage: bad_response on both transports
      assert.equal("bad_response", out.garbage.kind)
      assert.equal("fatal", out.garbage.class)
      assert.same({ "response_too_large", "fatal", 200 }, { out.huge.kind, out.huge.class, out.huge.status })
      assert.same({ "connection", "transient" }, { out.refused.kind, out.refused.class })
      for _, e in pairs(out) do assert.equal(1, e.attempts) end
    end)

    both("verify TLS against the trusted CA", "tls", function(out)
      assert.is_nil(out.err)
      assert.equal(200, out.status)
      assert.is_true(out.tls > 0)
    end)
  end)

  describe("policies", function()
    both("open the breaker after min_calls failures and refuse without sending", "breaker", function(out, id)
      assert.equal(10, m:scenario(id).count)
      assert.equal(20, out.refused)
      assert.is_true(out.retry_after > 0 and out.retry_after <= 30)
      assert.equal("open", out.state)
      assert.equal(1, out.opens)
      assert.equal(20, out.circuit_open)
      assert.same({ "closed>open" }, out.events)
    end)

    both("pace calls under a configured rpm", "paced", function(out, id)
      assert.equal(6, out.ok)
      assert.equal(600, out.limit)
      assert.is_true(out.paced >= 1)
      local times = m:scenario(id).times
      assert.equal(6, #times)
      assert.is_true(times[6] - times[1] >= 0.45, "spread " .. (times[6] - times[1]))
    end)

    both("pause the whole key after a 429 until its retry-after", "429 pause", function(out, id)
      assert.equal(id, out.paused.key)
      assert.near(1, out.paused.pause, 1e-9)
      local t_a, t_b = m:scenario(id .. "a").times[1], m:scenario(id .. "b").times[1]
      assert.is_true(t_b - t_a >= 0.99, "b went " .. (t_b - t_a) .. " s after the 429")
    end)

    both("serve the queue by priority, FIFO within a level", "priority queue", function(out)
      assert.same({ "first", "high1", "high2", "norm1", "low1", "low2" }, out.order)
      assert.equal(5, out.queued)
      assert.equal(1, out.in_flight)
    end)

    both("end calls with queue_full and, queued past their deadline, total_timeout", "queue bounds", function(out)
      assert.equal("queue_full", out.over.kind)
      assert.equal("total_timeout", out.q1.kind)
      assert.same({ 200, 200, 1 }, { out.q2, out.running, out.queue_full })
    end)
  end)

  describe("handles", function()
    both("keep a batch's order with mixed results", "batch", function(out)
      assert.same({ 200, "not_found", 200, 200, "auth", 200, 200, 200, "bad_request" }, out.results)
      assert.equal(9, out.progress)
    end)

    both("cancel running and queued calls and free the key", "cancel", function(out)
      table.sort(out.fired)
      assert.same({ "queued:canceled", "running:canceled" }, out.fired)
      assert.same({ true, true }, out.canceled)
      assert.is_false(out.canceled_again)
      assert.equal(1, out.queued_before)
      assert.is_true(out.took < 1, "took " .. out.took)
      assert.same({ 0, 0, 200 }, { out.in_flight, out.queued_after, out.next })
      assert.equal("canceled", out.stop.kind)
    end)

    both("cancel a stream from its events: once, and not after its terminal event", "cancel a stream",
         function(out)
      assert.same({ "canceled" }, out.mid)
      assert.equal("canceled", out.mid_error)
      assert.equal("message_stop", out.stop[#out.stop])
      assert.same({ "end_turn" }, { out.stop_reason, out.stop_error })
      assert.is_true(out.mid_canceled)
      assert.is_false(out.mid_again)
      assert.is_false(out.stop_canceled)
    end)

    both("close with calls in flight: each callback once, as canceled", "close with calls in flight", function(out)
      assert.same({ "canceled", "canceled", "canceled" }, out.fired)
      assert.is_true(out.took < 1)
      assert.is_false(out.submit_after_close)
    end)

    both("never show the API key in anything emitted", "secrets", function(out)
      assert.is_true(out.count > 100)
      assert.is_nil(out.text:find(out.key, 1, true))
      assert.is_nil(out.text:find(out.key:sub(8), 1, true))
    end)
  end)

  describe("only in nginx", function()
    it("never loads the curl engine in the cosocket path", function()
      local out = r:run("transport_cases", "no curl in the cosocket path", { transport = "ngx", id = "nocurl" })
      assert.is_false(out.before)
      assert.is_false(out.after)
      assert.is_true(out.ngx)
      assert.is_true(out.engine)
    end)

    for _, phase in ipairs { "content", "access", "rewrite", "timer" } do
      it("chooses the ngx transport by itself in the " .. phase .. " phase", function()
        local out = r:run("transport_cases", "phase", { id = "phase" .. phase }, phase)
        assert.equal(phase, out.phase)
        assert.is_true(out.ngx)
        assert.equal(200, out.status)
      end)
    end

    it("raises naming the phase when a call is forced onto ngx where nginx has no cosockets", function()
      local status, body = r:request("GET", "/phase/set")
      assert.equal(200, status)
      assert.matches("sturdy: submit: the ngx transport cannot make calls in nginx's set phase", body, 1, true)
      assert.equal(200, (r:request("GET", "/phase/header_filter")))
      assert.equal(200, (r:request("GET", "/phase/log")))
      local _, filter = r:request("GET", "/phase/result?name=header_filter")
      assert.matches("cannot make calls in nginx's header_filter phase", filter, 1, true)
      local _, log = r:request("GET", "/phase/result?name=log")
      assert.matches("cannot make calls in nginx's log phase", log, 1, true)
    end)

    it("names what is wrong: a missing dict, TLS options nginx owns, fds, bad requests", function()
      local out = r:run("transport_cases", "misconfigured", { transport = "ngx", id = "mis" })
      assert.matches("lua_shared_dict 'nope'", out.dict, 1, true)
      assert.matches("option 'tls.ca_file' is not available with the ngx transport", out.ca, 1, true)
      assert.matches("not available with the ngx transport", out.fds, 1, true)
      assert.matches("unknown option 'bogus' in request", out.bogus, 1, true)
      assert.matches("frames the message", out.framing, 1, true)
    end)

    it("shares a key's breaker between clients through the dict", function()
      local out, id = run("shared by two clients", "ngx")
      assert.equal(6, out.sent_a + out.sent_b)
      assert.is_true(out.sent_a > 0 and out.sent_b > 0)
      assert.equal(6, m:scenario(id).count)
      assert.equal("circuit_open", out.fresh.kind)
      assert.equal("open", out.state)
    end)

    it("shares a key's rate between clients through the dict", function()
      local out = run("rate shared by two clients", "ngx")
      -- ten calls at 600/min with a burst of one: 0.9 s at least together; alone, five each would take 0.4 s
      assert.is_true(out.took >= 0.85, "took " .. out.took)
    end)
  end)
end)

describe("two nginx workers", function()
  local m, r

  setup(function()
    m = assert(mock.start())
    r = assert(runner.start { mock = m, workers = 2, shared_dicts = { sturdy = "4m" } })
  end)

  teardown(function()
    if r then r:stop() end
    if m then m:stop() end
  end)

  it("share one breaker: the sick upstream sees min_calls in all, then both workers refuse", function()
    local options = '{"retry":{"attempts":1},"breaker":{"min_calls":8,"open_for":60,"window":30}}'
    local args = { transport = "ngx", key = "sick", id = "sick", keep_state = true, steps = "503",
                   options = options }
    -- the workers take turns: min_calls sent between them, then one refusal each
    local refused_by, sent_by = { [0] = 0, [1] = 0 }, { [0] = 0, [1] = 0 }
    for i = 1, 10 do
      local w = i % 2
      local out = r:run_on(w, "transport_cases", "worker call", args)
      assert.equal(w, out.worker)
      if out.err.kind == "circuit_open" then
        refused_by[w] = refused_by[w] + 1
      else
        assert.equal(0, refused_by[0] + refused_by[1], "a call was sent after a refusal")
        sent_by[w] = sent_by[w] + 1
      end
    end
    assert.truthy(sent_by[0] > 0 and sent_by[1] > 0, "calls were made from both workers")
    assert.truthy(refused_by[0] > 0 and refused_by[1] > 0, "both workers refused")
    assert.equal(8, m:scenario("sick").count)
    assert.equal(8, sent_by[0] + sent_by[1])
  end)
end)
