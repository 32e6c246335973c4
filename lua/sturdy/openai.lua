--- OpenAI Chat Completions on a sturdy client.
--   local gpt = require("sturdy.openai").new { model = "gpt-4o-mini" }
--   local reply, err = gpt:chat { messages = {{ role = "user", content = "hi" }} }
-- The key comes from api_key or OPENAI_API_KEY; the request body is the
-- provider's own shape and passes through untouched (model added if absent).
local sturdy = require "sturdy"
local provider = require "sturdy.provider"
local stream = require "sturdy.stream"

local OpenAI = { __name = "sturdy.openai" }
OpenAI.__index = OpenAI

local SPEC = {
  name = "openai", env = "OPENAI_API_KEY", base_url = "https://api.openai.com",
  auth = function(key) return { ["authorization"] = "Bearer " .. key } end,
}

local M = { OpenAI = OpenAI }

function M.new(opts)
  return provider.new(OpenAI, SPEC, opts)
end

--- OpenAI's usage in the common shape: input excludes cached prompt tokens.
function M.usage(u)
  u = type(u) == "table" and u or {}
  local cached = type(u.prompt_tokens_details) == "table" and tonumber(u.prompt_tokens_details.cached_tokens) or 0
  return {
    input = (tonumber(u.prompt_tokens) or 0) - cached, output = tonumber(u.completion_tokens) or 0,
    cache_read = cached, cache_write = 0,
  }
end

function OpenAI:_request(params, opts)
  if type(params) ~= "table" then
    error("sturdy: chat takes a table of request parameters, got " .. type(params), 0)
  end
  local body = {}
  for k, v in pairs(params) do body[k] = v end
  body.model = body.model or self.model
  if type(body.model) ~= "string" then error("sturdy: no model: pass model to new{} or in the request", 0) end
  local out = tonumber(body.max_completion_tokens or body.max_tokens) or 0
  local estimated = { input = provider.estimate_input(body), output = out }
  opts = opts or {}
  local headers = provider.auth_headers(self, SPEC)
  for k, v in pairs(opts.headers or {}) do headers[k] = v end
  return {
    method = "POST", path = "/v1/chat/completions", json = body,
    headers = headers,
    tokens = estimated, key = opts.key, priority = opts.priority, timeout = opts.timeout,
  }, body, estimated
end

--- The request for params, for client:submit or client:batch, and a function
-- that turns its response into the result (or nil, err). nil, err when the
-- input guard refuses it (nothing is sent).
function OpenAI:prepare(params, opts)
  local err = provider.guard(self, params, params and (params.max_completion_tokens or params.max_tokens))
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
function OpenAI:chat(params, opts)
  local req, finish = self:prepare(params, opts)
  if not req then return nil, finish end
  local res, err = self.client:request(req)
  if not res then return nil, err end
  return finish(res)
end

function OpenAI:_result(doc, res, body, estimated, req)
  local usage = M.usage(doc.usage)
  local key = req.key or self.client:_key_for(req)
  local model = doc.model or body.model
  local choice = type(doc.choices) == "table" and doc.choices[1] or {}
  local message = type(choice.message) == "table" and choice.message or {}
  return {
    reply = doc, text = type(message.content) == "string" and message.content or "", usage = usage,
    stop_reason = choice.finish_reason, model = model, request_id = res.request_id,
    latency = res.timings.total, attempts = res.attempts,
    cost = provider.account(self, key, model, usage, estimated),
  }
end

--- A streamed Chat Completions request (usage included). Returns an iterator
-- of events and the stream object; with opts.on_event, the stream object at
-- once. stream:result() gives the collected reply in the non-streamed shape.
function OpenAI:stream(params, opts)
  opts = opts or {}
  local err = provider.guard(self, params, params and (params.max_completion_tokens or params.max_tokens))
  local s
  if err then
    s = stream.failed(err)
  else
    local p = {}
    for k, v in pairs(params) do p[k] = v end
    p.stream = true
    p.stream_options = p.stream_options or { include_usage = true }
    local req, body, estimated = self:_request(p, opts)
    s = stream.start(self, stream.openai, req, function(doc, res)
      return self:_result(doc, res, body, estimated, req)
    end, opts.on_event)
  end
  if opts.on_event then return s end
  return s:events(), s
end

OpenAI.__tostring = function(self) return provider.tostring(self, "openai") end

sturdy.openai = M
return M
