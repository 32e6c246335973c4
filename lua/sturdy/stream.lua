--- Streamed replies (server-sent events parsed in C) for the providers.
-- Events reach the caller in order; a failure before the first content delta
-- reached the caller is retried like any call (the events before it are
-- dropped), after it the call is committed. An error event inside a 200 stream
-- becomes a typed error; a stream that ends without its terminal event is an
-- error, never a silently short answer.
--
-- stream:result() collects the reply in the non-streamed shape, as the SDKs
-- collect it: every field of an Anthropic message_delta (stop_details, ...)
-- and of its usage (nested ones merged) lands on the message; a tool block the
-- stream cut (max_tokens, no content_block_stop) gets the complete part of its
-- partial JSON as input, with incomplete = true and the raw partial_json;
-- OpenAI deltas merge per choice, tool calls included.
local policy = require "sturdy.policy"
local sturdy = require "sturdy"
local partial_json = require "sturdy.partial_json"
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

-- The 0-based index of a block, choice or tool call as a 1-based position in
-- list: an existing one, or the next one. Anything else (a gap, a negative, a
-- fraction, NaN, a string) is nil.
local function position(list, index)
  if type(index) ~= "number" or index ~= index or index < 0 or index > #list or index % 1 ~= 0 then
    return nil
  end
  return index + 1
end

-- Merges usage counts the way the SDKs do: a field of the update replaces the
-- one collected, nested tables (output_tokens_details, server_tool_use) merge
-- field by field, and a null never erases a value.
local function merge_usage(into, update)
  for k, v in pairs(update) do
    if type(v) == "table" and type(into[k]) == "table" then
      merge_usage(into[k], v)
    elseif v ~= cjson.null or into[k] == nil then
      into[k] = copy(v)
    end
  end
end

local function append(list, s)
  list[#list + 1] = s
end

-- -------------------------------------------------------------------------
-- Anthropic: event: message_start ... message_stop; event: error
-- -------------------------------------------------------------------------

-- The message collected so far is acc.message (nil until message_start).
-- What deltas add to a block is kept apart until its content_block_stop, in
-- acc.pieces[position][field] (lists, so a long answer is joined once): text
-- and thinking, and the input's JSON, so no private field sits in a block.

local function anthropic_block(acc, index)
  local content = acc.message and acc.message.content
  local at = content and position(content, index)
  return at and content[at], at
end

local function add_piece(acc, at, block, field, s)
  local fields = acc.pieces[at] or {}
  acc.pieces[at] = fields
  local list = fields[field]
  if not list then
    list = { field ~= "input" and type(block[field]) == "string" and block[field] or "" }
    fields[field] = list
  end
  append(list, s)
end

local function bad_input(block, what, why, text)
  return { kind = "bad_response", class = "fatal",
           message = "a " .. tostring(block.type) .. " block's input " .. what,
           detail = why .. "; input starts: " .. text:sub(1, 120):gsub("[%c]", " ") }
end

-- Sets the input of a block from its JSON text, or returns nil and a
-- bad_response error. A whole block's text is parsed as is; a block the
-- stream never stopped (max_tokens cut it) gets the complete part of its
-- partial JSON, and says so.
local function set_input(block, text, whole)
  if not whole then
    block.incomplete = true
    block.partial_json = text
    local input, err = partial_json.decode(text)
    if input ~= nil then
      block.input = input
    elseif err ~= "no complete value" then
      return nil, bad_input(block, "is not the start of JSON", err, text)
    end
  elseif not text:find("^%s*$") then   -- no input deltas: the start's input stands
    local input, err = cjson.decode(text)
    if input == nil then return nil, bad_input(block, "is not valid JSON", tostring(err), text) end
    block.input = input
  end
  return true
end

-- Joins what the deltas gave block at position at; whole: its
-- content_block_stop came.
local function finish_block(acc, at, whole)
  local fields, block = acc.pieces[at], acc.message.content[at]
  acc.pieces[at] = nil
  for field, list in pairs(fields or {}) do
    if field == "input" then
      local ok, err = set_input(block, table.concat(list), whole)
      if not ok then acc.error = acc.error or err end
    else
      block[field] = table.concat(list)
    end
  end
end

local ANTHROPIC_DELTAS = {
  text_delta = function(acc, at, block, delta)
    if type(delta.text) == "string" then add_piece(acc, at, block, "text", delta.text) end
  end,
  thinking_delta = function(acc, at, block, delta)
    if type(delta.thinking) == "string" then add_piece(acc, at, block, "thinking", delta.thinking) end
  end,
  input_json_delta = function(acc, at, block, delta)
    if type(delta.partial_json) == "string" then add_piece(acc, at, block, "input", delta.partial_json) end
  end,
  signature_delta = function(_, _, block, delta) block.signature = delta.signature end,
  citations_delta = function(_, _, block, delta)
    if type(block.citations) ~= "table" then block.citations = {} end
    append(block.citations, copy(delta.citation))
  end,
}

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
  new_acc = function() return { pieces = {} } end,
  accumulate = function(acc, ev)
    local d, msg = ev.data, acc.message
    if ev.type == "message_start" then
      -- a second message_start is ignored, as the SDKs do
      if msg == nil and type(d.message) == "table" then
        msg = copy(d.message)
        if type(msg.content) ~= "table" then msg.content = {} end
        acc.message = msg
      end
    elseif msg == nil then
      return   -- nothing is collected before message_start
    elseif ev.type == "content_block_start" then
      if type(d.content_block) == "table" then append(msg.content, copy(d.content_block)) end
    elseif ev.type == "content_block_delta" then
      local block, at = anthropic_block(acc, d.index)
      local delta = d.delta
      local add = type(delta) == "table" and ANTHROPIC_DELTAS[delta.type]
      if block and add then add(acc, at, block, delta) end
    elseif ev.type == "content_block_stop" then
      local _, at = anthropic_block(acc, d.index)
      if at then finish_block(acc, at, true) end
    elseif ev.type == "message_delta" then
      -- every field, so fields the API adds later arrive without a code
      -- change; content and type are the stream's own
      if type(d.delta) == "table" then
        for k, v in pairs(d.delta) do
          if k ~= "content" and k ~= "type" then msg[k] = copy(v) end
        end
      end
      if type(d.usage) == "table" then
        if type(msg.usage) ~= "table" then msg.usage = {} end
        merge_usage(msg.usage, d.usage)
      end
    end
  end,
  -- the input tokens message_start reported, or nil
  input_tokens = function(acc)
    local usage = acc.message and acc.message.usage
    local n = type(usage) == "table" and tonumber(usage.input_tokens)
    return n and n >= 0 and n < math.huge and n or nil
  end,
  message = function(acc)
    if not acc.message then
      return nil, { kind = "bad_response", class = "fatal", message = "the stream sent no message_start" }
    end
    for at in pairs(acc.pieces) do finish_block(acc, at, false) end
    if acc.error then return nil, acc.error end
    return acc.message
  end,
}

-- -------------------------------------------------------------------------
-- OpenAI: data: {chunk} ... data: [DONE]; data: {"error": ...}
-- -------------------------------------------------------------------------

-- Deltas merge as the SDKs merge them: strings are appended (kept as a list
-- of pieces until the end), objects merge field by field, lists of objects
-- with an "index" (tool_calls) merge by it, other lists are appended to, and
-- any other value replaces the one collected; a null never erases a value.
local Pieces = {}

local function merge_delta(into, delta)
  for k, v in pairs(delta) do
    local have = into[k]
    if k == "index" or k == "type" then
      into[k] = copy(v)
    elseif type(v) == "string" then
      if getmetatable(have) == Pieces then
        append(have, v)
      elseif type(have) == "string" then
        into[k] = setmetatable({ have, v }, Pieces)
      else
        into[k] = v
      end
    elseif type(v) == "table" then
      if type(have) ~= "table" or getmetatable(have) == Pieces then
        have = {}
        into[k] = have
      end
      if v[1] ~= nil then
        for _, item in ipairs(v) do
          local at = type(item) == "table" and position(have, item.index)
          if at then
            have[at] = have[at] or {}
            merge_delta(have[at], item)
          else
            append(have, copy(item))
          end
        end
      else
        merge_delta(have, v)
      end
    elseif v ~= cjson.null or have == nil then
      into[k] = v
    end
  end
end

-- Joins the pieces of appended strings.
local function join_pieces(t)
  for k, v in pairs(t) do
    if getmetatable(v) == Pieces then
      t[k] = table.concat(v)
    elseif type(v) == "table" then
      join_pieces(v)
    end
  end
  return t
end

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
  new_acc = function() return { doc = {}, choices = {} } end,
  -- OpenAI reports usage only at the end of a stream: the estimate stands
  input_tokens = function() return nil end,
  accumulate = function(acc, ev)
    local d = ev.data
    if not d then return end
    for k, v in pairs(d) do
      if k ~= "choices" and k ~= "object" and (v ~= cjson.null or acc.doc[k] == nil) then
        acc.doc[k] = copy(v)
      end
    end
    if type(d.choices) ~= "table" then return end
    for _, c in ipairs(d.choices) do
      local at = type(c) == "table" and position(acc.choices, c.index)
      if at then
        local choice = acc.choices[at] or { index = at - 1, message = {} }
        acc.choices[at] = choice
        for k, v in pairs(c) do
          if k == "delta" then
            if type(v) == "table" then merge_delta(choice.message, v) end
          elseif k == "logprobs" and type(v) == "table" then
            if type(choice.logprobs) ~= "table" then choice.logprobs = {} end
            merge_delta(choice.logprobs, v)
          elseif k ~= "index" and (v ~= cjson.null or choice[k] == nil) then
            choice[k] = copy(v)
          end
        end
      end
    end
  end,
  -- The collected completion in the non-streamed shape.
  message = function(acc)
    local doc = join_pieces(acc.doc)
    doc.object = "chat.completion"
    doc.choices = {}
    for i, choice in ipairs(join_pieces(acc.choices)) do
      local m = choice.message
      m.role = m.role or "assistant"
      if m.content == nil then m.content = cjson.null end
      if m.refusal == nil then m.refusal = cjson.null end
      if type(m.tool_calls) == "table" then
        for _, call in ipairs(m.tool_calls) do
          if type(call) == "table" then call.index = nil end
        end
      end
      if choice.finish_reason == nil then choice.finish_reason = cjson.null end
      if choice.logprobs == nil then choice.logprobs = cjson.null end
      doc.choices[i] = choice
    end
    acc.doc, acc.choices = {}, {}
    return doc
  end,
}

-- The stream object. A stream has one leg (a submitted request), or two when
-- a hedge went: each leg parses its own bytes; the first leg to deliver a
-- content delta (or its terminal event) wins, the other is cancelled, and only
-- the winner's events reach the caller.

-- A leg's parsing state, fresh (also for a new attempt of the leg).
local function reset_leg(self, leg)
  leg.parser:reset()
  leg.acc, leg.held, leg.released, leg.terminal, leg.stream_error = self.flavor.new_acc(), {}, false, false, nil
end

-- Submits req (which it completes with the stream's on_data) as a new leg.
local function new_leg(self, req)
  local leg = { parser = policy.sse() }
  reset_leg(self, leg)
  -- the prelude is held back until the first delta: the stream commits itself
  req.on_data = function(chunk, attempt) self:_chunk(leg, chunk, attempt) end
  req.commit = "manual"
  leg.handle = self.provider.client:submit(req, function(res, err) self:_leg_done(leg, res, err) end)
  return leg
end

--- Starts a streamed call of provider p (flavor: stream.anthropic or
-- stream.openai); finish(doc, res) turns the collected message into the
-- result. hedging (or nil) hedges it: { policy (from sturdy.hedge),
-- request = function(req, left_ms) -> the hedge's request, lost =
-- function(input_tokens or nil) -> the cost of a leg cancelled in flight, charged }.
function stream.start(p, flavor, req, finish, on_event, hedging)
  local self = setmetatable({
    provider = p, flavor = flavor, finish_fn = finish, on_event = on_event,
    queue = {}, head = 1, tail = 0, committed = false, done = false, hedging = hedging,
  }, Stream)
  local first = new_leg(self, req)
  self.legs, self.handle = { first }, first.handle
  local wait = hedging and first.handle:hedge_plan(hedging.policy)
  if wait then
    self.timer = p.client:after(wait / 1000, function() self:_hedge(req) end)
  end
  return self
end

-- The hedge timer: no delta yet, so a second leg goes if the core allows it.
function Stream:_hedge(req)
  local first = self.legs[1]
  if self.done or self.winner or first.done or first.released then return end
  local ok, left = first.handle:hedge_admit(self.hedging.policy)
  if not ok then return end
  self.hedged = true
  self.legs[2] = new_leg(self, self.hedging.request(req, left))
end

--- A stream that failed before it started (the input guard).
function stream.failed(err)
  return setmetatable({ done = true, error = err, queue = {}, head = 1, tail = 0, committed = false }, Stream)
end

function Stream:_commit()
  if self.committed then return end
  self.committed = true
  if self.handle then self.handle:commit() end
end

-- Hands an event to on_event. An error it raises must not cost the stream its
-- other events: it is kept and raised once the whole piece was read (so it
-- reaches the client's on_error, or poll's list of errors).
function Stream:_emit(ev)
  if self.on_event then
    self:_commit()
    local ok, e = pcall(self.on_event, ev)
    if not ok and self.hook_error == nil then self.hook_error = e end
  else
    self.tail = self.tail + 1
    self.queue[self.tail] = ev
  end
end

function Stream:_raise_hook_error()
  local e = self.hook_error
  if e ~= nil then
    self.hook_error = nil
    error(e, 0)
  end
end

function Stream:_chunk(leg, chunk, attempt)
  self:_read(leg, chunk, attempt)
  self:_raise_hook_error()
end

-- leg delivered its first delta first: it is the stream now; the other leg is
-- cancelled and what it cost is charged.
function Stream:_win(leg)
  self.winner, self.handle = leg, leg.handle
  if self.timer then self.timer:cancel() end
  for _, other in ipairs(self.legs) do
    if other ~= leg and not other.done then
      other.lost = true
      other.handle:lose()
      self.lost_cost = (self.lost_cost or 0) + self.hedging.lost(self.flavor.input_tokens(other.acc))
    end
  end
end

-- Over, canceled, lost to the other leg, or its attempt retried after all: no
-- more of leg's events go out, even of a piece being read (an event's hook may
-- drive the client).
function Stream:_stopped(leg)
  return self.done or (self.winner ~= nil and self.winner ~= leg) or not leg.handle:current(leg.attempt)
end

function Stream:_read(leg, chunk, attempt)
  if self.winner and self.winner ~= leg then return end -- a loser's last bytes
  if attempt ~= leg.attempt then
    -- a new attempt: a fresh body, and nothing of the last reached the caller
    leg.attempt = attempt
    reset_leg(self, leg)
    if not self.committed and leg == self.winner then self.queue, self.head, self.tail = {}, 1, 0 end
  end
  if leg.stream_error or self:_stopped(leg) then return end
  local events, perr = leg.parser:feed(chunk)
  if not events then
    leg.stream_error = { class = "fatal", kind = "stream_error", type = "stream_error", message = perr }
    leg.handle:fail_attempt("fatal", "stream_error", perr)
    return
  end
  for _, raw in ipairs(events) do
    local ev, err = self.flavor.parse(raw)
    if err then
      leg.stream_error = err
      if not self.committed and leg == self.winner then self.queue, self.head, self.tail = {}, 1, 0 end
      leg.held = {}
      leg.handle:fail_attempt(err.class, err.kind, err.message)
      return
    end
    if ev then
      self.flavor.accumulate(leg.acc, ev)
      if ev.terminal then leg.terminal = true end
      if leg.released then
        self:_emit(ev)
      else
        -- the prelude waits for the first delta: until then a failure is retried
        leg.held[#leg.held + 1] = ev
        if ev.content or ev.terminal then
          if not self.winner then self:_win(leg) end
          local held = leg.held
          leg.released, leg.held = true, {}
          for _, h in ipairs(held) do
            self:_emit(h)
            if self:_stopped(leg) then return end
          end
        end
      end
      if self:_stopped(leg) then return end
    end
  end
end

-- A leg ended. Without a winner yet, a failed leg waits for the other; the
-- stream ends with the winner, or with the first leg's outcome when none won.
function Stream:_leg_done(leg, res, err)
  leg.done, leg.res, leg.err = true, res, err
  if self.done or (self.winner and self.winner ~= leg) then return end
  if not self.winner then
    for _, other in ipairs(self.legs) do
      if other ~= leg and not other.done then return end
    end
    if self.timer then self.timer:cancel() end
    leg = self.legs[1]
    self.handle = leg.handle
  end
  self:_finish(leg, leg.res, leg.err)
end

function Stream:_finish(leg, res, err)
  self.done = true
  if err then
    if leg.stream_error then
      err.type = leg.stream_error.type
      err.detail = leg.stream_error.message
    end
    err.committed = self.committed
    err.hedged = self.hedged
    self.error = err
  elseif not leg.terminal or leg.parser:finish() then
    self.error = sturdy.Error.new {
      kind = "stream_truncated", class = "transient", committed = self.committed, status = res.status,
      request_id = res.request_id, attempts = res.attempts, hedged = self.hedged,
      message = "the stream ended before its terminal event",
    }
  else
    local doc, bad = self.flavor.message(leg.acc)
    if doc then
      local r = self.finish_fn(doc, res)
      if r and self.hedged then
        r.hedged, r.hedge_won = true, leg ~= self.legs[1]
      end
      if r and self.lost_cost then r.cost = (r.cost or 0) + self.lost_cost end
      self._result = r
    else
      self.error = sturdy.Error.new {
        kind = bad.kind, class = bad.class, committed = self.committed, status = res.status,
        request_id = res.request_id, attempts = res.attempts, message = bad.message, detail = bad.detail,
      }
    end
  end
  if res and self.error then
    -- the call succeeded but its stream cannot be used: observers hear why
    self.provider.client:notify { type = "reply_failed", key = res.key, response = res, error = self.error }
  end
  if self.on_event and self.error then self:_emit { type = "error", error = self.error } end
  -- s.on_done(s), when set, hears the end (success or error) after everything else
  if self.on_done then self.on_done(self) end
  self:_raise_hook_error()
end

--- Drives the client for at most timeout seconds (default 0) unless the
-- stream is over; returns whether it is over. For callers that wait on several
-- things at once (the cache's followers of a stream).
function Stream:poll(timeout)
  if not self.done then self.provider.client:poll(timeout or 0) end
  return self.done
end

--- The next event, driving the client while none is ready; after the last, an
-- event { type = "error", error = err } if the stream failed, then nil.
function Stream:next()
  while true do
    local q, i = self.queue, self.head
    local ev = q[i]
    local w = self.winner
    if ev and not self.committed and not self.done and w and not w.handle:current(w.attempt) then
      -- the attempt these came from was retried (or canceled) while they waited: never seen, they go
      self.queue, self.head, self.tail = {}, 1, 0
      ev = nil
    end
    if ev then
      -- taken by index, so draining is linear however long the queue grows
      q[i], self.head = nil, i + 1
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
  for _, leg in ipairs(self.legs or {}) do
    if not self.done and leg.handle._delivering then
      error("sturdy: stream:result() inside the stream's own events would never return", 2)
    end
  end
  while not self.done do self.provider.client:poll(0.05) end
  if self.error then return nil, self.error end
  return self._result
end

--- Ends the stream as canceled: no more events but the error one. Returns
-- true, or false when it is over, or its terminal event is in (the reply is
-- whole: the call ends by itself, once).
function Stream:cancel()
  if self.done or not self.legs or (self.winner and self.winner.terminal) then return false end
  if self.timer then self.timer:cancel() end
  local canceled = false
  for _, leg in ipairs(self.legs) do
    if leg.handle:cancel() then canceled = true end
  end
  return canceled
end

return stream
