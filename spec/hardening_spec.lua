-- Hostile servers and careless callers (issue 11): server hints and timeouts
-- are bounded, counts are whole numbers in range, malformed replies are typed
-- errors that say why, err.retryable is the core's, every kind prints a real
-- line, and a stream of any length drains in order. Against the real mock;
-- what reached it is read from its counters.
local sturdy = require "sturdy"
local options = require "sturdy.options"
local anthropic = require "sturdy.anthropic"
local openai = require "sturdy.openai"
local mock = require "spec.support.mock"

local steps = mock.steps
local FAST = { throttled = 0.001, overloaded = 0.001, transient = 0.001, timeout = 0.001, fatal = 0.001 }
local KEY = "sk-hardening-0123456789abcdef"
local ASK = { max_tokens = 16, messages = { { role = "user", content = "hi" } } }
local now = sturdy.monotime

-- 1000 days: long enough to pass every cap, short enough to be carried exactly
local LONG_HINT = 86400000
-- far beyond 10 years: the hint parser's documented ceiling applies
local ABSURD_HINT = "99999999999"

describe("hardening", function()
  local m

  setup(function() m = assert(mock.start()) end)
  teardown(function() m:stop() end)
  before_each(function() m:reset() end)

  local function client(extra)
    local cfg = { base_url = m.http_url, retry = { base = FAST } }
    for k, v in pairs(extra or {}) do cfg[k] = v end
    return sturdy.client(cfg)
  end

  local function requests() return assert(m:counters()).requests end

  describe("server hints", function()
    it("open the breaker on a long 503 Retry-After for at most max_open_for, and the error keeps the hint", function()
      local c = client { breaker = { open_for = 0.2, max_open_for = 0.5 } }
      local key = c:key_for { path = "/echo" }
      local _, err = c:request { path = "/echo", headers = steps("b1", "503;retry-after=" .. LONG_HINT) }
      assert.equal("overloaded", err.kind)
      assert.equal(503, err.status)
      assert.equal("hint_too_long", err.stopped)
      assert.equal(LONG_HINT, err.retry_after)            -- the whole hint, surfaced
      local breaker = c:stats(key).breaker
      assert.equal("open", breaker.state)
      assert.is_true(breaker.retry_in > 0 and breaker.retry_in <= 0.5, "retry_in " .. tostring(breaker.retry_in))
      local _, refused = c:request { path = "/echo" }
      assert.equal("circuit_open", refused.kind)
      assert.is_true(refused.retry_after > 0 and refused.retry_after <= 0.5)
      local before = requests()
      local t0 = now()
      while now() - t0 < 0.6 do c:poll(0.05) end
      local res = assert(c:request { path = "/echo" })   -- half-open after max_open_for, not 1000 days
      assert.equal(200, res.status)
      assert.equal(before + 1, requests())
      c:close()
    end)

    it("open it for at most the default max_open_for on an absurd hint", function()
      local c = client()
      local key = c:key_for { path = "/echo" }
      local _, err = c:request { path = "/echo", headers = steps("b2", "503;retry-after=" .. ABSURD_HINT) }
      assert.equal("hint_too_long", err.stopped)
      -- the hint as parsed: clamped to the documented ceiling of 10 years, beyond any cap
      assert.equal(options.MAX_SECONDS, err.retry_after)
      local cap = options.DEFAULTS.upstream.breaker.max_open_ms / 1000
      local retry_in = c:stats(key).breaker.retry_in
      assert.is_true(retry_in > 0 and retry_in <= cap, "retry_in " .. tostring(retry_in))
      assert.is_nil(tostring(err):find("e+", 1, true))  -- printed as plain seconds
      assert.matches("retry after 315360000s", tostring(err), 1, true)
      c:close()
    end)

    it("pause the key on a long 429 Retry-After for at most limits.max_pause", function()
      local c = client { limits = { max_pause = 0.5 } }
      local key = c:key_for { path = "/echo" }
      local _, err = c:request { path = "/echo", headers = steps("p1", "429;retry-after=" .. LONG_HINT) }
      assert.equal("rate_limited", err.kind)
      assert.equal("hint_too_long", err.stopped)
      assert.equal(LONG_HINT, err.retry_after)
      local paused = c:stats(key).limits.paused_for
      assert.is_true(paused > 0 and paused <= 0.5, "paused_for " .. tostring(paused))
      -- the next call waits out the short pause and goes through
      local before = requests()
      local res = assert(c:request { path = "/echo" })
      assert.equal(200, res.status)
      assert.equal(before + 1, requests())
      c:close()
    end)

    it("pause it for at most the default max_pause (300 s) on an absurd hint", function()
      assert.equal(300000, options.DEFAULTS.upstream.limits.max_pause_ms)
      local c = client()
      local key = c:key_for { path = "/echo" }
      local _, err = c:request { path = "/echo", headers = steps("p2", "429;retry-after=" .. ABSURD_HINT) }
      assert.equal("hint_too_long", err.stopped)
      assert.equal(options.MAX_SECONDS, err.retry_after)
      local paused = c:stats(key).limits.paused_for
      assert.is_true(paused > 0 and paused <= 300, "paused_for " .. tostring(paused))
      -- a call now is refused at once, nothing sent, with the capped wait
      local before = requests()
      local _, refused = c:request { path = "/echo" }
      assert.equal("rate_limited", refused.kind)
      assert.is_true(refused.retry_after > 0 and refused.retry_after <= 300)
      assert.equal(before, requests())
      c:close()
    end)

    it("cap an HTTP-date hint in the year 9999 the same way", function()
      local c = client { breaker = { open_for = 0.2, max_open_for = 0.5 }, limits = { max_pause = 0.5 } }
      local date = "Fri, 31 Dec 9999 23:59:59 GMT"
      local _, err = c:request { path = "/echo", key = "d503", headers = steps("d1", "503;retry-after=" .. date) }
      assert.equal("hint_too_long", err.stopped)
      assert.equal(options.MAX_SECONDS, err.retry_after)
      assert.is_true(c:stats("d503").breaker.retry_in <= 0.5)
      _, err = c:request { path = "/echo", key = "d429", headers = steps("d2", "429;retry-after=" .. date) }
      assert.equal("hint_too_long", err.stopped)
      assert.is_true(c:stats("d429").limits.paused_for <= 0.5)
      c:close()
    end)

    it("cap a retry-after-ms hint the same way", function()
      local c = client { breaker = { open_for = 0.2, max_open_for = 0.5 } }
      local key = c:key_for { path = "/echo" }
      local _, err = c:request { path = "/echo", headers = steps("p3", "529;retry-after-ms=" .. LONG_HINT * 1000) }
      assert.equal("hint_too_long", err.stopped)
      assert.equal(LONG_HINT, err.retry_after)
      assert.is_true(c:stats(key).breaker.retry_in <= 0.5)
      c:close()
    end)

    it("come with a max_open_for the breaker cannot quietly raise", function()
      -- the breaker would lift a cap below open_for up to open_for: refused instead
      local ok, msg = pcall(sturdy.client, { base_url = m.http_url, breaker = { max_open_for = 0.5 } })
      assert.is_false(ok)
      assert.matches("sturdy: option 'max_open_for' in client options.breaker (0.5s) must be at least open_for (15s)",
                     msg, 1, true)
      assert(sturdy.client { base_url = m.http_url, breaker = { open_for = 2, max_open_for = 2 } }):close()
    end)
  end)

  describe("timeouts", function()
    it("round a sub-millisecond client timeout up to 1 ms, never to none", function()
      local c = client { retry = { attempts = 1 }, timeout = { first_byte = 0.0001 } }
      local _, err = c:request { path = "/echo", headers = steps("t1", "200;delay=300") }
      assert.equal("first_byte_timeout", err.kind)
      c:close()
    end)

    it("round a sub-millisecond request timeout up to 1 ms, never to none", function()
      local c = client { retry = { attempts = 1 } }
      local _, err = c:request { path = "/echo", timeout = { first_byte = 0.0004 },
                                 headers = steps("t2", "200;delay=300") }
      assert.equal("first_byte_timeout", err.kind)
      _, err = c:request { path = "/echo", timeout = { total = 0.0001 }, headers = steps("t3", "200;delay=300") }
      assert.equal("total_timeout", err.kind)
      c:close()
    end)

    it("refuse more than 10 years, and NaN, infinity, zero or negatives, naming the option", function()
      local bad = { options.MAX_SECONDS + 1, math.huge, 0 / 0, -1, 0, "5" }
      for _, name in ipairs { "connect", "first_byte", "idle", "total" } do
        for _, v in ipairs(bad) do
          assert.has_error(function() sturdy.client { base_url = m.http_url, timeout = { [name] = v } } end)
          local ok, msg = pcall(sturdy.client, { base_url = m.http_url, timeout = { [name] = v } })
          assert.is_false(ok)
          assert.matches("sturdy: option '" .. name .. "' in client options.timeout must be", msg, 1, true)
        end
      end
      local c = client()
      local before = requests()
      for _, name in ipairs { "connect", "first_byte", "idle", "total" } do
        for _, v in ipairs(bad) do
          local ok, msg = pcall(c.request, c, { path = "/echo", timeout = { [name] = v } })
          assert.is_false(ok)
          assert.matches("sturdy: option '" .. name .. "' in request.timeout must be", msg, 1, true)
        end
      end
      assert.equal(before, requests())
      -- 10 years itself is allowed
      assert(sturdy.client { base_url = m.http_url, timeout = { total = options.MAX_SECONDS } }):close()
      c:close()
    end)

    it("refuse out-of-range values for every option in seconds of the schema", function()
      -- siblings: every leaf of kind seconds, not only the timeouts
      local checked = 0
      local function walk(section, path, build)
        for name, spec in pairs(section.fields) do
          if spec.fields then
            walk(spec, path .. "." .. name, function(v) return build { [name] = v } end)
          elseif spec[1] == "seconds" or spec[1] == "seconds|false" or spec[1] == "seconds|classes" then
            for _, v in ipairs { math.huge, -math.huge, 0 / 0, -1, options.MAX_SECONDS * 2 } do
              local ok, msg = pcall(sturdy.client, build { [name] = v })
              assert.is_false(ok, path .. "." .. name .. " took " .. tostring(v))
              assert.matches("sturdy: ", msg, 1, true)
              assert.matches(name, msg, 1, true)
            end
            checked = checked + 1
          end
        end
      end
      walk(options.CLIENT, "client options", function(t)
        t.base_url = t.base_url or m.http_url
        return t
      end)
      assert.is_true(checked >= 14, "checked " .. checked)
    end)
  end)

  describe("counts", function()
    local BAD = { math.huge, 0 / 0, 1.5, 2 ^ 32, 2 ^ 53, -1, 0 }

    it("refuse math.huge, NaN, fractions and 2^32 for retry.attempts, limits.concurrency and limits.queue", function()
      for _, opt in ipairs { { "retry", "attempts" }, { "limits", "concurrency" }, { "limits", "queue" } } do
        for _, v in ipairs(BAD) do
          local ok, msg = pcall(sturdy.client, { base_url = m.http_url, [opt[1]] = { [opt[2]] = v } })
          assert.is_false(ok, opt[2] .. " took " .. tostring(v))
          assert.matches(("sturdy: option '%s' in client options.%s must be a whole number"):format(opt[2], opt[1]),
                         msg, 1, true)
        end
      end
    end)

    it("refuse them for every count option of the schema", function()
      local checked = 0
      local function walk(section, build)
        for name, spec in pairs(section.fields) do
          if spec.fields then
            walk(spec, function(v) return build { [name] = v } end)
          elseif spec[1] == "count" then
            for _, v in ipairs { math.huge, 0 / 0, 1.5, 2 ^ 64 } do
              local ok, msg = pcall(sturdy.client, build { [name] = v })
              assert.is_false(ok, name .. " took " .. tostring(v))
              assert.matches("option '" .. name .. "'", msg, 1, true)
            end
            checked = checked + 1
          end
        end
      end
      walk(options.CLIENT, function(t)
        t.base_url = t.base_url or m.http_url
        return t
      end)
      assert.is_true(checked >= 8, "checked " .. checked)
    end)

    it("refuse them for a request's attempts and max_response, and send nothing", function()
      local c = client()
      local before = requests()
      for _, field in ipairs { "attempts", "max_response" } do
        for _, v in ipairs(BAD) do
          if not (field == "max_response" and (v == 2 ^ 32 or v == 2 ^ 53)) then -- legal sizes
            local ok, msg = pcall(c.request, c, { path = "/echo", [field] = v })
            assert.is_false(ok, field .. " took " .. tostring(v))
            assert.matches("sturdy: option '" .. field .. "' in request must be a whole number", msg, 1, true)
          end
        end
      end
      assert.equal(before, requests())
      c:close()
    end)

    it("refuse them for batch's concurrency", function()
      local c = client()
      for _, v in ipairs(BAD) do
        assert.has_error(function() c:batch({ { path = "/echo" } }, { concurrency = v }) end)
      end
      assert.equal(0, requests())
      c:close()
    end)
  end)

  describe("malformed replies", function()
    it("are bad_response for a garbage status line, not bad_url", function()
      local c = client()
      for _, s in ipairs { "garbage", "garbage;code=abc", "garbage;code=000", "garbage;code=2000",
                           "garbage;code=099", "garbage;code=20", "garbage;code=600", "garbage;code=999" } do
        local _, err = c:request { path = "/echo", headers = steps(s, s) }
        assert.equal("bad_response", err.kind, s .. ": " .. tostring(err))
        assert.equal("fatal", err.class)
        assert.is_false(err.retryable)
        assert.equal(1, m:scenario(s).count)
        assert.matches("^sturdy: bad_response", tostring(err))
      end
      c:close()
    end)

    it("still call a URL libcurl cannot parse bad_url, with nothing sent", function()
      local c = client()
      local _, err = c:request { url = "http://[::1/echo" }
      assert.equal("bad_url", err.kind)
      assert.equal(0, requests())
      c:close()
    end)

    it("are bad_response for one header line too long, never a fatal transport out of memory", function()
      local c = client()
      for _, s in ipairs { "big_head;line=1;size=200000", "big_head;line=1;size=2000000" } do
        local _, err = c:request { path = "/echo", headers = steps(s, s) }
        assert.is_true(err.kind == "bad_response" or err.kind == "response_too_large", s .. ": " .. tostring(err))
        assert.is_nil(tostring(err):lower():find("out of memory", 1, true))
      end
      -- a long line below libcurl's limit is an ordinary reply
      local res = assert(c:request { path = "/echo", headers = steps("fits", "big_head;line=1;size=50000") })
      assert.equal(50000, #res.headers["x-pad"])
      c:close()
    end)

    it("are bad_response for a head of many lines past the head limit", function()
      local c = client()
      local _, err = c:request { path = "/echo", headers = steps("bh", "big_head;size=400000") }
      assert.equal("bad_response", err.kind)
      assert.matches("head too large", err.detail, 1, true)
      c:close()
    end)
  end)

  describe("err.detail after a partial body", function()
    it("says the body stalled, not what the body began with", function()
      local c = client { retry = { attempts = 1 } }
      local _, err = c:request { path = "/echo", timeout = { idle = 0.2 },
                                 headers = steps("s1", "stall_mid;stall=3000") }
      assert.equal("idle_timeout", err.kind)
      assert.matches("idle_timeout after", err.detail, 1, true)
      assert.is_nil(err.detail:find("method", 1, true))       -- the echo body's first field
      assert.matches("the response stalled", tostring(err), 1, true)
      c:close()
    end)

    it("says so for a provider's reply too", function()
      local claude = anthropic.new { api_key = KEY, base_url = m.http_url, model = "claude-sonnet-4-5",
                                     client_options = { retry = { attempts = 1 }, timeout = { idle = 0.2 } } }
      local _, err = claude:messages(ASK, { headers = steps("s2", "stall_mid;stall=3000") })
      assert.equal("idle_timeout", err.kind)
      assert.matches("idle_timeout after", err.detail, 1, true)
      assert.is_nil(err.detail:find("msg_", 1, true))
      claude.client:close()
    end)

    it("says the body passed max_response", function()
      local c = client()
      for _, s in ipairs { "huge;size=300000", "huge;size=300000;chunked=1" } do
        local _, err = c:request { path = "/echo", max_response = 1000, headers = steps(s, s) }
        assert.equal("response_too_large", err.kind)
        assert.matches("exceeds max_response", err.detail, 1, true)
        assert.is_nil(err.detail:find("padding", 1, true))   -- the huge body's first bytes
      end
      c:close()
    end)

    it("says the deadline passed mid-body", function()
      local c = client { retry = { attempts = 1 } }
      local _, err = c:request { path = "/echo", timeout = { total = 0.3 },
                                 headers = steps("s3", "huge;size=100000;drip=100;pieces=50") }
      assert.equal("total_timeout", err.kind)
      assert.matches("total_timeout after", err.detail, 1, true)
      assert.is_nil(err.detail:find("padding", 1, true))
      c:close()
    end)
  end)

  describe("empty provider replies", function()
    for _, shape in ipairs { "object", "array", "bare" } do
      it("are bad_response for anthropic and openai: 200 with " .. shape, function()
        local claude = anthropic.new { api_key = KEY, base_url = m.http_url, model = "claude-sonnet-4-5" }
        local reply, err = claude:messages(ASK, { headers = steps("a" .. shape, "shape;json=" .. shape) })
        assert.is_nil(reply)
        assert.equal("bad_response", err.kind)
        assert.equal(200, err.status)
        assert.matches("no content", err.message, 1, true)
        local gpt = openai.new { api_key = KEY, base_url = m.http_url, model = "gpt-4o-mini" }
        reply, err = gpt:chat({ messages = ASK.messages }, { headers = steps("o" .. shape, "shape;json=" .. shape) })
        assert.is_nil(reply)
        assert.equal("bad_response", err.kind)
        assert.equal(200, err.status)
        assert.matches("no choices", err.message, 1, true)
        -- a bad reply is not a success: no usage was recorded for it
        assert.is_nil(claude.client:stats().usage)
        assert.is_nil(gpt.client:stats().usage)
        claude.client:close()
        gpt.client:close()
      end)
    end
  end)

  describe("err.retryable", function()
    it("is false with never_retry_on a class, after one attempt", function()
      local c = client { retry = { base = FAST, never_retry_on = { "transient" } } }
      local _, err = c:request { path = "/echo", headers = steps("nr", "500|200") }
      assert.equal("server", err.kind)
      assert.is_false(err.retryable)
      assert.equal(1, #err.attempts)
      assert.equal(1, m:scenario("nr").count)
      c:close()
    end)

    it("is false when the server says x-should-retry: false", function()
      local c = client()
      local _, err = c:request { path = "/echo", headers = steps("xs", "503;should-retry=false|200") }
      assert.is_false(err.retryable)
      assert.equal(1, #err.attempts)
      assert.equal(1, m:scenario("xs").count)
      c:close()
    end)

    it("is true for a 4xx named in retry_on, and it was retried", function()
      local c = client { retry = { base = FAST, attempts = 2, retry_on = { 404 } } }
      local _, err = c:request { path = "/echo", headers = steps("ro", "404") }
      assert.equal("not_found", err.kind)
      assert.is_true(err.retryable)
      assert.equal("attempts", err.stopped)
      assert.equal(2, m:scenario("ro").count)
      c:close()
    end)

    it("is false for a status named in never_retry_on, true for a class in retry_on", function()
      local c = client { retry = { base = FAST, attempts = 2, never_retry_on = { 529 }, retry_on = { "fatal" } } }
      local _, err = c:request { path = "/echo", headers = steps("n529", "529|200") }
      assert.is_false(err.retryable)
      assert.equal(1, m:scenario("n529").count)
      _, err = c:request { path = "/echo", headers = steps("f400", "400") }
      assert.is_true(err.retryable)
      assert.equal(2, m:scenario("f400").count)
      c:close()
    end)
  end)

  describe("printed errors", function()
    it("give circuit_open and queue_full a real message", function()
      local c = client { breaker = { mode = "forced_open" } }
      local _, err = c:request { path = "/echo" }
      assert.equal("circuit_open", err.kind)
      assert.equal(sturdy.MESSAGES.circuit_open, err.message)
      assert.is_nil(tostring(err):find("circuit_open: circuit_open", 1, true))
      c:close()

      c = client { limits = { concurrency = 1, queue = 1 } }
      local a = c:submit { path = "/echo", headers = steps("q1", "200;delay=300") }
      local b = c:submit { path = "/echo" }
      local over = c:submit { path = "/echo" }
      c:run()
      assert(a:result())
      assert(b:result())
      _, err = over:result()
      assert.equal("queue_full", err.kind)
      assert.equal(sturdy.MESSAGES.queue_full, err.message)
      assert.is_nil(tostring(err):find("queue_full: queue_full", 1, true))
      c:close()
    end)

    it("never print forced_open's endless wait as a number", function()
      local c = client { breaker = { mode = "forced_open" } }
      local _, err = c:request { path = "/echo" }
      assert.is_nil(err.retry_after)
      assert.is_nil(tostring(err):find("e+", 1, true))
      assert.matches("forced open", tostring(err), 1, true)
      local breaker = c:stats(c:key_for { path = "/echo" }).breaker
      assert.is_nil(breaker.retry_in)
      assert.equal(0, requests())
      c:close()
    end)

    it("give every kind the core can produce a message of its own", function()
      for _, kind in ipairs { "rate_limited", "overloaded", "server", "request_timeout", "conflict", "bad_request",
                              "auth", "permission", "not_found", "too_large", "client_error", "bad_response",
                              "response_too_large", "connection", "dns", "tls", "connect_timeout",
                              "first_byte_timeout", "idle_timeout", "total_timeout", "circuit_open", "queue_full",
                              "canceled", "bad_url", "transport", "stream_error", "stream_truncated" } do
        local msg = sturdy.MESSAGES[kind]
        assert.is_string(msg, kind)
        assert.are_not.equal(kind, msg)
        assert.is_nil(tostring(sturdy.Error.new { kind = kind }):find(kind .. ": " .. kind, 1, true))
      end
    end)
  end)

  describe("a retry the budget refuses", function()
    it("keeps the last attempt's kind and status and says the budget stopped it", function()
      local c = client { retry = { base = FAST, budget = { ratio = 0, min_per_s = 0 } } }
      local _, err = c:request { path = "/echo", headers = steps("bud", "503|200") }
      assert.equal("overloaded", err.kind)
      assert.equal(503, err.status)
      assert.equal("overloaded", err.class)
      assert.is_true(err.retryable)
      assert.equal("budget_exhausted", err.stopped)
      assert.equal(1, #err.attempts)
      assert.equal(1, m:scenario("bud").count)
      assert.matches("^sturdy: overloaded %(503", tostring(err))
      assert.matches("retry budget is spent", tostring(err), 1, true)
      c:close()
    end)
  end)
end)

describe("Stream:next", function()
  local m, dir
  local N = 80000

  -- a recorded-style Anthropic stream of N text deltas, "1" .. "N"
  local function write_fixture(path)
    local f = assert(io.open(path, "wb"))
    f:write('event: message_start\ndata: {"type":"message_start","message":{"id":"msg_long","type":"message",',
            '"role":"assistant","model":"claude-sonnet-4-5","content":[],"stop_reason":null,',
            '"usage":{"input_tokens":1,"output_tokens":1}}}\n\n',
            'event: content_block_start\ndata: {"type":"content_block_start","index":0,',
            '"content_block":{"type":"text","text":""}}\n\n')
    local chunk = {}
    for i = 1, N do
      chunk[#chunk + 1] = ('event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
        .. '"delta":{"type":"text_delta","text":"%d,"}}\n\n'):format(i)
      if #chunk == 1000 then f:write(table.concat(chunk)); chunk = {} end
    end
    f:write(table.concat(chunk),
            'event: content_block_stop\ndata: {"type":"content_block_stop","index":0}\n\n',
            'event: message_delta\ndata: {"type":"message_delta","delta":{"stop_reason":"end_turn"},',
            '"usage":{"output_tokens":', tostring(N), '}}\n\n',
            'event: message_stop\ndata: {"type":"message_stop"}\n\n')
    f:close()
  end

  setup(function()
    local p = io.popen("mktemp -d /tmp/sturdy-streams.XXXXXX")
    dir = p:read("*l")
    p:close()
    write_fixture(dir .. "/long.sse")
    m = assert(mock.start { fixtures = dir })
  end)
  teardown(function()
    m:stop()
    os.remove(dir .. "/long.sse")
    os.remove(dir)
  end)

  it("drains 80k queued events in order, each once", function()
    local claude = anthropic.new { api_key = KEY, base_url = m.http_url, model = "claude-sonnet-4-5" }
    local iter, s = claude:stream(ASK, { headers = steps("long", "replay;file=long.sse") })
    local result = assert(s:result())           -- the whole stream is read and queued first
    assert.equal(N + 5, s.tail - s.head + 1)
    local count, deltas, types = 0, 0, {}
    for ev in iter do
      count = count + 1
      types[ev.type] = (types[ev.type] or 0) + 1
      if ev.type == "content_block_delta" then
        deltas = deltas + 1
        assert.equal(deltas .. ",", ev.data.delta.text)
      end
    end
    assert.equal(N + 5, count)
    assert.equal(N, deltas)
    assert.equal(1, types.message_start)
    assert.equal(1, types.message_stop)
    assert.is_nil(next(s.queue))                 -- every slot let go
    assert.equal(N, select(2, result.text:gsub(",", "")))
    assert.equal("1,2,3,", result.text:sub(1, 6))
    assert.equal(N .. ",", result.text:sub(-#(N .. ",")))
    assert.is_nil(iter())                        -- and it stays drained
    claude.client:close()
  end)
end)
