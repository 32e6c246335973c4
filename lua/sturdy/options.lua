--- The options of `sturdy.client`, declared once: name, type, unit, range and,
-- for what the C core decides, where the value goes in the compiled
-- configuration it reads. Defaults of those come from the C core itself
-- (`sturdy.policy.defaults()`), and the names of classes, jitters, breaker modes
-- and priorities from its enums, so no list is kept twice.
--
-- `options.client(cfg)` checks a client's options once, at creation, converts
-- units once (seconds to milliseconds, rounded up), and returns the compiled
-- configuration and the Lua-side settings. Requests are checked by the C core
-- (src/lua/request.c), in one pass over their fields.
-- @module sturdy.options
local policy = require "sturdy.policy"

local options = {}

local type, pairs, ipairs, tostring = type, pairs, ipairs, tostring
local floor, ceil, huge = math.floor, math.ceil, math.huge
local format = string.format

--- The longest span any option in seconds may name: 10 years.
options.MAX_SECONDS = 315360000

local ENUMS = policy.enums()
ENUMS.transport = { "curl", "ngx" }
ENUMS.log_level = { "debug", "info", "warn", "error" }
options.enums = ENUMS

local function set_of(list)
  local s = {}
  for _, v in ipairs(list) do s[v] = true end
  return s
end

local CLASS_SET = set_of(ENUMS.class)
-- classes a user may name in retry and breaker settings
local POLICY_CLASSES = { throttled = true, overloaded = true, transient = true, timeout = true, fatal = true }
local ENUM_SETS = {}
for name, list in pairs(ENUMS) do ENUM_SETS[name] = set_of(list) end

local function fail(msg, ...)
  error("sturdy: " .. format(msg, ...), 0)
end

--- Flattens a value to one printable line of at most n bytes.
local function one_line(s, n)
  s = tostring(s):gsub("[%c]+", " ")
  if #s > n then s = s:sub(1, n) .. "..." end
  return s
end
options.one_line = one_line

local function shown(v)
  return type(v) == "string" and format("%q", one_line(v, 40)) or type(v)
end

---------------------------------------------------------------------------
-- Kinds of values. Each checks v and returns it converted, or calls bad(want).
---------------------------------------------------------------------------

local function finite(v)
  return type(v) == "number" and v == v and v > -huge and v < huge
end

local function seconds_to_ms(v)
  return ceil(v * 1000)
end

local KINDS = {}

function KINDS.string(v, _, bad)
  if type(v) ~= "string" then bad("a string") end
  return v
end

function KINDS.table(v, _, bad)
  if type(v) ~= "table" then bad("a table") end
  return v
end

function KINDS.boolean(v, _, bad)
  if type(v) ~= "boolean" then bad("a boolean") end
  return v
end

-- a function, or one of the names in spec.names
function KINDS.writer(v, spec, bad)
  if type(v) ~= "function" and not (type(v) == "string" and spec.names[v]) then
    local names = {}
    for name in pairs(spec.names) do names[#names + 1] = format("%q", name) end
    table.sort(names)
    bad("a function or " .. table.concat(names, " or "))
  end
  return v
end

KINDS["function"] = function(v, _, bad)
  if type(v) ~= "function" then bad("a function") end
  return v
end

-- seconds > 0, at most MAX_SECONDS; to milliseconds (at least 1)
function KINDS.seconds(v, _, bad)
  if not finite(v) or v <= 0 then bad("a positive number") end
  if v > options.MAX_SECONDS then bad(format("at most %d (seconds)", options.MAX_SECONDS)) end
  return seconds_to_ms(v)
end

-- as seconds, or false for none (0)
KINDS["seconds|false"] = function(v, spec, bad)
  if v == false then return 0 end
  if not finite(v) or v <= 0 then bad("a positive number or false") end
  return KINDS.seconds(v, spec, bad)
end

-- a whole number within spec.range
function KINDS.count(v, spec, bad)
  local lo, hi = spec.range[1], spec.range[2]
  if not finite(v) or v ~= floor(v) or v < lo then bad(format("a whole number >= %d", lo)) end
  if v > hi then bad(format("a whole number from %d to %.0f", lo, hi)) end
  return v
end

-- a finite number within spec.range
function KINDS.number(v, spec, bad)
  local lo, hi = spec.range[1], spec.range[2]
  if not finite(v) then bad("a number") end
  if v < lo or v > hi then bad(format("a number from %g to %g", lo, hi)) end
  return v
end

-- a per-minute limit
function KINDS.rate(v, _, bad)
  if not finite(v) or v <= 0 then bad("a positive number") end
  if v > 1e12 then bad("at most 1e12 (per minute)") end
  return v
end

-- Redis connection settings, checked by sturdy.redis (shared with the cache)
function KINDS.redis(v, _, _, where)
  return require("sturdy.redis").settings(v, where)
end

function KINDS.enum(v, spec, bad)
  if type(v) ~= "string" or not ENUM_SETS[spec.values][v] then
    bad("one of " .. table.concat(ENUMS[spec.values], ", "))
  end
  return v
end

-- one number of seconds for every class, or a table of them by class
KINDS["seconds|classes"] = function(v, spec, bad, where)
  local out = {}
  if type(v) == "number" then
    local ms = KINDS.seconds(v, spec, bad)
    for class in pairs(POLICY_CLASSES) do out[class] = ms end
    return out
  end
  if type(v) ~= "table" then bad("a positive number or a table of them by class") end
  for class, s in pairs(v) do
    if not POLICY_CLASSES[class] then fail("unknown class '%s' in %s", tostring(class), where) end
    out[class] = KINDS.seconds(s, spec, function(want)
      fail("%s.%s must be %s, got %s", where, class, want, shown(s))
    end)
  end
  return out
end

-- a list of class names or HTTP statuses
function KINDS.outcomes(v, _, bad, where)
  if type(v) ~= "table" then bad("a list of class names or HTTP statuses") end
  for _, x in ipairs(v) do
    if not POLICY_CLASSES[x] and not (type(x) == "number" and x >= 100 and x <= 599 and x == floor(x)) then
      fail("%s takes class names (throttled, overloaded, transient, timeout, fatal) or HTTP statuses, got %s",
           where, tostring(x))
    end
  end
  return v
end

-- a list of class names
function KINDS.classes(v, _, bad, where)
  if type(v) ~= "table" then bad("a list of class names") end
  for _, x in ipairs(v) do
    if not POLICY_CLASSES[x] then fail("unknown class '%s' in %s", tostring(x), where) end
  end
  return v
end

local ADAPTIVE = { fields = {
  min = { "count", range = { 1, 1e6 } },
  max = { "count", range = { 1, 1e6 } },
  initial = { "count", range = { 1, 1e6 } },
  window = { "seconds" },
  tolerance = { "number", range = { 0, 10 } },
} }

-- a fixed in-flight cap, or "adaptive", or { adaptive = { min, max, initial, window, tolerance } };
-- an adaptive one comes back as { adaptive = {...} } (window in ms)
function KINDS.concurrency(v, spec, bad, where)
  if v == "adaptive" then return { adaptive = {} } end
  if type(v) == "table" then
    for k in pairs(v) do
      if k ~= "adaptive" then fail("unknown option '%s' in %s", tostring(k), where) end
    end
    local a = v.adaptive
    if a == true then return { adaptive = {} } end
    if type(a) ~= "table" then bad('a whole number, "adaptive" or { adaptive = { min =, max = } }') end
    local out = {}
    for k, x in pairs(a) do
      local field = ADAPTIVE.fields[k]
      if not field then fail("unknown option '%s' in %s.adaptive", tostring(k), where) end
      out[k] = KINDS[field[1]](x, field, function(want)
        fail("option '%s' in %s.adaptive must be %s, got %s", k, where, want, shown(x))
      end)
    end
    if out.min and out.max and out.max < out.min then
      fail("option 'max' in %s.adaptive must be at least its min (%d), got %d", where, out.min, out.max)
    end
    return { adaptive = out }
  end
  if type(v) ~= "number" then bad('a whole number, "adaptive" or { adaptive = { min =, max = } }') end
  return KINDS.count(v, spec, bad)
end

-- caps of one scope of the spend budget
local SPEND_CAPS = { fields = {
  usd_per_hour = { "number", range = { 1e-6, 1e9 } },
  usd_per_day = { "number", range = { 1e-6, 1e9 } },
  tokens_per_hour = { "count", range = { 1, 1e15 } },
  tokens_per_day = { "count", range = { 1, 1e15 } },
  warn = { "number", range = { 0, 1 } },
} }

local check_section -- defined below, used by the kinds of nested sections

-- { [name] = caps }: key or tag names to their caps
KINDS["caps by name"] = function(v, _, bad, where)
  if type(v) ~= "table" then bad("a table of caps by name") end
  local out = {}
  for name, caps in pairs(v) do
    if type(name) ~= "string" or name == "" or name:find("%z") then
      fail("%s takes non-empty names without NUL bytes, got %s", where, shown(name))
    end
    if type(caps) ~= "table" then
      fail("%s[%q] must be a table of caps, got %s", where, one_line(name, 40), type(caps))
    end
    out[name] = {}
    check_section(caps, SPEND_CAPS, format("%s[%q]", where, one_line(name, 40)), {}, out[name])
  end
  return out
end

---------------------------------------------------------------------------
-- The schema. A leaf: { kind, to = compiled path, range =, values =, default = }.
-- A section: { fields = {...} }, optionally `false` allowed (or_false).
---------------------------------------------------------------------------

local TIMEOUT = {
  fields = {
    connect = { "seconds|false", default = 10 },
    first_byte = { "seconds|false", default = 60 },
    idle = { "seconds|false", default = 30 },
    total = { "seconds|false", default = 600 },
  },
}

local CLIENT = { fields = {
  base_url = { "string" },
  headers = { "table" },
  key = { "string" },
  timeout = TIMEOUT,
  retry = { fields = {
    attempts = { "count", range = { 1, 1000 }, to = "retry.attempts" },
    base = { "seconds|classes", to = "retry.base_ms" },
    cap = { "seconds", to = "retry.cap_ms" },
    jitter = { "enum", values = "jitter", to = "retry.jitter" },
    honor_retry_after = { "seconds", to = "retry.honor_retry_after_ms" },
    retry_on = { "outcomes" },
    never_retry_on = { "outcomes" },
    budget = { or_false = "retry.budget", fields = {
      ratio = { "number", range = { 0, 1e6 }, to = "upstream.budget.ratio" },
      min_per_s = { "number", range = { 0, 1e6 }, to = "upstream.budget.min_per_s" },
      -- the window is ten slots
      window = { "seconds", to = "upstream.budget.slot_ms", scale = 0.1 },
    } },
  } },
  tls = { fields = {
    ca_file = { "string", to = "transport.ca_file" },
    ca_path = { "string", to = "transport.ca_path" },
    client_cert = { "string", to = "transport.client_cert" },
    client_key = { "string", to = "transport.client_key" },
    client_key_password = { "string", to = "transport.client_key_password" },
  } },
  proxy = { "string", to = "transport.proxy" },
  no_proxy = { "string", to = "transport.no_proxy" },
  user_agent = { "string", to = "transport.user_agent" },
  max_response = { "count", range = { 1, 2 ^ 53 } },
  seed = { "count", range = { 1, 2 ^ 53 - 1 }, to = "seed" },
  on_retry = { "function" }, on_error = { "function" }, on_event = { "function" }, yield = { "function" },
  transport = { "enum", values = "transport" },
  observe = { "function" },
  shared_dict = { "string", to = "transport.shared_dict" },
  -- telemetry (sturdy.log, sturdy.trace, sturdy.alerts): observers the client attaches
  logger = { "writer", names = { json = true, ngx = true } },
  log_level = { "enum", values = "log_level" },
  log_sample = { "number", range = { 0, 1 } },
  log_bodies = { "boolean" },
  on_span_start = { "function" }, on_span_end = { "function" },
  alerts = { "table" }, on_alert = { "function" },
  breaker = { or_false = "upstream.breaker", fields = {
    window = { "seconds", to = "upstream.breaker.window_ms" },
    buckets = { "count", range = { 1, 64 }, to = "upstream.breaker.buckets" },
    min_calls = { "count", range = { 1, 1e9 }, to = "upstream.breaker.min_calls" },
    failure_rate = { "number", range = { 0, 1 }, to = "upstream.breaker.failure_rate" },
    slow_call = { "seconds|false", to = "upstream.breaker.slow_call_ms" },
    slow_rate = { "number", range = { 0, 1 }, to = "upstream.breaker.slow_rate" },
    open_for = { "seconds", to = "upstream.breaker.open_ms" },
    max_open_for = { "seconds", to = "upstream.breaker.max_open_ms" },
    probes = { "count", range = { 1, 64 }, to = "upstream.breaker.probes" },
    probe_timeout = { "seconds", to = "upstream.breaker.probe_timeout_ms" },
    failure_classes = { "classes", to = "upstream.breaker.failure_classes" },
    mode = { "enum", values = "breaker_mode", to = "upstream.breaker.mode" },
  } },
  limits = { fields = {
    rpm = { "rate", to = "upstream.limits.requests" },
    tpm = { "rate", to = "upstream.limits.tokens" },
    itpm = { "rate", to = "upstream.limits.input_tokens" },
    otpm = { "rate", to = "upstream.limits.output_tokens" },
    -- a number goes to upstream.limits.concurrency, adaptive to upstream.adaptive (compile_concurrency)
    concurrency = { "concurrency", range = { 1, 1e6 } },
    queue = { "count", range = { 1, 1e7 }, to = "upstream.limits.queue" },
    burst = { "number", range = { 1e-3, 3600 }, to = "upstream.limits.burst_s" },
    max_pause = { "seconds", to = "upstream.limits.max_pause_ms" },
  } },
  -- limits and breakers shared by processes through Redis (sturdy.shared)
  shared = { fields = {
    redis = { "redis" },
    processes = { "count", range = { 1, 1e6 } },
    lease = { "count", range = { 1, 1000 } },
    sync = { "number", range = { 0.01, 1 } },
  } },
  -- spend caps (compile_budget): the client's, per key and per tag
  budget = { fields = {
    usd_per_hour = SPEND_CAPS.fields.usd_per_hour, usd_per_day = SPEND_CAPS.fields.usd_per_day,
    tokens_per_hour = SPEND_CAPS.fields.tokens_per_hour, tokens_per_day = SPEND_CAPS.fields.tokens_per_day,
    warn = SPEND_CAPS.fields.warn,
    settle_within = { "seconds" },
    keys = { "caps by name" },
    tags = { "caps by name" },
  } },
} }
options.CLIENT = CLIENT

--- The host (and port) of a URL, without any userinfo; nil for no URL.
function options.url_host(url)
  local host = url and url:match("^%a[%w+.-]*://([^/?#]+)")
  return host and (host:gsub("^.*@", ""))
end

local function deep_copy(t)
  if type(t) ~= "table" then return t end
  local c = {}
  for k, v in pairs(t) do c[k] = deep_copy(v) end
  return c
end

-- Sets compiled[path] (dotted) = v.
local function put(compiled, path, v)
  local t, last = compiled, nil
  for part in path:gmatch("[^.]+") do
    if last then
      t[last] = t[last] or {}
      t = t[last]
    end
    last = part
  end
  t[last] = v
end

function check_section(t, section, where, compiled, settings)
  if type(t) ~= "table" then fail("%s must be a table, got %s", where, type(t)) end
  for k, v in pairs(t) do
    local spec = section.fields[k]
    if spec == nil then fail("unknown option '%s' in %s", tostring(k), where) end
    local function bad(want)
      fail("option '%s' in %s must be %s, got %s", k, where, want, shown(v))
    end
    if spec.fields then
      if v == false and spec.or_false then
        put(compiled, spec.or_false, false)
      elseif type(v) ~= "table" then
        bad(spec.or_false and "a table or false" or "a table")
      else
        if spec.or_false == "upstream.breaker" then
          -- a breaker table starts from the defaults again (it may follow `false`)
          put(compiled, "upstream.breaker", deep_copy(options.DEFAULTS.upstream.breaker))
        elseif spec.or_false then
          put(compiled, spec.or_false, true)
        end
        settings[k] = settings[k] or {}
        check_section(v, spec, where .. "." .. k, compiled, settings[k])
      end
    else
      local value = KINDS[spec[1]](v, spec, bad, where .. "." .. k)
      if spec.to then
        if spec.scale then value = ceil(value * spec.scale) end
        put(compiled, spec.to, value)
      end
      settings[k] = value
    end
  end
end

options.DEFAULTS = policy.defaults()

-- retry_on / never_retry_on into the compiled per-class and per-status tables
local function compile_retry_lists(retry, compiled)
  for _, spec in ipairs { { retry.retry_on, true }, { retry.never_retry_on, false } } do
    for _, v in ipairs(spec[1] or {}) do
      if type(v) == "number" then
        compiled.retry.status_retried[v] = spec[2]
      else
        compiled.retry.retried[v] = spec[2]
      end
    end
  end
end

local DEFAULT_WARN = 0.8
local DEFAULT_SETTLE_MS = 60000

-- A number of limits.concurrency to the compiled cap, an adaptive one to upstream.adaptive.
local function compile_concurrency(limits, compiled)
  local c = limits and limits.concurrency
  if type(c) == "number" then
    compiled.upstream.limits.concurrency = c
  elseif type(c) == "table" then
    local a, out = c.adaptive, compiled.upstream.adaptive
    out.enabled = true
    out.min_limit = a.min or out.min_limit
    out.max_limit = a.max or out.max_limit
    if out.max_limit < out.min_limit then
      if a.max then
        fail("option 'max' in client options.limits.concurrency.adaptive must be at least %d, got %d",
             out.min_limit, a.max)
      end
      out.max_limit = out.min_limit
    end
    out.initial_limit = math.max(out.min_limit, math.min(out.max_limit, a.initial or out.initial_limit))
    out.window_ms = a.window or out.window_ms
    out.tolerance = a.tolerance or out.tolerance
  end
end

-- The scope's caps in the compiled shape; warn from the scope, else the budget's.
local function compile_caps(caps, warn)
  return { usd_per_hour = caps.usd_per_hour, usd_per_day = caps.usd_per_day,
           tokens_per_hour = caps.tokens_per_hour, tokens_per_day = caps.tokens_per_day,
           warn = caps.warn or warn }
end

local function compile_budget(budget, compiled)
  if not budget then return end
  local warn = budget.warn or DEFAULT_WARN
  local out = { settle_ms = budget.settle_within or DEFAULT_SETTLE_MS, keys = {}, tags = {} }
  if budget.usd_per_hour or budget.usd_per_day or budget.tokens_per_hour or budget.tokens_per_day then
    out.client = compile_caps(budget, warn)
  end
  for name, caps in pairs(budget.keys or {}) do out.keys[name] = compile_caps(caps, warn) end
  for name, caps in pairs(budget.tags or {}) do out.tags[name] = compile_caps(caps, warn) end
  compiled.budget = out
end

--- The header lines of a headers table ({ Name = value }), checked: names are
-- tokens, values strings or numbers (CR, LF and NUL are refused by the core).
local function header_lines(headers, where)
  local lines = {}
  for name, value in pairs(headers) do
    if type(name) ~= "string" or not name:find("^[%w!#$%%&'*+%-.^_`|~]+$") then
      fail("header name %s in %s is not a valid HTTP token", format("%q", tostring(name)), where)
    end
    if type(value) ~= "string" and type(value) ~= "number" then
      fail("header '%s' in %s must be a string, got %s", name, where, type(value))
    end
    lines[#lines + 1] = name .. ": " .. tostring(value)
  end
  return lines
end
options.header_lines = header_lines

--- Checks a client's options. Returns the compiled configuration (for the C
-- core) and the settings (every option given, converted; timeouts in ms).
function options.client(cfg)
  if cfg == nil then cfg = {} end
  local compiled = deep_copy(options.DEFAULTS)
  compiled.transport = {}
  local settings = {}
  check_section(cfg, CLIENT, "client options", compiled, settings)
  if cfg.retry then compile_retry_lists(cfg.retry, compiled) end
  compile_concurrency(settings.limits, compiled)
  compile_budget(settings.budget, compiled)
  for _, pair in ipairs { { "log_level", "logger" }, { "log_sample", "logger" }, { "log_bodies", "logger" },
                          { "on_alert", "alerts" } } do
    if cfg[pair[1]] ~= nil and cfg[pair[2]] == nil and not (pair[1] == "on_alert" and cfg.budget ~= nil) then
      fail("option '%s' needs option '%s'%s", pair[1], pair[2], pair[1] == "on_alert" and " or 'budget'" or "")
    end
  end
  if cfg.base_url and not cfg.base_url:find("^https?://[^/]") then
    fail("option 'base_url' must start with http:// or https:// and name a host, got %q",
         one_line(cfg.base_url, 80))
  end
  if cfg.base_url and cfg.base_url:find("%z") then fail("option 'base_url' contains a NUL byte") end
  if cfg.key and cfg.key:find("%c") then
    -- as a request's own key: it is shown in stats, events and errors
    fail("option 'key' contains a control character or NUL byte")
  end
  local breaker = compiled.upstream.breaker
  if breaker and breaker.max_open_ms < breaker.open_ms then
    -- the breaker would quietly raise the cap to open_for
    fail("option 'max_open_for' in client options.breaker (%gs) must be at least open_for (%gs)",
         breaker.max_open_ms / 1000, breaker.open_ms / 1000)
  end
  compiled.transport.headers = cfg.headers and header_lines(cfg.headers, "client headers") or {}
  local timeout = {}
  for name, spec in pairs(TIMEOUT.fields) do
    local v = settings.timeout and settings.timeout[name]
    if v == nil then v = seconds_to_ms(spec.default) end
    timeout[name] = v
  end
  settings.timeout_ms = timeout
  local base_url = cfg.base_url and cfg.base_url:gsub("/+$", "")
  compiled.client = {
    base_url = base_url, key = cfg.key or (base_url and options.url_host(base_url)),
    explicit_key = cfg.key ~= nil, timeout_ms = timeout, max_response = cfg.max_response,
  }
  return compiled, settings
end

options.classes = CLASS_SET
return options
