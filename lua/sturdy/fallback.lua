--- sturdy.fallback: a chain of targets (providers, models, API keys) that
-- answers a call when the first choice cannot.
--
--   local chain = sturdy.fallback { targets = { sonnet, haiku, gpt } }
--   local r, err = chain:messages { max_tokens = 256, messages = {...} }  -- Anthropic shape
--   local r2 = chain:chat { messages = {...} }                          -- OpenAI shape
--   -- r.served_by, r.fallbacks = { { target, kind, status, ... }, ... }, r.degraded
--   for ev in chain:stream { ... } do ... end
--
-- A target's failure moves the call on when its class, kind or what stopped
-- its retries is listed in `on`. The call has one deadline and one attempt
-- cap across its targets; moving on never restarts a target already tried.
-- A target whose breaker is open or whose key is paused by a 429 is skipped
-- without a request (the client says so: `client:stats(key)`); when every
-- target is cooling down the call fails with `retry_after` set to the
-- earliest recovery, or waits for it (`wait_for_cooldown`). Requests and
-- replies are translated between the Anthropic and OpenAI shapes
-- (sturdy.translate); a request that does not translate skips that target.
-- @module sturdy.fallback
local sturdy = require "sturdy"
local policy = require "sturdy.policy"
local translate = require "sturdy.translate"
local hedge = require "sturdy.hedge"
local cjson = require "cjson.safe"

local M = {}

local type, pairs, ipairs, tostring = type, pairs, ipairs, tostring
local setmetatable, getmetatable, rawget = setmetatable, getmetatable, rawget
local format, concat = string.format, table.concat
local floor, min, max, huge = math.floor, math.min, math.max, math.huge

local monotime = policy.monotime
local Error = sturdy.Error
local MAX_SECONDS = require("sturdy.options").MAX_SECONDS

local function fail(msg, ...)
  error("sturdy: " .. format(msg, ...), 0)
end

local function finite(v)
  return type(v) == "number" and v == v and v > -huge and v < huge
end

local function copy(t)
  local c = {}
  for k, v in pairs(t) do c[k] = v end
  return c
end

-- =========================================================================
-- What falls through
-- =========================================================================

--- What moves a call to the next target unless the chain says otherwise.
M.DEFAULT_ON = { "overloaded", "transient", "timeout", "throttled", "circuit_open", "budget_exhausted" }

-- Names `on` may hold: outcome classes, error kinds, what stopped the retries,
-- and content_policy (a refusal, or an error saying the content was filtered).
local ON_NAMES = {
  throttled = true, overloaded = true, transient = true, timeout = true, fatal = true,
  budget_exhausted = true, hint_too_long = true, content_policy = true, callback = true,
}
for kind in pairs(sturdy.MESSAGES) do ON_NAMES[kind] = true end
ON_NAMES.canceled = nil -- a canceled call is over, wherever it was

-- The provider's own error code and message, read from the error body.
local function error_code(err)
  local body = err.body
  if type(body) ~= "string" or not body:find("^%s*{") then return nil end
  local doc = cjson.decode(body)
  local e = type(doc) == "table" and doc.error
  if type(e) ~= "table" then return nil end
  return type(e.code) == "string" and e.code or (type(e.type) == "string" and e.type or nil)
end

--- True when err says the prompt is above the model's context window
-- (Anthropic "prompt is too long", OpenAI `context_length_exceeded`).
function M.is_context_error(err)
  if type(err) ~= "table" or (err.kind ~= "bad_request" and err.kind ~= "too_large") then return false end
  if error_code(err) == "context_length_exceeded" then return true end
  local detail = type(err.detail) == "string" and err.detail:lower() or ""
  return detail:find("prompt is too long", 1, true) ~= nil or detail:find("maximum context length", 1, true) ~= nil
end

local POLICY_CODES = { content_filter = true, content_policy_violation = true }

--- True when err says the provider filtered the content.
function M.is_content_policy_error(err)
  if type(err) ~= "table" then return false end
  return POLICY_CODES[error_code(err) or ""] or POLICY_CODES[err.type or ""] or false
end

local REFUSALS = { anthropic = "refusal", openai = "content_filter" }

local function falls_through(on, err)
  return on[err.class] or on[err.kind] or (err.stopped ~= nil and on[err.stopped]) or false
end

-- Attempts that reached the server: the log also holds calls refused
-- locally (breaker, queue, a pause or deadline the limiter saw coming).
local LOCAL_REFUSALS = { circuit_open = true, queue_full = true, rate_limited = true, total_timeout = true }

local function sent(attempts)
  local n = 0
  for _, a in ipairs(type(attempts) == "table" and attempts or {}) do
    if a.status or not LOCAL_REFUSALS[a.kind] then n = n + 1 end
  end
  return n
end

-- =========================================================================
-- Targets
-- =========================================================================

local KeyGroup = { __name = "sturdy.fallback.keys" }
KeyGroup.__index = KeyGroup

local TARGET_FIELDS = {
  provider = "table", name = "string", context = "number", key = "string", headers = "table",
  attempts = "number", shape = "string",
}

local function provider_kind(p)
  local mt = getmetatable(p)
  local name = type(mt) == "table" and type(mt.__name) == "string" and mt.__name or "provider"
  return (name:gsub("^sturdy%.", ""))
end

local function shape_of(p, given, where)
  if given ~= nil then
    if not translate.SHAPES[given] then fail("%s: shape must be \"anthropic\" or \"openai\", got %q", where, given) end
    if type(p[translate.SHAPES[given]]) ~= "function" then
      fail("%s: shape %s needs a '%s' method", where, given, translate.SHAPES[given])
    end
    return given
  end
  local anthropic, openai = type(p.messages) == "function", type(p.chat) == "function"
  if anthropic and not openai then return "anthropic" end
  if openai and not anthropic then return "openai" end
  fail("%s: cannot tell whether it takes the Anthropic or the OpenAI shape; give shape = \"anthropic\" or \"openai\"",
       where)
end

local function check_count(v, what, lo, hi)
  if not finite(v) or v ~= floor(v) or v < lo or v > hi then
    fail("%s must be a whole number from %d to %d, got %s", what, lo, hi, tostring(v))
  end
  return v
end

-- The upstream key a provider's requests go under (its breaker, limits and
-- windows), read from the request it prepares; nil when it cannot say.
local function derived_key(p)
  if type(p.prepare) ~= "function" then return nil end
  local ok, req = pcall(p.prepare, p, { max_tokens = 1, messages = {} })
  return ok and type(req) == "table" and type(req.key) == "string" and req.key or nil
end

-- One member of a chain position: a provider and what the chain knows of it.
local function new_member(spec, where)
  local p = spec.provider
  if type(p) ~= "table" then fail("%s must be a provider object or { provider = ... }, got %s", where, type(p)) end
  if type(p.client) ~= "table" or type(p.client.stats) ~= "function" or type(p.client.call_limits) ~= "function" then
    fail("%s must be a provider on a sturdy client (sturdy.anthropic.new, sturdy.openai.new)", where)
  end
  local shape = shape_of(p, spec.shape, where)
  if spec.context ~= nil and (not finite(spec.context) or spec.context <= 0) then
    fail("%s: context must be a positive number of tokens, got %s", where, tostring(spec.context))
  end
  if spec.attempts ~= nil then check_count(spec.attempts, where .. ": attempts", 1, 1000) end
  local name = spec.name or (provider_kind(p) .. "/" .. tostring(p.model))
  return {
    name = name, provider = p, client = p.client, shape = shape, method = translate.SHAPES[shape],
    limits = p.client:call_limits(), -- fixed when the client was made
    call_key = spec.key, key = spec.key or derived_key(p), context = spec.context,
    headers = spec.headers, attempts = spec.attempts,
    counts = { calls = 0, successes = 0, failures = 0, fallbacks = 0, skipped = 0, probes = 0, attempts = 0 },
    used_at = 0,
  }
end

local function target_spec(t, where)
  if getmetatable(t) ~= nil or t.provider == nil then return { provider = t } end
  for k, v in pairs(t) do
    local want = TARGET_FIELDS[k]
    if not want then fail("unknown option '%s' in %s", tostring(k), where) end
    if type(v) ~= want then fail("option '%s' in %s must be a %s, got %s", k, where, want, type(v)) end
  end
  return t
end

local KEYS_OWN = { provider = true, api_keys = true, name = true, context = true, headers = true, attempts = true }

--- Several API keys of one provider and model, as one target of a chain.
-- spec: `provider` ("anthropic", "openai" or a module with `new`),
-- `api_keys` (a list), `name` (default "<provider>/<model>"), `context`,
-- `headers`, `attempts`, and any option of the provider's `new` (`model`,
-- `client`, `base_url`, ...). Each key is a provider of its own under an
-- upstream key of its own (`<host>/<model>#<n>`, so each has its breaker and
-- learned limits) and is named `<name>#<n>`. A call goes to the key with the
-- most remaining quota (the smallest share left over the limits learned from
-- rate-limit headers; a key without data counts as full), the least recently
-- used first among equals; a key that is throttled moves the call to the next
-- key (and past the last one only when `on` lists throttled).
function M.keys(spec)
  if type(spec) ~= "table" then fail("fallback.keys takes a table, got %s", type(spec)) end
  local mod = spec.provider
  if type(mod) == "string" then
    if mod ~= "anthropic" and mod ~= "openai" then
      fail("option 'provider' in fallback.keys must be \"anthropic\", \"openai\" or a module with new, got %q", mod)
    end
    mod = require("sturdy." .. mod)
  end
  if type(mod) ~= "table" or type(mod.new) ~= "function" then
    fail("option 'provider' in fallback.keys must be \"anthropic\", \"openai\" or a module with new")
  end
  local keys = spec.api_keys
  if type(keys) ~= "table" or #keys == 0 then fail("option 'api_keys' in fallback.keys must be a non-empty list") end
  local new_opts = {}
  for k, v in pairs(spec) do
    if not KEYS_OWN[k] then new_opts[k] = v end
  end
  local providers = {}
  for i, key in ipairs(keys) do
    if type(key) ~= "string" or key == "" then fail("api_keys[%d] in fallback.keys must be a non-empty string", i) end
    local o = copy(new_opts)
    o.api_key = key
    providers[i] = mod.new(o)
  end
  local base = derived_key(providers[1])
  local name = spec.name or (provider_kind(providers[1]) .. "/" .. tostring(providers[1].model))
  local specs = {}
  for i, p in ipairs(providers) do
    specs[i] = { provider = p, name = name .. "#" .. i, key = base and (base .. "#" .. i) or nil,
                 context = spec.context, headers = spec.headers, attempts = spec.attempts }
  end
  return setmetatable({ name = name, specs = specs }, KeyGroup)
end

-- =========================================================================
-- Options
-- =========================================================================

local OPTIONS = {
  targets = "table", on = "table", max_targets = "number", attempts = "number", timeout = "number",
  wait_for_cooldown = "boolean", order = "string", score = "table|function", rerank_every = "number",
  probe = "number", degraded = "string|function", context = "table", shape = "string",
  default_max_tokens = "number", yield = "function", name = "string", hedge = "table|boolean",
}

local DEFAULTS = {
  max_targets = 3, attempts = 8, wait_for_cooldown = false, order = "static", rerank_every = 5, probe = 0.05,
  default_max_tokens = translate.DEFAULT_MAX_TOKENS,
}

--- The adaptive order's default weights: score = success × 0.7 + latency / (p50 seconds + 1) × 0.3.
M.DEFAULT_WEIGHTS = { success = 0.7, latency = 0.3 }

local function check_options(opts)
  for k, v in pairs(opts) do
    local want = OPTIONS[k]
    if not want then fail("unknown option '%s' in sturdy.fallback", tostring(k)) end
    if not want:find(type(v), 1, true) then
      fail("option '%s' in sturdy.fallback must be a %s, got %s", k, want:gsub("|", " or "), type(v))
    end
  end
  if opts.max_targets ~= nil then check_count(opts.max_targets, "option 'max_targets' in sturdy.fallback", 1, 1000) end
  if opts.attempts ~= nil then check_count(opts.attempts, "option 'attempts' in sturdy.fallback", 1, 1000) end
  if opts.default_max_tokens ~= nil then
    check_count(opts.default_max_tokens, "option 'default_max_tokens' in sturdy.fallback", 1, 1e9)
  end
  for _, k in ipairs { "timeout", "rerank_every" } do
    local v = opts[k]
    if v ~= nil and (not finite(v) or v <= 0 or v > MAX_SECONDS) then
      fail("option '%s' in sturdy.fallback must be a positive number of seconds up to %d, got %s", k, MAX_SECONDS,
           tostring(v))
    end
  end
  if opts.probe ~= nil and (not finite(opts.probe) or opts.probe < 0 or opts.probe > 1) then
    fail("option 'probe' in sturdy.fallback must be a share from 0 to 1, got %s", tostring(opts.probe))
  end
  if opts.order ~= nil and opts.order ~= "static" and opts.order ~= "adaptive" then
    fail("option 'order' in sturdy.fallback must be \"static\" or \"adaptive\", got %q", opts.order)
  end
  if opts.shape ~= nil and not translate.SHAPES[opts.shape] then
    fail("option 'shape' in sturdy.fallback must be \"anthropic\" or \"openai\", got %q", opts.shape)
  end
end

local function on_set(list)
  local set = {}
  for i, name in ipairs(list) do
    if name == "canceled" then fail("option 'on' in sturdy.fallback: a canceled call never falls through") end
    if type(name) ~= "string" or not ON_NAMES[name] then
      fail("option 'on' in sturdy.fallback: entry #%d (%s) is not an outcome class, an error kind, "
           .. "budget_exhausted or content_policy", i, tostring(name))
    end
    set[name] = true
  end
  return set
end

-- The score function of the adaptive order, from a weights table or a function.
local function score_function(score)
  if type(score) == "function" then return score end
  local w = copy(M.DEFAULT_WEIGHTS)
  for k, v in pairs(score or {}) do
    if w[k] == nil then fail("unknown weight '%s' in option 'score' of sturdy.fallback", tostring(k)) end
    if not finite(v) or v < 0 then
      fail("weight '%s' in option 'score' of sturdy.fallback must be a number >= 0, got %s", k, tostring(v))
    end
    w[k] = v
  end
  return function(s) return w.success * s.success + w.latency / (s.latency + 1) end
end

-- =========================================================================
-- The chain
-- =========================================================================

local Chain = { __name = "sturdy.fallback" }
Chain.__index = Chain
M.Chain = Chain

local ChainStream = { __name = "sturdy.FallbackStream" }
ChainStream.__index = ChainStream
M.ChainStream = ChainStream

--- Creates a chain; see the README for the options. Programming mistakes
-- (unknown options, wrong types, a target that is not a provider) raise.
function M.new(opts)
  if type(opts) ~= "table" then fail("sturdy.fallback takes a table of options, got %s", type(opts)) end
  check_options(opts)
  local targets = opts.targets
  if type(targets) ~= "table" or #targets == 0 then
    fail("option 'targets' in sturdy.fallback must be a non-empty list of providers")
  end
  local self = setmetatable({}, Chain)
  for k, v in pairs(DEFAULTS) do self[k] = v end
  for k, v in pairs(opts) do
    if DEFAULTS[k] ~= nil then self[k] = v end
  end
  self.on = on_set(opts.on or M.DEFAULT_ON)
  self.timeout, self.degraded, self.yield = opts.timeout, opts.degraded, opts.yield
  self.hedge = hedge.policy(opts.hedge, "sturdy.fallback")
  self.score = score_function(opts.score)
  self.positions, self.members, self.by_name = {}, {}, {}
  local keys_seen = {}
  local function add(pos, spec, where)
    local m = new_member(spec, where)
    if self.by_name[m.name] and spec.name then fail("%s: the name '%s' is taken", where, m.name) end
    if self.by_name[m.name] then
      local n = 2
      while self.by_name[m.name .. "#" .. n] do n = n + 1 end
      m.name = m.name .. "#" .. n
    end
    if m.key and keys_seen[m.key] and not m.call_key then
      -- another API key for the same model: its own breaker and limits
      local n = 2
      while keys_seen[m.key .. "#" .. n] do n = n + 1 end
      m.key = m.key .. "#" .. n
      m.call_key = m.key
    end
    if m.key then keys_seen[m.key] = true end
    if opts.context and opts.context[m.name] ~= nil then
      local c = opts.context[m.name]
      if not finite(c) or c <= 0 then
        fail("option 'context.%s' in sturdy.fallback must be a positive number", m.name)
      end
      m.context = c
    end
    m.position = pos
    pos.members[#pos.members + 1] = m
    self.members[#self.members + 1] = m
    self.by_name[m.name] = m
  end
  for i, t in ipairs(targets) do
    local where = format("targets[%d] of sturdy.fallback", i)
    if type(t) ~= "table" then fail("%s must be a provider, got %s", where, type(t)) end
    local pos = { index = i, members = {}, led_at = 0 }
    if getmetatable(t) == KeyGroup then
      pos.group, pos.name = true, t.name
      for j, spec in ipairs(t.specs) do add(pos, spec, format("%s key #%d", where, j)) end
    else
      add(pos, target_spec(t, where), where)
      pos.name = pos.members[1].name
    end
    self.positions[i] = pos
  end
  for name in pairs(opts.context or {}) do
    if not self.by_name[name] then fail("option 'context' in sturdy.fallback names no target '%s'", tostring(name)) end
  end
  self.shape = opts.shape or self.members[1].shape
  local names = {}
  for i, pos in ipairs(self.positions) do names[i] = pos.name end
  self.name = opts.name or concat(names, " > ")
  -- what the chain answers as, for a cache in front of it
  self.model = self.name
  self.counts = { calls = 0, answered = 0, failed = 0, degraded = 0, waits = 0, probes = 0 }
  self.calls_seen = 0
  return self
end

setmetatable(M, { __call = function(_, opts) return M.new(opts) end })

-- Adaptive order ------------------------------------------------------------

-- What the C windows say of a member: success (1 - failure rate of the
-- breaker's window; 1 without calls), latency (p50 of the total time, 0
-- without samples), calls, samples, and the client's stats for its key.
local function member_view(m)
  local st = m.key and m.client:stats(m.key)
  local b = st and st.breaker
  local calls = b and b.calls or 0
  local lat = st and st.latency
  local samples = lat and lat.count or 0
  return {
    name = m.name, stats = st, calls = calls, samples = samples,
    success = calls > 0 and 1 - (b.failure_rate or 0) or 1,
    latency = samples > 0 and lat.p50 or 0,
  }
end

-- Scores are compared to two decimals; equals keep the declared order.
local function rounded(score)
  if not finite(score) then fail("the chain's score function returned %s", tostring(score)) end
  return floor(score * 100 + 0.5) / 100
end

function Chain:_rank()
  local ranked = {}
  for i, pos in ipairs(self.positions) do
    local best = -huge
    for _, m in ipairs(pos.members) do
      local s = self.score(member_view(m))
      if type(s) ~= "number" then fail("the chain's score function must return a number, got %s", type(s)) end
      best = max(best, rounded(s))
    end
    pos.score = best
    ranked[i] = pos
  end
  table.sort(ranked, function(a, b)
    if a.score ~= b.score then return a.score > b.score end
    return a.index < b.index
  end)
  self._ranked, self._ranked_at = ranked, monotime()
end

-- The order of positions for the next call, and the position it probes.
function Chain:_order()
  if self.order ~= "adaptive" then return self.positions end
  if not self._ranking and (not self._ranked or monotime() - self._ranked_at >= self.rerank_every) then
    -- a score function that calls the chain gets the order as it stands
    self._ranking = true
    local ok, err = pcall(self._rank, self)
    self._ranking = false
    if not ok then error(err, 0) end
  end
  local order = self._ranked or self.positions
  local n = self.calls_seen + 1
  self.calls_seen = n
  local probe
  if self.probe > 0 and #order > 1 and floor(n * self.probe) > floor((n - 1) * self.probe) then
    -- a share of calls lead with the position that led least recently, so
    -- one that recovered shows it in the windows and is never starved
    for i = 2, #order do
      if not probe or order[i].led_at < probe.led_at then probe = order[i] end
    end
    local o = { probe }
    for _, pos in ipairs(order) do
      if pos ~= probe then o[#o + 1] = pos end
    end
    order = o
    self.counts.probes = self.counts.probes + 1
  end
  order[1].led_at = monotime()
  return order, probe
end

-- Key rotation ----------------------------------------------------------------

-- The share of quota a member has left: the smallest remaining / limit over
-- the dimensions whose reset is still ahead; 1 without data.
local function quota(st)
  local q = 1
  local limits = st and st.limits
  for _, l in pairs(type(limits) == "table" and limits or {}) do
    if type(l) == "table" and finite(l.limit) and l.limit > 0 and finite(l.remaining) and l.reset_in then
      q = min(q, max(0, l.remaining / l.limit))
    end
  end
  return q
end

local function members_in_order(pos)
  if #pos.members == 1 then return pos.members end
  local list = {}
  for i, m in ipairs(pos.members) do
    list[i] = { m = m, q = quota(m.key and m.client:stats(m.key)), i = i }
  end
  table.sort(list, function(a, b)
    if a.q ~= b.q then return a.q > b.q end
    if a.m.used_at ~= b.m.used_at then return a.m.used_at < b.m.used_at end
    return a.i < b.i
  end)
  for i, x in ipairs(list) do list[i] = x.m end
  return list
end

-- Cooling down: seconds until a member can take a call (math.huge when its
-- breaker is forced open) and why, or nil when it can take one now.
local function cooldown(m)
  local st = m.key and m.client:stats(m.key)
  if not st then return nil end
  local b = st.breaker
  if b and b.state == "open" then
    if b.retry_in == nil then return huge, "circuit_open" end
    if b.retry_in > 0 then return b.retry_in, "circuit_open" end
  end
  local paused = type(st.limits) == "table" and st.limits.paused_for
  if finite(paused) and paused > 0 then return paused, "rate_limited" end
  return nil
end

-- =========================================================================
-- One call through the chain: its state, the next member to try, and what
-- each outcome does. Shared by the blocking calls and the streams.
-- =========================================================================

local CALL_OPTIONS = { timeout = "table", headers = "table", priority = "string", attempts = "number",
                       on_event = "function" }

local function new_call(chain, shape, params, opts, method)
  if type(params) ~= "table" then fail("%s takes a table of request parameters, got %s", method, type(params)) end
  if params.model ~= nil then fail("chain calls take no 'model': each target names its own") end
  if opts == nil then opts = {} end
  if type(opts) ~= "table" then fail("%s's call options must be a table, got %s", method, type(opts)) end
  for k, v in pairs(opts) do
    local want = CALL_OPTIONS[k]
    if not want or (k == "on_event" and method ~= "stream") then
      fail("unknown call option '%s' for a chain's %s", tostring(k), method)
    end
    if type(v) ~= want then fail("call option '%s' must be a %s, got %s", k, want, type(v)) end
  end
  local attempts = opts.attempts and check_count(opts.attempts, "call option 'attempts'", 1, 1000) or chain.attempts
  local total = opts.timeout and opts.timeout.total
  if total == nil then total = chain.timeout end
  if total == nil then total = chain.members[1].limits.total or false end
  if total ~= false and (not finite(total) or total <= 0 or total > MAX_SECONDS) then
    fail("call option 'timeout.total' must be a positive number of seconds up to %d or false, got %s", MAX_SECONDS,
         tostring(total))
  end
  local order, probe = chain:_order()
  return {
    chain = chain, shape = shape, params = params, opts = opts, bodies = {},
    deadline = total and monotime() + total or huge, attempts_left = attempts,
    order = order, probe = probe, oi = 0, fallbacks = {}, tried = {}, counted = {}, used = 0, logged = {},
  }
end

-- The request body for a member: the caller's, or translated to its shape.
local function body_for(call, m)
  if m.shape == call.shape then return call.params end
  local b = call.bodies[m.shape]
  if b == nil then
    local body, why = translate.request(call.params, call.shape, m.shape,
                                        { default_max_tokens = call.chain.default_max_tokens })
    b = body or { why = why }
    call.bodies[m.shape] = b
  end
  if b.why then return nil, b.why end
  return b
end

local function skip(call, m, entry)
  if call.logged[m] then return end
  call.logged[m] = true
  entry.target, entry.skipped = m.name, true
  call.fallbacks[#call.fallbacks + 1] = entry
  m.counts.skipped = m.counts.skipped + 1
end

-- The next member to send the call to, or nil and why there is none:
-- "attempts", "deadline", "max_targets", "stopped" (a throttled call tried
-- the other keys of its target and `on` does not move it further) or
-- "exhausted" (call.cooling then holds the members that were only cooling down).
local function next_member(call)
  local chain = call.chain
  while true do
    if call.attempts_left <= 0 then return nil, "attempts" end
    if monotime() >= call.deadline then return nil, "deadline" end
    if not call.members then
      call.oi = call.oi + 1
      call.pos = call.order[call.oi]
      if not call.pos then return nil, "exhausted" end
      call.members, call.mi = members_in_order(call.pos), 0
    end
    call.mi = call.mi + 1
    local m = call.members[call.mi]
    if not m then
      call.members = nil
      -- a throttled key moved the call to the other keys; none answered, and
      -- the chain does not move a throttled call on
      if call.keys_only then return nil, "stopped" end
    elseif not call.tried[m] then
      local body, why = body_for(call, m)
      if not body then
        call.tried[m] = true
        skip(call, m, { kind = "untranslatable", reason = why })
      elseif call.floor and not (m.context and m.context > call.floor) then
        call.tried[m] = true
        skip(call, m, { kind = "context_window", reason = format("its context (%s) is not larger than %.0f tokens",
                                                               m.context and format("%.0f", m.context) or "undeclared",
                                                               call.floor) })
      else
        local cool, kind = cooldown(m)
        if cool then
          skip(call, m, { kind = kind, retry_after = cool < huge and cool or nil })
          call.cooling = call.cooling or {}
          call.cooling[#call.cooling + 1] = { m = m, at = monotime() + cool, kind = kind }
        elseif not call.counted[call.pos] and call.used >= chain.max_targets then
          return nil, "max_targets"
        else
          if not call.counted[call.pos] then
            call.counted[call.pos] = true
            call.used = call.used + 1
          end
          call.tried[m] = true
          return m, body
        end
      end
    end
  end
end

-- The options of one member's call: the caller's, with the member's key and
-- headers, the time left of the chain's deadline and the attempts left.
local function member_options(call, m)
  local o = call.opts
  local limits = m.limits
  local topts = { key = m.call_key, priority = o.priority }
  if o.headers or m.headers then
    local h = {}
    for k, v in pairs(o.headers or {}) do h[k] = v end
    for k, v in pairs(m.headers or {}) do h[k] = v end
    topts.headers = h
  end
  local total = limits.total or huge
  if call.deadline < huge then total = min(total, max(0.001, call.deadline - monotime())) end
  if o.timeout or total < huge then
    local t = {}
    for k, v in pairs(o.timeout or {}) do
      if k ~= "total" then t[k] = v end
    end
    if total < huge then t.total = total end
    topts.timeout = t
  end
  topts.attempts = min(m.attempts or limits.attempts, call.attempts_left)
  m.counts.calls = m.counts.calls + 1
  m.used_at = monotime()
  if call.probe and call.probe == call.pos and call.mi == 1 then m.counts.probes = m.counts.probes + 1 end
  return topts
end

-- Counts the attempts a member's call sent against the call's cap.
local function spend(call, m, attempts)
  local n = sent(attempts)
  call.attempts_left = call.attempts_left - n
  m.counts.attempts = m.counts.attempts + n
  return n
end

local function record(call, m, err)
  call.fallbacks[#call.fallbacks + 1] = { target = m.name, kind = err.kind, class = err.class, status = err.status,
                                          attempts = spend(call, m, err.attempts), retry_after = err.retry_after }
end

-- After a member failed: true when the call moves on.
local function after_failure(call, m, err)
  local chain = call.chain
  m.counts.failures = m.counts.failures + 1
  record(call, m, err)
  call.last_err = err
  call.keys_only = nil
  local falls = falls_through(chain.on, err) or (chain.on.content_policy and M.is_content_policy_error(err))
  local moves
  if err.kind == "canceled" then
    moves = false
  elseif M.is_context_error(err) and m.context then
    -- only a target with a larger declared context can take this prompt
    call.floor = max(call.floor or 0, m.context)
    call.members = nil
    moves = true
  elseif call.pos.group and err.class == "throttled" and call.mi < #call.members then
    moves = true -- the next key of the same model
    call.keys_only = not falls
  elseif falls then
    call.members = nil
    moves = true
  end
  if moves then m.counts.fallbacks = m.counts.fallbacks + 1 end
  return moves or false
end

-- A reply the content filter declined moves on when the chain asks for it.
local function refused(call, m, r)
  if not call.chain.on.content_policy then return false end
  local reason = translate.reply_stop_reason(r.reply, m.shape)
  if reason ~= REFUSALS[m.shape] then return false end
  m.counts.failures = m.counts.failures + 1
  m.counts.fallbacks = m.counts.fallbacks + 1
  call.fallbacks[#call.fallbacks + 1] = { target = m.name, kind = "content_policy", stop_reason = reason,
                                          attempts = spend(call, m, r.attempts) }
  call.members = nil
  call.refusal = call.refusal or { m = m, r = r }
  return true
end

-- The result of a member, in the caller's shape, marked with who served it.
local function served(call, m, r)
  if m.shape ~= call.shape then
    r.reply = translate.reply(r.reply, m.shape, call.shape)
    r.stop_reason = translate.reply_stop_reason(r.reply, call.shape)
    r.translated_from = m.shape
  end
  r.served_by, r.fallbacks, r.degraded = m.name, call.fallbacks, false
  return r
end

local function answered(call, m, r)
  spend(call, m, r.attempts)
  m.counts.successes = m.counts.successes + 1
  call.chain.counts.answered = call.chain.counts.answered + 1
  return served(call, m, r)
end

-- When no member can answer now: "wait" and the time of the earliest
-- recovery, or "fail" and the error (why: what ended the search).
local function end_of_pass(call, why)
  local chain = call.chain
  if why == "exhausted" and call.cooling then
    local first
    for _, c in ipairs(call.cooling) do
      if not first or c.at < first.at then first = c end
    end
    call.cooling = nil
    if chain.wait_for_cooldown and first.at < call.deadline and call.attempts_left > 0 then
      -- the next pass looks at everything not tried yet, the cooling ones again
      call.oi, call.members = 0, nil
      return "wait", first
    end
    local parts = {}
    for _, e in ipairs(call.fallbacks) do
      if e.skipped and (e.kind == "circuit_open" or e.kind == "rate_limited") then
        parts[#parts + 1] = format("%s %s%s", e.target, e.kind == "circuit_open" and "circuit open" or "paused",
                                   e.retry_after and format(" for %.3gs", e.retry_after) or "")
      end
    end
    local retry_after = first.at < huge and max(0, floor((first.at - monotime()) * 1000 + 0.5) / 1000) or nil
    return "fail", Error.new {
      kind = "cooling_down", class = "overloaded", retryable = true, retry_after = retry_after, attempts = {},
      message = "every target of the chain is cooling down", detail = concat(parts, "; "),
      cause = call.last_err,
    }
  end
  local err = call.last_err
  if not err then
    if why == "deadline" then
      err = Error.new { kind = "total_timeout", class = "timeout", attempts = {},
                        message = "the chain's deadline passed before a target was tried" }
    else
      local reasons = {}
      for _, e in ipairs(call.fallbacks) do reasons[#reasons + 1] = e.target .. ": " .. tostring(e.reason or e.kind) end
      err = Error.new { kind = "no_target", class = "fatal", attempts = {},
                        message = "no target of the chain could take the call", detail = concat(reasons, "; ") }
    end
  end
  return "fail", err
end

-- The degraded answer, when the chain has one and the call ran out of
-- targets, time or attempts (never when an error stopped it).
local function degraded_result(call, err, why)
  local d = call.chain.degraded
  if d == nil or why == "stopped" or err.kind == "canceled" then return nil end
  local text = d
  if type(d) == "function" then
    text = d(call.params, err)
    if text == nil then return nil end
    if type(text) ~= "string" then
      fail("the chain's degraded function must return a string or nil, got %s", type(text))
    end
  end
  local doc = { id = "msg_degraded", type = "message", role = "assistant", model = cjson.null,
                content = { { type = "text", text = text } }, stop_reason = "end_turn", stop_sequence = cjson.null,
                usage = { input_tokens = 0, output_tokens = 0 } }
  local reply = translate.reply(doc, "anthropic", call.shape)
  return {
    reply = reply, text = text, stop_reason = translate.reply_stop_reason(reply, call.shape),
    usage = { input = 0, output = 0, cache_read = 0, cache_write = 0 }, cost = 0, attempts = {}, latency = 0,
    fallbacks = call.fallbacks, degraded = true, error = err,
  }
end

-- The end of a call that no member answered: a declined reply when one came
-- (content_policy), the degraded answer, or the error with the call's story.
local function give_up(call, err, why)
  local chain = call.chain
  if call.refusal then
    chain.counts.answered = chain.counts.answered + 1
    return served(call, call.refusal.m, call.refusal.r)
  end
  local d = degraded_result(call, err, why)
  if d then
    chain.counts.degraded = chain.counts.degraded + 1
    return d
  end
  chain.counts.failed = chain.counts.failed + 1
  err.fallbacks, err.chain_stopped = call.fallbacks, why
  return nil, err
end

-- =========================================================================
-- Hedges: a member's call whose first byte is late starts one hedge on the
-- next member the chain would try (when it shares the member's client, whose
-- core then decides for both keys), else on the same member.
-- =========================================================================

-- The member next_member would give now, and a function that takes it back
-- (the call's place in the chain as it was) when it is not used.
local function peek_member(call)
  local saved = { oi = call.oi, pos = call.pos, members = call.members, mi = call.mi, used = call.used,
                  keys_only = call.keys_only }
  local counted = {}
  for k in pairs(call.counted) do counted[k] = true end
  local m, body = next_member(call)
  return m, body, function()
    if m then call.tried[m] = nil end
    for k in pairs(call.counted) do
      if not counted[k] then call.counted[k] = nil end
    end
    for k, v in pairs(saved) do call[k] = v end
  end
end

-- One member's call raced against a hedge (the chain's `hedge` option).
-- Returns the member whose outcome is the call's, and r, err.
local function hedged_member_call(call, m, body)
  local hp, client = call.chain.hedge, m.client
  local req, finish = m.provider:prepare(body, member_options(call, m))
  if not req then return m, nil, finish end
  local legs_of = { { m = m, req = req, finish = finish } }
  local winner, legs = hedge.race(client, hp, function(cb) return client:submit(req, cb) end,
    function(first, cb)
      local h, hbody, take_back = peek_member(call)
      local key = h and h.client == client and (h.call_key or h.key)
      if not key then
        if h then take_back() end
        h, hbody = m, body
      end
      local ok, left = first:hedge_admit(hp, h ~= m and key or nil)
      if not ok then
        if h ~= m then take_back() end
        return nil
      end
      local topts = member_options(call, h)
      topts.attempts = 1
      if left then
        topts.timeout = topts.timeout or {}
        topts.timeout.total = math.max(left, 1) / 1000
      end
      local hreq, hfinish = h.provider:prepare(hbody, topts)
      if not hreq then return nil end
      legs_of[2] = { m = h, req = hreq, finish = hfinish }
      return client:submit(hreq, cb)
    end)
  local lost = 0
  for i, leg in ipairs(legs) do
    local of = legs_of[i]
    if leg.lost then
      lost = lost + of.m.provider:lost_leg(of.req)
      spend(call, of.m, { { kind = "canceled" } }) -- it was sent
    elseif i ~= winner and leg.err then
      of.m.counts.failures = of.m.counts.failures + 1
      record(call, of.m, leg.err)
    end
  end
  local w, of = legs[winner], legs_of[winner]
  local r, err = w.res, w.err
  if r then r, err = of.finish(r) end
  local out = r or err
  if out and legs[2] then
    out.hedged, out.hedge_won, out.hedged_to = true, winner == 2, legs_of[2].m.name
  end
  if r then r.cost = (r.cost or 0) + lost end
  return of.m, r, err
end

-- Waits for left seconds at most while nothing else can: the client's calls
-- go on meanwhile; an idle client would return at once, so the thread sleeps.
local function idle_wait(client, left)
  if left <= 0 then return end
  if client:pending() > 0 then
    client:poll(min(left, 1))
  else
    policy.sleep(min(left, 1))
  end
end

-- Waits until t: ngx.sleep inside nginx, the chain's yield inside a
-- coroutine, else by driving the client (its other calls go on meanwhile).
function Chain:_sleep(t, client)
  self.counts.waits = self.counts.waits + 1
  local ngx = rawget(_G, "ngx")
  while true do
    local left = t - monotime()
    if left <= 0 then return end
    local phase = ngx and type(ngx.get_phase) == "function" and ngx.get_phase()
    if phase == "rewrite" or phase == "access" or phase == "content" or phase == "timer" then
      ngx.sleep(left)
    elseif self.yield and coroutine.running() and select(2, coroutine.running()) ~= true then
      self.yield()
      client:poll(0)
    else
      idle_wait(client, left)
    end
  end
end

function Chain:_call(shape, method, params, opts)
  local call = new_call(self, shape, params, opts, method)
  self.counts.calls = self.counts.calls + 1
  while true do
    local m, body = next_member(call)
    if m then
      local p = m.provider
      local r, err
      if self.hedge then
        m, r, err = hedged_member_call(call, m, body)
      else
        r, err = p[m.method](p, body, member_options(call, m))
      end
      if r then
        if not refused(call, m, r) then return answered(call, m, r) end
      elseif not after_failure(call, m, err) then
        return give_up(call, err, "stopped")
      end
    else
      local what, v = end_of_pass(call, body)
      if what ~= "wait" then return give_up(call, v, body) end
      self:_sleep(v.at, v.m.client)
    end
  end
end

--- An Anthropic-shaped call (the Messages API's params; no `model`: each
-- target names its own). Returns the result of the target that answered
-- (`reply` in the Anthropic shape, `text`, `usage`, `cost`, `served_by`,
-- `fallbacks`, `degraded`), or nil and the error (with `fallbacks` and
-- `chain_stopped`). opts: `timeout` (`total` is the chain's deadline),
-- `headers`, `priority`, `attempts` (the call's cap across targets).
function Chain:messages(params, opts)
  return self:_call("anthropic", "messages", params, opts)
end

--- An OpenAI-shaped call (Chat Completions params); as messages.
function Chain:chat(params, opts)
  return self:_call("openai", "chat", params, opts)
end

-- =========================================================================
-- Streams: the call moves on before the first delta reaches the caller;
-- after it, a failure is the answer (an error carrying the partial text),
-- never another model's continuation.
-- =========================================================================

--- A streamed call in the chain's shape (option `shape`, by default the
-- first target's). `for ev in chain:stream(params) do`, or with
-- `opts.on_event` the stream object at once. The object has `next`,
-- `events`, `result`, `poll`, `cancel`, `done`, `error`, `on_done`. A stream
-- that waits for a cooldown is resumed by its `poll` (which `next` and
-- `result` call).
function Chain:stream(params, opts)
  local call = new_call(self, self.shape, params, opts, "stream")
  self.counts.calls = self.counts.calls + 1
  local s = setmetatable({ chain = self, call = call, on_event = call.opts.on_event, queue = {}, head = 1, tail = 0,
                           done = false, committed = false, partial = {} }, ChainStream)
  s:_advance()
  if s.on_event then return s end
  return s:events(), s
end

function ChainStream:_emit(ev)
  if ev.terminal then self.terminal = true end
  if self.on_event then
    self.on_event(ev)
  else
    self.tail = self.tail + 1
    self.queue[self.tail] = ev
  end
end

function ChainStream:_end(result, err)
  if self.done then return end
  self.done, self._result, self.error = true, result, err
  self.up = nil
  if err and self.on_event then self.on_event { type = "error", error = err } end
  if self.on_done then self.on_done(self) end
end

function ChainStream:_give_up(err, why)
  local r, e = give_up(self.call, err, why)
  if r and r.degraded then
    for _, ev in ipairs(translate.text_events(self.call.shape, r.text)) do self:_emit(ev) end
  end
  self:_end(r, e)
end

-- Events of the member now streaming, translated to the caller's shape.
function ChainStream:_event(m, ev)
  if self.done or self.member ~= m or ev.type == "error" then return end
  for _, x in ipairs(self.translator:feed(ev)) do
    self.committed = true
    local text = translate.event_text(x, self.call.shape)
    if text ~= "" then self.partial[#self.partial + 1] = text end
    self:_emit(x)
  end
end

-- A member's stream is over: true when the call moves on to another member.
function ChainStream:_settle(m, up)
  if self.done then return false end
  local call = self.call
  local err = up.error
  if not err then
    self:_end(answered(call, m, up:result()))
    return false
  end
  if self.committed then
    -- part of this member's answer reached the caller: it is the answer
    m.counts.failures = m.counts.failures + 1
    record(call, m, err)
    call.chain.counts.failed = call.chain.counts.failed + 1
    err.partial_text, err.served_by = concat(self.partial), m.name
    err.fallbacks, err.chain_stopped = call.fallbacks, "committed"
    self:_end(nil, err)
    return false
  end
  if after_failure(call, m, err) then return true end
  self:_give_up(err, "stopped")
  return false
end

-- Starts the member's stream: true when it runs (or ended the call).
function ChainStream:_start(m, body)
  local call = self.call
  local topts = member_options(call, m)
  topts.on_event = function(ev) self:_event(m, ev) end
  self.member, self.translator = m, translate.events(m.shape, call.shape)
  local up = m.provider:stream(body, topts)
  if up.done then return not self:_settle(m, up) end -- refused before sending (the input guard)
  self.up = up
  up.on_done = function()
    if self:_settle(m, up) then self:_advance() end
  end
  return true
end

function ChainStream:_advance()
  local call = self.call
  while not self.done do
    local m, body = next_member(call)
    if not m then
      local what, v = end_of_pass(call, body)
      if what == "wait" then
        self.chain.counts.waits = self.chain.counts.waits + 1
        self.waiting = v
        return
      end
      return self:_give_up(v, body)
    end
    if self:_start(m, body) then return end
  end
end

--- Drives the stream for at most timeout seconds (default 0); true when it is over.
function ChainStream:poll(timeout)
  if self.done then return true end
  local w = self.waiting
  if w then
    idle_wait(w.m.client, min(w.at - monotime(), timeout or 0))
    if monotime() >= w.at then
      self.waiting = nil
      self:_advance()
    end
  elseif self.up then
    self.up:poll(timeout or 0)
  end
  return self.done
end

--- The next event (in the chain's shape), driving the clients while none is
-- ready; after the last, { type = "error", error = err } if the call failed, then nil.
function ChainStream:next()
  while true do
    local ev = self.queue[self.head]
    if ev ~= nil then
      self.queue[self.head], self.head = nil, self.head + 1
      return ev
    end
    if self.done then
      if self.error and not self.error_seen then
        self.error_seen = true
        return { type = "error", error = self.error }
      end
      return nil
    end
    self:poll(0.05)
  end
end

function ChainStream:events()
  return function() return self:next() end
end

--- Waits for the end: the result (as a non-streamed call's, with
-- `served_by`, `fallbacks`, `degraded`), or nil and the error.
function ChainStream:result()
  while not self.done do self:poll(0.05) end
  if self.error then return nil, self.error end
  return self._result
end

--- Ends the stream as canceled (the member's stream too). Returns true, or
-- false when it is over or its terminal event is in (it ends by itself, once).
function ChainStream:cancel()
  if self.done or self.terminal then return false end
  local up = self.up
  local err = Error.new { kind = "canceled", class = "canceled", attempts = {} }
  err.fallbacks = self.call.fallbacks
  self.chain.counts.failed = self.chain.counts.failed + 1
  self:_end(nil, err)
  if up then up:cancel() end
  return true
end

function ChainStream:__tostring()
  return format("sturdy.FallbackStream (%s%s)", self.member and self.member.name or "not started",
                self.done and ", done" or "")
end

-- =========================================================================
-- Counts
-- =========================================================================

--- The chain's counts: `calls`, `answered`, `failed`, `degraded`, `waits`
-- (cooldowns waited for), `probes` (calls that led with a lower-ranked
-- target), `order` (target names, the current ranking) and `targets`
-- (`{ [name] = { calls, successes, failures, fallbacks, skipped, probes, attempts } }`:
-- calls sent to the target, answered, failed, failed and moved on, passed
-- over without a request, probe calls, and the attempts its calls sent, retries
-- included). With a name: that target's counts.
function Chain:stats(name)
  if name ~= nil then
    if type(name) ~= "string" then fail("chain:stats takes a target name, got %s", type(name)) end
    local m = self.by_name[name]
    return m and copy(m.counts) or nil
  end
  local s = copy(self.counts)
  s.targets, s.order = {}, {}
  for _, m in ipairs(self.members) do s.targets[m.name] = copy(m.counts) end
  for i, pos in ipairs(self.order == "adaptive" and self._ranked or self.positions) do s.order[i] = pos.name end
  return s
end

--- The target names, in declared order (key groups' keys included).
function Chain:targets()
  local names = {}
  for i, m in ipairs(self.members) do names[i] = m.name end
  return names
end

function Chain:__tostring()
  return format("sturdy.fallback (%s)", self.name)
end

sturdy.fallback = M
return M
