--- What the Anthropic and OpenAI modules share: construction and its checks,
-- the API key kept out of every printable place, the input guard, usage
-- accounting (limiter corrections, cost totals) and JSON replies.
local sturdy = require "sturdy"
local prices = require "sturdy.prices"
local cjson = require "cjson.safe"

local provider = {}

local format = string.format

local function fail(msg, ...)
  error("sturdy: " .. format(msg, ...), 0)
end

-- Keys live here, not in the objects: nothing that prints an object can show them.
local secrets = setmetatable({}, { __mode = "k" })

local NEW_SCHEMA = {
  client = "table", api_key = "string", model = "string", base_url = "string", version = "string",
  max_tokens_cap = "number", max_input_chars = "number", prices = "table", client_options = "table",
}

--- Builds a provider object from new{...}. spec: name, env (API key variable),
-- base_url (default), auth (function(key) -> headers), extra_headers(opts).
function provider.new(class, spec, opts)
  opts = opts or {}
  if type(opts) ~= "table" then fail("%s.new takes a table of options, got %s", spec.name, type(opts)) end
  for k, v in pairs(opts) do
    local want = NEW_SCHEMA[k]
    if not want then fail("unknown option '%s' in %s.new", tostring(k), spec.name) end
    if type(v) ~= want then fail("option '%s' in %s.new must be a %s, got %s", k, spec.name, want, type(v)) end
  end
  local key = opts.api_key or os.getenv(spec.env)
  if key == nil or key == "" then
    fail("%s needs an API key: pass api_key or set %s", spec.name, spec.env)
  end
  if key:find("[%c]") then fail("%s api_key contains control characters", spec.name) end
  local client = opts.client
  if client == nil then
    local copts = {}
    for k, v in pairs(opts.client_options or {}) do copts[k] = v end
    copts.base_url = opts.base_url or copts.base_url or spec.base_url
    client = sturdy.client(copts)
  elseif opts.client_options then
    fail("%s.new takes client or client_options, not both", spec.name)
  end
  local self = setmetatable({
    client = client, model = opts.model, version = opts.version,
    base_url = opts.base_url, max_tokens_cap = opts.max_tokens_cap, max_input_chars = opts.max_input_chars,
    prices = opts.prices,
  }, class)
  secrets[self] = key
  return self
end

--- The headers a request needs, the key included (only ever sent, never kept elsewhere).
function provider.auth_headers(self, spec)
  return spec.auth(secrets[self], self)
end

--- Counts the characters of prompt text in messages (strings and text blocks) and a system prompt.
local function input_chars(params)
  local n = 0
  local function add(content)
    if type(content) == "string" then
      n = n + #content
    elseif type(content) == "table" then
      for _, block in ipairs(content) do
        if type(block) == "table" and type(block.text) == "string" then n = n + #block.text end
        if type(block) == "table" and type(block.content) == "string" then n = n + #block.content end
      end
    end
  end
  add(params.system)
  for _, m in ipairs(params.messages or {}) do
    if type(m) == "table" then add(m.content) end
  end
  return n
end

--- The input guard: errors before anything is sent. Returns nil or a sturdy.Error.
function provider.guard(self, params, max_tokens)
  if self.max_input_chars then
    local n = input_chars(params)
    if n > self.max_input_chars then
      return sturdy.Error.new {
        kind = "too_large", class = "fatal",
        message = format("the input is %d characters, above max_input_chars (%d); nothing was sent",
                         n, self.max_input_chars),
        attempts = {},
      }
    end
  end
  if self.max_tokens_cap and type(max_tokens) == "number" and max_tokens > self.max_tokens_cap then
    return sturdy.Error.new {
      kind = "bad_request", class = "fatal",
      message = format("max_tokens %d is above max_tokens_cap (%d); nothing was sent",
                       max_tokens, self.max_tokens_cap),
      attempts = {},
    }
  end
end

--- A rough token estimate for the rate limiter before the reply says.
function provider.estimate_input(params)
  return math.ceil(input_chars(params) / 4) + 8
end

--- Decodes a JSON reply; a body that is not JSON is a bad_response error
-- carrying the first bytes of what came.
function provider.decode(res)
  local doc, err = cjson.decode(res.body)
  if type(doc) ~= "table" then
    return nil, sturdy.Error.new {
      kind = "bad_response", class = "fatal", status = res.status, request_id = res.request_id,
      attempts = res.attempts, message = "the reply is not valid JSON",
      detail = format("%s; body starts: %s", tostring(err), res.body:sub(1, 120):gsub("[%c]", " ")),
    }
  end
  return doc
end

--- Records the real usage: corrects the limiter's estimates, prices it and
-- adds it to the client's totals for the key. Returns the cost (or nil).
function provider.account(self, key, model, usage, estimated)
  local client = self.client
  if estimated then
    client._engine:correct(key, "input_tokens", (usage.input + usage.cache_read + usage.cache_write)
      - estimated.input)
    client._engine:correct(key, "output_tokens", usage.output - estimated.output)
    client._engine:correct(key, "tokens", usage.input + usage.cache_read + usage.cache_write + usage.output
      - estimated.input - estimated.output)
  end
  local table_ = self.prices and setmetatable(self.prices, { __index = prices }) or prices
  local p = (self.prices and self.prices[model]) or table_.lookup(model)
  local cost = p and ((usage.input * (p.input or 0) + usage.output * (p.output or 0)
    + usage.cache_read * (p.cache_read or p.input or 0)
    + usage.cache_write * (p.cache_write or p.input or 0)) / 1e6) or nil
  local totals = client._usage or {}
  client._usage = totals
  local t = totals[key] or { calls = 0, input = 0, output = 0, cache_read = 0, cache_write = 0, cost = 0 }
  totals[key] = t
  t.calls = t.calls + 1
  t.input, t.output = t.input + usage.input, t.output + usage.output
  t.cache_read, t.cache_write = t.cache_read + usage.cache_read, t.cache_write + usage.cache_write
  t.cost = t.cost + (cost or 0)
  return cost
end

function provider.tostring(self, name)
  return format("sturdy.%s (model %s)", name, tostring(self.model))
end

return provider
