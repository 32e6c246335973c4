--- What the Anthropic and OpenAI modules share: construction and its checks,
-- the API key kept out of every printable place, the input guard, usage
-- accounting (limiter corrections, cost totals) and JSON replies.
local sturdy = require "sturdy"
local prices = require "sturdy.prices"
local stream = require "sturdy.stream"
local hedge = require "sturdy.hedge"
local cjson = require "cjson.safe"

local provider = {}

local format = string.format

local function fail(msg, ...)
  error("sturdy: " .. format(msg, ...), 0)
end

-- Keys live here, not in the objects: nothing that prints an object can show them.
local secrets = setmetatable({}, { __mode = "k" })
-- The auth headers of each provider, made once (they hold the key too).
local auth_headers = setmetatable({}, { __mode = "k" })

-- What each provider request is, for observers (see provider.about).
local abouts = setmetatable({}, { __mode = "k" })

--- What a request made by a provider is, for observers (metrics, logs,
-- spans): `{ provider, operation, model, max_tokens, usage = true }` (a
-- usage or reply_failed record follows its successful call), or nil for a
-- request no provider made. Never the prompt.
function provider.about(req)
  return abouts[req]
end

local NEW_SCHEMA = {
  client = "table", api_key = "string", model = "string", base_url = "string", version = "string",
  max_tokens_cap = "number", max_input_chars = "number", prices = "table", client_options = "table",
  hedge = "hedge",
}

local tointeger = math.tointeger

--- n as an integer when it is integral and fits (Lua 5.3+ prints 120, not
-- 120.0), else n unchanged.
function provider.integral(n)
  return type(n) == "number" and tointeger and tointeger(n) or n
end

--- Makes every integral number in t (nested tables too) an integer, in place;
-- returns t.
function provider.integral_all(t)
  if type(t) == "table" then
    for k, v in pairs(t) do
      if type(v) == "table" then provider.integral_all(v) else t[k] = provider.integral(v) end
    end
  end
  return t
end

--- A token count from a reply: a finite number >= 0 (an integer when
-- integral), else 0. A lying server cannot put NaN or infinity in the totals.
function provider.count(v)
  v = tonumber(v)
  if v == nil or v ~= v or v < 0 or v == math.huge then return 0 end
  return provider.integral(v)
end

local host_of = sturdy.url_host

--- Builds a provider object from new{...}. spec: name, env (API key variable),
-- base_url (default), auth (function(key) -> headers), extra_headers(opts).
-- With a shared client, the provider's base_url wins over the client's for its
-- own requests (they go out with an absolute url, under the upstream key of
-- that URL's host); without either, spec.base_url is used.
function provider.new(class, spec, opts)
  opts = opts or {}
  if type(opts) ~= "table" then fail("%s.new takes a table of options, got %s", spec.name, type(opts)) end
  for k, v in pairs(opts) do
    local want = NEW_SCHEMA[k]
    if not want then fail("unknown option '%s' in %s.new", tostring(k), spec.name) end
    if want ~= "hedge" and type(v) ~= want then
      fail("option '%s' in %s.new must be a %s, got %s", k, spec.name, want, type(v))
    end
  end
  local key = opts.api_key or os.getenv(spec.env)
  if key == nil or key == "" then
    fail("%s needs an API key: pass api_key or set %s", spec.name, spec.env)
  end
  if key:find("[%c]") then fail("%s api_key contains control characters", spec.name) end
  local base_url = opts.base_url
  if base_url then
    if not base_url:find("^https?://[^/]") or base_url:find("[%c%s]") then
      fail("option 'base_url' in %s.new must start with http:// or https:// and name a host, got %q",
           spec.name, base_url:sub(1, 80))
    end
    base_url = base_url:gsub("/+$", "")
  end
  local client = opts.client
  if client == nil then
    local copts = {}
    for k, v in pairs(opts.client_options or {}) do copts[k] = v end
    copts.base_url = opts.base_url or copts.base_url or spec.base_url
    client = sturdy.client(copts)
  elseif opts.client_options then
    fail("%s.new takes client or client_options, not both", spec.name)
  end
  -- Requests name their URL only when it is not the client's: a shared client
  -- with another base URL, or with none (then the provider's default).
  local own_url
  if opts.client then
    own_url = base_url or (client.base_url == nil and spec.base_url) or nil
    if own_url == client.base_url then own_url = nil end
  end
  for _, name in ipairs { "max_tokens_cap", "max_input_chars" } do
    local v = opts[name]
    if v ~= nil and not (v >= 1 and v < math.huge and v == math.floor(v)) then
      fail("option '%s' in %s.new must be a whole number >= 1, got %s", name, spec.name, tostring(v))
    end
  end
  local self = setmetatable({
    client = client, model = opts.model, version = opts.version,
    base_url = own_url, host = own_url and host_of(own_url),
    max_tokens_cap = opts.max_tokens_cap, max_input_chars = opts.max_input_chars,
    prices = opts.prices, hedge = hedge.policy(opts.hedge, spec.name .. ".new"),
  }, class)
  secrets[self] = key
  return self
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
        message = format("the input is %d characters, above max_input_chars (%s); nothing was sent",
                         n, tostring(provider.integral(self.max_input_chars))),
        attempts = {},
      }
    end
  end
  if max_tokens ~= nil and not (type(max_tokens) == "number" and max_tokens >= 1 and max_tokens < math.huge
                                and max_tokens == math.floor(max_tokens)) then
    return sturdy.Error.new {
      kind = "bad_request", class = "fatal",
      message = format("max_tokens must be a whole number >= 1, got %s; nothing was sent",
                       type(max_tokens) == "number" and tostring(max_tokens) or type(max_tokens)),
      attempts = {},
    }
  end
  if self.max_tokens_cap and max_tokens and max_tokens > self.max_tokens_cap then
    return sturdy.Error.new {
      kind = "bad_request", class = "fatal",
      message = format("max_tokens %s is above max_tokens_cap (%s); nothing was sent",
                       tostring(provider.integral(max_tokens)), tostring(provider.integral(self.max_tokens_cap))),
      attempts = {},
    }
  end
end

--- A rough token estimate for the rate limiter before the reply says.
function provider.estimate_input(params)
  return math.ceil(input_chars(params) / 4) + 8
end

local function bad_response(res, message, detail)
  return sturdy.Error.new {
    kind = "bad_response", class = "fatal", status = res.status, request_id = res.request_id,
    attempts = res.attempts, message = message, detail = detail,
  }
end

--- Decodes a JSON reply; a body that is not JSON is a bad_response error
-- carrying the first bytes of what came. check(doc), when given, says what a
-- reply of this provider lacks (nil when it is usable): a 200 without the
-- message is an error, never an empty answer.
function provider.decode(res, check)
  local doc, err = cjson.decode(res.body)
  if type(doc) ~= "table" then
    return nil, bad_response(res, "the reply is not valid JSON",
                             format("%s; body starts: %s", tostring(err), res.body:sub(1, 120):gsub("[%c]", " ")))
  end
  local lacks = check and check(doc)
  if lacks then
    return nil, bad_response(res, "the reply is not a message: " .. lacks,
                             "body starts: " .. res.body:sub(1, 120):gsub("[%c]", " "))
  end
  return doc
end

-- The price entry of a model: the provider's own prices first.
local function price_of(self, model)
  return (self.prices and self.prices[model]) or prices.lookup(model)
end

--- The worst case of a call for the spend caps: its input estimate at the
-- higher of the input and cache-write prices, plus its max_tokens at the
-- output price ({ usd, tokens }; usd 0 for a model without a price).
function provider.reservation(self, model, estimated)
  local p = price_of(self, model)
  local usd = 0
  if p then
    usd = (estimated.input * math.max(p.input or 0, p.cache_write or 0) + estimated.output * (p.output or 0)) / 1e6
  end
  return { usd = usd, tokens = estimated.input + estimated.output }
end

--- Records the real usage: prices it, and has the client correct the
-- limiter's estimates and add it to the key's totals. Returns the cost (or nil).
function provider.account(self, key, model, usage, estimated, reply)
  local p = price_of(self, model)
  local cost = p and ((usage.input * (p.input or 0) + usage.output * (p.output or 0)
    + usage.cache_read * (p.cache_read or p.input or 0)
    + usage.cache_write * (p.cache_write or p.input or 0)) / 1e6) or nil
  self.client:record_usage(key, usage, estimated, cost, reply)
  return cost
end

--- Gives class the methods every provider has, from its spec: name, env,
-- base_url, auth(key, self) -> headers, path, call (the sending method's name),
-- max_tokens(params), usage(u) -> normalized, text(doc), stop_reason(doc),
-- flavor (stream.anthropic / stream.openai), stream_body(body) (optional).
function provider.define(class, spec)
  class.__index = class

  -- The upstream key of req: the caller's, else the host the provider sends
  -- to plus "/model", else (requests to the client's base URL) the client's
  -- own derivation.
  local function upstream_key(self, req, model)
    if req.key then return req.key end
    if self.host then return self.host .. "/" .. model end
    return self.client:key_for(req)
  end

  -- The request for params; the options a call may add: key, priority, timeout,
  -- headers, attempts, tag (for the spend caps), hedge.
  function class:_request(params, opts)
    if type(params) ~= "table" then
      fail("%s takes a table of request parameters, got %s", spec.call, type(params))
    end
    local body = {}
    for k, v in pairs(params) do body[k] = v end
    body.model = body.model or self.model
    if type(body.model) ~= "string" then fail("no model: pass model to new{} or in the request") end
    local estimated = { input = provider.estimate_input(body), output = tonumber(spec.max_tokens(body)) or 0 }
    opts = opts or {}
    local headers = auth_headers[self]
    if headers == nil then
      headers = spec.auth(secrets[self], self)
      auth_headers[self] = headers
    end
    if opts.headers then
      local merged = {}
      for k, v in pairs(headers) do merged[k] = v end
      for k, v in pairs(opts.headers) do merged[k] = v end
      headers = merged
    end
    local req = {
      method = "POST", json = body, headers = headers,
      tokens = estimated, key = opts.key, priority = opts.priority, timeout = opts.timeout,
      attempts = opts.attempts, tag = opts.tag,
    }
    if self.base_url then req.url = self.base_url .. spec.path else req.path = spec.path end
    req.key = upstream_key(self, req, body.model)
    if self.client:budgeted() then req.reserve = provider.reservation(self, body.model, estimated) end
    abouts[req] = { provider = spec.name, operation = spec.operation or "chat", model = body.model,
                    max_tokens = tonumber(spec.max_tokens(body)), usage = true }
    return req, body, estimated
  end

  -- The hedge policy of a call: its own `hedge` option, else the provider's.
  local function hedge_policy(self, opts)
    if opts and opts.hedge ~= nil then return hedge.policy(opts.hedge, spec.call .. " options") end
    return self.hedge
  end

  -- The hedge of req: the same call (hedge.request_for), known as req is.
  local function hedge_request(req, left)
    local h = hedge.request_for(req, left)
    abouts[h] = abouts[req]
    return h
  end

  --- Records a hedge leg of req (a request this provider prepared) that was
  -- cancelled in flight: it was billed for its input, so its input tokens
  -- (`input`, the provider's count when it sent one, as a stream's
  -- message_start does; else the request's estimate) at the input price count
  -- in the key's totals (`hedges_lost`, `hedge_cost`) and spend caps. Returns
  -- the cost, for the call's.
  function class:lost_leg(req, input)
    local model = req.json and req.json.model
    local usage = { input = input or (req.tokens and req.tokens.input) or 0, output = 0, cache_read = 0,
                    cache_write = 0 }
    local p = price_of(self, model)
    local cost = p and usage.input * (p.input or 0) / 1e6 or 0
    self.client:record_usage(req.key, usage, nil, cost, { model = model, tag = req.tag, lost = true })
    return cost
  end

  function class:_result(doc, res, body, estimated, req)
    provider.integral_all(doc.usage)
    local usage = spec.usage(doc.usage)
    local key = req.key
    local model = doc.model or body.model
    local stop_reason = spec.stop_reason(doc)
    return {
      reply = doc, text = spec.text(doc), usage = usage, stop_reason = stop_reason,
      model = model, request_id = res.request_id, latency = res.timings.total,
      attempts = res.attempts,
      cost = provider.account(self, key, model, usage, estimated,
                              { model = model, stop_reason = stop_reason, request_id = res.request_id,
                                response = res, hold = res.hold, tag = req.tag }),
    }
  end

  --- The request for params, for client:submit or client:batch, and a function
  -- that turns its response into the result (or nil, err). nil, err when the
  -- input guard refuses it (nothing is sent).
  function class:prepare(params, opts)
    if type(params) == "table" and params.stream then
      -- a streamed reply is not JSON: it would come back as bad_response
      fail("%s takes no 'stream' parameter: call stream{...} for a streamed reply", spec.call)
    end
    local err = provider.guard(self, params, params and spec.max_tokens(params))
    if err then return nil, err end
    local req, body, estimated = self:_request(params, opts)
    return req, function(res)
      local doc, derr = provider.decode(res, spec.check)
      if not doc then
        self.client:notify { type = "reply_failed", key = req.key, response = res, error = derr }
        return nil, derr
      end
      return self:_result(doc, res, body, estimated, req)
    end
  end

  -- Sends the request and returns { reply (decoded), text, usage, stop_reason,
  -- model, request_id, latency, attempts, cost } — or nil and a sturdy.Error.
  -- Hedged (the `hedge` option), a result or error also says `hedged` (a hedge
  -- was sent) and `hedge_won`; the cost of a leg cancelled in flight is in `cost`.
  class[spec.call] = function(self, params, opts)
    local policy = hedge_policy(self, opts)
    local req, finish = self:prepare(params, opts)
    if not req then return nil, finish end
    if not policy then
      local res, err = self.client:request(req)
      if not res then return nil, err end
      return finish(res)
    end
    local res, err, info = hedge.call(self.client, req, policy, hedge_request)
    local lost = 0
    if info.lost then lost = self:lost_leg(req) end
    local r, ferr = res, err
    if res then r, ferr = finish(res) end
    local out = r or ferr
    if out then
      out.hedged, out.hedge_won = info.hedged, info.hedged and info.won == "hedge"
      if r then r.cost = (r.cost or 0) + lost end
    end
    return r, ferr
  end

  --- A streamed request. Returns an iterator of events and the stream object
  -- (`for ev in p:stream{...} do`); with opts.on_event, returns the stream
  -- object at once and events reach on_event from the client's poll.
  -- stream:result() gives the collected reply in the non-streamed shape.
  function class:stream(params, opts)
    opts = opts or {}
    local policy = hedge_policy(self, opts)
    local err = provider.guard(self, params, params and spec.max_tokens(params))
    local s
    if err then
      s = stream.failed(err)
    else
      local p = {}
      for k, v in pairs(params) do p[k] = v end
      p.stream = true
      if spec.stream_body then spec.stream_body(p) end
      local req, body, estimated = self:_request(p, opts)
      s = stream.start(self, spec.flavor, req, function(doc, res)
        return self:_result(doc, res, body, estimated, req)
      end, opts.on_event, policy and {
        policy = policy, request = hedge_request,
        lost = function(input) return self:lost_leg(req, input) end,
      })
    end
    if opts.on_event then return s end
    return s:events(), s
  end

  function class:__tostring()
    return format("sturdy.%s (model %s)", spec.name, tostring(self.model))
  end
  return class
end

return provider
