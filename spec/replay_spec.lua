-- Recorded Anthropic and OpenAI streams (spec/fixtures/streams, the official
-- SDKs' test recordings, bytes as the API sent them) served by the mock's
-- `replay` step, so they go through the curl transport and the C SSE parser.
-- Each collected message is compared field by field with the non-streamed
-- message the SDKs give for the same stream (NAME.json beside NAME.sse).
local anthropic = require "sturdy.anthropic"
local openai = require "sturdy.openai"
local cjson = require "cjson.safe"
local mock = require "spec.support.mock"

local FIXTURES = "spec/fixtures/streams/"

local function read(name)
  local f = assert(io.open(FIXTURES .. name, "rb"))
  local data = f:read("*a")
  f:close()
  return data
end

local function show(v)
  if v == cjson.null then return "null" end
  if type(v) == "string" then return string.format("%q", v) end
  return tostring(v)
end

-- Every difference between want and got as "path: want X, got Y"; a key one
-- side lacks counts, so a private field left in a block shows up here.
local function differences(want, got, path, out)
  out = out or {}
  if type(want) == "table" and type(got) == "table" then
    local keys = {}
    for k in pairs(want) do keys[k] = true end
    for k in pairs(got) do keys[k] = true end
    for k in pairs(keys) do differences(want[k], got[k], path .. "." .. tostring(k), out) end
  elseif want ~= got then
    out[#out + 1] = path .. ": want " .. show(want) .. ", got " .. show(got)
  end
  return out
end

local function assert_same_message(want, got)
  local diff = differences(want, got, "reply")
  table.sort(diff)
  assert(#diff == 0, "collected message differs:\n  " .. table.concat(diff, "\n  "))
end

-- Every numeric field in t whose value is integral is an integer (Lua 5.3+).
local function assert_integers(t, path)
  for k, v in pairs(t) do
    if type(v) == "table" then
      assert_integers(v, path .. "." .. k)
    elseif type(v) == "number" and math.type and v % 1 == 0 then
      assert(math.type(v) == "integer", path .. "." .. k .. " is " .. tostring(v) .. ", not an integer")
    end
  end
end

local ASK = { max_tokens = 1024, messages = { { role = "user", content = "Say hello there!" } } }

-- The anthropic fixtures with an expected message, and what the common result
-- fields must say for each.
local ANTHROPIC = {
  { "anthropic_text", "basic text", text = "Hello there!", stop = "end_turn", input = 11, output = 6 },
  { "anthropic_tool_use", "tool use", text = "I'll check the current weather in Paris for you.",
    stop = "tool_use", input = 377, output = 65 },
  { "anthropic_server_tool_use", "server tool use", text = "Let me search for that.", stop = "end_turn",
    input = 42, output = 40 },
  { "anthropic_refusal", "a refusal with stop_details", text = "", stop = "refusal", input = 20, output = 120 },
  { "anthropic_usage_in_delta", "usage sent only in message_delta", text = "hi", stop = "end_turn",
    input = 11, output = 1, cache_read = 5, cache_write = 3 },
  { "anthropic_usage_in_delta_nested", "nested usage sent only in message_delta", text = "Hello",
    stop = "end_turn", input = 12, output = 6, cache_read = 3, cache_write = 4 },
  { "anthropic_delta_fields", "message_delta fields merged over message_start's", text = "Hello there!",
    stop = "end_turn", input = 40, output = 8, cache_read = 7, cache_write = 12 },
  { "anthropic_stop_details_cleared", "stop_details set to null by message_delta", text = "hi",
    stop = "end_turn", input = 11, output = 1 },
  { "anthropic_max_tokens_tool", "a tool call cut by max_tokens", stop = "max_tokens", input = 450, output = 124,
    text = "I'll create a comprehensive tax guide for someone with multiple W2s and save it in a file called"
      .. " taxes.txt. Let me do that for you now." },
}

local OPENAI = {
  { "openai_tool_call", "a tool call's deltas", text = "", stop = "tool_calls", input = 44, output = 16 },
  { "openai_two_tool_calls", "two tool calls' deltas", text = "", stop = "tool_calls", input = 149, output = 60 },
  { "openai_length", "finish_reason length", text = '{"', stop = "length", input = 17, output = 1 },
}

describe("recorded streams", function()
  local m, claude, gpt

  setup(function()
    m = assert(mock.start())
    claude = anthropic.new { api_key = "sk-test", base_url = m.http_url, model = "claude-sonnet-4-5" }
    gpt = openai.new { api_key = "sk-test", client = claude.client, base_url = m.http_url, model = "gpt-4o" }
  end)
  teardown(function()
    claude.client:close()
    m:stop()
  end)
  before_each(function() m:reset() end)

  -- Streams fixture NAME whole, or cut into `pieces` parts; returns the
  -- result (or nil, err) and the event types seen.
  local function replay(provider, name, pieces, params)
    local step = "replay;file=" .. name .. ".sse" .. (pieces and (";drip=1;pieces=" .. pieces) or "")
    local iter, s = provider:stream(params or ASK, { headers = { ["x-mock-steps"] = step } })
    local types = {}
    for ev in iter do types[#types + 1] = ev.type end
    local r, err = s:result()
    return r, err, types
  end

  local function check(case, r)
    assert.equal(case.text, r.text)
    assert.equal(case.stop, r.stop_reason)
    assert.equal(case.input, r.usage.input)
    assert.equal(case.output, r.usage.output)
    assert.equal(case.cache_read or 0, r.usage.cache_read)
    assert.equal(case.cache_write or 0, r.usage.cache_write)
    -- counts print as integers on every Lua (120, not 120.0)
    assert.equal(tostring(case.output), tostring(r.usage.output))
    assert_integers(r.usage, "usage")
    assert_integers(r.reply.usage, "reply.usage")
  end

  for _, case in ipairs(ANTHROPIC) do
    local name = case[1]
    it("collects " .. case[2] .. " as the SDKs do (" .. name .. ")", function()
      local want = assert(cjson.decode(read(name .. ".json")))
      for _, pieces in ipairs { false, 7 } do
        local r, err, types = replay(claude, name, pieces)
        assert(r, tostring(err))
        assert.equal("message_start", types[1])
        assert.equal("message_stop", types[#types])
        assert_same_message(want, r.reply)
        check(case, r)
      end
      assert.equal(2, m:counters().paths["/v1/messages"])
    end)
  end

  it("reads each fixture through the parser byte for byte: the mock serves the file unchanged", function()
    local res = assert(claude.client:request { path = "/v1/messages", json = { model = "m" },
      headers = { ["x-mock-steps"] = "replay;file=anthropic_max_tokens_tool.sse" } })
    assert.equal(read("anthropic_max_tokens_tool.sse"), res.body)
    assert.equal("text/event-stream", res.headers["content-type"])
  end)

  it("gives a cut tool block the complete part of its JSON, marked incomplete, with no private field", function()
    local r = assert(replay(claude, "anthropic_max_tokens_tool"))
    local block = r.reply.content[2]
    assert.equal("taxes.txt", block.input.filename)
    assert.equal(4, #block.input.lines_of_text)
    assert.is_true(block.incomplete)
    assert.matches('"Filing taxes$', block.partial_json)
    for _, b in ipairs(r.reply.content) do
      for k in pairs(b) do assert.not_matches("^_", k) end
    end
    -- a block that was stopped is not marked
    local whole = assert(replay(claude, "anthropic_tool_use"))
    assert.is_nil(whole.reply.content[2].incomplete)
    assert.is_nil(whole.reply.content[2].partial_json)
  end)

  it("keeps stop_details and nested usage from message_delta", function()
    local r = assert(replay(claude, "anthropic_refusal"))
    assert.equal("cyber", r.reply.stop_details.category)
    assert.equal(67, r.reply.usage.output_tokens_details.thinking_tokens)
    r = assert(replay(claude, "anthropic_delta_fields"))
    assert.equal("container_01AbCdEfGh", r.reply.container.id)
    -- never re-sent by message_delta: message_start's stand
    assert.equal("standard", r.reply.usage.service_tier)
    assert.equal(10, r.reply.usage.cache_creation.ephemeral_5m_input_tokens)
  end)

  it("reports a tool block whose JSON does not parse as bad_response, as the SDKs raise", function()
    local r, err, types = replay(claude, "anthropic_tool_invalid_json")
    assert.is_nil(r)
    assert.equal("message_stop", types[#types - 1])
    assert.equal("error", types[#types])
    assert.equal("bad_response", err.kind)
    assert.equal("fatal", err.class)
    assert.matches("not valid JSON", err.message)
    assert.matches("celsius", err.detail)
    assert.matches("^req_", err.request_id)
  end)

  for _, case in ipairs(OPENAI) do
    local name = case[1]
    it("collects " .. case[2] .. " as the SDKs do (" .. name .. ")", function()
      local want = assert(cjson.decode(read(name .. ".json")))
      for _, pieces in ipairs { false, 7 } do
        local r, err, types = replay(gpt, name, pieces)
        assert(r, tostring(err))
        assert.equal("done", types[#types])
        assert_same_message(want, r.reply)
        check(case, r)
      end
      assert.equal(2, m:counters().paths["/v1/chat/completions"])
    end)
  end

  it("joins tool call arguments in order, by index, into message.tool_calls", function()
    local r = assert(replay(gpt, "openai_two_tool_calls"))
    local calls = r.reply.choices[1].message.tool_calls
    assert.equal(2, #calls)
    assert.same({ city = "Edinburgh", country = "UK", units = "c" }, cjson.decode(calls[1]["function"].arguments))
    assert.same({ ticker = "AAPL", exchange = "NASDAQ" }, cjson.decode(calls[2]["function"].arguments))
    assert.equal("get_stock_price", calls[2]["function"].name)
  end)

  it("survives an Anthropic stream that lies: bad indexes, NaN and negative counts, odd deltas", function()
    local r = assert(replay(claude, "hostile_anthropic"))
    local reply = r.reply
    assert.equal("msg_hostile", reply.id)                 -- a second message_start is ignored
    assert.equal("message", reply.type)                   -- message_delta cannot replace type or content
    assert.equal(2, #reply.content)
    assert.same({ type = "text", text = "kept" }, reply.content[1])
    assert.same({ depth = { { { { { { 1 } } } } } }, n = -0.5 }, reply.content[2].input)
    assert.same({ a = 1 }, reply.a_future_field)
    assert.equal(-5, reply.usage.input_tokens)            -- a null never erases a count
    assert.equal("end_turn", r.stop_reason)
    -- the counts that reach the limiter and the totals are sane
    assert.same({ input = 0, output = 0, cache_read = 12, cache_write = 0 }, r.usage)
    local totals = claude.client:stats().usage
    for _, k in ipairs { "input", "output", "cache_read", "cache_write", "cost" } do
      assert(totals[k] == totals[k] and totals[k] >= 0 and totals[k] < math.huge, k .. " is " .. tostring(totals[k]))
    end
  end)

  it("survives an OpenAI stream that lies: gaps in indexes, nulls, counts out of range", function()
    local r = assert(replay(gpt, "hostile_openai"))
    local choices = r.reply.choices
    assert.equal(1, #choices)
    local m1 = choices[1].message
    assert.equal("kept", m1.content)                      -- a null delta never erases text
    assert.equal("tool_calls", choices[1].finish_reason)
    assert.same({
      { id = "call_1", type = "function", ["function"] = { name = "f", arguments = '{"a":1}' } },
      { id = "call_gap", type = "function", ["function"] = { name = "g", arguments = "{}" } },
      { ["function"] = { arguments = "lost?" } },
    }, m1.tool_calls)
    assert.same({ input = 0, output = 0, cache_read = 0, cache_write = 0 }, r.usage)
  end)

  it("answers a replay of a missing or unsafe file name with a 400", function()
    local cases = {
      ["replay;file=nope.sse"] = "no stream fixture 'nope.sse'",
      ["replay;file=../support/mock.lua"] = "needs file=NAME",
      ["replay"] = "needs file=NAME",
    }
    for step, detail in pairs(cases) do
      local res, err = claude.client:request { path = "/v1/messages", json = { model = "m" },
        headers = { ["x-mock-steps"] = step }, attempts = 1 }
      assert.is_nil(res)
      assert.equal(400, err.status)
      assert.matches(detail, err.detail, 1, true)
    end
  end)
end)
