--- OpenAI Chat Completions on a sturdy client.
--   local gpt = require("sturdy.openai").new { model = "gpt-4o-mini" }
--   local reply, err = gpt:chat { messages = {{ role = "user", content = "hi" }} }
-- The key comes from api_key or OPENAI_API_KEY; the request body is the
-- provider's own shape and passes through untouched (model added if absent).
local sturdy = require "sturdy"
local provider = require "sturdy.provider"
local stream = require "sturdy.stream"

local M = {}

--- OpenAI's usage in the common shape: input excludes cached prompt tokens.
function M.usage(u)
  u = type(u) == "table" and u or {}
  local count = provider.count
  local prompt = count(u.prompt_tokens)
  -- cached tokens are part of the prompt's, never more
  local cached = math.min(prompt, count(type(u.prompt_tokens_details) == "table"
                                        and u.prompt_tokens_details.cached_tokens))
  return { input = prompt - cached, output = count(u.completion_tokens), cache_read = cached, cache_write = 0 }
end

local function first_choice(doc)
  local choice = type(doc.choices) == "table" and doc.choices[1]
  return type(choice) == "table" and choice or {}
end

local SPEC = {
  name = "openai", env = "OPENAI_API_KEY", base_url = "https://api.openai.com",
  path = "/v1/chat/completions", call = "chat", flavor = stream.openai,
  auth = function(key) return { ["authorization"] = "Bearer " .. key } end,
  max_tokens = function(params) return params.max_completion_tokens or params.max_tokens end,
  usage = M.usage,
  text = function(doc)
    local message = first_choice(doc).message
    return type(message) == "table" and type(message.content) == "string" and message.content or ""
  end,
  stop_reason = function(doc) return first_choice(doc).finish_reason end,
  check = function(doc)
    local choice = type(doc.choices) == "table" and doc.choices[1]
    if type(choice) ~= "table" or type(choice.message) ~= "table" then return "no choices" end
  end,
  -- the usage comes in a last chunk only when asked for
  stream_body = function(body) body.stream_options = body.stream_options or { include_usage = true } end,
}

M.OpenAI = provider.define({ __name = "sturdy.openai" }, SPEC)

function M.new(opts)
  return provider.new(M.OpenAI, SPEC, opts)
end

sturdy.openai = M
return M
