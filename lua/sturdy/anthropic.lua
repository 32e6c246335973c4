--- Anthropic Messages API on a sturdy client.
--   local claude = require("sturdy.anthropic").new { model = "claude-sonnet-4-5" }
--   local reply, err = claude:messages { max_tokens = 512, messages = {{ role = "user", content = "hi" }} }
-- The key comes from api_key or ANTHROPIC_API_KEY; the request body is the
-- provider's own shape and passes through untouched (model added if absent).
local sturdy = require "sturdy"
local provider = require "sturdy.provider"
local stream = require "sturdy.stream"

local M = {}

--- Anthropic's usage in the common shape: input excludes cached tokens.
function M.usage(u)
  u = type(u) == "table" and u or {}
  local count = provider.count
  return {
    input = count(u.input_tokens), output = count(u.output_tokens),
    cache_read = count(u.cache_read_input_tokens), cache_write = count(u.cache_creation_input_tokens),
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

local SPEC = {
  name = "anthropic", env = "ANTHROPIC_API_KEY", base_url = "https://api.anthropic.com",
  path = "/v1/messages", call = "messages", flavor = stream.anthropic,
  auth = function(key, self)
    return { ["x-api-key"] = key, ["anthropic-version"] = self.version or "2023-06-01" }
  end,
  max_tokens = function(params) return params.max_tokens end,
  usage = M.usage,
  text = function(doc) return M.text(doc.content) end,
  stop_reason = function(doc) return doc.stop_reason end,
  check = function(doc)
    if type(doc.content) ~= "table" then return "no content" end
  end,
}

M.Anthropic = provider.define({ __name = "sturdy.anthropic" }, SPEC)

function M.new(opts)
  return provider.new(M.Anthropic, SPEC, opts)
end

sturdy.anthropic = M
return M
