-- Bad input is refused before anything is sent (issue 11): NUL bytes, CR LF,
-- `stream = true`, framing headers, a batch with one bad request, the C entry
-- points called directly, the provider guard; and an absolute URL is kept
-- under its own host. What reached the mock is read from its counters.
local sturdy = require "sturdy"
local options = require "sturdy.options"
local policy = require "sturdy.policy"
local core = require "sturdy.core"
local anthropic = require "sturdy.anthropic"
local openai = require "sturdy.openai"
local mock = require "spec.support.mock"

local steps = mock.steps
local KEY = "sk-hardening-input-0123456789"
local ASK = { max_tokens = 16, messages = { { role = "user", content = "hi" } } }

local FRAMING = { "Content-Length", "Transfer-Encoding", "Host", "Connection", "Upgrade", "TE", "Trailer",
                  "Keep-Alive", "Proxy-Connection", "Expect", "content-length", "HOST", "transfer-encoding" }

describe("bad input", function()
  local m

  setup(function() m = assert(mock.start()) end)
  teardown(function() m:stop() end)
  before_each(function() m:reset() end)

  local function requests() return assert(m:counters()).requests end

  -- fn() raises an error whose message holds every plain string of `expect`
  local function raises(fn, ...)
    local ok, msg = pcall(fn)
    assert.is_false(ok, "did not raise")
    msg = tostring(msg)
    assert.matches("sturdy: ", msg, 1, true)
    for i = 1, select("#", ...) do
      local part = select(i, ...)
      assert.matches(part, msg, 1, true)
    end
    return msg
  end

  local function client(extra)
    local cfg = { base_url = m.http_url }
    for k, v in pairs(extra or {}) do cfg[k] = v end
    return sturdy.client(cfg)
  end

  describe("NUL bytes", function()
    it("in a request's path, url, header name, header value, key, method or model are refused", function()
      local c = client()
      local cases = {
        { { path = "/x\0/../secret" }, "url or path contains" },
        { { url = m.http_url .. "/x\0/../secret" }, "url or path contains" },
        { { path = "/echo", headers = { ["x-a\0b"] = "v" } }, "is not a valid HTTP token" },
        { { path = "/echo", headers = { ["x-a"] = "v\0/../secret" } }, "contains CR, LF or NUL" },
        { { path = "/echo", key = "k\0j" }, "request 'key' contains" },
        { { path = "/echo", method = "GET\0X" }, "request 'method'" },
        { { path = "/echo", json = { model = "m\0n" } }, "request json 'model' contains" },
      }
      for _, case in ipairs(cases) do
        raises(function() c:request(case[1]) end, case[2])
        raises(function() c:submit(case[1]) end, case[2])
        raises(function() c:batch { { path = "/echo" }, case[1] } end, case[2])
      end
      -- the key of a model with a NUL is not cut short either
      raises(function() c:key_for { path = "/echo", json = { model = "m\0n" } } end, "'model'")
      assert.equal(0, requests())
      assert.equal(0, c:pending())
      c:close()
    end)

    it("in a client's base_url, key, header values, user_agent or proxy are refused", function()
      raises(function() client { base_url = m.http_url .. "\0/x" } end, "'base_url' contains a NUL byte")
      raises(function() client { key = "k\0j" } end, "'key' contains")
      raises(function() client { headers = { ["x-a"] = "v\0w" } } end, "contains CR, LF or NUL")
      raises(function() client { user_agent = "ua\0x" } end, "'user_agent' contains a NUL byte")
      raises(function() client { proxy = "http://127.0.0.1:1\0x" } end, "'proxy' contains a NUL byte")
    end)

    it("nor do CR or LF reach a header line through user_agent, or a client key", function()
      -- user_agent becomes the User-Agent line: a CR LF in it would add a header of its own
      raises(function() client { user_agent = "ua\r\nX-Evil: 1" } end, "'user_agent' contains CR or LF")
      raises(function() client { key = "k\r\nj" } end, "'key' contains a control character")
      local c = client { user_agent = "ua/1.0 (x)" }
      local echo = require("cjson").decode(assert(c:request { path = "/echo" }).body)
      assert.equal("ua/1.0 (x)", echo.headers["user-agent"])
      assert.is_nil(echo.headers["x-evil"])
      c:close()
    end)
  end)

  describe("stream = true in a request table", function()
    it("is a clear error from request, submit and batch, with nothing sent", function()
      local c = client()
      for _, v in ipairs { true, false } do
        local req = { path = "/v1/messages", json = { model = "m", stream = true }, stream = v }
        raises(function() c:request(req) end, "option 'stream' in request is not supported", "on_data")
        raises(function() c:submit(req) end, "option 'stream' in request is not supported")
        raises(function() c:batch { { path = "/echo" }, req } end, "option 'stream' in request is not supported")
      end
      assert.equal(0, requests())
      assert.equal(0, c:pending())
      c:close()
    end)

    it("among a provider's parameters points to stream{}, with nothing sent", function()
      local claude = anthropic.new { api_key = KEY, base_url = m.http_url, model = "claude-sonnet-4-5" }
      local gpt = openai.new { api_key = KEY, base_url = m.http_url, model = "gpt-4o-mini" }
      local with_stream = { max_tokens = 16, stream = true, messages = ASK.messages }
      raises(function() claude:messages(with_stream) end, "messages takes no 'stream' parameter", "stream{")
      raises(function() claude:prepare(with_stream) end, "messages takes no 'stream' parameter")
      raises(function() gpt:chat(with_stream) end, "chat takes no 'stream' parameter")
      assert.equal(0, requests())
      -- the streamed call itself still works
      local _, s = claude:stream(ASK)
      assert(s:result())
      claude.client:close()
      gpt.client:close()
    end)
  end)

  describe("batch", function()
    it("checks every request before sending any: a bad third request sends nothing", function()
      local c = client()
      local bad_thirds = {
        { { path = "/echo", bogus = 1 }, "unknown option 'bogus' in request" },
        { { path = "/echo", stream = true }, "option 'stream'" },
        { { path = "/x\0y" }, "contains a control character" },
        { { path = "/echo", headers = { Host = "evil" } }, "frames the message" },
        { { path = "/echo", json = { f = function() end } }, "cannot be encoded" },
        { { path = "/echo", timeout = { total = math.huge } }, "'total' in request.timeout" },
        { { path = "/echo", attempts = 0 / 0 }, "'attempts' in request" },
        { "not a table", "batch request #3 must be a table" },
      }
      for _, case in ipairs(bad_thirds) do
        raises(function()
          c:batch({ { path = "/echo", headers = steps("b1", "200;delay=50") }, { path = "/echo" }, case[1] })
        end, case[2])
        assert.equal(0, requests())
        assert.equal(0, c:pending())
      end
      -- the same list made good runs, on_data requests included
      local chunks = {}
      local results = c:batch {
        { path = "/echo" }, { path = "/echo" },
        { path = "/echo", on_data = function(chunk) chunks[#chunks + 1] = chunk end },
      }
      assert.equal(3, #results)
      for i = 1, 3 do assert.equal(200, results[i].status) end
      assert.is_true(#table.concat(chunks) > 0)
      assert.equal(3, requests())
      c:close()
    end)
  end)

  describe("framing headers", function()
    it("are refused in request headers, any case, with nothing sent", function()
      local c = client()
      for _, name in ipairs(FRAMING) do
        raises(function() c:request { path = "/echo", body = "{}", headers = { [name] = "5" } } end,
               "header '" .. name .. "' in request headers frames the message")
      end
      assert.equal(0, requests())
      c:close()
    end)

    it("are refused in client headers and a provider call's headers", function()
      for _, name in ipairs(FRAMING) do
        raises(function() client { headers = { [name] = "5" } } end,
               "header '" .. name .. "' in client headers frames the message")
      end
      local claude = anthropic.new { api_key = KEY, base_url = m.http_url, model = "claude-sonnet-4-5" }
      raises(function() claude:messages(ASK, { headers = { ["Content-Length"] = "1" } } ) end, "frames the message")
      assert.equal(0, requests())
      claude.client:close()
    end)

    it("leave a reused connection in step: the body's own length is sent", function()
      local c = client()
      for i = 1, 3 do
        local res = assert(c:request { path = "/echo", body = ("x"):rep(i * 10) })
        local echo = require("cjson").decode(res.body)
        assert.equal(tostring(i * 10), echo.headers["content-length"])
        assert.equal(i * 10, #echo.body)
      end
      assert.equal(1, assert(m:counters()).connections)
      c:close()
    end)
  end)

  describe("the C entry points called directly", function()
    it("policy.header_table reads only within its string", function()
      assert.same({}, policy.header_table("abc"))
      assert.same({}, policy.header_table("a\0b"))        -- a value cut short ends the table
      assert.same({}, policy.header_table("\0"))
      assert.same({ a = "b" }, policy.header_table("a\0b\0c"))
      assert.same({ a = { "1", "2" } }, policy.header_table("A\0001\0a\0002\0"))
      local rng = 12345
      for _ = 1, 500 do                                     -- random blocks: no crash, no read past the end
        local bytes = {}
        for j = 1, rng % 40 do
          rng = (rng * 1103515245 + 12345) % 2147483648
          bytes[j] = string.char(rng % 4 == 0 and 0 or 97 + rng % 26)
        end
        assert.is_table(policy.header_table(table.concat(bytes)))
      end
      assert.has_error(function() policy.header_table(nil) end)
    end)

    it("policy.status_line and policy.head refuse garbage and keep line breaks out of values", function()
      assert.is_nil(policy.status_line("HTTP/1.1 2OO OK"))
      assert.is_nil(policy.status_line("HTTP/1.1 000 X"))
      assert.is_nil(policy.status_line(""))
      assert.equal(200, (policy.status_line("HTTP/1.1 200 OK\r\n")))
      for _, max in ipairs { math.huge, -math.huge, 0 / 0, -1, 1e300, 2 ^ 64 } do
        local head = policy.head(max)
        assert.is_true(head:add("x-a: 1\r\n"))
        assert.equal("1", head:get("x-a"))
      end
      local head = policy.head()
      local ok, why = head:add("x-a: 1\r\nx-injected: 2\r\n")     -- one line holding two
      assert.is_nil(ok)
      assert.equal("malformed", why)
      ok, why = head:add("x-b: 1\rx-injected: 2")
      assert.is_nil(ok)
      assert.equal("malformed", why)
      assert.is_nil(head:get("x-a"))
      assert.is_nil(head:get("x-b"))
      assert.equal("too_large", select(2, policy.head(100):add("x-c: " .. ("a"):rep(200))))
    end)

    it("policy.sse takes any number as its limit", function()
      for _, max in ipairs { math.huge, -math.huge, 0 / 0, -1, 1e300, 2 ^ 64, 0.5 } do
        local parser = policy.sse(max)
        local events = assert(parser:feed("data: x\n\n"))
        assert.equal("x", events[1].data)
      end
      assert.is_nil((policy.sse(8):feed("data: " .. ("x"):rep(100) .. "\n\n")))
    end)

    it("core.engine refuses a configuration with huge, negative or NaN ms fields, naming them", function()
      local function compiled() return (options.client { base_url = m.http_url }) end
      local fields = {
        { { "client", "timeout_ms", "total" }, "client.timeout_ms.total" },
        { { "client", "timeout_ms", "idle" }, "client.timeout_ms.idle" },
        { { "retry", "cap_ms" }, "retry.cap_ms" },
        { { "retry", "honor_retry_after_ms" }, "retry.honor_retry_after_ms" },
        { { "upstream", "breaker", "open_ms" }, "upstream.breaker.open_ms" },
        { { "upstream", "breaker", "window_ms" }, "upstream.breaker.window_ms" },
        { { "upstream", "limits", "max_pause_ms" }, "upstream.limits.max_pause_ms" },
        { { "upstream", "budget", "slot_ms" }, "upstream.budget.slot_ms" },
        { { "retry", "attempts" }, "retry.attempts" },
        { { "upstream", "limits", "concurrency" }, "upstream.limits.concurrency" },
        { { "upstream", "limits", "queue" }, "upstream.limits.queue" },
      }
      for _, f in ipairs(fields) do
        for _, v in ipairs { math.huge, -math.huge, 0 / 0, -1, 1e300, "5" } do
          local cfg = compiled()
          local t = cfg
          for i = 1, #f[1] - 1 do t = t[f[1][i]] end
          t[f[1][#f[1]]] = v
          raises(function() core.engine(cfg) end, f[2])
        end
      end
      assert.has_error(function() core.engine(5) end)
    end)

    it("core.engine refuses client header lines with CR, LF, NUL, no colon, or framing", function()
      for _, line in ipairs { "X-A: a\r\nX-B: b", "X-A: a\nX-B: b", "X-A: a\0b", "X-A a", ": a",
                              "Host: evil", "Content-Length: 1", "X A: b" } do
        local cfg = options.client { base_url = m.http_url }
        cfg.transport.headers = { line }
        raises(function() core.engine(cfg) end, "client headers")
      end
    end)

    it("an engine refuses bad requests and bad arguments without sending", function()
      local e = core.engine((options.client { base_url = m.http_url }))
      local handle = {}
      raises(function() e:submit(handle, { path = "/echo", headers = { ["x-a"] = "a\r\nX-Evil: 1" } }) end,
             "contains CR, LF or NUL")
      raises(function() e:check({ path = "/echo", headers = { Host = "x" } }) end, "frames the message")
      raises(function() e:check({ path = "/echo", stream = true }) end, "'stream'")
      raises(function() e:submit(handle, { path = "/echo", json = {} }) end, "'json' was not encoded")
      raises(function() e:submit(handle, "x") end, "request must be a table")
      for _, v in ipairs { 0 / 0, math.huge, -math.huge, -1 } do e:step(v) end
      assert.equal(0, requests())
      -- a ready queue taken at an absurd position is refused, not overflowed
      local r = e:submit(handle, { path = "/echo" })
      assert(r)
      local t0 = sturdy.monotime()
      while select(2, e:step(50)) ~= true and sturdy.monotime() - t0 < 5 do end
      for _, at in ipairs { 2 ^ 31 - 1, 2 ^ 40, -8 } do
        local ok, msg = pcall(e.take, e, {}, at)
        assert.is_false(ok)
        assert.matches("queue length out of range", msg, 1, true)
      end
      local q = {}
      local n = e:take(q, 0)
      assert.equal(4, n)
      assert.equal("done", q[1])
      assert.equal(handle, q[2])
      assert.equal(200, q[3].status)
      e:close()
    end)
  end)

  describe("the provider guard", function()
    it("returns bad_request for a fractional, negative, zero, NaN or other max_tokens, with nothing sent", function()
      local claude = anthropic.new { api_key = KEY, base_url = m.http_url, model = "claude-sonnet-4-5" }
      local gpt = openai.new { api_key = KEY, base_url = m.http_url, model = "gpt-4o-mini" }
      for _, v in ipairs { 1.5, -1, 0, 0 / 0, math.huge, "10", {} } do
        local reply, err = claude:messages { max_tokens = v, messages = ASK.messages }
        assert.is_nil(reply)
        assert.equal("bad_request", err.kind)
        assert.matches("max_tokens must be a whole number", err.message, 1, true)
        reply, err = gpt:chat { max_completion_tokens = v, messages = ASK.messages }
        assert.is_nil(reply)
        assert.equal("bad_request", err.kind)
        reply, err = gpt:chat { max_tokens = v, messages = ASK.messages }
        assert.is_nil(reply)
        assert.equal("bad_request", err.kind)
        local req, perr = claude:prepare { max_tokens = v, messages = ASK.messages }
        assert.is_nil(req)
        assert.equal("bad_request", perr.kind)
        local iter = claude:stream { max_tokens = v, messages = ASK.messages }
        local ev = iter()
        assert.equal("error", ev.type)
        assert.equal("bad_request", ev.error.kind)
        assert.is_nil(iter())
      end
      assert.equal(0, requests())
      claude.client:close()
      gpt.client:close()
    end)

    it("raises for a max_input_chars or max_tokens_cap that is not a whole number >= 1, naming it", function()
      for _, name in ipairs { "max_input_chars", "max_tokens_cap" } do
        for _, v in ipairs { 2.5, 0, -1, 0 / 0, math.huge } do
          raises(function() anthropic.new { api_key = KEY, [name] = v } end,
                 "option '" .. name .. "' in anthropic.new must be a whole number >= 1")
          raises(function() openai.new { api_key = KEY, [name] = v } end,
                 "option '" .. name .. "' in openai.new must be a whole number >= 1")
        end
      end
      -- the guard itself never hits a format error on a whole cap
      local claude = anthropic.new { api_key = KEY, base_url = m.http_url, model = "m", max_input_chars = 1,
                                     max_tokens_cap = 8 }
      local _, err = claude:messages(ASK)
      assert.equal("too_large", err.kind)
      assert.matches("above max_input_chars (1)", err.message, 1, true)
      _, err = claude:messages { max_tokens = 9, messages = { { role = "user", content = "a" } } }
      assert.equal("bad_request", err.kind)
      assert.matches("above max_tokens_cap (8)", err.message, 1, true)
      assert.equal(0, requests())
      claude.client:close()
    end)
  end)

  describe("record_usage", function()
    it("refuses NaN, infinite, negative or missing amounts, naming them, and keeps the totals clean", function()
      local c = client()
      local good = { input = 10, output = 5, cache_read = 0, cache_write = 0 }
      local function usage(k, v)
        local u = {}
        for name, x in pairs(good) do u[name] = x end
        u[k] = v
        return u
      end
      for _, v in ipairs { 0 / 0, math.huge, -1, "5", false } do
        for _, k in ipairs { "input", "output", "cache_read", "cache_write" } do
          raises(function() c:record_usage("k", usage(k, v)) end, "record_usage takes usage." .. k)
        end
        raises(function() c:record_usage("k", good, { input = v, output = 1 }) end, "estimated.input")
        raises(function() c:record_usage("k", good, nil, v) end, "record_usage takes cost")
      end
      raises(function() c:record_usage("k", usage("input", nil)) end, "usage.input")
      raises(function() c:record_usage(nil, good) end, "key string")
      raises(function() c:record_usage("k", nil) end, "usage table")
      c:record_usage("k", good, { input = 8, output = 16 }, 0.25)
      local u = c:stats().usage
      assert.same({ calls = 1, input = 10, output = 5, cache_read = 0, cache_write = 0, cost = 0.25 }, u)
      c:close()
    end)
  end)

  describe("an absolute url", function()
    it("is keyed under its own host: a 429 pause on host A does not hold host B", function()
      local a_url = m.http_url                                   -- 127.0.0.1:PORT
      local b_url = "http://localhost:" .. m.port
      local c = sturdy.client { base_url = a_url, retry = { attempts = 1 } }
      local key_a = c:key_for { path = "/echo" }
      local key_b = c:key_for { url = b_url .. "/echo" }
      assert.equal("127.0.0.1:" .. m.port, key_a)
      assert.equal("localhost:" .. m.port, key_b)
      assert.equal(key_b, c:key_for { url = "http://user:pw@localhost:" .. m.port .. "/echo" })
      local _, err = c:request { path = "/echo", headers = steps("a429", "429;retry-after=30") }
      assert.equal("rate_limited", err.kind)
      assert.is_true(c:stats(key_a).limits.paused_for > 20)
      local held = c:submit { path = "/echo" }                  -- waits out host A's pause
      local t0 = sturdy.monotime()
      local res = assert(c:request { url = b_url .. "/echo" })
      assert.equal(200, res.status)
      assert.is_true(sturdy.monotime() - t0 < 5)
      assert.equal(key_b, res.key)
      assert.is_nil(c:stats(key_b).limits.paused_for)
      assert.is_false(held:done())
      assert.equal(1, c:stats(key_a).queued)
      assert.equal(2, assert(m:counters()).paths["/echo"])      -- A's 429, then only B's call
      c:close()
      assert.equal("canceled", select(2, held:result()).kind)
    end)

    it("goes under the client's key when the client names one", function()
      local c = sturdy.client { base_url = m.http_url, key = "mine" }
      assert.equal("mine", c:key_for { url = "http://localhost:" .. m.port .. "/echo" })
      c:close()
    end)
  end)
end)
