-- sturdy.translate: requests, replies and stream events between the
-- Anthropic and OpenAI shapes, and the reasons a request does not translate.
local translate = require "sturdy.translate"
local cjson = require "cjson"

local null = cjson.null

local function feed_all(t, events)
  local out = {}
  for _, ev in ipairs(events) do
    for _, x in ipairs(t:feed(ev)) do out[#out + 1] = x end
  end
  return out
end

local function types(events)
  local out = {}
  for i, ev in ipairs(events) do out[i] = ev.type end
  return table.concat(out, " ")
end

describe("sturdy.translate", function()
  describe("Anthropic requests to OpenAI", function()
    it("carries system, text turns, sampling, stop sequences and the user id", function()
      local body = assert(translate.request({
        system = "Be brief.", max_tokens = 100, temperature = 0.3, top_p = 0.9,
        stop_sequences = { "END", "STOP" }, metadata = { user_id = "u-1" },
        messages = {
          { role = "user", content = "Hello" },
          { role = "assistant", content = { { type = "text", text = "Hi." }, { type = "text", text = " What?" } } },
          { role = "user", content = { { type = "text", text = "Tell me", cache_control = { type = "ephemeral" } } } },
        },
      }, "anthropic", "openai"))
      assert.same({
        { role = "system", content = "Be brief." },
        { role = "user", content = "Hello" },
        { role = "assistant", content = { { type = "text", text = "Hi." }, { type = "text", text = " What?" } } },
        { role = "user", content = "Tell me" },
      }, body.messages)
      assert.equal(100, body.max_completion_tokens)
      assert.equal(0.3, body.temperature)
      assert.equal(0.9, body.top_p)
      assert.same({ "END", "STOP" }, body.stop)
      assert.equal("u-1", body.user)
      assert.is_nil(body.max_tokens)
    end)

    it("carries tools, tool_choice, tool calls and their results", function()
      local body = assert(translate.request({
        max_tokens = 50,
        tools = { { name = "get_weather", description = "Weather in a city",
                    input_schema = { type = "object", properties = { city = { type = "string" } } } } },
        tool_choice = { type = "tool", name = "get_weather", disable_parallel_tool_use = true },
        messages = {
          { role = "user", content = "Weather in Paris?" },
          { role = "assistant", content = {
            { type = "text", text = "Let me look." },
            { type = "tool_use", id = "toolu_1", name = "get_weather", input = { city = "Paris" } } } },
          { role = "user", content = {
            { type = "tool_result", tool_use_id = "toolu_1", content = "18 C, sunny" },
            { type = "text", text = "And tomorrow?" } } },
        },
      }, "anthropic", "openai"))
      assert.same({ { type = "function", ["function"] = {
        name = "get_weather", description = "Weather in a city",
        parameters = { type = "object", properties = { city = { type = "string" } } } } } }, body.tools)
      assert.same({ type = "function", ["function"] = { name = "get_weather" } }, body.tool_choice)
      assert.is_false(body.parallel_tool_calls)
      local a = body.messages[2]
      assert.equal("assistant", a.role)
      assert.equal("Let me look.", a.content)
      assert.equal("toolu_1", a.tool_calls[1].id)
      assert.equal("get_weather", a.tool_calls[1]["function"].name)
      assert.same({ city = "Paris" }, cjson.decode(a.tool_calls[1]["function"].arguments))
      -- the tool's answer comes first, then the user's words
      assert.same({ role = "tool", tool_call_id = "toolu_1", content = "18 C, sunny" }, body.messages[3])
      assert.same({ role = "user", content = "And tomorrow?" }, body.messages[4])
    end)

    it("maps every simple tool_choice", function()
      local function choice(tc)
        local p = { max_tokens = 1, messages = {}, tool_choice = tc }
        local body = assert(translate.request(p, "anthropic", "openai"))
        return body.tool_choice
      end
      assert.equal("auto", choice { type = "auto" })
      assert.equal("required", choice { type = "any" })
      assert.equal("none", choice { type = "none" })
    end)

    it("refuses what OpenAI cannot say, naming it", function()
      local function why(p)
        local body, reason = translate.request(p, "anthropic", "openai")
        assert.is_nil(body)
        return reason
      end
      local msgs = { { role = "user", content = "hi" } }
      assert.matches("'top_k'", why { max_tokens = 1, top_k = 5, messages = msgs })
      assert.matches("'thinking'", why { max_tokens = 1, thinking = { type = "enabled" }, messages = msgs })
      assert.matches("messages%[1%]%.content%[1%] %(image%)", why { max_tokens = 1, messages = {
        { role = "user", content = { { type = "image", source = { type = "base64", data = "x" } } } } } })
      assert.matches("web_search_20250305 tool", why { max_tokens = 1, messages = msgs,
                                                        tools = { { type = "web_search_20250305", name = "s" } } })
      assert.matches("5 stop sequences", why { max_tokens = 1, messages = msgs,
                                               stop_sequences = { "a", "b", "c", "d", "e" } })
      assert.matches("is_error", why { max_tokens = 1, messages = {
        { role = "user", content = { { type = "tool_result", tool_use_id = "t", content = "boom",
                                       is_error = true } } } } })
      assert.matches("role system", why { max_tokens = 1, messages = { { role = "system", content = "x" } } })
    end)
  end)

  describe("OpenAI requests to Anthropic", function()
    it("carries system messages, text turns, sampling and stop", function()
      local body = assert(translate.request({
        max_completion_tokens = 80, temperature = 0.5, top_p = 1, stop = "END", user = "u-2", n = 1,
        messages = {
          { role = "system", content = "Be brief." },
          { role = "developer", content = { { type = "text", text = "Use French." } } },
          { role = "user", content = "Bonjour" },
          { role = "assistant", content = "Salut." },
          { role = "user", content = { { type = "text", text = "Encore" } } },
        },
      }, "openai", "anthropic"))
      assert.same({ { type = "text", text = "Be brief." }, { type = "text", text = "Use French." } }, body.system)
      assert.same({
        { role = "user", content = { { type = "text", text = "Bonjour" } } },
        { role = "assistant", content = { { type = "text", text = "Salut." } } },
        { role = "user", content = { { type = "text", text = "Encore" } } },
      }, body.messages)
      assert.equal(80, body.max_tokens)
      assert.same({ "END" }, body.stop_sequences)
      assert.same({ user_id = "u-2" }, body.metadata)
    end)

    it("gives Anthropic the max_tokens it requires", function()
      local body = assert(translate.request({ messages = { { role = "user", content = "x" } } }, "openai", "anthropic"))
      assert.equal(translate.DEFAULT_MAX_TOKENS, body.max_tokens)
      body = assert(translate.request({ max_tokens = 7, messages = {} }, "openai", "anthropic"))
      assert.equal(7, body.max_tokens)
      body = assert(translate.request({ messages = {} }, "openai", "anthropic", { default_max_tokens = 99 }))
      assert.equal(99, body.max_tokens)
    end)

    it("carries tools, tool calls and tool results (one user turn with the next user text)", function()
      local body = assert(translate.request({
        tools = { { type = "function", ["function"] = { name = "add", parameters = { type = "object" } } } },
        tool_choice = "required", parallel_tool_calls = false,
        messages = {
          { role = "user", content = "2+2?" },
          { role = "assistant", content = null, tool_calls = {
            { id = "call_1", type = "function", ["function"] = { name = "add", arguments = '{"a":2,"b":2}' } } } },
          { role = "tool", tool_call_id = "call_1", content = "4" },
          { role = "user", content = "Thanks" },
        },
      }, "openai", "anthropic"))
      assert.same({ { name = "add", input_schema = { type = "object" } } }, body.tools)
      assert.same({ type = "any", disable_parallel_tool_use = true }, body.tool_choice)
      assert.same({ { type = "tool_use", id = "call_1", name = "add", input = { a = 2, b = 2 } } },
                  body.messages[2].content)
      assert.same({ role = "user", content = {
        { type = "tool_result", tool_use_id = "call_1", content = "4" },
        { type = "text", text = "Thanks" } } }, body.messages[3])
      assert.equal(3, #body.messages)
    end)

    it("refuses what Anthropic cannot say, naming it", function()
      local function why(p)
        local body, reason = translate.request(p, "openai", "anthropic")
        assert.is_nil(body)
        return reason
      end
      local msgs = { { role = "user", content = "hi" } }
      assert.matches("temperature 1.5", why { temperature = 1.5, messages = msgs })
      assert.matches("'response_format'", why { response_format = { type = "json_object" }, messages = msgs })
      assert.matches("'n'", why { n = 2, messages = msgs })
      assert.matches("'logprobs'", why { logprobs = true, messages = msgs })
      assert.matches("strict", why { messages = msgs, tools = {
        { type = "function", ["function"] = { name = "f", strict = true, parameters = {} } } } })
      assert.matches("image_url", why { messages = { { role = "user", content = {
        { type = "image_url", image_url = { url = "https://x/y.png" } } } } } })
      assert.matches("after the conversation began", why { messages = {
        { role = "user", content = "a" }, { role = "system", content = "b" } } })
      assert.matches("not a JSON object", why { messages = { { role = "assistant", tool_calls = {
        { id = "c", type = "function", ["function"] = { name = "f", arguments = "[1,2]" } } } } } })
    end)

    it("round-trips a conversation with a tool call through both shapes", function()
      local a = {
        max_tokens = 64, system = "Sys.",
        tools = { { name = "f", description = "d", input_schema = { type = "object" } } },
        messages = {
          { role = "user", content = { { type = "text", text = "q" } } },
          { role = "assistant", content = { { type = "tool_use", id = "t1", name = "f", input = { x = 1 } } } },
          { role = "user", content = { { type = "tool_result", tool_use_id = "t1", content = "r" } } },
        },
      }
      local o = assert(translate.request(a, "anthropic", "openai"))
      local back = assert(translate.request(o, "openai", "anthropic"))
      assert.equal("Sys.", back.system)
      assert.equal(64, back.max_tokens)
      assert.same(a.tools, back.tools)
      assert.same(a.messages, back.messages)
    end)
  end)

  describe("replies", function()
    local openai_doc = {
      id = "chatcmpl-1", object = "chat.completion", model = "gpt-4o-mini",
      choices = { { index = 0, finish_reason = "tool_calls", message = { role = "assistant", content = "Sure.",
        tool_calls = { { id = "call_9", type = "function",
                         ["function"] = { name = "f", arguments = '{"k":"v"}' } } } } } },
      usage = { prompt_tokens = 30, completion_tokens = 5, prompt_tokens_details = { cached_tokens = 10 } },
    }

    it("reads an OpenAI completion as an Anthropic message", function()
      local doc = translate.reply(openai_doc, "openai", "anthropic")
      assert.equal("message", doc.type)
      assert.equal("gpt-4o-mini", doc.model)
      assert.equal("tool_use", doc.stop_reason)
      assert.same({ type = "text", text = "Sure." }, doc.content[1])
      assert.same({ type = "tool_use", id = "call_9", name = "f", input = { k = "v" } }, doc.content[2])
      assert.same({ input_tokens = 20, output_tokens = 5, cache_read_input_tokens = 10,
                    cache_creation_input_tokens = 0 }, doc.usage)
    end)

    it("reads an Anthropic message as an OpenAI completion, and back", function()
      local a = translate.reply(openai_doc, "openai", "anthropic")
      local o = translate.reply(a, "anthropic", "openai")
      assert.equal("chat.completion", o.object)
      assert.equal("tool_calls", o.choices[1].finish_reason)
      assert.equal("Sure.", o.choices[1].message.content)
      assert.same({ k = "v" }, cjson.decode(o.choices[1].message.tool_calls[1]["function"].arguments))
      assert.equal(30, o.usage.prompt_tokens)
      assert.equal(10, o.usage.prompt_tokens_details.cached_tokens)
      assert.equal(35, o.usage.total_tokens)
    end)

    it("maps stop reasons both ways", function()
      assert.equal("stop", translate.stop_reason("end_turn", "anthropic", "openai"))
      assert.equal("length", translate.stop_reason("max_tokens", "anthropic", "openai"))
      assert.equal("content_filter", translate.stop_reason("refusal", "anthropic", "openai"))
      assert.equal("max_tokens", translate.stop_reason("length", "openai", "anthropic"))
      assert.equal("refusal", translate.stop_reason("content_filter", "openai", "anthropic"))
      assert.equal("end_turn", translate.stop_reason("stop", "openai", "anthropic"))
    end)
  end)

  describe("stream events", function()
    local function chunk(delta, finish, usage)
      return { type = "chunk", content = delta.content ~= nil or delta.tool_calls ~= nil,
               data = { id = "c1", model = "gpt-4o-mini", usage = usage,
                        choices = usage and {} or { { index = 0, delta = delta, finish_reason = finish or null } } } }
    end

    it("turns OpenAI chunks into the Anthropic event sequence", function()
      local t = translate.events("openai", "anthropic")
      local out = feed_all(t, {
        chunk { role = "assistant", content = "" },
        chunk { content = "Hel" }, chunk { content = "lo" },
        chunk { tool_calls = { { index = 0, id = "call_1", type = "function",
                                 ["function"] = { name = "f", arguments = "" } } } },
        chunk { tool_calls = { { index = 0, ["function"] = { arguments = '{"a":' } } } },
        chunk { tool_calls = { { index = 0, ["function"] = { arguments = "1}" } } } },
        chunk({}, "tool_calls"),
        chunk({}, nil, { prompt_tokens = 12, completion_tokens = 7 }),
        { type = "done", terminal = true },
      })
      assert.equal("message_start content_block_start content_block_delta content_block_delta content_block_stop "
                   .. "content_block_start content_block_delta content_block_delta content_block_stop message_delta "
                   .. "message_stop", types(out))
      assert.equal("Hel", out[3].data.delta.text)
      assert.is_true(out[3].content)
      assert.equal("tool_use", out[6].data.content_block.type)
      assert.equal(1, out[6].data.index)
      assert.equal('{"a":', out[7].data.delta.partial_json)
      assert.equal("tool_use", out[10].data.delta.stop_reason)
      assert.equal(7, out[10].data.usage.output_tokens)
      assert.is_true(out[11].terminal)
      assert.equal("Hello", translate.event_text(out[3], "anthropic") .. translate.event_text(out[4], "anthropic"))
    end)

    it("turns Anthropic events into OpenAI chunks", function()
      local t = translate.events("anthropic", "openai")
      local out = feed_all(t, translate.text_events("anthropic", "All good.", "claude-haiku-4-5"))
      assert.equal("chunk chunk chunk chunk done", types(out))
      assert.equal("assistant", out[1].data.choices[1].delta.role)
      assert.equal("All good.", out[2].data.choices[1].delta.content)
      assert.is_true(out[2].content)
      assert.equal("stop", out[3].data.choices[1].finish_reason)
      assert.same({}, out[4].data.choices)
      assert.is_true(out[5].terminal)
      assert.equal("All good.", translate.event_text(out[2], "openai"))
    end)
  end)
end)
