-- Logs, spans and health against the mock API, and a full run (logs,
-- metrics, spans, alerts, errors) that never shows a known API key or a
-- known prompt.
local sturdy = require "sturdy"
local anthropic = require "sturdy.anthropic"
local log = require "sturdy.log"
local trace = require "sturdy.trace"
local cjson = require "cjson"
local mock = require "spec.support.mock"

local steps = mock.steps

local KEY = "sk-ant-SECRET-0123456789abcdef"
local PROMPT = "PROMPT-purple-elephant-42"

describe("telemetry", function()
  local m

  setup(function() m = assert(mock.start()) end)
  teardown(function() m:stop() end)
  before_each(function() m:reset() end)

  local function run(bodies)
    local lua = arg and arg[-1] or "lua"
    local cmd = ("STURDY_MOCK_URL=%s LUA_PATH=%q LUA_CPATH=%q %s spec/support/telemetry_run.lua %s %s %s 2>&1"):format(
      m.http_url, package.path, package.cpath, lua, KEY, PROMPT, bodies and "bodies" or "")
    local p = io.popen(cmd)
    local out = p:read("*a")
    p:close()
    return out
  end

  it("a full run never shows the key or the prompt in a log line, metric, span, alert or error", function()
    local out = run(false)
    assert.matches("telemetry_run done: %d+ events, %d+ spans, %d+ alerts, %d+ errors", out)
    -- the run emitted what it should: JSON lines on stderr, metrics, spans, errors of many kinds
    local json_lines = 0
    for line in out:gmatch("[^\n]+") do
      if line:find('^{"ts":') then
        local ev = assert(cjson.decode(line))
        assert.is_string(ev.event)
        json_lines = json_lines + 1
      end
    end
    assert.is_true(json_lines >= 40)
    for _, want in ipairs { "gen_ai_client_operation_duration_seconds_bucket", "gen_ai.usage.input_tokens",
                            "\"error_type\":\"auth\"", "stream_truncated", "bad_response", "rate_limited",
                            "received headers", "\"state\":\"firing\"" } do
      assert.matches(want, out, 1, true)
    end
    assert.is_nil(out:find(KEY, 1, true))
    assert.is_nil(out:find(KEY:sub(8), 1, true))
    assert.is_nil(out:find(PROMPT, 1, true))
  end)

  it("with log_bodies the prompt is logged, the key still never", function()
    local out = run(true)
    assert.matches("telemetry_run done", out)
    assert.matches('"request_body":"{', out, 1, true)
    assert.truthy(out:find(PROMPT, 1, true))
    assert.is_nil(out:find(KEY, 1, true))
    assert.is_nil(out:find(KEY:sub(8), 1, true))
    assert.matches("[redacted]", out, 1, true) -- the key the careless request put in its body
  end)

  it("logs one event per attempt and per call, with levels and exact sampling of successes", function()
    local events = {}
    local c = sturdy.client { base_url = m.http_url, retry = { base = 0.01, cap = 0.02 } }
    log.attach(c, { logger = function(ev) events[#events + 1] = ev end, level = "debug", sample = 0.25 })
    local claude = anthropic.new { client = c, api_key = "sk-ant-log", model = "claude-sonnet-4-5" }
    local ask = { max_tokens = 16, messages = { { role = "user", content = "hi" } } }
    assert(claude:messages(ask, { headers = steps("r", "429;retry-after-ms=10|529|200") }))
    -- a 429, a 529, then a 200: three attempt events, then the call
    local kinds = {}
    for i, ev in ipairs(events) do kinds[i] = ev.event .. ":" .. ev.level end
    assert.same({ "attempt:warn", "attempt:warn", "attempt:debug", "call:info" }, kinds)
    local a1, call = events[1], events[4]
    assert.equal(429, a1.status)
    assert.equal("rate_limited", a1.error_type)
    assert.equal(1, a1.attempt)
    assert.equal("retry_after", a1.delay_reason)
    assert.equal("backoff", events[2].delay_reason)
    assert.is_nil(events[3].delay)
    assert.equal(a1.id, call.id)
    assert.equal("anthropic", call.provider)
    assert.equal("claude-sonnet-4-5", call.model)
    assert.equal(3, call.attempts)
    assert.equal(1, call.input_tokens)
    assert.equal(2, call.output_tokens)
    assert.equal("end_turn", call.stop_reason)
    assert.is_number(call.cost)
    assert.matches("^req_", call.request_id)
    assert.matches("^%d%d%d%d%-%d%d%-%d%dT%d%d:%d%d:%d%d%.%d%d%dZ$", call.ts)
    -- sampling 0.25: the first success is written (the one above), then exactly one in four
    events = {}
    for _ = 1, 8 do assert(claude:messages(ask)) end
    local calls = 0
    for _, ev in ipairs(events) do if ev.event == "call" then calls = calls + 1 end end
    assert.equal(2, calls)
    -- failures are always written
    events = {}
    for i = 1, 3 do claude:messages(ask, { headers = steps("f" .. i, "400") }) end
    calls = 0
    for _, ev in ipairs(events) do
      if ev.event == "call" then
        calls = calls + 1
        assert.equal("error", ev.level)
        assert.equal("bad_request", ev.error_type)
        assert.equal("fatal", ev.class)
      end
    end
    assert.equal(3, calls)
    c:close()
  end)

  it("writes JSON lines in a fixed order; levels below the threshold are left out", function()
    local lines = {}
    local c = sturdy.client { base_url = m.http_url, logger = function(ev) lines[#lines + 1] = log.json(ev) end }
    assert(c:request { path = "/echo" })
    assert.equal(1, #lines) -- the attempt event is debug, below the default info
    assert.matches('^{"ts":"[^"]+","level":"info","event":"call","id":"%x+",', lines[1])
    assert.matches('"key":"127.0.0.1:%d+"', lines[1])
    assert.has_error(function() sturdy.client { logger = "xml" } end,
                     'sturdy: option \'logger\' in client options must be a function or "json" or "ngx", got "xml"')
    assert.has_error(function() sturdy.client { logger = "json", log_level = "loud" } end)
    assert.has_error(function() sturdy.client { log_sample = 0.5 } end,
                     "sturdy: option 'log_sample' needs option 'logger'")
    c:close()
  end)

  it("traces: a call span and a child per attempt; an app's traceparent is joined and sent on", function()
    local started, ended = {}, {}
    local c = sturdy.client { base_url = m.http_url, retry = { base = 0.01, cap = 0.02 },
                              on_span_start = function(s) started[#started + 1] = s end,
                              on_span_end = function(s) ended[#ended + 1] = s end }
    local app = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    local res = assert(c:request { path = "/echo", headers = { traceparent = app, ["x-mock-steps"] = "503,200" } })
    local sent = cjson.decode(res.body).headers.traceparent
    assert.equal(3, #ended)
    local call = ended[3]
    assert.equal(call, started[1]) -- the call span started first, at submit
    assert.equal("0af7651916cd43dd8448eb211c80319c", call.trace_id)
    assert.equal("b7ad6b7169203331", call.parent_span_id)
    assert.equal("00-0af7651916cd43dd8448eb211c80319c-" .. call.span_id .. "-01", sent)
    assert.equal("GET", call.name)
    assert.equal("ok", call.status)
    assert.equal(2, call.attributes["sturdy.attempts"])
    local a1, a2 = ended[1], ended[2]
    assert.equal(call.span_id, a1.parent_span_id)
    assert.equal(call.span_id, a2.parent_span_id)
    assert.equal(503, a1.attributes["http.response.status_code"])
    assert.equal("error", a1.status)
    assert.equal(1, a2.attributes["http.request.resend_count"])
    assert.is_true(a1.start_time >= call.start_time and a1.end_time <= a2.start_time + 1e-6)
    assert.is_true(a2.end_time <= call.end_time + 1e-6)
    -- without one, a call starts its own trace
    started, ended = {}, {}
    res = assert(c:request { path = "/echo" })
    assert.is_nil(ended[2].parent_span_id)
    assert.equal(32, #ended[2].trace_id)
    assert.equal(ended[2].span_id, (trace.parse_traceparent(cjson.decode(res.body).headers.traceparent)) and
                 select(2, trace.parse_traceparent(cjson.decode(res.body).headers.traceparent)))
    assert.is_nil(trace.parse_traceparent("00-00000000000000000000000000000000-b7ad6b7169203331-01"))
    assert.is_nil(trace.parse_traceparent("garbage"))
    c:close()
  end)

  it("provider spans carry the GenAI attributes and usage; OTLP/JSON has them", function()
    local ended = {}
    local c = sturdy.client { base_url = m.http_url, on_span_end = function(s) ended[#ended + 1] = s end }
    local claude = anthropic.new { client = c, api_key = "sk-ant-trace", model = "claude-sonnet-4-5" }
    assert(claude:messages { max_tokens = 16, messages = { { role = "user", content = "hi" } } })
    local call = ended[#ended]
    assert.equal("chat claude-sonnet-4-5", call.name)
    local a = call.attributes
    assert.equal("chat", a["gen_ai.operation.name"])
    assert.equal("anthropic", a["gen_ai.provider.name"])
    assert.equal("claude-sonnet-4-5", a["gen_ai.request.model"])
    assert.equal(16, a["gen_ai.request.max_tokens"])
    assert.equal(1, a["gen_ai.usage.input_tokens"])
    assert.equal(2, a["gen_ai.usage.output_tokens"])
    assert.same({ "end_turn" }, a["gen_ai.response.finish_reasons"])
    assert.equal("127.0.0.1", a["server.address"])
    local otlp = trace.otlp(ended, "spec")
    local spans = otlp.resourceSpans[1].scopeSpans[1].spans
    assert.equal(#ended, #spans)
    assert.equal(call.span_id, spans[#spans].spanId)
    assert.matches("^%d+$", spans[#spans].startTimeUnixNano)
    local found
    for _, kv in ipairs(spans[#spans].attributes) do
      if kv.key == "gen_ai.usage.input_tokens" then found = kv.value end
    end
    assert.same({ intValue = "1" }, found)
    c:close()
  end)

  it("health: up, degraded by a 429 pause, down with an open breaker, idle before any call", function()
    local c = sturdy.client { base_url = m.http_url, retry = { attempts = 1 },
                              breaker = { min_calls = 2, failure_rate = 0.5, open_for = 60 } }
    assert.equal("idle", c:health().status)
    assert(c:request { path = "/echo", key = "good" })
    c:request { path = "/echo", key = "paused", headers = steps("p", "429;retry-after=30") }
    for i = 1, 2 do c:request { path = "/echo", key = "bad", headers = steps("b" .. i, "500") } end
    local h = c:health()
    assert.equal("up", h.keys.good.status)
    assert.equal("degraded", h.keys.paused.status)
    assert.matches("paused by a 429", h.keys.paused.reason)
    assert.equal("down", h.keys.bad.status)
    assert.matches("breaker open", h.keys.bad.reason)
    assert.equal("open", h.keys.bad.breaker.state)
    assert.equal("down", h.status)
    assert.is_false(h.ok)
    assert.equal("up", c:health("good").status)
    assert.is_nil(c:health("never-seen"))
    c:close()
  end)

  it("an observer may add headers at a call's start; notify hands records on", function()
    local seen = {}
    local c = sturdy.client { base_url = m.http_url }
    c:observe(function(rec)
      seen[#seen + 1] = rec.type
      if rec.type == "start" then rec.headers = { ["x-added"] = "yes", ["x-keep"] = "theirs" } end
    end)
    local res = assert(c:request { path = "/echo", headers = { ["X-Keep"] = "mine" } })
    local headers = cjson.decode(res.body).headers
    assert.equal("yes", headers["x-added"])
    assert.equal("theirs", headers["x-keep"])
    c:notify { type = "custom" }
    assert.same({ "start", "call", "custom" }, seen)
    assert.has_error(function() c:notify "x" end, "sturdy: notify takes a record table with a type, got string")
    c:close()
  end)
end)
