-- The Anthropic and OpenAI modules against the mock: replies, usage, cost,
-- learned limits, the input guard, malformed replies and key handling.
local anthropic = require "sturdy.anthropic"
local openai = require "sturdy.openai"
local mock = require "spec.support.mock"

local KEY = "sk-ant-test-0123456789abcdef"

describe("providers", function()
  local m

  setup(function() m = assert(mock.start()) end)
  teardown(function() m:stop() end)
  before_each(function() m:reset() end)

  local function claude(opts)
    local o = { api_key = KEY, base_url = m.http_url, model = "claude-sonnet-4-5" }
    for k, v in pairs(opts or {}) do o[k] = v end
    return anthropic.new(o)
  end

  local function gpt(opts)
    local o = { api_key = KEY, base_url = m.http_url, model = "gpt-4o-mini" }
    for k, v in pairs(opts or {}) do o[k] = v end
    return openai.new(o)
  end

  describe("anthropic", function()
    it("sends the provider's request and decodes the reply with usage, cost and request id", function()
      local c = claude()
      local r = assert(c:messages {
        max_tokens = 64, system = "Be brief.", temperature = 0.2, stop_sequences = { "END" },
        metadata = { user_id = "u-1" },
        messages = { { role = "user", content = "Hello there" } },
      })
      assert.equal("Echo: Hello there", r.text)
      assert.equal("message", r.reply.type)
      assert.equal("end_turn", r.stop_reason)
      assert.equal("claude-sonnet-4-5", r.model)
      assert.matches("^req_", r.request_id)
      assert.is_true(r.usage.input > 0)
      assert.is_true(r.usage.output > 0)
      assert.equal(0, r.usage.cache_read)
      assert.is_number(r.latency)
      assert.equal(1, #r.attempts)
      -- $3 in, $15 out per million
      assert.near((r.usage.input * 3 + r.usage.output * 15) / 1e6, r.cost, 1e-12)
      local key = m.http_url:match("^http://(.*)$") .. "/claude-sonnet-4-5"
      local s = c.client:stats(key)
      assert.equal(1, s.usage.calls)
      assert.near(r.cost, s.usage.cost, 1e-12)
      assert.equal(4000, s.limits.requests.learned)
      assert.is_number(s.limits.output_tokens.limit)
      c.client:close()
    end)

    it("sets the required headers, with the key only in x-api-key", function()
      local c = claude { version = "2024-01-01" }
      local r = assert(c.client:request(c:_request({ max_tokens = 5, messages = {} })))
      assert.equal(200, r.status)
      local echo = assert(c.client:request { path = "/echo", headers = c:_request({ messages = {} }).headers })
      local sent = require("cjson").decode(echo.body).headers
      assert.equal(KEY, sent["x-api-key"])
      assert.equal("2024-01-01", sent["anthropic-version"])
      c.client:close()
    end)

    it("retries an overloaded reply and reports the attempts", function()
      local c = claude { client_options = { retry = { base = { overloaded = 0.01 } } } }
      local r = assert(c:messages({ max_tokens = 5, messages = { { role = "user", content = "x" } } }))
      assert.equal(1, #r.attempts)
      local c2 = claude { client_options = {
        retry = { base = { overloaded = 0.01 } },
        headers = { ["x-mock-steps"] = "529|529|200", ["x-mock-steps-sep"] = "|" },
      } }
      r = assert(c2:messages({ max_tokens = 5, messages = { { role = "user", content = "y" } } }))
      assert.equal(3, #r.attempts)
      c.client:close()
      c2.client:close()
    end)

    it("returns a typed error with the provider's detail", function()
      local c = claude { client_options = { headers = { ["x-mock-steps"] = "401" } } }
      local r, err = c:messages { max_tokens = 5, messages = { { role = "user", content = "x" } } }
      assert.is_nil(r)
      assert.equal("auth", err.kind)
      assert.equal("authentication_error", err.type)
      c.client:close()
    end)

    it("reports malformed JSON as bad_response with the body's first bytes", function()
      local c = claude { client_options = { headers = { ["x-mock-steps"] = "malformed" } } }
      local r, err = c:messages { max_tokens = 5, messages = { { role = "user", content = "x" } } }
      assert.is_nil(r)
      assert.equal("bad_response", err.kind)
      assert.matches('{"id": "msg_broken"', err.detail, 1, true)
      c.client:close()
    end)

    it("guards input size and max_tokens before sending anything", function()
      local c = claude { max_input_chars = 10, max_tokens_cap = 100 }
      local r, err = c:messages { max_tokens = 5, messages = { { role = "user", content = "far too long for it" } } }
      assert.is_nil(r)
      assert.equal("too_large", err.kind)
      assert.matches("max_input_chars %(10%)", err.message)
      r, err = c:messages { max_tokens = 500, messages = { { role = "user", content = "short" } } }
      assert.is_nil(r)
      assert.equal("bad_request", err.kind)
      assert.matches("max_tokens_cap %(100%)", err.message)
      assert.equal(0, m:counters().requests)
      c.client:close()
    end)

    it("takes the key from ANTHROPIC_API_KEY, and refuses to start without one", function()
      local lua = arg and arg[-1] or "lua"
      local code = [[
        local a = require "sturdy.anthropic"
        local ok, err = pcall(a.new, { model = "m" })
        io.write(ok and "made" or err)
      ]]
      local function run(env)
        local p = io.popen(("%s LUA_PATH=%q LUA_CPATH=%q %s -e %q"):format(env, package.path, package.cpath, lua, code))
        local out = p:read("*a")
        p:close()
        return out
      end
      assert.equal("made", run("ANTHROPIC_API_KEY=sk-from-env"))
      assert.matches("needs an API key: pass api_key or set ANTHROPIC_API_KEY", run("env -u ANTHROPIC_API_KEY"))
      assert.has_error(function() anthropic.new { api_key = KEY, modle = "x" } end,
        "sturdy: unknown option 'modle' in anthropic.new")
    end)
  end)

  describe("openai", function()
    it("decodes a chat completion with usage, cost and request id", function()
      local g = gpt()
      local r = assert(g:chat { messages = { { role = "user", content = "Hello there" } }, temperature = 0 })
      assert.equal("Echo: Hello there", r.text)
      assert.equal("stop", r.stop_reason)
      assert.matches("^req_", r.request_id)
      assert.is_true(r.usage.input > 0 and r.usage.output > 0)
      assert.near((r.usage.input * 0.15 + r.usage.output * 0.60) / 1e6, r.cost, 1e-12)
      local key = m.http_url:match("^http://(.*)$") .. "/gpt-4o-mini"
      local s = g.client:stats(key)
      assert.is_number(s.limits.requests.limit)
      assert.is_number(s.limits.tokens.limit)
      g.client:close()
    end)

    it("sends the key as a bearer token", function()
      local g = gpt()
      local echo = assert(g.client:request { path = "/echo", headers = g:_request({ messages = {} }).headers })
      assert.equal("Bearer " .. KEY, require("cjson").decode(echo.body).headers["authorization"])
      g.client:close()
    end)

    it("returns typed errors in OpenAI's shape", function()
      local g = gpt { client_options = { headers = { ["x-mock-steps"] = "400" } } }
      local _, err = g:chat { messages = { { role = "user", content = "x" } } }
      assert.equal("bad_request", err.kind)
      assert.equal("invalid_request_error", err.type)
      g.client:close()
    end)
  end)

  it("gives token counts as integers, in the common usage and in the reply (120, not 120.0)", function()
    local c, g = claude(), gpt()
    local ra = assert(c:messages { max_tokens = 5, messages = { { role = "user", content = "count me" } } })
    local rg = assert(g:chat { messages = { { role = "user", content = "count me" } } })
    for _, n in ipairs { ra.usage.input, ra.usage.output, ra.usage.cache_read, ra.reply.usage.input_tokens,
                         ra.reply.usage.output_tokens, rg.usage.input, rg.usage.output, rg.reply.usage.total_tokens,
                         rg.reply.usage.completion_tokens_details.reasoning_tokens } do
      assert.matches("^%d+$", tostring(n))
      if math.type then assert.equal("integer", math.type(n)) end
    end
    c.client:close()
    g.client:close()
  end)

  it("uses a model price the user adds", function()
    local prices = require "sturdy.prices"
    prices["claude-custom"] = { input = 1000000, output = 0 }
    local c = claude { model = "claude-custom" }
    local r = assert(c:messages { max_tokens = 5, messages = { { role = "user", content = "abcd" } } })
    assert.equal(r.usage.input, r.cost)
    prices["claude-custom"] = nil
    c.client:close()
  end)

  it("never shows the key in tostring of its objects", function()
    local c = claude()
    assert.not_matches(KEY, tostring(c), 1, true)
    assert.not_matches(KEY, tostring(c.client), 1, true)
    for _, v in pairs(c) do
      if type(v) == "string" then assert.not_matches(KEY, v, 1, true) end
    end
    c.client:close()
  end)
end)
