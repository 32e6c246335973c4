--- Prices per million tokens, by model id prefix: input, output, and
-- cache_read / cache_write (prompt caching). Extend or override at run time:
--   require("sturdy.prices")["my-model"] = { input = 1, output = 2 }
-- A model id matches the longest prefix listed ("claude-sonnet-4-5-20250929"
-- uses "claude-sonnet-4-5").
local prices = {
  -- Anthropic
  ["claude-opus-4-1"] = { input = 15, output = 75, cache_write = 18.75, cache_read = 1.50 },
  ["claude-opus-4"] = { input = 15, output = 75, cache_write = 18.75, cache_read = 1.50 },
  ["claude-sonnet-4-5"] = { input = 3, output = 15, cache_write = 3.75, cache_read = 0.30 },
  ["claude-sonnet-4"] = { input = 3, output = 15, cache_write = 3.75, cache_read = 0.30 },
  ["claude-3-7-sonnet"] = { input = 3, output = 15, cache_write = 3.75, cache_read = 0.30 },
  ["claude-haiku-4-5"] = { input = 1, output = 5, cache_write = 1.25, cache_read = 0.10 },
  ["claude-3-5-haiku"] = { input = 0.80, output = 4, cache_write = 1, cache_read = 0.08 },
  -- OpenAI (cache_read: cached input tokens)
  ["gpt-4o"] = { input = 2.50, output = 10, cache_read = 1.25 },
  ["gpt-4o-mini"] = { input = 0.15, output = 0.60, cache_read = 0.075 },
  ["gpt-4.1"] = { input = 2, output = 8, cache_read = 0.50 },
  ["gpt-4.1-mini"] = { input = 0.40, output = 1.60, cache_read = 0.10 },
  ["gpt-4.1-nano"] = { input = 0.10, output = 0.40, cache_read = 0.025 },
}

-- model id -> the prefix that prices it (false: none), so a call does not
-- walk the table; an entry added at run time clears it (see __newindex)
local matched = {}

--- The price entry for a model id, or nil.
local function lookup(model)
  if type(model) ~= "string" then return nil end
  local prefix = matched[model]
  if prefix == nil then
    local best_len = 0
    prefix = false
    for k, p in pairs(prices) do
      if type(p) == "table" and type(k) == "string" and #k > best_len and model:sub(1, #k) == k then
        prefix, best_len = k, #k
      end
    end
    matched[model] = prefix
  end
  local p = prefix and rawget(prices, prefix)
  if prefix and p == nil then
    matched[model] = nil -- the entry was removed since
    return lookup(model)
  end
  return p or nil
end

--- Cost in dollars of a normalized usage ({input, output, cache_read, cache_write}).
-- Input tokens here exclude cached ones; nil when the model has no price.
local function cost(model, usage)
  local p = lookup(model)
  if not p or not usage then return nil end
  return ((usage.input or 0) * (p.input or 0) + (usage.output or 0) * (p.output or 0)
    + (usage.cache_read or 0) * (p.cache_read or p.input or 0)
    + (usage.cache_write or 0) * (p.cache_write or p.input or 0)) / 1e6
end

return setmetatable(prices, {
  __index = { lookup = lookup, cost = cost },
  __newindex = function(t, k, v)
    matched = {}
    rawset(t, k, v)
  end,
})
