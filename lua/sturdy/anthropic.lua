--- Anthropic Messages API on a sturdy client.
--   local claude = require("sturdy.anthropic").new { model = "claude-sonnet-4-5" }
--   local reply, err = claude:messages { max_tokens = 512, messages = {{ role = "user", content = "hi" }} }
-- The key comes from api_key or ANTHROPIC_API_KEY; the request body is the
-- provider's own shape and passes through untouched (model added if absent).
local sturdy = require "sturdy"
local provider = require "sturdy.provider"
local stream = require "sturdy.stream"

local Anthropic = { __name = "sturdy.anthropic" }
Anthropic.__index = Anthropic

local DEFAULT_VERSION = "2023-06-01"

local SPEC = {
  name = "anthropic", env = "ANTHROPIC_API_KEY", base_url = "https://api.anthropic.com",
  auth = function(key, self)
    return { ["x-api-key"] = key, ["anthropic-version"] = self.version or DEFAULT_VERSION }
  end,
}

local M = { Anthropic = Anthropic }

function M.new(opts)
  return provider.new(Anthropic, SPEC, opts)
end

--- Anthropic's usage in the common shape: input excludes cached tokens.
function M.usage(u)
  u = type(u) == "table" and u or {}
  return {
    input = tonumber(u.input_tokens) or 0, output = tonumber(u.output_tokens) or 0,
    cache_read = tonumber(u.cache_read_input_tokens) or 0,
    cache_write = tonumber(u.cache_creation_input_tokens) or 0,
  }
end

--- The text of a message's content blocks, joined.
function M.text(content)
  local parts = {}
  for _, block in ipairs(type(content) == "table" and content or {}) do
    if type(block) == "table" and block.type == "text" and type(block.text) == "string" then
      parts[#parts + 1] = block.text
    end
  end
  return table.concat(parts)
end

-- The request for params; the options a call may add: key, priority, timeout.
function Anthropic:_request(params, opts)
  if type(params) ~= "table" then
    error("sturdy: messages takes a table of request parameters, got " .. type(params), 0)
  end
  local body = {}
  for k, v in pairs(params) do body[k] = v end
  body.model = body.model or self.model
  if type(body.model) ~= "string" then error("sturdy: no model: pass model to new{} or in the request", 0) end
  local estimated = { input = provider.estimate_input(body), output = tonumber(body.max_tokens) or 0 }
  opts = opts or {}
  local headers = provider.auth_headers(self, SPEC)
  for k, v in pairs(opts.headers or {}) do headers[k] = v end
  return {
    method = "POST", path = "/v1/messages", json = body,
    headers = headers,
    tokens = estimated, key = opts.key, priority = opts.priority, timeout = opts.timeout,
  }, body, estimated
end

--- The request for params, for client:submit or client:batch, and a function
-- that turns its response into the result (or nil, err). nil, err when the
-- input guard refuses it (nothing is sent).
function Anthropic:prepare(params, opts)
  local err = provider.guard(self, params, params and params.max_tokens)
  if err then return nil, err end
  local req, body, estimated = self:_request(params, opts)
  return req, function(res)
    local doc, derr = provider.decode(res)
    if not doc then return nil, derr end
    return self:_result(doc, res, body, estimated, req)
  end
end

--- Sends the request and returns { reply (decoded), text, usage, stop_reason,
-- model, request_id, latency, attempts, cost } — or nil and a sturdy.Error.
function Anthropic:messages(params, opts)
  local req, finish = self:prepare(params, opts)
  if not req then return nil, finish end
  local res, err = self.client:request(req)
  if not res then return nil, err end
  return finish(res)
end

function Anthropic:_result(doc, res, body, estimated, req)
  local usage = M.usage(doc.usage)
  local key = req.key or self.client:_key_for(req)
  local model = doc.model or body.model
  return {
    reply = doc, text = M.text(doc.content), usage = usage, stop_reason = doc.stop_reason,
    model = model, request_id = res.request_id, latency = res.timings.total,
    attempts = res.attempts, cost = provider.account(self, key, model, usage, estimated),
  }
end

--- A streamed Messages request. Returns an iterator of events and the stream
-- object (`for ev in claude:stream{...} do`); with opts.on_event, returns the
-- stream object at once and events reach on_event from the client's poll.
-- stream:result() gives the collected reply in the non-streamed shape.
function Anthropic:stream(params, opts)
  opts = opts or {}
  local err = provider.guard(self, params, params and params.max_tokens)
  local s
  if err then
    s = stream.failed(err)
  else
    local p = {}
    for k, v in pairs(params) do p[k] = v end
    p.stream = true
    local req, body, estimated = self:_request(p, opts)
    s = stream.start(self, stream.anthropic, req, function(doc, res)
      return self:_result(doc, res, body, estimated, req)
    end, opts.on_event)
  end
  if opts.on_event then return s end
  return s:events(), s
end

Anthropic.__tostring = function(self) return provider.tostring(self, "anthropic") end

sturdy.anthropic = M
return M
