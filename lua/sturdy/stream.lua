--- Streamed replies (server-sent events parsed in C) for the providers.
-- Events reach the caller in order; a failure before the first content delta
-- reached the caller is retried like any call (the events before it are
-- dropped), after it the call is committed. An error event inside a 200 stream
-- becomes a typed error; a stream that ends without its terminal event is an
-- error, never a silently short answer.
local policy = require "sturdy.policy"
local sturdy = require "sturdy"
local cjson = require "cjson.safe"

local stream = {}

local Stream = { __name = "sturdy.Stream" }
Stream.__index = Stream
stream.Stream = Stream

-- Provider error types inside a stream, to the class and kind of an HTTP error.
local ERROR_TYPES = {
  overloaded_error = { "overloaded", "overloaded" },
  rate_limit_error = { "throttled", "rate_limited" },
  rate_limit_exceeded = { "throttled", "rate_limited" },
  api_error = { "transient", "server" },
  server_error = { "transient", "server" },
  invalid_request_error = { "fatal", "bad_request" },
  authentication_error = { "fatal", "auth" },
  permission_error = { "fatal", "permission" },
  not_found_error = { "fatal", "not_found" },
  request_too_large = { "fatal", "too_large" },
}

local function stream_error(e)
  e = type(e) == "table" and e or {}
  local t = type(e.type) == "string" and e.type or (type(e.code) == "string" and e.code or "stream_error")
  local map = ERROR_TYPES[t] or { "transient", "stream_error" }
  return { class = map[1], kind = map[2], type = t,
           message = type(e.message) == "string" and e.message or t }
end

local function copy(t)
  if type(t) ~= "table" then return t end
  local c = {}
  for k, v in pairs(t) do c[k] = copy(v) end
  return c
end

---------------------------------------------------------------------------
-- Anthropic: event: message_start ... message_stop; event: error
---------------------------------------------------------------------------

stream.anthropic = {
  parse = function(raw)
    local doc = cjson.decode(raw.data)
    if raw.event == "error" or (type(doc) == "table" and doc.type == "error") then
      return nil, stream_error(type(doc) == "table" and doc.error)
    end
    if type(doc) ~= "table" then return nil end
    local t = raw.event ~= "message" and raw.event or doc.type
    return { type = t, data = doc, content = t == "content_block_delta", terminal = t == "message_stop" }
  end,
  new_acc = function() return { content = {} } end,
  accumulate = function(acc, ev)
    local d = ev.data
    if ev.type == "message_start" and type(d.message) == "table" then
      local content = acc.content
      for k, v in pairs(copy(d.message)) do acc[k] = v end
      acc.content = content
    elseif ev.type == "content_block_start" and type(d.content_block) == "table" then
      acc.content[(tonumber(d.index) or #acc.content) + 1] = copy(d.content_block)
    elseif ev.type == "content_block_delta" and type(d.delta) == "table" then
      local block = acc.content[(tonumber(d.index) or 0) + 1]
      if block then
        local delta = d.delta
        if delta.type == "text_delta" then block.text = (block.text or "") .. (delta.text or "")
        elseif delta.type == "input_json_delta" then block._json = (block._json or "") .. (delta.partial_json or "")
        elseif delta.type == "thinking_delta" then block.thinking = (block.thinking or "") .. (delta.thinking or "")
        elseif delta.type == "signature_delta" then block.signature = delta.signature
        end
      end
    elseif ev.type == "content_block_stop" then
      local block = acc.content[(tonumber(d.index) or 0) + 1]
      if block and block._json then
        block.input = cjson.decode(block._json ~= "" and block._json or "{}")
        block._json = nil
      end
    elseif ev.type == "message_delta" then
      if type(d.delta) == "table" then
        acc.stop_reason = d.delta.stop_reason
        acc.stop_sequence = d.delta.stop_sequence
      end
      if type(d.usage) == "table" then
        acc.usage = acc.usage or {}
        for k, v in pairs(d.usage) do acc.usage[k] = v end
      end
    end
  end,
  message = function(acc) return acc end,
}

---------------------------------------------------------------------------
-- OpenAI: data: {chunk} ... data: [DONE]; data: {"error": ...}
---------------------------------------------------------------------------

stream.openai = {
  parse = function(raw)
    if raw.data == "[DONE]" then return { type = "done", terminal = true } end
    local doc = cjson.decode(raw.data)
    if type(doc) ~= "table" then return nil end
    if doc.error ~= nil then return nil, stream_error(doc.error) end
    local choice = type(doc.choices) == "table" and doc.choices[1]
    local delta = type(choice) == "table" and choice.delta
    local content = type(delta) == "table"
      and ((type(delta.content) == "string" and delta.content ~= "") or delta.tool_calls ~= nil)
    return { type = "chunk", data = doc, content = content and true or false }
  end,
  new_acc = function() return { content = {} } end,
  accumulate = function(acc, ev)
    local d = ev.data
    if not d then return end
    acc.id, acc.model, acc.created = acc.id or d.id, acc.model or d.model, acc.created or d.created
    acc.system_fingerprint = acc.system_fingerprint or d.system_fingerprint
    if type(d.usage) == "table" then acc.usage = copy(d.usage) end
    local choice = type(d.choices) == "table" and d.choices[1]
    if type(choice) == "table" then
      local delta = type(choice.delta) == "table" and choice.delta or {}
      if type(delta.role) == "string" then acc.role = delta.role end
      if type(delta.content) == "string" then acc.content[#acc.content + 1] = delta.content end
      if type(choice.finish_reason) == "string" then acc.finish_reason = choice.finish_reason end
    end
  end,
  message = function(acc)
    return {
      id = acc.id, object = "chat.completion", created = acc.created, model = acc.model,
      system_fingerprint = acc.system_fingerprint,
      choices = { { index = 0, finish_reason = acc.finish_reason, logprobs = cjson.null,
                    message = { role = acc.role or "assistant", content = table.concat(acc.content),
                                refusal = cjson.null } } },
      usage = acc.usage,
    }
  end,
}

-- The stream object

--- Starts a streamed call of provider p (flavor: stream.anthropic or
-- stream.openai); finish(doc, res) turns the collected message into the result.
function stream.start(p, flavor, req, finish, on_event)
  local self = setmetatable({
    provider = p, flavor = flavor, finish_fn = finish, on_event = on_event,
    queue = {}, held = {}, committed = false, released = false, done = false,
    parser = policy.sse(), acc = flavor.new_acc(),
  }, Stream)
  req.stream = true
  self.handle = p.client:submit(req, function(res, err) self:_finish(res, err) end)
  self.handle.on_chunk = function(chunk, attempt) self:_chunk(chunk, attempt) end
  return self
end

--- A stream that failed before it started (the input guard).
function stream.failed(err)
  return setmetatable({ done = true, error = err, queue = {}, committed = false }, Stream)
end

function Stream:_commit()
  if self.committed then return end
  self.committed = true
  local request = self.handle and self.handle._request
  if request then request:commit() end
end

function Stream:_emit(ev)
  if self.on_event then
    self:_commit()
    self.on_event(ev)
  else
    self.queue[#self.queue + 1] = ev
  end
end

function Stream:_chunk(chunk, attempt)
  if attempt ~= self.attempt then
    -- a new attempt: a fresh body, and nothing of the last reached the caller
    self.attempt = attempt
    self.parser:reset()
    self.acc, self.held, self.released, self.terminal, self.stream_error = self.flavor.new_acc(), {}, false, false, nil
  end
  if self.stream_error then return end
  local events, perr = self.parser:feed(chunk)
  if not events then
    self.stream_error = { class = "fatal", kind = "stream_error", type = "stream_error", message = perr }
    self.handle._request:fail_attempt("fatal", "stream_error", perr)
    return
  end
  for _, raw in ipairs(events) do
    local ev, err = self.flavor.parse(raw)
    if err then
      self.stream_error = err
      if not self.committed then self.queue, self.held = {}, {} end
      self.handle._request:fail_attempt(err.class, err.kind, err.message)
      return
    end
    if ev then
      self.flavor.accumulate(self.acc, ev)
      if ev.terminal then self.terminal = true end
      if self.released then
        self:_emit(ev)
      else
        -- the prelude waits for the first delta: until then a failure is retried
        self.held[#self.held + 1] = ev
        if ev.content or ev.terminal then
          self.released = true
          for _, h in ipairs(self.held) do self:_emit(h) end
          self.held = {}
        end
      end
    end
  end
end

function Stream:_finish(res, err)
  self.done = true
  if err then
    if self.stream_error then
      err.type = self.stream_error.type
      err.detail = self.stream_error.message
    end
    err.committed = self.committed
    self.error = err
  elseif not self.terminal or self.parser:finish() then
    self.error = sturdy.Error.new {
      kind = "stream_truncated", class = "transient", committed = self.committed, status = res.status,
      request_id = res.request_id, attempts = res.attempts,
      message = "the stream ended before its terminal event",
    }
  else
    self._result = self.finish_fn(self.flavor.message(self.acc), res)
  end
  if self.on_event and self.error then self.on_event { type = "error", error = self.error } end
end

--- The next event, driving the client while none is ready; after the last, an
-- event { type = "error", error = err } if the stream failed, then nil.
function Stream:next()
  while true do
    local ev = table.remove(self.queue, 1)
    if ev then
      self:_commit()
      return ev
    end
    if self.done then
      if self.error and not self.error_seen then
        self.error_seen = true
        return { type = "error", error = self.error }
      end
      return nil
    end
    self.provider.client:poll(0.05)
  end
end

--- An iterator over the events, for `for ev in s:events() do ... end`.
function Stream:events()
  return function() return self:next() end
end

--- Waits for the end and returns the result (the same shape as the non-streamed
-- call's, reply collected from the deltas), or nil and the error.
function Stream:result()
  while not self.done do self.provider.client:poll(0.05) end
  if self.error then return nil, self.error end
  return self._result
end

function Stream:cancel()
  if self.handle then self.handle:cancel() end
end

return stream
