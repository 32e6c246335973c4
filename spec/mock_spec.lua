-- Tests of the mock API itself (spec/support/), with luasocket and the curl
-- CLI only, so a broken sturdy cannot hide a broken mock.
-- luacheck: std +busted

local http = require "socket.http"
local ltn12 = require "ltn12"
local socket = require "socket"
local cjson = require "cjson"
local mock = require "spec.support.mock"

local m

-- One HTTP request with luasocket; returns status, headers, body
-- (or nil, err when no response came).
local function request(path, opts)
  opts = opts or {}
  local chunks = {}
  local headers = {}
  for k, v in pairs(opts.headers or {}) do
    headers[k] = v
  end
  local body = opts.body
  if type(body) == "table" then
    body = cjson.encode(body)
  end
  if body then
    headers["content-type"] = headers["content-type"] or "application/json"
    headers["content-length"] = tostring(#body)
  end
  local ok, status, resp_headers = http.request({
    url = m.http_url .. path,
    method = opts.method or (body and "POST" or "GET"),
    headers = headers,
    source = body and ltn12.source.string(body) or nil,
    sink = ltn12.sink.table(chunks),
  })
  if not ok then
    return nil, status
  end
  return status, resp_headers, table.concat(chunks)
end

local function shell_quote(s)
  return "'" .. tostring(s):gsub("'", "'\\''") .. "'"
end

-- Run curl; returns its stdout and exit code.
local function curl(args)
  local p = io.popen("env -u LD_PRELOAD curl -s " .. args .. " 2>/dev/null; echo \"\n__rc=$?\"")
  local out = p:read("*a")
  p:close()
  local body, rc = out:match("^(.*)\n__rc=(%d+)\n$")
  return body, tonumber(rc)
end

-- Parse an SSE body into { {event=, data=}, ... }.
local function sse_events(body)
  local events = {}
  for block in (body .. "\n\n"):gmatch("(.-)\n\n") do
    if block ~= "" then
      local ev = {}
      for line in block:gmatch("[^\n]+") do
        local k, v = line:match("^(%w+): ?(.*)$")
        if k then
          ev[k] = v
        end
      end
      events[#events + 1] = ev
    end
  end
  return events
end

local PROMPT = { model = "claude-test", max_tokens = 64,
                 messages = { { role = "user", content = "hello there" } } }

local function with(t, extra)
  local out = {}
  for k, v in pairs(t) do
    out[k] = v
  end
  for k, v in pairs(extra) do
    out[k] = v
  end
  return out
end

describe("mock API", function()
  setup(function()
    m = assert(mock.start())
  end)

  teardown(function()
    if m then
      m:stop()
    end
  end)

  before_each(function()
    assert(m:reset())
  end)

  it("exposes its endpoints", function()
    assert.matches("^http://127%.0%.0%.1:%d+$", m.http_url)
    assert.matches("^https://localhost:%d+$", m.https_url)
    assert.is_number(m.port)
    assert.is_number(m.tls_port)
    assert.truthy(io.open(m.ca_file)):close()
  end)

  describe("Anthropic /v1/messages", function()
    it("answers the Messages JSON shape with request-id and rate-limit headers", function()
      local status, h, body = request("/v1/messages", { body = PROMPT })
      assert.equal(200, status)
      assert.equal("application/json", h["content-type"])
      assert.matches("^req_", h["request-id"])
      for _, dim in ipairs({ "requests", "tokens", "input-tokens", "output-tokens" }) do
        assert.matches("^%d+$", h["anthropic-ratelimit-" .. dim .. "-limit"])
        assert.matches("^%d+$", h["anthropic-ratelimit-" .. dim .. "-remaining"])
        assert.matches("^%d%d%d%d%-%d%d%-%d%dT%d%d:%d%d:%d%dZ$", h["anthropic-ratelimit-" .. dim .. "-reset"])
      end
      local msg = cjson.decode(body)
      assert.matches("^msg_", msg.id)
      assert.equal("message", msg.type)
      assert.equal("assistant", msg.role)
      assert.equal("claude-test", msg.model)
      assert.same({ { type = "text", text = "Echo: hello there" } }, msg.content)
      assert.equal("end_turn", msg.stop_reason)
      assert.equal(cjson.null, msg.stop_sequence)
      assert.is_true(msg.usage.input_tokens > 0)
      assert.is_true(msg.usage.output_tokens > 0)
      assert.equal(0, msg.usage.cache_creation_input_tokens)
      assert.equal(0, msg.usage.cache_read_input_tokens)
    end)

    it("streams the real SSE event sequence", function()
      local status, h, body = request("/v1/messages", { body = with(PROMPT, { stream = true }) })
      assert.equal(200, status)
      assert.equal("text/event-stream", h["content-type"])
      local events = sse_events(body)
      local names, text = {}, {}
      for _, ev in ipairs(events) do
        names[#names + 1] = ev.event
        local data = cjson.decode(ev.data)
        assert.equal(ev.event, data.type)
        if ev.event == "content_block_delta" then
          assert.equal("text_delta", data.delta.type)
          text[#text + 1] = data.delta.text
        elseif ev.event == "message_start" then
          assert.same({}, data.message.content)
          assert.equal("claude-test", data.message.model)
        elseif ev.event == "message_delta" then
          assert.equal("end_turn", data.delta.stop_reason)
          assert.is_number(data.usage.output_tokens)
        end
      end
      assert.equal("Echo: hello there", table.concat(text))
      assert.is_true(#text >= 2)
      local deltas = {}
      for _ = 1, #text do
        deltas[#deltas + 1] = "content_block_delta"
      end
      local expected = { "message_start", "content_block_start", "ping" }
      for _, d in ipairs(deltas) do
        expected[#expected + 1] = d
      end
      for _, e in ipairs({ "content_block_stop", "message_delta", "message_stop" }) do
        expected[#expected + 1] = e
      end
      assert.same(expected, names)
      assert.matches('"content":%[%]', body)   -- an empty array, not {}
    end)

    it("uses Anthropic error bodies", function()
      local status, h, body = request("/v1/messages", { body = PROMPT, headers = { ["x-mock-steps"] = "529" } })
      assert.equal(529, status)
      local err = cjson.decode(body)
      assert.equal("error", err.type)
      assert.same({ type = "overloaded_error", message = "Overloaded" }, err.error)
      assert.equal(h["request-id"], err.request_id)
      local cases = { [400] = "invalid_request_error", [401] = "authentication_error",
                      [403] = "permission_error", [404] = "not_found_error", [413] = "request_too_large",
                      [429] = "rate_limit_error", [500] = "api_error", [503] = "overloaded_error" }
      for code, kind in pairs(cases) do
        local s, _, b = request("/v1/messages", { body = PROMPT, headers = { ["x-mock-steps"] = tostring(code) } })
        assert.equal(code, s)
        assert.equal(kind, cjson.decode(b).error.type)
      end
    end)

    it("rejects a body that is not JSON", function()
      local status, _, body = request("/v1/messages", { body = "{nope" })
      assert.equal(400, status)
      assert.equal("invalid_request_error", cjson.decode(body).error.type)
    end)
  end)

  describe("OpenAI /v1/chat/completions", function()
    it("answers the chat.completion shape with x-request-id and rate-limit headers", function()
      local status, h, body = request("/v1/chat/completions", { body = with(PROMPT, { model = "gpt-test" }) })
      assert.equal(200, status)
      assert.equal("application/json", h["content-type"])
      assert.is_string(h["x-request-id"])
      for _, dim in ipairs({ "requests", "tokens" }) do
        assert.matches("^%d+$", h["x-ratelimit-limit-" .. dim])
        assert.matches("^%d+$", h["x-ratelimit-remaining-" .. dim])
        assert.matches("^[%d%.hms]+s$", h["x-ratelimit-reset-" .. dim])
      end
      local c = cjson.decode(body)
      assert.matches("^chatcmpl%-", c.id)
      assert.equal("chat.completion", c.object)
      assert.equal("gpt-test", c.model)
      assert.is_number(c.created)
      local choice = c.choices[1]
      assert.equal(0, choice.index)
      assert.equal("assistant", choice.message.role)
      assert.equal("Echo: hello there", choice.message.content)
      assert.equal(cjson.null, choice.message.refusal)
      assert.equal("stop", choice.finish_reason)
      assert.equal(c.usage.prompt_tokens + c.usage.completion_tokens, c.usage.total_tokens)
    end)

    it("streams chunks ending in [DONE], with a usage chunk when asked", function()
      local req = with(PROMPT, { stream = true, stream_options = { include_usage = true } })
      local status, h, body = request("/v1/chat/completions", { body = req })
      assert.equal(200, status)
      assert.equal("text/event-stream", h["content-type"])
      local events = sse_events(body)
      assert.equal("[DONE]", events[#events].data)
      local chunks = {}
      for i = 1, #events - 1 do
        chunks[i] = cjson.decode(events[i].data)
        assert.equal("chat.completion.chunk", chunks[i].object)
      end
      assert.equal("assistant", chunks[1].choices[1].delta.role)
      local usage_chunk = chunks[#chunks]
      assert.same({}, usage_chunk.choices)
      assert.matches('"choices":%[%]', events[#events - 1].data)
      assert.is_number(usage_chunk.usage.total_tokens)
      local finish = chunks[#chunks - 1].choices[1]
      assert.equal("stop", finish.finish_reason)
      local text = {}
      for i = 2, #chunks - 2 do
        text[#text + 1] = chunks[i].choices[1].delta.content
      end
      assert.equal("Echo: hello there", table.concat(text))
    end)

    it("uses OpenAI error bodies", function()
      local status, _, body = request("/v1/chat/completions",
                                      { body = PROMPT, headers = { ["x-mock-steps"] = "429" } })
      assert.equal(429, status)
      local err = cjson.decode(body).error
      assert.is_string(err.message)
      assert.equal("rate_limit_exceeded", err.code)
      assert.equal(cjson.null, err.param)
      status, _, body = request("/v1/chat/completions", { body = PROMPT, headers = { ["x-mock-steps"] = "500" } })
      assert.equal(500, status)
      assert.equal("server_error", cjson.decode(body).error.type)
    end)
  end)

  describe("/echo", function()
    it("describes the request and shows keep-alive reuse", function()
      local c = assert(socket.connect("127.0.0.1", m.port))
      c:settimeout(5)
      local seen = {}
      for i = 1, 2 do
        local body = "ping" .. i
        assert(c:send("PUT /echo?x=1 HTTP/1.1\r\nHost: t\r\nX-Thing: A\r\nContent-Length: "
                      .. #body .. "\r\n\r\n" .. body))
        local line = c:receive("*l")
        assert.equal("HTTP/1.1 200 OK", line)
        local len
        repeat
          line = c:receive("*l")
          len = len or tonumber(line:lower():match("^content%-length:%s*(%d+)"))
        until line == ""
        seen[i] = cjson.decode((c:receive(len)))
        assert.equal(body, seen[i].body)
      end
      c:close()
      assert.equal("PUT", seen[1].method)
      assert.equal("/echo?x=1", seen[1].uri)
      assert.equal("PUT /echo?x=1 HTTP/1.1", seen[1].request_line)
      assert.equal("A", seen[1].headers["x-thing"])
      assert.equal(1.1, seen[1].http_version)
      assert.equal("http", seen[1].scheme)
      assert.equal(seen[1].connection, seen[2].connection)
      assert.equal(1, seen[1].connection_requests)
      assert.equal(2, seen[2].connection_requests)
      local counters = m:counters()
      assert.equal(2, counters.requests)
      assert.equal(1, counters.connections)
    end)

    it("accepts absolute-form requests, as sent to a forward proxy", function()
      local out, rc = curl("-x " .. m.http_url .. " -d hi http://sturdy.test/echo")
      assert.equal(0, rc)
      local echo = cjson.decode(out)
      assert.equal("POST http://sturdy.test/echo HTTP/1.1", echo.request_line)
      assert.equal("/echo", echo.uri)
      assert.equal("hi", echo.body)
      assert.equal("sturdy.test", echo.headers.host)
    end)

    it("uses Anthropic-shaped errors", function()
      local status, _, body = request("/echo", { headers = { ["x-mock-steps"] = "404" } })
      assert.equal(404, status)
      assert.equal("not_found_error", cjson.decode(body).error.type)
    end)
  end)

  describe("HTTPS", function()
    it("verifies with the CA file and negotiates HTTP/2", function()
      local out, rc = curl("--cacert " .. shell_quote(m.ca_file) .. " " .. m.https_url .. "/echo")
      assert.equal(0, rc)
      local echo = cjson.decode(out)
      assert.equal("https", echo.scheme)
      out = curl("--http2 --cacert " .. shell_quote(m.ca_file) .. " -o /dev/null -w '%{http_version}' "
                 .. m.https_url .. "/echo")
      assert.equal("2", out)
      local _, bad = curl(m.https_url .. "/echo")   -- system CAs do not know it
      assert.equal(60, bad)
    end)

    it("also answers on 127.0.0.1 (IP SAN)", function()
      local url = "https://127.0.0.1:" .. m.tls_port .. "/echo"
      local _, rc = curl("--cacert " .. shell_quote(m.ca_file) .. " " .. url)
      assert.equal(0, rc)
    end)
  end)

  describe("fault steps", function()
    it("walks a step sequence per scenario, repeating the last step", function()
      local headers = { ["x-mock-scenario"] = "seq", ["x-mock-steps"] = "529,529,200" }
      local got = {}
      for i = 1, 4 do
        got[i] = request("/v1/messages", { body = PROMPT, headers = headers })
      end
      assert.same({ 529, 529, 200, 200 }, got)
      local sc = m:counters().scenarios.seq
      assert.equal(4, sc.count)
      assert.same({ 529, 529, 200, 200 }, sc.statuses)
      assert.same({ "529", "529", "200", "200" }, sc.steps)
      assert.equal(4, #sc.times)
      for i = 2, 4 do
        assert.is_true(sc.times[i] >= sc.times[i - 1])
      end
      assert.is_true(math.abs(sc.times[1] - socket.gettime()) < 10)
    end)

    it("uses the steps string as scenario id when none is given", function()
      request("/v1/messages", { body = PROMPT, headers = { ["x-mock-steps"] = "503,200" } })
      assert.equal(1, m:counters().scenarios["503,200"].count)
    end)

    it("adds retry hints, with another step separator for HTTP-dates", function()
      local date = "Wed, 21 Oct 2015 07:28:00 GMT"
      local headers = { ["x-mock-steps"] = "429;retry-after=" .. date .. ";retry-after-ms=1500"
                                           .. ";should-retry=false|200",
                        ["x-mock-steps-sep"] = "|" }
      local status, h = request("/v1/messages", { body = PROMPT, headers = headers })
      assert.equal(429, status)
      assert.equal(date, h["retry-after"])
      assert.equal("1500", h["retry-after-ms"])
      assert.equal("false", h["x-should-retry"])
      assert.equal(200, (request("/v1/messages", { body = PROMPT, headers = headers })))
    end)

    it("rejects an unknown step", function()
      local status, _, body = request("/v1/messages", { body = PROMPT, headers = { ["x-mock-steps"] = "boom" } })
      assert.equal(400, status)
      assert.matches("unknown step", cjson.decode(body).error.message)
    end)

    it("drop closes the connection without a response", function()
      local c = assert(socket.connect("127.0.0.1", m.port))
      c:settimeout(5)
      c:send("GET /v1/messages HTTP/1.1\r\nHost: t\r\nx-mock-steps: drop\r\n\r\n")
      local data, _, partial = c:receive("*a")
      c:close()
      assert.equal("", data or partial)
      assert.same({ 0 }, m:counters().scenarios.drop.statuses)
    end)

    it("drop_mid cuts JSON and SSE bodies after the headers", function()
      local data = shell_quote(cjson.encode(PROMPT))
      local out, rc = curl("-H 'x-mock-steps: drop_mid' -d " .. data .. " " .. m.http_url .. "/v1/messages")
      assert.equal(18, rc)   -- CURLE_PARTIAL_FILE
      assert.matches("^{", out)
      data = shell_quote(cjson.encode(with(PROMPT, { stream = true })))
      out, rc = curl("-H 'x-mock-steps: drop_mid' -d " .. data .. " " .. m.http_url .. "/v1/messages")
      assert.equal(18, rc)
      assert.matches("event: message_start", out)
      assert.matches("content_block_delta", out)
      assert.not_matches("message_stop", out)
    end)

    it("stall_mid pauses mid-body, delay before the headers", function()
      local t0 = socket.gettime()
      local status, _, body = request("/v1/messages",
                                      { body = PROMPT, headers = { ["x-mock-steps"] = "stall_mid;stall=200" } })
      assert.equal(200, status)
      assert.equal("message", cjson.decode(body).type)
      assert.is_true(socket.gettime() - t0 >= 0.19)
      t0 = socket.gettime()
      status = request("/v1/chat/completions", { body = PROMPT, headers = { ["x-mock-steps"] = "200;delay=150" } })
      assert.equal(200, status)
      assert.is_true(socket.gettime() - t0 >= 0.14)
    end)

    it("drip sends the body in timed pieces", function()
      local t0 = socket.gettime()
      local status, _, body = request("/v1/messages",
                                      { body = PROMPT, headers = { ["x-mock-steps"] = "200;drip=40;pieces=4" } })
      assert.equal(200, status)
      assert.equal("message", cjson.decode(body).type)
      assert.is_true(socket.gettime() - t0 >= 0.15)
    end)

    it("malformed sends truncated JSON in a complete HTTP reply", function()
      local status, h, body = request("/v1/messages", { body = PROMPT, headers = { ["x-mock-steps"] = "malformed" } })
      assert.equal(200, status)
      assert.equal("application/json", h["content-type"])
      assert.equal('{"id": "msg_broken", "content": [', body)
    end)

    it("html sends a proxy error page", function()
      local status, h, body = request("/v1/messages", { body = PROMPT, headers = { ["x-mock-steps"] = "html" } })
      assert.equal(502, status)
      assert.equal("text/html", h["content-type"])
      assert.matches("<html>", body)
    end)

    it("huge sends exactly size bytes, with or without content-length", function()
      local status, h, body = request("/v1/messages",
                                      { body = PROMPT, headers = { ["x-mock-steps"] = "huge;size=300000" } })
      assert.equal(200, status)
      assert.equal("300000", h["content-length"])
      assert.equal(300000, #body)
      assert.equal("padding", cjson.decode(body).type)
      status, h, body = request("/v1/messages",
                                { body = PROMPT, headers = { ["x-mock-steps"] = "huge;size=100000;chunked=1" } })
      assert.equal(200, status)
      assert.is_nil(h["content-length"])
      assert.equal(100000, #body)
    end)

    it("truncated ends a stream cleanly without its terminal event", function()
      local _, _, body = request("/v1/messages", { body = PROMPT, headers = { ["x-mock-steps"] = "truncated" } })
      local events = sse_events(body)
      assert.equal("message_delta", events[#events].event)
      _, _, body = request("/v1/chat/completions", { body = PROMPT, headers = { ["x-mock-steps"] = "truncated" } })
      events = sse_events(body)
      assert.not_equal("[DONE]", events[#events].data)
    end)

    it("stream_error sends an error event inside a 200 stream", function()
      local status, _, body = request("/v1/messages",
                                      { body = PROMPT, headers = { ["x-mock-steps"] = "stream_error" } })
      assert.equal(200, status)
      local events = sse_events(body)
      assert.same({ "message_start", "error" }, { events[1].event, events[2].event })
      assert.same({ type = "error", error = { type = "overloaded_error", message = "Overloaded" } },
                  cjson.decode(events[2].data))
      _, _, body = request("/v1/messages",
                           { body = PROMPT, headers = { ["x-mock-steps"] = "stream_error;after_delta=1" } })
      events = sse_events(body)
      assert.equal("content_block_delta", events[#events - 1].event)
      assert.equal("error", events[#events].event)
      _, _, body = request("/v1/chat/completions", { body = PROMPT, headers = { ["x-mock-steps"] = "stream_error" } })
      events = sse_events(body)
      assert.equal("server_error", cjson.decode(events[#events].data).error.type)
    end)
  end)

  describe("rate limiter", function()
    it("answers 429 with retry-after once the burst is spent", function()
      assert(m:config({ rate_limit = { rpm = 60, burst = 2 } }))
      local s1, h1 = request("/v1/messages", { body = PROMPT })
      local s2 = request("/v1/messages", { body = PROMPT })
      local s3, h3, b3 = request("/v1/messages", { body = PROMPT })
      assert.same({ 200, 200, 429 }, { s1, s2, s3 })
      assert.equal("60", h1["anthropic-ratelimit-requests-limit"])
      assert.equal("1", h1["anthropic-ratelimit-requests-remaining"])
      assert.equal("1", h3["retry-after"])
      assert.equal("0", h3["anthropic-ratelimit-requests-remaining"])
      assert.equal("rate_limit_error", cjson.decode(b3).error.type)
      local s4, h4 = request("/v1/chat/completions", { body = PROMPT })
      assert.equal(429, s4)
      assert.equal("60", h4["x-ratelimit-limit-requests"])
      assert.matches("^%d[%d%.]*s$", h4["x-ratelimit-reset-requests"])
      assert.equal(200, (request("/echo")))   -- only /v1/* is limited
      assert.equal(2, m:counters().rate_limited)
      assert(m:config({ rate_limit = false }))
      assert.equal(200, (request("/v1/messages", { body = PROMPT })))
    end)

    it("refills continuously", function()
      assert(m:config({ rate_limit = { rpm = 1200, burst = 1 } }))   -- 20 per second
      assert.equal(200, (request("/v1/messages", { body = PROMPT })))
      assert.equal(429, (request("/v1/messages", { body = PROMPT })))
      socket.sleep(0.06)
      assert.equal(200, (request("/v1/messages", { body = PROMPT })))
    end)

    it("rejects unknown config keys", function()
      local ok, err = m:config({ rate_limit = { rpm = 60, brust = 2 } })
      assert.is_nil(ok)
      assert.matches("brust", err)
    end)
  end)

  describe("server helpers (loaded outside nginx)", function()
    local server = require "sturdy.mock.server"

    it("format Go durations as OpenAI's reset headers do", function()
      assert.equal("0s", server.go_duration(0))
      assert.equal("12ms", server.go_duration(0.012))
      assert.equal("1s", server.go_duration(1))
      assert.equal("1.5s", server.go_duration(1.5))
      assert.equal("6m0s", server.go_duration(360))
      assert.equal("1h2m3.5s", server.go_duration(3723.5))
    end)

    it("parse steps and their params", function()
      local steps = assert(server.parse_steps("529;retry-after=2 , drop_mid;stall=100,200", ","))
      assert.equal(3, #steps)
      assert.equal(529, steps[1].status)
      assert.equal("2", steps[1].params["retry-after"])
      assert.equal("drop_mid", steps[2].keyword)
      assert.equal(100, steps[2].params.stall)
      assert.equal(200, steps[3].status)
      assert.is_nil(server.parse_steps("200;dealy=5", ","))
      assert.is_nil(server.parse_steps("200;delay=soon", ","))
    end)
  end)

  describe("counters", function()
    it("count requests and connections, and reset clears them", function()
      request("/v1/messages", { body = PROMPT, headers = { ["x-mock-scenario"] = "a" } })
      request("/echo")
      local c = m:counters()
      assert.equal(2, c.requests)
      assert.equal(2, c.connections)   -- luasocket's http opens one per request
      assert.equal(0, c.rate_limited)
      assert.equal(1, c.scenarios.a.count)
      assert.same({ 200 }, c.scenarios.a.statuses)
      assert.equal(1, c.paths["/echo"])
      assert(m:reset())
      c = m:counters()
      assert.equal(0, c.requests)
      assert.equal(0, c.connections)
      assert.same({}, c.scenarios)
    end)
  end)
end)
