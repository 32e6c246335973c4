--- sturdy.cache: answers of LLM calls kept and served again.
--
--   local cache = require("sturdy.cache") { backend = "memory", ttl = 3600, stale_if_error = 86400 }
--   local cached = cache:wrap(claude)              -- any provider (or chain): the same methods
--   local r = cached:messages { temperature = 0, ... }   -- r.cache = "hit" | "miss" | "stale"
--
-- The key is the SHA-256 of the canonical request: the target's scope (its
-- type, base URL and API version), the method's shape, the model and the
-- request body (sorted keys, normalised numbers), without the fields that
-- only shape delivery (stream, stream_options, metadata, user). The API key is
-- never part of it, and the request itself is not stored.
--
-- Only cacheable requests use the cache: temperature 0, or the call option
-- `cache = true` (cached:messages(params, { cache = true })); `cache = false`
-- bypasses it. Identical misses in flight at once make one upstream call
-- (single flight); when the call fails, an entry expired for less than
-- stale_if_error seconds is served, marked "stale", with the error beside it.
local policy = require "sturdy.policy"
local sturdy = require "sturdy"
local cjson = require "cjson.safe"

local M = {}

local type, pairs, ipairs, tostring = type, pairs, ipairs, tostring
local format, concat, sort = string.format, table.concat, table.sort
local floor, huge = math.floor, math.huge

-- a private instance: the application's cjson settings never change what is stored
local json = cjson.new()

local FORMAT = 1 -- of the key material and of stored entries
local MAX_DEPTH = 100

-- Fields that only shape how an answer is delivered, never what it says.
local DELIVERY_FIELDS = { stream = true, stream_options = true, metadata = true, user = true }

local function fail(msg, ...)
  error("sturdy: " .. format(msg, ...), 0)
end

---------------------------------------------------------------------------
-- Canonical encoding: one string per request meaning (key order, number
-- spelling and JSON whitespace do not matter).
---------------------------------------------------------------------------

-- The path to the value being encoded, as a stack of segments, joined only
-- for an error message.
local function path_text(path, depth)
  local parts = { "request" }
  for i = 1, depth do
    local seg = path[i]
    parts[#parts + 1] = type(seg) == "number" and ("[" .. seg .. "]") or ("." .. seg)
  end
  return concat(parts)
end

local function number_text(v, path, depth)
  if v ~= v or v == huge or v == -huge then
    fail("the request cannot be a cache key: %s is %s", path_text(path, depth), tostring(v))
  end
  if v == floor(v) and v > -2 ^ 53 and v < 2 ^ 53 then return format("%d", v) end
  return format("%.17g", v)
end

-- Object keys quoted, remembered: requests use the same few names again and
-- again. The memo is emptied when it grows, so foreign names cannot bloat it.
local quoted, quoted_count = {}, 0
local function quoted_name(name)
  local q = quoted[name]
  if q then return q end
  q = json.encode(name)
  if quoted_count >= 4096 then quoted, quoted_count = {}, 0 end
  quoted[name], quoted_count = q, quoted_count + 1
  return q
end

local encode_value

local function encode_table(t, out, path, depth)
  if depth >= MAX_DEPTH then fail("the request cannot be a cache key: it nests deeper than %d", MAX_DEPTH) end
  local n, max = 0, 0
  for k in pairs(t) do
    n = n + 1
    if type(k) == "number" and k >= 1 and k == floor(k) then
      if k > max then max = k end
    else
      max = -1
      break
    end
  end
  local at = depth + 1
  if n > 0 and max == n then
    out[#out + 1] = "["
    for i = 1, n do
      if i > 1 then out[#out + 1] = "," end
      path[at] = i
      encode_value(t[i], out, path, at)
    end
    out[#out + 1] = "]"
    return
  end
  -- string keys are looked up as they are; other keys by their text
  local names, by_name = {}, nil
  for k, v in pairs(t) do
    local name = k
    if type(k) == "number" then
      name = number_text(k, path, depth)
      by_name = by_name or {}
      by_name[name] = v
    elseif type(k) ~= "string" then
      fail("the request cannot be a cache key: %s has a %s key", path_text(path, depth), type(k))
    end
    names[#names + 1] = name
  end
  sort(names)
  out[#out + 1] = "{"
  for i = 1, #names do
    local name = names[i]
    if i > 1 then
      if name == names[i - 1] then
        fail("the request cannot be a cache key: %s has the key %q twice", path_text(path, depth), name)
      end
      out[#out + 1] = ","
    end
    out[#out + 1] = quoted_name(name)
    out[#out + 1] = ":"
    path[at] = name
    local v = t[name]
    if by_name and by_name[name] ~= nil then v = by_name[name] end
    encode_value(v, out, path, at)
  end
  out[#out + 1] = "}"
end

function encode_value(v, out, path, depth)
  local t = type(v)
  if t == "string" then
    out[#out + 1] = json.encode(v)
  elseif t == "number" then
    out[#out + 1] = number_text(v, path, depth)
  elseif t == "boolean" then
    out[#out + 1] = v and "true" or "false"
  elseif t == "table" then
    encode_table(v, out, path, depth)
  elseif v == nil or v == cjson.null then
    out[#out + 1] = "null"
  else
    fail("the request cannot be a cache key: %s is a %s", path_text(path, depth), t)
  end
end

--- The canonical JSON text of a Lua value: object keys sorted, integers
-- without a fraction (1.0 is 1), other numbers with 17 significant digits, no
-- whitespace. NaN, infinities, functions and cycles raise.
function M.canonical(v)
  local out = {}
  encode_value(v, out, {}, 0)
  return concat(out)
end

---------------------------------------------------------------------------
-- `similar`: the last user message's text, normalised
---------------------------------------------------------------------------

-- Sentence punctuation and quotes at the edges of words; everything else
-- (digits, operators, signs, inner dots of 3.5) is kept, so that questions
-- that differ in a number or an operator stay different.
local EDGE = "[%.,!%?;:\"'`]+"

--- Lowercase (ASCII), whitespace runs as one space, sentence punctuation and
-- quotes trimmed from the edges of words. Word order and every word stay.
function M.normalise_text(s)
  local words = {}
  for w in s:lower():gmatch("%S+") do
    w = w:gsub("^" .. EDGE, ""):gsub(EDGE .. "$", "")
    if w ~= "" then words[#words + 1] = w end
  end
  return concat(words, " ")
end

local normalise_text = M.normalise_text

local function normalise_content(content)
  if type(content) == "string" then return { similar = normalise_text(content) } end
  if type(content) ~= "table" then return content end
  local blocks = {}
  for i, block in ipairs(content) do
    if type(block) == "table" and type(block.text) == "string" then
      local b = {}
      for k, v in pairs(block) do b[k] = v end
      b.text = nil
      b.similar = normalise_text(block.text)
      blocks[i] = b
    else
      blocks[i] = block
    end
  end
  return blocks
end

-- The body with its last user message's text normalised, or nil when it has none.
local function similar_body(body)
  local messages = body.messages
  if type(messages) ~= "table" then return nil end
  for i = #messages, 1, -1 do
    local m = messages[i]
    if type(m) == "table" and m.role == "user" then
      local copy_messages = {}
      for j, x in ipairs(messages) do copy_messages[j] = x end
      local last = {}
      for k, v in pairs(m) do last[k] = v end
      last.content = normalise_content(m.content)
      copy_messages[i] = last
      local b = {}
      for k, v in pairs(body) do b[k] = v end
      b.messages = copy_messages
      return b
    end
  end
  return nil
end

---------------------------------------------------------------------------
-- Helpers
---------------------------------------------------------------------------

local function deep_copy(v, depth)
  if type(v) ~= "table" then return v end
  depth = depth or 0
  if depth > MAX_DEPTH then fail("a cached value nests deeper than %d", MAX_DEPTH) end
  local c = {}
  for k, x in pairs(v) do c[k] = deep_copy(x, depth + 1) end
  return c
end

local function in_coroutine()
  local co, main = coroutine.running()
  return co ~= nil and not main
end

local monotime = policy.monotime

local unpack = table.unpack or unpack -- luacheck: ignore 143

local function pack(...)
  return { n = select("#", ...), ... }
end

-- Lua 5.1's pcall cannot be yielded across; LuaJIT's and 5.2+'s can.
local pcall_yields = _VERSION ~= "Lua 5.1" or rawget(_G, "jit") ~= nil

-- pcall(fn, ...) that lets fn yield (a client waiting with its `yield`): on
-- Lua 5.1, inside a coroutine, fn runs in a coroutine of its own whose yields
-- are passed up and whose resumptions are passed down.
local function protected_call(fn, ...)
  if pcall_yields or not in_coroutine() then return pcall(fn, ...) end
  local co = coroutine.create(fn)
  local res = pack(coroutine.resume(co, ...))
  while true do
    if not res[1] then return false, res[2] end
    if coroutine.status(co) == "dead" then return unpack(res, 1, res.n) end
    res = pack(coroutine.resume(co, coroutine.yield(unpack(res, 2, res.n))))
  end
end

local function canceled_error()
  return sturdy.Error.new { kind = "canceled", class = "canceled", attempts = {} }
end

-- A cached answer served again: nothing was sent, nothing spent.
local function served(env, how, now, exact)
  local r = env.r
  r.cache = how
  r.cost = 0
  r.attempts = {}
  r.age = now - (tonumber(env.c) or now)
  r.cache_match = (env.x == exact) and "exact" or "similar"
  return r
end

---------------------------------------------------------------------------
-- Options
---------------------------------------------------------------------------

local OPTIONS = {
  backend = { "string", "table" }, ttl = { "positive" }, max_entries = { "count" }, max_bytes = { "positive" },
  stale_if_error = { "nonnegative" }, similar = { "boolean" }, clock = { "function" }, yield = { "function" },
  single_flight = { "boolean" }, flight_wait = { "positive" }, redis = { "table" }, ngx = { "table" },
}

local VALID = {
  string = function(v) return type(v) == "string" end,
  table = function(v) return type(v) == "table" end,
  boolean = function(v) return type(v) == "boolean" end,
  ["function"] = function(v) return type(v) == "function" end,
  positive = function(v) return type(v) == "number" and v > 0 and v < huge end,
  nonnegative = function(v) return type(v) == "number" and v >= 0 and v < huge end,
  count = function(v) return type(v) == "number" and v >= 1 and v < huge and v == floor(v) end,
}

local WANTS = {
  positive = "a positive finite number", nonnegative = "a number >= 0", count = "a whole number >= 1",
}

local function check_options(opts)
  for k, v in pairs(opts) do
    local kinds = OPTIONS[k]
    if not kinds then fail("unknown option '%s' in sturdy.cache", tostring(k)) end
    local ok = false
    for _, kind in ipairs(kinds) do ok = ok or VALID[kind](v) end
    if not ok then
      local wants = {}
      for i, kind in ipairs(kinds) do wants[i] = WANTS[kind] or ("a " .. kind) end
      fail("option '%s' in sturdy.cache must be %s, got %s", k, concat(wants, " or "),
           type(v) == "number" and tostring(v) or type(v))
    end
  end
end

local DEFAULTS = {
  ttl = 3600, max_entries = 10000, max_bytes = 64e6, stale_if_error = 0, similar = false,
  single_flight = true, flight_wait = 600,
}

---------------------------------------------------------------------------
-- The cache
---------------------------------------------------------------------------

local Cache = { __name = "sturdy.cache" }
Cache.__index = Cache
M.Cache = Cache

local Cached = { __name = "sturdy.cached" }
Cached.__index = Cached
M.Cached = Cached

local CacheStream = { __name = "sturdy.CacheStream" }
CacheStream.__index = CacheStream
M.CacheStream = CacheStream

local COUNTERS = { "hits", "misses", "stale", "evictions", "bypass", "coalesced", "stores", "errors", "too_large" }
local PER_TARGET = { hits = true, misses = true, stale = true, evictions = true, bypass = true }

function Cache:_count(label, what)
  self.counts[what] = self.counts[what] + 1
  if label and PER_TARGET[what] then
    local t = self.targets[label]
    if not t then
      t = { hits = 0, misses = 0, stale = 0, evictions = 0, bypass = 0 }
      self.targets[label] = t
    end
    t[what] = t[what] + 1
  end
end

local function open_backend(self, opts)
  local b = opts.backend or "memory"
  if type(b) == "table" then
    if type(b.get) ~= "function" or type(b.set) ~= "function" then
      fail("option 'backend' in sturdy.cache: a backend table needs get and set methods")
    end
    return b
  end
  if b == "memory" then
    return require("sturdy.cache.memory").new {
      max_entries = self.max_entries, max_bytes = self.max_bytes,
      on_evict = function(_, label) self:_count(label, "evictions") end,
    }
  elseif b == "redis" then
    local settings = require("sturdy.redis").settings(opts.redis, "sturdy.cache option 'redis'")
    return require("sturdy.cache.redis").new(settings)
  elseif b == "ngx" then
    local n = opts.ngx or {}
    for k, v in pairs(n) do
      if k ~= "dict" and k ~= "lock_timeout" then
        fail("unknown option '%s' in sturdy.cache option 'ngx'", tostring(k))
      end
      if k == "dict" and type(v) ~= "string" then fail("option 'ngx.dict' in sturdy.cache must be a string") end
      if k == "lock_timeout" and not VALID.positive(v) then
        fail("option 'ngx.lock_timeout' in sturdy.cache must be a positive finite number")
      end
    end
    local backend, err = require("sturdy.cache.ngx").new {
      dict = n.dict or "sturdy_cache", max_entries = self.max_entries, lock_timeout = n.lock_timeout or 30,
    }
    if not backend then fail("%s", err) end
    return backend
  end
  fail("option 'backend' in sturdy.cache must be \"memory\", \"redis\", \"ngx\" or a backend table, got %q", b)
end

-- The clock each backend keeps time by, unless the caller gives one: the
-- monotonic clock in one process; wall-clock time when processes share entries.
local function default_clock(backend_name)
  if backend_name == "redis" then
    local socket = require "socket"
    return socket.gettime
  elseif backend_name == "ngx" then
    local ngx = rawget(_G, "ngx")
    return function() return ngx.now() end
  end
  return monotime
end

-- How a waiting follower lets others run: the caller's yield, or in OpenResty a short sleep.
local function default_yield()
  local ngx = rawget(_G, "ngx")
  if ngx and ngx.sleep then return function() ngx.sleep(0.001) end end
  return nil
end

--- Creates a cache. Options (all optional): backend ("memory" | "redis" |
-- "ngx" | a backend table), ttl, max_entries, max_bytes, stale_if_error,
-- similar, clock, yield, single_flight, flight_wait, redis (settings), ngx.
function M.new(opts)
  if opts == nil then opts = {} end
  if type(opts) ~= "table" then fail("sturdy.cache takes a table of options, got %s", type(opts)) end
  check_options(opts)
  if opts.redis and opts.backend ~= "redis" then fail("option 'redis' in sturdy.cache needs backend = \"redis\"") end
  if opts.ngx and opts.backend ~= "ngx" then fail("option 'ngx' in sturdy.cache needs backend = \"ngx\"") end
  local self = setmetatable({ flights = {}, targets = {} }, Cache)
  for k, v in pairs(DEFAULTS) do self[k] = v end
  for k, v in pairs(opts) do
    if DEFAULTS[k] ~= nil then self[k] = v end
  end
  self.counts = {}
  for _, c in ipairs(COUNTERS) do self.counts[c] = 0 end
  self.backend_name = type(opts.backend) == "string" and opts.backend or (opts.backend and "custom" or "memory")
  self.backend = open_backend(self, opts)
  self.clock = opts.clock or default_clock(self.backend_name)
  local t = self.clock()
  if type(t) ~= "number" or t ~= t or t == huge or t == -huge then
    fail("option 'clock' in sturdy.cache must return seconds as a finite number, got %s", tostring(t))
  end
  self.yield = opts.yield or default_yield()
  return self
end

setmetatable(M, { __call = function(_, opts) return M.new(opts) end })

-- The stored entry under key: its decoded envelope, or nil. A backend that
-- fails counts as an error and a miss.
function Cache:_read(key, now)
  local bytes, err = self.backend:get(key, now)
  if bytes == nil then
    if err then self:_count(nil, "errors") end
    return nil
  end
  local env = json.decode(bytes)
  if type(env) ~= "table" or env.v ~= FORMAT or type(env.e) ~= "number" or type(env.r) ~= "table" then
    return nil -- foreign or damaged bytes are a miss, never an answer
  end
  return env
end

-- Stores an answer; returns the bytes stored (or that would have been), or nil
-- when it cannot be serialised.
function Cache:_write(key, exact, label, result, events, now)
  local bytes = json.encode { v = FORMAT, c = now, e = now + self.ttl, t = label, x = exact, r = result, s = events }
  if not bytes then
    self:_count(nil, "errors")
    return nil
  end
  local ok, err = self.backend:set(key, bytes, now, now + self.ttl + self.stale_if_error, label)
  if ok then
    self:_count(nil, "stores")
  elseif err == "too_large" then
    self:_count(nil, "too_large")
  else
    self:_count(nil, "errors")
  end
  return bytes
end

function Cache:_stale_usable(env, err, now)
  return env ~= nil and self.stale_if_error > 0 and now < env.e + self.stale_if_error
    and not (err and err.kind == "canceled")
end

-- Waits, yielding, until the flight is done or flight_wait passes; true when done.
function Cache:_wait(flight)
  local started = monotime()
  while not flight.done do
    if monotime() - started > self.flight_wait then return false end
    self.yield()
  end
  return true
end

function Cache:_can_wait()
  return self.single_flight and self.yield ~= nil and in_coroutine()
end

--- Wraps a provider (or a chain): the returned object has the same methods
-- (messages, chat, stream, prepare) and answers from the cache when it can.
-- opts: scope (a string naming what the target answers for, instead of its
-- type, base URL and API version), name (the label of its counts).
function Cache:wrap(target, opts)
  if type(target) ~= "table" then fail("cache:wrap takes a provider or chain, got %s", type(target)) end
  local has = false
  for _, m in ipairs { "messages", "chat", "stream", "prepare" } do has = has or type(target[m]) == "function" end
  if not has then
    fail("cache:wrap takes a provider or chain (with messages, chat, stream or prepare), got a table without them")
  end
  opts = opts or {}
  if type(opts) ~= "table" then fail("cache:wrap options must be a table, got %s", type(opts)) end
  for k, v in pairs(opts) do
    if k ~= "scope" and k ~= "name" then fail("unknown option '%s' in cache:wrap", tostring(k)) end
    if type(v) ~= "string" then fail("option '%s' in cache:wrap must be a string, got %s", k, type(v)) end
  end
  local mt = getmetatable(target)
  local kind = (type(mt) == "table" and type(mt.__name) == "string" and mt.__name or "provider"):gsub("^sturdy%.", "")
  local client = type(target.client) == "table" and target.client or nil
  local base_url = target.base_url or (client and client.base_url)
  local scope = opts.scope or concat({ kind, tostring(base_url or ""), tostring(target.version or "") }, " ")
  -- the shape of prepare's requests: the target's one non-streamed method
  local call_shape = "prepare"
  if type(target.messages) == "function" and type(target.chat) ~= "function" then call_shape = "messages" end
  if type(target.chat) == "function" and type(target.messages) ~= "function" then call_shape = "chat" end
  return setmetatable({ cache = self, target = target, scope = scope, name = opts.name or kind,
                        call_shape = call_shape }, Cached)
end

--- Counts: hits, misses, stale, evictions, bypass, coalesced (followers that
-- shared another call's answer; they count as hits too), stores, errors
-- (backend or serialisation failures), too_large; entries and bytes (memory);
-- targets = { [label] = { hits, misses, stale, evictions, bypass } }, where
-- the label is the chain target that served (served_by) or "<provider>/<model>".
-- With a label: that target's counts (nil when it has none).
function Cache:stats(label)
  if label ~= nil then
    if type(label) ~= "string" then fail("cache:stats takes a target label string, got %s", type(label)) end
    local t = self.targets[label]
    if not t then return nil end
    local c = {}
    for k, v in pairs(t) do c[k] = v end
    return c
  end
  local s = {}
  for k, v in pairs(self.counts) do s[k] = v end
  if self.backend.stats then
    for k, v in pairs(self.backend:stats() or {}) do s[k] = v end
  end
  s.targets = {}
  for name, t in pairs(self.targets) do
    local c = {}
    for k, v in pairs(t) do c[k] = v end
    s.targets[name] = c
  end
  s.backend = self.backend_name
  return s
end

--- Calls fn(key, bytes) for every stored entry (debugging, audits).
function Cache:scan(fn)
  if type(fn) ~= "function" then fail("cache:scan takes a function, got %s", type(fn)) end
  if not self.backend.scan then return nil, "this backend cannot list its entries" end
  return self.backend:scan(fn)
end

function Cache:__tostring()
  return format("sturdy.cache (%s)", self.backend_name)
end

---------------------------------------------------------------------------
-- Wrapped calls
---------------------------------------------------------------------------

-- Splits the call options: the cache flag, and a copy of the rest for the target.
local function split_options(params, opts, method)
  if type(params) ~= "table" then fail("%s takes a table of request parameters, got %s", method, type(params)) end
  if params.cache ~= nil then
    fail("'cache' goes in the call options, not the request: cached:%s(params, { cache = true })", method)
  end
  if opts == nil then return nil, nil end
  if type(opts) ~= "table" then fail("%s's call options must be a table, got %s", method, type(opts)) end
  local flag = opts.cache
  if flag ~= nil and type(flag) ~= "boolean" then
    fail("call option 'cache' must be true or false, got %s", type(flag))
  end
  local rest = {}
  for k, v in pairs(opts) do
    if k ~= "cache" then rest[k] = v end
  end
  return flag, rest
end

local function cacheable(params, flag)
  if flag ~= nil then return flag end
  return params.temperature == 0
end

-- The cache key (similar or exact) and the exact key of a request.
function Cached:_keys(shape, params)
  local body = {}
  for k, v in pairs(params) do
    if not DELIVERY_FIELDS[k] and k ~= "model" then body[k] = v end
  end
  local model = params.model or self.target.model
  local material = { f = FORMAT, scope = self.scope, shape = shape, model = model, body = body }
  local exact = policy.sha256(M.canonical(material))
  if self.cache.similar then
    local sb = similar_body(body)
    if sb then
      material.body = sb
      material.similar = true
      return policy.sha256(M.canonical(material)), exact, model
    end
  end
  return exact, exact, model
end

function Cached:_label(result, model)
  if type(result) == "table" and type(result.served_by) == "string" then return result.served_by end
  return self.name .. "/" .. tostring(model)
end

-- A non-streamed call through the cache (messages, chat).
function Cached:_call(method, params, opts)
  local target = self.target
  local fn = target[method]
  if type(fn) ~= "function" then fail("the wrapped %s has no method '%s'", self.name, method) end
  local flag, topts = split_options(params, opts, method)
  local cache = self.cache
  if not cacheable(params, flag) then
    cache:_count(self:_label(nil, params.model or target.model), "bypass")
    local r, err = fn(target, params, topts)
    if type(r) == "table" then r.cache = "bypass" end
    return r, err
  end
  local key, exact, model = self:_keys(method, params)
  local now = cache.clock()
  local env = cache:_read(key, now)
  if env and now < env.e then
    cache:_count(env.t, "hits")
    return served(env, "hit", now, exact)
  end

  local flight = cache.flights[key]
  -- a hook of the leading call asking again from inside it must not wait for itself
  if flight and flight.co ~= coroutine.running() and cache:_can_wait() and cache:_wait(flight) then
    if flight.raised then error(flight.raised, 0) end
    now = cache.clock()
    local shared = flight.bytes and json.decode(flight.bytes)
    if shared then
      cache:_count(shared.t, "hits")
      cache:_count(nil, "coalesced")
      return served(shared, "hit", now, exact)
    elseif flight.stale then
      local s = deep_copy(flight.stale)
      cache:_count(s.t, "stale")
      local r = served(s, "stale", now, exact)
      r.stale_error = flight.err
      return r
    elseif flight.result then
      cache:_count(flight.label, "hits")
      cache:_count(nil, "coalesced")
      local r = deep_copy(flight.result)
      r.cache = "hit"
      return r
    elseif flight.degraded then
      cache:_count(self:_label(nil, model), "misses")
      local r = deep_copy(flight.degraded)
      r.cache = "miss"
      return r
    end
    cache:_count(self:_label(nil, model), "misses")
    return nil, flight.err
  end

  -- this call leads: others that miss the same key meanwhile wait for it
  flight = { done = false, co = coroutine.running() }
  local leads = cache.single_flight and cache.flights[key] == nil
  if leads then cache.flights[key] = flight end
  local function land()
    flight.done = true
    if leads and cache.flights[key] == flight then cache.flights[key] = nil end
  end
  -- a backend shared by processes may also hold a lock against stampedes
  local backend, locked = cache.backend, false
  if backend.lock then
    local waited = backend:lock(key)
    locked = waited ~= nil -- nil: no lock (timed out or failed); go on without it
    if waited then
      -- another process held it: it has most likely stored the answer
      now = cache.clock()
      local again = cache:_read(key, now)
      if again and now < again.e then
        backend:unlock(key)
        flight.bytes = json.encode(again)
        land()
        cache:_count(again.t, "hits")
        return served(again, "hit", now, exact)
      end
    end
  end
  local ok, r, err = protected_call(fn, target, params, topts)
  if not ok then
    if locked then backend:unlock(key) end
    flight.raised = r
    land()
    error(r, 0)
  end
  now = cache.clock()
  if type(r) == "table" and not r.degraded then
    local label = self:_label(r, model)
    flight.bytes = cache:_write(key, exact, label, r, nil, now)
    if locked then backend:unlock(key) end
    if not flight.bytes then flight.result, flight.label = deep_copy(r), label end
    land()
    cache:_count(label, "misses")
    r.cache = "miss"
    return r
  end
  if locked then backend:unlock(key) end
  -- a chain's degraded answer is its last resort: never stored, and a stale
  -- answer is better
  local degraded = type(r) == "table" and r or nil
  if degraded then err = r.error end
  flight.err = err
  if cache:_stale_usable(env, err, now) then
    flight.stale = deep_copy(env)
    land()
    cache:_count(env.t, "stale")
    local stale = served(env, "stale", now, exact)
    stale.stale_error = err
    return stale
  end
  if degraded then flight.degraded = deep_copy(degraded) end
  land()
  cache:_count(self:_label(nil, model), "misses")
  if degraded then
    degraded.cache = "miss"
    return degraded
  end
  return nil, err
end

function Cached:messages(params, opts)
  return self:_call("messages", params, opts)
end

function Cached:chat(params, opts)
  return self:_call("chat", params, opts)
end

--- The cached answer to a non-streamed request, or nil (nothing is sent).
-- For batches: look up first, prepare and submit the rest.
function Cached:lookup(params, opts)
  local flag = split_options(params, opts, "lookup")
  if not cacheable(params, flag) then return nil end
  local key, exact = self:_keys(self.call_shape, params)
  local cache = self.cache
  local now = cache.clock()
  local env = cache:_read(key, now)
  if env and now < env.e then
    cache:_count(env.t, "hits")
    return served(env, "hit", now, exact)
  end
  return nil
end

--- The target's prepare, whose finish(res_or_err) also stores the answer,
-- and serves a stale one when given an error (client:batch's failures) or
-- when the response cannot be used. Check lookup first to skip the send.
function Cached:prepare(params, opts)
  local target = self.target
  if type(target.prepare) ~= "function" then fail("the wrapped %s has no method 'prepare'", self.name) end
  local flag, topts = split_options(params, opts, "prepare")
  local req, finish = target.prepare(target, params, topts)
  if not req then return req, finish end
  local cache = self.cache
  if not cacheable(params, flag) then
    return req, function(res, err)
      if res == nil or sturdy.is_error(res) then return nil, err or res end
      local r, ferr = finish(res)
      if type(r) == "table" then r.cache = "bypass" end
      return r, ferr
    end
  end
  local key, exact, model = self:_keys(self.call_shape, params)
  return req, function(res, err)
    local r
    if res ~= nil and not sturdy.is_error(res) then
      r, err = finish(res)
    else
      err = err or res
    end
    local now = cache.clock()
    if type(r) == "table" then
      local label = self:_label(r, model)
      cache:_write(key, exact, label, r, nil, now)
      cache:_count(label, "misses")
      r.cache = "miss"
      return r
    end
    local env = cache:_read(key, now)
    if cache:_stale_usable(env, err, now) then
      cache:_count(env.t, "stale")
      local s = served(env, "stale", now, exact)
      s.stale_error = err
      return s
    end
    cache:_count(self:_label(nil, model), "misses")
    return nil, err
  end
end

---------------------------------------------------------------------------
-- Streams: a hit replays the stored events; a miss records the live ones and
-- stores them after the terminal event. Identical streams in flight share one
-- upstream stream: a follower gets the events so far at once, then the rest
-- as they arrive.
---------------------------------------------------------------------------

local function new_stream(on_event, how)
  return setmetatable({ on_event = on_event, queue = {}, head = 1, tail = 0, done = false, cache = how }, CacheStream)
end

-- Hands one event to the caller: to on_event at once, or onto the queue.
function CacheStream:_push(ev)
  if self.done then return end
  if self.on_event then
    self.on_event(ev)
  else
    self.tail = self.tail + 1
    self.queue[self.tail] = ev
  end
end

function CacheStream:_end(result, err)
  if self.done then return end
  self.done, self._result, self.error = true, result, err
  if err and self.on_event then self.on_event { type = "error", error = err } end
end

-- Replays a stored entry's events and ends with its result.
function CacheStream:_replay(env, how, now, exact, err)
  self.cache = how
  for _, ev in ipairs(env.s or {}) do self:_push(ev) end
  local r = served(env, how, now, exact)
  r.stale_error = err
  self:_end(r)
end

-- Calls fn(sub) for every subscriber. Alone, a subscriber's on_event raises
-- through the client's poll, as a live stream's would. Shared, one that
-- raises is detached and ends with a "callback" error (its result() says so),
-- so that it cannot break the stream the others are reading.
local function each_subscriber(flight, fn)
  local subs = {}
  for i, s in ipairs(flight.subs) do subs[i] = s end
  if #subs == 1 then return fn(subs[1]) end
  for _, s in ipairs(subs) do
    local ok, e = pcall(fn, s)
    if not ok then
      for i, x in ipairs(flight.subs) do
        if x == s then
          table.remove(flight.subs, i)
          break
        end
      end
      s.on_event = nil -- _end does nothing to a stream already over
      s:_end(nil, sturdy.Error.new { kind = "callback", class = "fatal", attempts = {},
                                     message = "on_event raised; this caller was detached from the shared stream",
                                     detail = tostring(e) })
    end
  end
end

local function finish_flight(cached, flight)
  if flight.finished then return end
  flight.finished = true
  local cache = cached.cache
  if cache.flights[flight.key] == flight then cache.flights[flight.key] = nil end
  local up = flight.upstream
  local now = cache.clock()
  if up.error then
    local err = up.error
    if #flight.log == 0 and cache:_stale_usable(flight.env, err, now) then
      each_subscriber(flight, function(s)
        cache:_count(flight.env.t, "stale")
        s:_replay(deep_copy(flight.env), "stale", now, flight.exact, err)
      end)
      return
    end
    each_subscriber(flight, function(s)
      cache:_count(cached:_label(nil, flight.model), "misses")
      s:_end(nil, err)
    end)
    return
  end
  local r, rerr = up:result()
  if type(r) ~= "table" then
    each_subscriber(flight, function(s) s:_end(nil, rerr) end)
    return
  end
  if r.degraded then -- a chain's last resort, its events already delivered: never stored
    each_subscriber(flight, function(s)
      cache:_count(cached:_label(nil, flight.model), "misses")
      local mine = deep_copy(r)
      mine.cache = "miss"
      s:_end(mine)
    end)
    return
  end
  local label = cached:_label(r, flight.model)
  cache:_write(flight.key, flight.exact, label, r, flight.log, now)
  each_subscriber(flight, function(s)
    local mine = deep_copy(r)
    mine.cache = s.cache
    if s.cache == "hit" then
      cache:_count(label, "hits")
      cache:_count(nil, "coalesced")
    else
      cache:_count(label, "misses")
    end
    s:_end(mine)
  end)
end

--- A streamed call through the cache: `for ev in cached:stream{...} do`, or
-- with opts.on_event the stream object at once. The object has next, events,
-- result, cancel and `cache` ("hit" | "miss" | "stale"). A hit's events (and
-- a follower's events so far) reach on_event before stream returns: there is
-- nothing to wait for.
function Cached:stream(params, opts)
  local target = self.target
  if type(target.stream) ~= "function" then fail("the wrapped %s has no method 'stream'", self.name) end
  local flag, topts = split_options(params, opts, "stream")
  local on_event = topts and topts.on_event
  if on_event ~= nil and type(on_event) ~= "function" then
    fail("call option 'on_event' must be a function, got %s", type(on_event))
  end
  local cache = self.cache
  if not cacheable(params, flag) then
    cache:_count(self:_label(nil, params.model or target.model), "bypass")
    return target.stream(target, params, topts)
  end
  local key, exact, model = self:_keys("stream", params)
  local now = cache.clock()
  local env = cache:_read(key, now)
  local s = new_stream(on_event, "miss")
  local function give()
    if on_event then return s end
    return s:events(), s
  end
  if env and now < env.e then
    cache:_count(env.t, "hits")
    s:_replay(env, "hit", now, exact)
    return give()
  end
  local flight = cache.single_flight and cache.flights[key]
  if flight then
    s.cache, s.flight = "hit", flight
    flight.subs[#flight.subs + 1] = s
    for _, ev in ipairs(flight.log) do s:_push(deep_copy(ev)) end
    return give()
  end
  flight = { key = key, exact = exact, model = model, env = env, subs = { s }, log = {}, cached = self }
  s.flight = flight
  if cache.single_flight then cache.flights[key] = flight end
  topts = topts or {}
  topts.on_event = function(ev)
    if ev.type == "error" then return end -- the end is handled once, in on_done
    flight.log[#flight.log + 1] = ev
    each_subscriber(flight, function(sub) sub:_push(deep_copy(ev)) end)
  end
  local ok, up = pcall(target.stream, target, params, topts)
  if not ok then
    if cache.flights[key] == flight then cache.flights[key] = nil end
    error(up, 0)
  end
  flight.upstream = up
  up.on_done = function() finish_flight(self, flight) end
  if up.done then finish_flight(self, flight) end
  return give()
end

--- The next event, driving the upstream stream while none is ready; after
-- the last, { type = "error", error = err } if the stream failed, then nil.
function CacheStream:next()
  while true do
    local ev = self.queue[self.head]
    if ev ~= nil then
      self.queue[self.head] = nil
      self.head = self.head + 1
      return ev
    end
    if self.done then
      if self.error and not self.error_seen then
        self.error_seen = true
        return { type = "error", error = self.error }
      end
      return nil
    end
    self:_drive()
  end
end

function CacheStream:_drive()
  local flight = self.flight
  local up = flight and flight.upstream
  if not up then
    self:_end(nil, sturdy.Error.new { kind = "canceled", class = "canceled", attempts = {},
                                      message = "the stream has no upstream" })
    return
  end
  if up:poll(0.05) and not flight.finished then finish_flight(flight.cached, flight) end
end

function CacheStream:events()
  return function() return self:next() end
end

--- Waits for the end: the result (the non-streamed call's shape, with
-- `cache`), or nil and the error.
function CacheStream:result()
  while not self.done do self:_drive() end
  if self.error then return nil, self.error end
  return self._result
end

--- Stops this caller's stream. The upstream stream is canceled only when no
-- other caller shares it.
function CacheStream:cancel()
  if self.done then return end
  local flight = self.flight
  if flight then
    for i, s in ipairs(flight.subs) do
      if s == self then
        table.remove(flight.subs, i)
        break
      end
    end
  end
  self:_end(nil, canceled_error())
  if flight and #flight.subs == 0 and flight.upstream and not flight.upstream.done then
    -- nobody listens: later callers start afresh instead of joining a canceled call
    local flights = flight.cached.cache.flights
    if flights[flight.key] == flight then flights[flight.key] = nil end
    flight.upstream:cancel()
  end
end

function CacheStream:__tostring()
  return format("sturdy.CacheStream (%s%s)", self.cache, self.done and ", done" or "")
end

function Cached:__tostring()
  return format("sturdy.cached (%s)", self.name)
end

sturdy.cache = M
return M
