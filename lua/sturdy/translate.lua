--- Translation between the Anthropic Messages and OpenAI Chat Completions
-- shapes, for what they have in common: system, user and assistant text,
-- `max_tokens`, `temperature`, `top_p`, stop sequences, plain (function)
-- tools with `tool_choice`, tool calls and their results in the history.
--
-- A request field or block outside that subset is never dropped or guessed
-- at: `request` returns nil and the reason, naming it. Replies, stop reasons
-- and stream events translate back, so a call in one shape can be served by
-- the other provider and read as if it had not been.
--
--   local body, why = translate.request(params, "anthropic", "openai")
--   local doc = translate.reply(openai_doc, "openai", "anthropic")
--   local t = translate.events("openai", "anthropic"); for _, ev in ipairs(t:feed(chunk)) do ... end
-- @module sturdy.translate
local cjson = require "cjson.safe"

local M = {}

local type, pairs, ipairs, tostring = type, pairs, ipairs, tostring
local format, concat = string.format, table.concat
local null = cjson.null

-- a private instance: the application's cjson settings never change what is sent
local json = cjson.new()

--- The shapes: the method of each and the provider module serving it.
M.SHAPES = { anthropic = "messages", openai = "chat" }

--- OpenAI accepts at most this many stop sequences.
M.MAX_OPENAI_STOP = 4

--- max_tokens given to Anthropic when an OpenAI-shaped request names none
-- (Anthropic requires one); `request`'s `default_max_tokens` replaces it.
M.DEFAULT_MAX_TOKENS = 4096

local function is_list(t)
  if type(t) ~= "table" then return false end
  local n = 0
  for _ in pairs(t) do n = n + 1 end
  return n == #t
end

local function copy(t)
  if type(t) ~= "table" then return t end
  local c = {}
  for k, v in pairs(t) do c[k] = copy(v) end
  return c
end

-- Returns nil and the reason, in one place so every refusal reads alike.
local function cannot(msg, ...)
  return nil, format(msg, ...)
end

-- =========================================================================
-- Stop reasons
-- =========================================================================

local A2O_STOP = {
  end_turn = "stop", stop_sequence = "stop", max_tokens = "length", tool_use = "tool_calls",
  refusal = "content_filter", pause_turn = "stop",
}
local O2A_STOP = {
  stop = "end_turn", length = "max_tokens", tool_calls = "tool_use", function_call = "tool_use",
  content_filter = "refusal",
}

--- A stop reason in the other shape's words (nil stays nil).
function M.stop_reason(reason, from, to)
  if reason == nil or reason == null or from == to then return reason end
  if from == "anthropic" then return A2O_STOP[reason] or "stop" end
  return O2A_STOP[reason] or "end_turn"
end

-- =========================================================================
-- Requests: Anthropic -> OpenAI
-- =========================================================================

-- The text of a list of Anthropic text blocks as OpenAI content parts, or
-- nil and the reason naming the first block that is not text.
local function text_parts(blocks, where)
  local parts = {}
  for i, b in ipairs(blocks) do
    if type(b) ~= "table" or b.type ~= "text" or type(b.text) ~= "string" then
      return cannot("%s block #%d (%s) has no OpenAI equivalent", where, i,
                    type(b) == "table" and tostring(b.type) or type(b))
    end
    for k in pairs(b) do
      if k ~= "type" and k ~= "text" and k ~= "cache_control" then
        return cannot("%s block #%d has '%s', which has no OpenAI equivalent", where, i, tostring(k))
      end
    end
    parts[#parts + 1] = { type = "text", text = b.text }
  end
  return parts
end

-- An Anthropic tool_result's content as an OpenAI tool message's.
local function tool_result_content(content, where)
  if content == nil then return "" end
  if type(content) == "string" then return content end
  if type(content) ~= "table" then return cannot("%s has content of type %s", where, type(content)) end
  local parts, why = text_parts(content, where)
  if not parts then return nil, why end
  if #parts == 1 then return parts[1].text end
  return parts
end

local function anthropic_message_to_openai(m, i, out)
  local where = format("messages[%d]", i)
  if type(m) ~= "table" then return cannot("%s is not a table", where) end
  for k in pairs(m) do
    if k ~= "role" and k ~= "content" then
      return cannot("%s has '%s', which has no OpenAI equivalent", where, tostring(k))
    end
  end
  local role, content = m.role, m.content
  if role ~= "user" and role ~= "assistant" then
    return cannot("%s has role %s; only user and assistant translate", where, tostring(role))
  end
  if type(content) == "string" then
    out[#out + 1] = { role = role, content = content }
    return true
  end
  if type(content) ~= "table" then return cannot("%s has content of type %s", where, type(content)) end
  local texts, calls, results = {}, {}, {}
  for j, b in ipairs(content) do
    local bw = format("%s.content[%d]", where, j)
    local t = type(b) == "table" and b.type
    if t == "text" then
      local parts, why = text_parts({ b }, bw)
      if not parts then return nil, why end
      texts[#texts + 1] = parts[1]
    elseif t == "tool_use" and role == "assistant" then
      if type(b.id) ~= "string" or type(b.name) ~= "string" then
        return cannot("%s is a tool_use without a string id and name", bw)
      end
      local args, err = json.encode(b.input == nil and {} or b.input)
      if not args then return cannot("%s's input cannot be encoded: %s", bw, tostring(err)) end
      calls[#calls + 1] = { id = b.id, type = "function", ["function"] = { name = b.name, arguments = args } }
    elseif t == "tool_result" and role == "user" then
      if b.is_error then return cannot("%s is a tool_result with is_error, which OpenAI cannot say", bw) end
      if type(b.tool_use_id) ~= "string" then return cannot("%s is a tool_result without tool_use_id", bw) end
      local c, why = tool_result_content(b.content, bw)
      if c == nil then return nil, why end
      results[#results + 1] = { role = "tool", tool_call_id = b.tool_use_id, content = c }
    else
      return cannot("%s (%s) has no OpenAI equivalent", bw, type(b) == "table" and tostring(b.type) or type(b))
    end
  end
  -- tool results answer the assistant turn before them, so they come first
  for _, r in ipairs(results) do out[#out + 1] = r end
  if role == "assistant" then
    local msg = { role = "assistant" }
    if #texts == 1 then
      msg.content = texts[1].text
    elseif #texts > 1 then
      msg.content = texts
    else
      msg.content = null
    end
    if #calls > 0 then msg.tool_calls = calls end
    out[#out + 1] = msg
  elseif #texts > 0 or #results == 0 then
    out[#out + 1] = { role = "user", content = #texts == 1 and texts[1].text or (#texts > 0 and texts or "") }
  end
  return true
end

local function anthropic_tools_to_openai(tools)
  if not is_list(tools) then return cannot("tools is not a list") end
  local out = {}
  for i, tool in ipairs(tools) do
    local where = format("tools[%d]", i)
    if type(tool) ~= "table" then return cannot("%s is not a table", where) end
    if tool.type ~= nil and tool.type ~= "custom" then
      return cannot("%s is a %s tool; only plain tools translate", where, tostring(tool.type))
    end
    for k in pairs(tool) do
      if k ~= "name" and k ~= "description" and k ~= "input_schema" and k ~= "type" and k ~= "cache_control" then
        return cannot("%s has '%s', which has no OpenAI equivalent", where, tostring(k))
      end
    end
    if type(tool.name) ~= "string" then return cannot("%s has no name", where) end
    out[i] = { type = "function", ["function"] = {
      name = tool.name, description = tool.description, parameters = copy(tool.input_schema),
    } }
  end
  return out
end

local function anthropic_tool_choice_to_openai(tc, body)
  if type(tc) ~= "table" then return cannot("tool_choice is not a table") end
  for k in pairs(tc) do
    if k ~= "type" and k ~= "name" and k ~= "disable_parallel_tool_use" then
      return cannot("tool_choice has '%s', which has no OpenAI equivalent", tostring(k))
    end
  end
  if tc.type == "auto" then
    body.tool_choice = "auto"
  elseif tc.type == "any" then
    body.tool_choice = "required"
  elseif tc.type == "none" then
    body.tool_choice = "none"
  elseif tc.type == "tool" and type(tc.name) == "string" then
    body.tool_choice = { type = "function", ["function"] = { name = tc.name } }
  else
    return cannot("tool_choice of type %s has no OpenAI equivalent", tostring(tc.type))
  end
  if tc.disable_parallel_tool_use == true then body.parallel_tool_calls = false end
  return true
end

local A2O_FIELDS = {
  messages = true, system = true, max_tokens = true, temperature = true, top_p = true,
  stop_sequences = true, tools = true, tool_choice = true, metadata = true, stream = true,
}

local function anthropic_to_openai(p)
  for k in pairs(p) do
    if not A2O_FIELDS[k] then return cannot("'%s' has no OpenAI equivalent", tostring(k)) end
  end
  local body, msgs = {}, {}
  local system = p.system
  if type(system) == "string" then
    msgs[1] = { role = "system", content = system }
  elseif type(system) == "table" then
    local parts, why = text_parts(system, "system")
    if not parts then return nil, why end
    msgs[1] = { role = "system", content = #parts == 1 and parts[1].text or parts }
  elseif system ~= nil then
    return cannot("system is a %s", type(system))
  end
  if not is_list(p.messages) then return cannot("messages is not a list") end
  for i, m in ipairs(p.messages) do
    local ok, why = anthropic_message_to_openai(m, i, msgs)
    if not ok then return nil, why end
  end
  body.messages = msgs
  body.max_completion_tokens = p.max_tokens
  body.temperature, body.top_p, body.stream = p.temperature, p.top_p, p.stream
  if p.stop_sequences ~= nil then
    if not is_list(p.stop_sequences) then return cannot("stop_sequences is not a list") end
    if #p.stop_sequences > M.MAX_OPENAI_STOP then
      return cannot("%d stop sequences; OpenAI takes at most %d", #p.stop_sequences, M.MAX_OPENAI_STOP)
    end
    if #p.stop_sequences > 0 then body.stop = copy(p.stop_sequences) end
  end
  if p.metadata ~= nil then
    if type(p.metadata) ~= "table" then return cannot("metadata is not a table") end
    for k, v in pairs(p.metadata) do
      if k ~= "user_id" then return cannot("metadata.%s has no OpenAI equivalent", tostring(k)) end
      body.user = v
    end
  end
  if p.tools ~= nil then
    local tools, why = anthropic_tools_to_openai(p.tools)
    if not tools then return nil, why end
    if #tools > 0 then body.tools = tools end
  end
  if p.tool_choice ~= nil then
    local ok, why = anthropic_tool_choice_to_openai(p.tool_choice, body)
    if not ok then return nil, why end
  end
  return body
end

-- =========================================================================
-- Requests: OpenAI -> Anthropic
-- =========================================================================

-- OpenAI content (a string or text parts) as Anthropic text blocks.
local function openai_text_blocks(content, where)
  if type(content) == "string" then
    if content == "" then return {} end
    return { { type = "text", text = content } }
  end
  if content == nil or content == null then return {} end
  if not is_list(content) then return cannot("%s has content of type %s", where, type(content)) end
  local blocks = {}
  for i, part in ipairs(content) do
    if type(part) ~= "table" or part.type ~= "text" or type(part.text) ~= "string" then
      return cannot("%s part #%d (%s) has no Anthropic equivalent", where, i,
                    type(part) == "table" and tostring(part.type) or type(part))
    end
    blocks[#blocks + 1] = { type = "text", text = part.text }
  end
  return blocks
end

-- Adds blocks as a user turn, merged into the last one when it is a user
-- turn too (tool results and the user text after them are one turn).
local function add_user_blocks(msgs, blocks)
  local last = msgs[#msgs]
  if last and last.role == "user" then
    for _, b in ipairs(blocks) do last.content[#last.content + 1] = b end
  else
    msgs[#msgs + 1] = { role = "user", content = blocks }
  end
end

local function openai_message_to_anthropic(m, i, state)
  local where = format("messages[%d]", i)
  if type(m) ~= "table" then return cannot("%s is not a table", where) end
  local role = m.role
  local allowed = { role = true, content = true }
  if role == "assistant" then
    allowed.tool_calls, allowed.refusal = true, true
  elseif role == "tool" then
    allowed.tool_call_id = true
  end
  for k, v in pairs(m) do
    if not allowed[k] and v ~= null then
      return cannot("%s has '%s', which has no Anthropic equivalent", where, tostring(k))
    end
  end
  if role == "system" or role == "developer" then
    if #state.msgs > 0 then return cannot("%s is a %s message after the conversation began", where, role) end
    local blocks, why = openai_text_blocks(m.content, where)
    if not blocks then return nil, why end
    for _, b in ipairs(blocks) do state.system[#state.system + 1] = b end
    return true
  end
  if role == "user" then
    local blocks, why = openai_text_blocks(m.content, where)
    if not blocks then return nil, why end
    if #blocks == 0 then blocks = { { type = "text", text = "" } } end
    add_user_blocks(state.msgs, blocks)
    return true
  end
  if role == "assistant" then
    if m.refusal ~= nil and m.refusal ~= null then
      return cannot("%s carries a refusal, which has no Anthropic equivalent", where)
    end
    local blocks, why = openai_text_blocks(m.content, where)
    if not blocks then return nil, why end
    if m.tool_calls ~= nil and m.tool_calls ~= null then
      if not is_list(m.tool_calls) then return cannot("%s.tool_calls is not a list", where) end
      for j, call in ipairs(m.tool_calls) do
        local cw = format("%s.tool_calls[%d]", where, j)
        local fn = type(call) == "table" and call["function"]
        if type(fn) ~= "table" or (call.type ~= nil and call.type ~= "function") then
          return cannot("%s is not a function call", cw)
        end
        if type(call.id) ~= "string" or type(fn.name) ~= "string" then
          return cannot("%s has no string id and name", cw)
        end
        local input = {}
        if type(fn.arguments) == "string" and fn.arguments ~= "" then
          input = json.decode(fn.arguments)
          if type(input) ~= "table" or (next(input) ~= nil and is_list(input)) then
            return cannot("%s's arguments are not a JSON object", cw)
          end
        end
        blocks[#blocks + 1] = { type = "tool_use", id = call.id, name = fn.name, input = input }
      end
    end
    if #blocks == 0 then return cannot("%s has neither content nor tool calls", where) end
    state.msgs[#state.msgs + 1] = { role = "assistant", content = blocks }
    return true
  end
  if role == "tool" then
    if type(m.tool_call_id) ~= "string" then return cannot("%s has no tool_call_id", where) end
    local content = m.content
    if type(content) ~= "string" then
      local blocks, why = openai_text_blocks(content, where)
      if not blocks then return nil, why end
      content = blocks
    end
    add_user_blocks(state.msgs, { { type = "tool_result", tool_use_id = m.tool_call_id, content = content } })
    return true
  end
  return cannot("%s has role %s, which has no Anthropic equivalent", where, tostring(role))
end

local function openai_tools_to_anthropic(tools)
  if not is_list(tools) then return cannot("tools is not a list") end
  local out = {}
  for i, tool in ipairs(tools) do
    local where = format("tools[%d]", i)
    local fn = type(tool) == "table" and tool["function"]
    if type(fn) ~= "table" or tool.type ~= "function" then
      return cannot("%s is not a function tool; only plain tools translate", where)
    end
    for k in pairs(fn) do
      if k ~= "name" and k ~= "description" and k ~= "parameters" and k ~= "strict" then
        return cannot("%s.function has '%s', which has no Anthropic equivalent", where, tostring(k))
      end
    end
    if fn.strict == true then return cannot("%s is strict, which Anthropic cannot promise", where) end
    if type(fn.name) ~= "string" then return cannot("%s has no name", where) end
    out[i] = { name = fn.name, description = fn.description,
               input_schema = fn.parameters ~= nil and copy(fn.parameters) or { type = "object" } }
  end
  return out
end

local function openai_tool_choice_to_anthropic(tc)
  if tc == "auto" then return { type = "auto" } end
  if tc == "none" then return { type = "none" } end
  if tc == "required" then return { type = "any" } end
  local fn = type(tc) == "table" and tc.type == "function" and tc["function"]
  if type(fn) == "table" and type(fn.name) == "string" then return { type = "tool", name = fn.name } end
  return cannot("tool_choice %s has no Anthropic equivalent", type(tc) == "string" and tc or type(tc))
end

-- Fields an OpenAI request may carry at their neutral value and lose nothing.
local NEUTRAL = { n = 1, presence_penalty = 0, frequency_penalty = 0 }

local O2A_FIELDS = {
  messages = true, max_tokens = true, max_completion_tokens = true, temperature = true, top_p = true,
  stop = true, tools = true, tool_choice = true, parallel_tool_calls = true, user = true, stream = true,
  stream_options = true,
}

local function openai_to_anthropic(p, opts)
  for k, v in pairs(p) do
    if not O2A_FIELDS[k] and not (NEUTRAL[k] ~= nil and NEUTRAL[k] == v) then
      return cannot("'%s' has no Anthropic equivalent", tostring(k))
    end
  end
  if type(p.temperature) == "number" and p.temperature > 1 then
    return cannot("temperature %s is above Anthropic's maximum of 1", tostring(p.temperature))
  end
  if not is_list(p.messages) then return cannot("messages is not a list") end
  local state = { msgs = {}, system = {} }
  for i, m in ipairs(p.messages) do
    local ok, why = openai_message_to_anthropic(m, i, state)
    if not ok then return nil, why end
  end
  local body = { messages = state.msgs }
  if #state.system == 1 then
    body.system = state.system[1].text
  elseif #state.system > 1 then
    body.system = state.system
  end
  body.max_tokens = p.max_completion_tokens or p.max_tokens or (opts and opts.default_max_tokens)
    or M.DEFAULT_MAX_TOKENS
  body.temperature, body.top_p, body.stream = p.temperature, p.top_p, p.stream
  if type(p.stop) == "string" then
    body.stop_sequences = { p.stop }
  elseif p.stop ~= nil and p.stop ~= null then
    if not is_list(p.stop) then return cannot("stop is not a string or a list") end
    if #p.stop > 0 then body.stop_sequences = copy(p.stop) end
  end
  if p.user ~= nil then body.metadata = { user_id = p.user } end
  if p.tools ~= nil then
    local tools, why = openai_tools_to_anthropic(p.tools)
    if not tools then return nil, why end
    if #tools > 0 then body.tools = tools end
  end
  if p.tool_choice ~= nil then
    local tc, why = openai_tool_choice_to_anthropic(p.tool_choice)
    if not tc then return nil, why end
    body.tool_choice = tc
  end
  if p.parallel_tool_calls == false then
    body.tool_choice = body.tool_choice or { type = "auto" }
    if body.tool_choice.type ~= "none" then body.tool_choice.disable_parallel_tool_use = true end
  end
  return body
end

--- The request params of one shape in the other's. Returns the translated
-- body (a new table; params is not changed), or nil and the reason naming
-- what does not translate. opts: `default_max_tokens` (OpenAI to Anthropic,
-- when the request names none).
function M.request(params, from, to, opts)
  if from == to then return params end
  if from == "anthropic" and to == "openai" then return anthropic_to_openai(params) end
  if from == "openai" and to == "anthropic" then return openai_to_anthropic(params, opts) end
  error(format("sturdy: translate.request: unknown shapes %s -> %s", tostring(from), tostring(to)), 2)
end

-- =========================================================================
-- Replies
-- =========================================================================

local function first_choice(doc)
  local c = type(doc.choices) == "table" and doc.choices[1]
  return type(c) == "table" and c or {}
end

local function number(v)
  return type(v) == "number" and v == v and v or 0
end

-- An OpenAI completion as an Anthropic message.
local function openai_reply_to_anthropic(doc)
  local choice = first_choice(doc)
  local msg = type(choice.message) == "table" and choice.message or {}
  local content = {}
  if type(msg.content) == "string" and msg.content ~= "" then
    content[1] = { type = "text", text = msg.content }
  end
  for _, call in ipairs(type(msg.tool_calls) == "table" and msg.tool_calls or {}) do
    local fn = type(call) == "table" and call["function"] or {}
    local input = type(fn.arguments) == "string" and json.decode(fn.arguments)
    content[#content + 1] = { type = "tool_use", id = call.id, name = fn.name,
                              input = type(input) == "table" and input or {} }
  end
  local u = type(doc.usage) == "table" and doc.usage or {}
  local details = type(u.prompt_tokens_details) == "table" and u.prompt_tokens_details or {}
  local cached = math.min(number(u.prompt_tokens), number(details.cached_tokens))
  return {
    id = doc.id, type = "message", role = "assistant", model = doc.model, content = content,
    stop_reason = M.stop_reason(choice.finish_reason, "openai", "anthropic") or null, stop_sequence = null,
    usage = { input_tokens = number(u.prompt_tokens) - cached, output_tokens = number(u.completion_tokens),
              cache_read_input_tokens = cached, cache_creation_input_tokens = 0 },
  }
end

-- An Anthropic message as an OpenAI completion.
local function anthropic_reply_to_openai(doc)
  local texts, calls = {}, {}
  for _, b in ipairs(type(doc.content) == "table" and doc.content or {}) do
    if type(b) == "table" and b.type == "text" and type(b.text) == "string" then
      texts[#texts + 1] = b.text
    elseif type(b) == "table" and b.type == "tool_use" then
      calls[#calls + 1] = { id = b.id, type = "function",
                            ["function"] = { name = b.name, arguments = json.encode(b.input or {}) or "{}" } }
    end
  end
  local message = { role = "assistant", content = #texts > 0 and concat(texts) or null, refusal = null }
  if #calls > 0 then message.tool_calls = calls end
  local u = type(doc.usage) == "table" and doc.usage or {}
  local cache_read = number(u.cache_read_input_tokens)
  local prompt = number(u.input_tokens) + cache_read + number(u.cache_creation_input_tokens)
  local output = number(u.output_tokens)
  return {
    id = doc.id, object = "chat.completion", created = os.time(), model = doc.model,
    choices = { { index = 0, message = message, logprobs = null,
                  finish_reason = M.stop_reason(doc.stop_reason, "anthropic", "openai") or null } },
    usage = { prompt_tokens = prompt, completion_tokens = output, total_tokens = prompt + output,
              prompt_tokens_details = { cached_tokens = cache_read } },
  }
end

--- A decoded reply of one shape in the other's (a new table).
function M.reply(doc, from, to)
  if from == to or type(doc) ~= "table" then return doc end
  if from == "openai" then return openai_reply_to_anthropic(doc) end
  return anthropic_reply_to_openai(doc)
end

--- The stop reason of a decoded reply of a shape, in that shape's words.
function M.reply_stop_reason(doc, shape)
  if type(doc) ~= "table" then return nil end
  if shape == "openai" then return first_choice(doc).finish_reason end
  return doc.stop_reason
end

-- =========================================================================
-- Stream events. Events have the shape sturdy.stream gives: Anthropic
-- { type = <event>, data = doc, content = <a delta>, terminal = <message_stop> };
-- OpenAI { type = "chunk", data = doc, content = <a delta> } and
-- { type = "done", terminal = true }.
-- =========================================================================

local function anthropic_event(t, data)
  data.type = t
  return { type = t, data = data, content = t == "content_block_delta", terminal = t == "message_stop" }
end

local Translator = {}
Translator.__index = Translator

-- OpenAI chunks -> Anthropic events

local function o2a_start(self, out, doc)
  if self.started then return end
  self.started = true
  out[#out + 1] = anthropic_event("message_start", { message = {
    id = doc and doc.id, type = "message", role = "assistant", model = doc and doc.model, content = {},
    stop_reason = null, stop_sequence = null, usage = { input_tokens = 0, output_tokens = 0 },
  } })
end

local function o2a_close(self, out)
  if self.block then
    out[#out + 1] = anthropic_event("content_block_stop", { index = self.block })
    self.block, self.block_type = nil, nil
  end
end

local function o2a_open(self, out, block_type, content_block)
  o2a_close(self, out)
  self.next_block = self.next_block + 1
  self.block, self.block_type = self.next_block, block_type
  out[#out + 1] = anthropic_event("content_block_start", { index = self.block, content_block = content_block })
  return self.block
end

local function o2a_feed(self, ev)
  local out = {}
  if ev.type == "done" then
    o2a_start(self, out)
    o2a_close(self, out)
    local u = self.usage or {}
    out[#out + 1] = anthropic_event("message_delta", {
      delta = { stop_reason = M.stop_reason(self.finish or "stop", "openai", "anthropic"), stop_sequence = null },
      usage = { input_tokens = number(u.prompt_tokens), output_tokens = number(u.completion_tokens) },
    })
    out[#out + 1] = anthropic_event("message_stop", {})
    return out
  end
  local d = ev.data
  if type(d) ~= "table" then return out end
  o2a_start(self, out, d)
  if type(d.usage) == "table" then self.usage = d.usage end
  local choice = type(d.choices) == "table" and d.choices[1]
  if type(choice) ~= "table" or (choice.index ~= nil and choice.index ~= 0) then return out end
  local delta = type(choice.delta) == "table" and choice.delta or {}
  if type(delta.content) == "string" and delta.content ~= "" then
    if self.block_type ~= "text" then o2a_open(self, out, "text", { type = "text", text = "" }) end
    out[#out + 1] = anthropic_event("content_block_delta", { index = self.block,
                                                             delta = { type = "text_delta", text = delta.content } })
  end
  for _, call in ipairs(type(delta.tool_calls) == "table" and delta.tool_calls or {}) do
    if type(call) == "table" then
      local fn = type(call["function"]) == "table" and call["function"] or {}
      local at = self.tools[call.index or 0]
      if at == nil then
        at = o2a_open(self, out, "tool_use", { type = "tool_use", id = call.id, name = fn.name, input = {} })
        self.tools[call.index or 0] = at
      end
      if type(fn.arguments) == "string" and fn.arguments ~= "" then
        out[#out + 1] = anthropic_event("content_block_delta", {
          index = at, delta = { type = "input_json_delta", partial_json = fn.arguments } })
      end
    end
  end
  if choice.finish_reason ~= nil and choice.finish_reason ~= null then self.finish = choice.finish_reason end
  return out
end

-- Anthropic events -> OpenAI chunks

local function openai_chunk(self, choices, content, usage)
  local data = { id = self.id, object = "chat.completion.chunk", created = self.created, model = self.model,
                 choices = choices, usage = usage }
  return { type = "chunk", data = data, content = content }
end

local function delta_chunk(self, delta, finish, content)
  return openai_chunk(self, { { index = 0, delta = delta, logprobs = null, finish_reason = finish or null } },
                      content)
end

local function a2o_feed(self, ev)
  local out = {}
  local d = type(ev.data) == "table" and ev.data or {}
  local t = ev.type
  if t == "message_start" then
    local msg = type(d.message) == "table" and d.message or {}
    self.id, self.model = msg.id, msg.model
    if type(msg.usage) == "table" then self.usage = copy(msg.usage) end
    out[1] = delta_chunk(self, { role = "assistant", content = "" }, nil, false)
  elseif t == "content_block_start" then
    local b = type(d.content_block) == "table" and d.content_block or {}
    if b.type == "tool_use" then
      local k = self.next_tool
      self.next_tool = k + 1
      self.tools[d.index] = k
      out[1] = delta_chunk(self, { tool_calls = { { index = k, id = b.id, type = "function",
                                                     ["function"] = { name = b.name, arguments = "" } } } },
                           nil, true)
    end
  elseif t == "content_block_delta" then
    local delta = type(d.delta) == "table" and d.delta or {}
    if delta.type == "text_delta" and type(delta.text) == "string" then
      out[1] = delta_chunk(self, { content = delta.text }, nil, delta.text ~= "")
    elseif delta.type == "input_json_delta" and self.tools[d.index] then
      out[1] = delta_chunk(self, { tool_calls = { { index = self.tools[d.index],
                                                     ["function"] = { arguments = delta.partial_json } } } },
                           nil, true)
    end
  elseif t == "message_delta" then
    if type(d.usage) == "table" then
      self.usage = self.usage or {}
      for k, v in pairs(d.usage) do self.usage[k] = v end
    end
    local delta = type(d.delta) == "table" and d.delta or {}
    if delta.stop_reason ~= nil and delta.stop_reason ~= null then
      out[1] = delta_chunk(self, {}, M.stop_reason(delta.stop_reason, "anthropic", "openai"), false)
    end
  elseif t == "message_stop" then
    local u = self.usage or {}
    local cache_read = number(u.cache_read_input_tokens)
    local prompt = number(u.input_tokens) + cache_read + number(u.cache_creation_input_tokens)
    out[1] = openai_chunk(self, {}, false, {
      prompt_tokens = prompt, completion_tokens = number(u.output_tokens),
      total_tokens = prompt + number(u.output_tokens), prompt_tokens_details = { cached_tokens = cache_read },
    })
    out[2] = { type = "done", terminal = true }
  end
  return out
end

--- A translator of stream events from one shape to the other:
-- `t:feed(ev)` returns the list of events ev becomes (often one, maybe none).
-- Events of the same shape pass through.
function M.events(from, to)
  local self = setmetatable({ from = from, to = to, tools = {}, next_block = -1, next_tool = 0,
                              created = os.time() }, Translator)
  if from == to then
    self.feed = function(_, ev) return { ev } end
  elseif from == "openai" then
    self.feed = o2a_feed
  else
    self.feed = a2o_feed
  end
  return self
end

--- The events of a complete reply given as text, in a shape: what a stream
-- of it would have carried (for answers that were never streamed).
function M.text_events(shape, text, model)
  local events = {
    anthropic_event("message_start", { message = {
      id = "msg_local", type = "message", role = "assistant", model = model, content = {},
      stop_reason = null, stop_sequence = null, usage = { input_tokens = 0, output_tokens = 0 } } }),
    anthropic_event("content_block_start", { index = 0, content_block = { type = "text", text = "" } }),
    anthropic_event("content_block_delta", { index = 0, delta = { type = "text_delta", text = text } }),
    anthropic_event("content_block_stop", { index = 0 }),
    anthropic_event("message_delta", { delta = { stop_reason = "end_turn", stop_sequence = null },
                                       usage = { output_tokens = 0 } }),
    anthropic_event("message_stop", {}),
  }
  if shape == "anthropic" then return events end
  local t, out = M.events("anthropic", shape), {}
  for _, ev in ipairs(events) do
    for _, x in ipairs(t:feed(ev)) do out[#out + 1] = x end
  end
  return out
end

--- The text a stream event adds to the answer ("" for none).
function M.event_text(ev, shape)
  local d = type(ev) == "table" and ev.data
  if type(d) ~= "table" then return "" end
  if shape == "anthropic" then
    local delta = ev.type == "content_block_delta" and d.delta
    return type(delta) == "table" and delta.type == "text_delta" and type(delta.text) == "string" and delta.text or ""
  end
  local choice = type(d.choices) == "table" and d.choices[1]
  local delta = type(choice) == "table" and choice.delta
  return type(delta) == "table" and type(delta.content) == "string" and delta.content or ""
end

return M
