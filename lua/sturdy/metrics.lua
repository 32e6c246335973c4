--- Metrics in the Prometheus text exposition format (or OpenMetrics), for one
-- client or a registry shared by clients, caches and fallback chains.
--
--   local metrics = require "sturdy.metrics"
--   local registry = metrics.registry()
--   registry:observe(client)              -- as many clients as you like
--   registry:add_source(cache, { name = "answers" })   -- cache:stats(), chain:stats()
--   local text = registry:render()        -- or registry:render("openmetrics")
--
-- Names follow the OpenTelemetry GenAI and HTTP-client conventions, mapped to
-- Prometheus (dots to underscores, the unit as a suffix):
--
-- - `gen_ai_client_operation_duration_seconds` (histogram, OTel's advised
--   buckets 0.01 to 81.92 s): each call, from submit to its end, labels `key`,
--   `gen_ai_provider_name`, `gen_ai_operation_name`, `gen_ai_request_model`
--   (provider calls) and `error_type` (the error kind, on failures);
-- - `gen_ai_client_operation_time_to_first_chunk_seconds` (histogram, same
--   buckets): streamed calls, from submit to the first chunk;
-- - `gen_ai_client_token_usage_total` (counter): tokens of provider calls by
--   `gen_ai_token_type` (`input`, `output`, `cache_read`, `cache_write`),
--   labels as the duration's (a counter rather than OTel's per-call
--   histogram: token rates and totals are what one graphs, in 4 lines a key
--   rather than 60);
-- - `http_client_attempts_total` (counter): each attempt by `key`,
--   `http_response_status_code` and `error_type`.
--
-- sturdy's own, all per `key`:
--
-- - `sturdy_calls_total` by `class` (success, throttled, overloaded,
--   transient, timeout, fatal, canceled), `status` and `error_type`, as
--   the transport ended them (a 200 whose body a provider could not read
--   is a success here; logs and spans say it failed);
-- - `sturdy_retries_total` by `class`; `sturdy_throttled_total`: 429s
--   received (every attempt's); `sturdy_paced_total`: attempts the rate
--   limiter held back;
-- - `sturdy_breaker_state` (0 closed, 1 half-open, 2 open) and
--   `sturdy_breaker_transitions_total` by `from` and `to`;
-- - `sturdy_ratelimit_limit` and `sturdy_ratelimit_remaining` by `dimension`
--   (requests, tokens, input_tokens, output_tokens; learned from headers or
--   configured), `sturdy_ratelimit_paused_seconds`;
-- - `sturdy_queue_depth`, `sturdy_in_flight`;
-- - `sturdy_cost_usd_total` by `gen_ai_provider_name`, `gen_ai_request_model`;
-- - from sources: `sturdy_cache_requests_total` by `cache`, `target`,
--   `result` (hit, miss, stale, bypass), `sturdy_cache_entries`;
--   `sturdy_fallback_target_calls_total` by `chain`, `target`, `outcome`
--   (success, failure, skipped), `sturdy_fallbacks_total` (calls that moved on
--   from a target) by `chain`, `target`, `sturdy_fallback_calls_total` by
--   `chain`, `outcome` (answered, failed, degraded).
--
-- Label values are bounded: at most `max_keys` keys, `max_models` models and
-- `max_targets` targets (100 each by default); later ones fold into
-- `other`. Values are printable ASCII (others become `_`), at most 128 bytes.
-- Nothing from a request or a reply body, no header and no secret is a label.
--
-- Inside nginx, `registry{ shared = "dict" }` keeps the counts in that
-- `lua_shared_dict` (every worker adds to the same counters) and each worker
-- publishes its clients' gauges there every `interval` seconds (1), so one
-- scrape of any worker sees the whole nginx: gauges are summed over workers
-- (queue, in-flight, paced), or their maximum (breaker state, limits) or
-- minimum (remaining) is shown.
-- @module sturdy.metrics
local metrics = {}

local type, pairs, ipairs, tostring, tonumber = type, pairs, ipairs, tostring, tonumber
local setmetatable, pcall, next = setmetatable, pcall, next
local format, concat, sort = string.format, table.concat, table.sort
local huge, floor = math.huge, math.floor

local function fail(msg, ...)
  error("sturdy: " .. format(msg, ...), 0)
end

--- Content types of the two formats.
metrics.CONTENT_TYPES = {
  prometheus = "text/plain; version=0.0.4; charset=utf-8",
  openmetrics = "application/openmetrics-text; version=1.0.0; charset=utf-8",
}

-- A number as Prometheus reads it: integers plain, others in the fewest digits
-- that read back the same.
local function number_text(v)
  if v ~= v then return "NaN" end
  if v == huge then return "+Inf" end
  if v == -huge then return "-Inf" end
  if v == floor(v) and v > -1e15 and v < 1e15 then return format("%d", v) end
  local s = format("%.15g", v)
  if tonumber(s) ~= v then
    s = format("%.16g", v)
    if tonumber(s) ~= v then s = format("%.17g", v) end
  end
  return s
end
metrics.number_text = number_text

-- OTel's advised buckets
local DURATION_BUCKETS = { 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92 }
metrics.BUCKETS = DURATION_BUCKETS

local CALL_LABELS = { "key", "gen_ai_provider_name", "gen_ai_operation_name", "gen_ai_request_model", "error_type" }
local MODEL_LABELS = { "key", "gen_ai_provider_name", "gen_ai_operation_name", "gen_ai_request_model" }

-- Every family: name (the sample name; counters end in _total), type, help,
-- labels, buckets (histograms), merge (how gauges of several clients or
-- workers combine: sum, max or min).
local FAMILIES = {
  { "gen_ai_client_operation_duration_seconds", "histogram",
    "GenAI operation duration: each call from submit to its end.", CALL_LABELS, buckets = DURATION_BUCKETS },
  { "gen_ai_client_operation_time_to_first_chunk_seconds", "histogram",
    "Time from submit to the first chunk of a streamed call.", MODEL_LABELS, buckets = DURATION_BUCKETS },
  { "gen_ai_client_token_usage_total", "counter", "Tokens of provider calls, by token type.",
    { "key", "gen_ai_provider_name", "gen_ai_operation_name", "gen_ai_request_model", "gen_ai_token_type" } },
  { "http_client_attempts_total", "counter", "HTTP attempts, by status and error type.",
    { "key", "http_response_status_code", "error_type" } },
  { "sturdy_calls_total", "counter", "Calls ended, by outcome class, status and error type.",
    { "key", "class", "status", "error_type" } },
  { "sturdy_retries_total", "counter", "Attempts retried, by the class of their outcome.", { "key", "class" } },
  { "sturdy_throttled_total", "counter", "Attempts answered 429.", { "key" } },
  { "sturdy_paced_total", "counter", "Attempts the rate limiter held back before sending.", { "key" }, merge = "sum" },
  { "sturdy_breaker_state", "gauge", "Circuit breaker state: 0 closed, 1 half-open, 2 open.", { "key" },
    merge = "max" },
  { "sturdy_breaker_transitions_total", "counter", "Circuit breaker state changes.", { "key", "from", "to" } },
  { "sturdy_ratelimit_limit", "gauge", "Rate limit per minute, learned from headers or configured.",
    { "key", "dimension" }, merge = "max" },
  { "sturdy_ratelimit_remaining", "gauge", "What the rate limit has left, as the server last said.",
    { "key", "dimension" }, merge = "min" },
  { "sturdy_ratelimit_paused_seconds", "gauge", "Seconds until a key paused by a 429 may send again.",
    { "key" }, merge = "max" },
  { "sturdy_queue_depth", "gauge", "Calls waiting for their turn.", { "key" }, merge = "sum" },
  { "sturdy_in_flight", "gauge", "Calls in flight.", { "key" }, merge = "sum" },
  { "sturdy_cost_usd_total", "counter", "Cost of provider calls in US dollars, from sturdy.prices.", MODEL_LABELS },
  { "sturdy_cache_requests_total", "counter", "Cache lookups, by result.", { "cache", "target", "result" },
    merge = "sum" },
  { "sturdy_cache_entries", "gauge", "Entries in the cache.", { "cache" }, merge = "sum" },
  { "sturdy_fallback_target_calls_total", "counter", "Calls a fallback chain sent to each target, by outcome.",
    { "chain", "target", "outcome" }, merge = "sum" },
  { "sturdy_fallbacks_total", "counter", "Calls that moved on from a target to the next.", { "chain", "target" },
    merge = "sum" },
  { "sturdy_fallback_calls_total", "counter", "Calls to a fallback chain, by outcome.", { "chain", "outcome" },
    merge = "sum" },
}

local FAMILY = {}
for i, f in ipairs(FAMILIES) do
  f.name, f.type, f.help, f.labels, f.index = f[1], f[2], f[3], f[4], i
  -- OpenMetrics names a counter family without its _total
  f.family = f.type == "counter" and f.name:gsub("_total$", "") or f.name
  f.head = {}
  for fmt, head in pairs { prometheus = f.name, openmetrics = f.family } do
    f.head[fmt] = "# HELP " .. head .. " " .. f.help .. "\n# TYPE " .. head .. " " .. f.type .. "\n"
  end
  if f.buckets then
    f.le = {}
    for j, b in ipairs(f.buckets) do f.le[j] = number_text(b) end
    f.le[#f.buckets + 1] = "+Inf"
  end
  FAMILY[f.name] = f
end
metrics.FAMILIES = FAMILIES


-- Label values: printable ASCII, escaped, at most 128 bytes.
local function label_value(v)
  v = tostring(v)
  if #v > 128 then v = v:sub(1, 128) end
  if v:find("[^ !#-Z%[%]^-~]") then -- not printable ASCII, or a quote or backslash
    v = v:gsub("[^\32-\126]", "_"):gsub('[\\"]', "\\%0")
  end
  return v
end
metrics.label_value = label_value

-- The label text ('a="x",b="y"') of values in the family's label order; nil values are left out.
local function label_text(f, values)
  local parts = {}
  for i, name in ipairs(f.labels) do
    local v = values[i]
    if v ~= nil then parts[#parts + 1] = name .. '="' .. label_value(v) .. '"' end
  end
  return concat(parts, ",")
end

-- ---------------------------------------------------------------------------
-- Series: the numbers behind the text. A counter or gauge series is
-- { labels, value }; a histogram series { labels, counts (per bucket, not
-- cumulative, +Inf last), sum, count }. Rendering adds text (the series'
-- lines, dropped when its numbers change) and the fixed parts of its lines
-- (prefix, or a histogram's parts).
-- ---------------------------------------------------------------------------

-- data[i]: family i's series by label text; data.count[i]: how many.
-- data.dirty[i]: a series of family i changed, came or went since the last render.
local function new_data()
  local data = { count = {}, dirty = {}, round = 0 }
  for i = 1, #FAMILIES do data[i], data.count[i], data.dirty[i] = {}, 0, true end
  return data
end

local function series_of(data, f, labels)
  local fam = data[f.index]
  local s = fam[labels]
  if s then return s end
  if f.buckets then
    local counts = {}
    for i = 1, #f.buckets + 1 do counts[i] = 0 end
    s = { labels = labels, counts = counts, sum = 0, count = 0 }
  else
    s = { labels = labels, value = 0 }
  end
  fam[labels] = s
  data.count[f.index] = data.count[f.index] + 1
  data.dirty[f.index] = true
  return s
end

-- The bucket a value falls in (the first bound >= v; +Inf last).
local function bucket_of(buckets, v)
  local lo, hi = 1, #buckets + 1
  while lo < hi do
    local mid = floor((lo + hi) / 2)
    if v <= buckets[mid] then hi = mid else lo = mid + 1 end
  end
  return lo
end

-- ---------------------------------------------------------------------------
-- Stores: where record-driven counts go. The memory store is the series
-- itself; the ngx store adds into a shared dict under flat keys
-- "<family index>\1<labels>\1<slot>", slot "v" (value), "s" (sum), "c"
-- (count) or a bucket number.
-- ---------------------------------------------------------------------------

local MemoryStore = {}
MemoryStore.__index = MemoryStore

-- (a series' text is kept until its numbers change)
function MemoryStore:add(f, labels, v)
  local data = self.data
  local s = series_of(data, f, labels)
  s.value, s.text = s.value + v, nil
  data.dirty[f.index] = true
end

function MemoryStore:observe(f, labels, v)
  local data = self.data
  local s = series_of(data, f, labels)
  local b = bucket_of(f.buckets, v)
  s.counts[b] = s.counts[b] + 1
  s.sum, s.count, s.text = s.sum + v, s.count + 1, nil
  data.dirty[f.index] = true
end

function MemoryStore:snapshot()
  return self.data
end

local NgxStore = {}
NgxStore.__index = NgxStore

local SEP = "\1"

function NgxStore:incr(k, v)
  local _, err = self.dict:incr(k, v, 0)
  if err then self.errors = self.errors + 1 end
end

function NgxStore:add(f, labels, v)
  self:incr(f.index .. SEP .. labels .. SEP .. "v", v)
end

function NgxStore:observe(f, labels, v)
  local prefix = f.index .. SEP .. labels .. SEP
  self:incr(prefix .. bucket_of(f.buckets, v), 1)
  self:incr(prefix .. "s", v)
  self:incr(prefix .. "c", 1)
end

-- Gauges of this worker: "g\1<worker>\1<family>\1<labels>", expiring so
-- that a worker gone stops counting.
function NgxStore:publish(gauges, ttl)
  local dict, worker = self.dict, self.worker
  for index = 1, #FAMILIES do
    for labels, s in pairs(gauges[index]) do
      dict:set("g" .. SEP .. worker .. SEP .. index .. SEP .. labels, s.value, ttl)
    end
  end
end

-- The counts of every worker as series, and the published gauges merged.
function NgxStore:snapshot()
  local data, gauges = new_data(), new_data()
  local dict = self.dict
  for _, k in ipairs(dict:get_keys(0)) do
    local v = dict:get(k)
    if type(v) == "number" then
      if k:sub(1, 2) == "g" .. SEP then
        local index, labels = k:match("^g\1[^\1]*\1(%d+)\1(.*)$")
        local f = FAMILIES[tonumber(index)]
        if f then
          local fam = gauges[f.index]
          local s = fam[labels]
          if not s then
            fam[labels] = { labels = labels, value = v }
            gauges.count[f.index] = gauges.count[f.index] + 1
          elseif f.merge == "max" then
            if v > s.value then s.value = v end
          elseif f.merge == "min" then
            if v < s.value then s.value = v end
          else
            s.value = s.value + v
          end
        end
      else
        local index, labels, slot = k:match("^(%d+)\1(.*)\1([^\1]+)$")
        local f = FAMILIES[tonumber(index)]
        if f then
          local s = series_of(data, f, labels)
          if slot == "v" then
            s.value = s.value + v
          elseif slot == "s" then
            s.sum = s.sum + v
          elseif slot == "c" then
            s.count = s.count + v
          elseif f.buckets then
            local b = tonumber(slot)
            if b and s.counts[b] then s.counts[b] = s.counts[b] + v end
          end
        end
      end
    end
  end
  return data, gauges
end

-- ---------------------------------------------------------------------------
-- The registry
-- ---------------------------------------------------------------------------

--- A registry: counts from the clients it observes, gauges read from their
-- stats, and the stats of the sources added.
-- @type Registry
local Registry = {}
Registry.__index = Registry
metrics.Registry = Registry

local OPTIONS = { max_keys = "count", max_models = "count", max_targets = "count", shared = "string",
                  interval = "number" }

local function check_options(opts)
  if type(opts) ~= "table" then fail("metrics.registry takes a table of options, got %s", type(opts)) end
  for k, v in pairs(opts) do
    local want = OPTIONS[k]
    if not want then fail("unknown option '%s' in metrics.registry", tostring(k)) end
    if want == "count" then
      if type(v) ~= "number" or v < 1 or v > 1e6 or v ~= floor(v) then
        fail("option '%s' in metrics.registry must be a whole number from 1 to 1000000, got %s", k, tostring(v))
      end
    elseif want == "number" then
      if type(v) ~= "number" or not (v >= 0.01 and v <= 3600) then
        fail("option '%s' in metrics.registry must be seconds from 0.01 to 3600, got %s", k, tostring(v))
      end
    elseif type(v) ~= want then
      fail("option '%s' in metrics.registry must be a %s, got %s", k, want, type(v))
    end
  end
end

--- Makes a registry. opts: `max_keys`, `max_models`, `max_targets` (label
-- bounds, 100 each), `shared` (the name of a lua_shared_dict: inside nginx,
-- counts of every worker in one place), `interval` (seconds between a
-- worker's gauge publications with `shared`, 1).
function metrics.registry(opts)
  opts = opts or {}
  check_options(opts)
  local self = setmetatable({
    clients = {}, sources = {},
    bounds = { key = opts.max_keys or 100, model = opts.max_models or 100, target = opts.max_targets or 100 },
    seen = { key = {}, model = {}, target = {} }, admitted = { key = 0, model = 0, target = 0 },
    labels = {}, -- label text cache: family index -> joined raw values -> text
    orders = {}, -- each family's series in label order
    key_labels = {}, -- a key's gauge label texts
    rendered = {}, -- the text of the last render in each format, while nothing changed
    gauge_data = new_data(),
    interval = opts.interval or 1,
  }, Registry)
  if opts.shared then
    local ngx_ = rawget(_G, "ngx")
    local dict = type(ngx_) == "table" and ngx_.shared and ngx_.shared[opts.shared]
    if not dict then fail("option 'shared' in metrics.registry: no lua_shared_dict named %q", opts.shared) end
    self.store = setmetatable({ dict = dict, errors = 0, worker = tostring(ngx_.worker.pid()) }, NgxStore)
  else
    self.store = setmetatable({ data = new_data() }, MemoryStore)
  end
  return self
end

-- A bounded label value: the value while fewer than the bound have been
-- seen (or it was seen before), else "other".
function Registry:_bound(kind, v)
  if v == nil then return nil end
  local seen = self.seen[kind]
  if seen[v] then return v end
  if self.admitted[kind] >= self.bounds[kind] then return "other" end
  self.admitted[kind] = self.admitted[kind] + 1
  seen[v] = true
  return v
end

-- The label text for values of family f, cached (the hot path sees the same few sets).
function Registry:_labels(f, a, b, c, d, e)
  local cache = self.labels[f.index]
  if not cache then
    cache = {}
    self.labels[f.index] = cache
  end
  local k = concat({ tostring(a), tostring(b), tostring(c), tostring(d), tostring(e) }, "\0")
  local text = cache[k]
  if not text then
    text = label_text(f, { a, b, c, d, e })
    if next(cache) and self.label_count and self.label_count > 100000 then
      -- far more label sets than the bounds allow: something varies; start over
      self.labels, self.label_count = {}, 0
    end
    cache[k] = text
    self.label_count = (self.label_count or 0) + 1
  end
  return text
end

local TOKEN_TYPES = { "input", "output", "cache_read", "cache_write" }

--- The observer that counts a client's records (registry:observe adds it;
-- use this to add it to a client yourself).
function Registry:observer()
  local abouts = setmetatable({}, { __mode = "k" })     -- handle -> what the request is
  local replies = setmetatable({}, { __mode = "k" })    -- response -> what its request was
  local about_of = require("sturdy.provider").about
  local store = self.store
  local F = FAMILY
  return function(rec)
    local t = rec.type
    if t == "start" then
      local req = rec.request
      if type(req) == "table" then
        local about = rec.about or about_of(req)
        local json = type(req.json) == "table" and req.json
        local model = about and about.model or (json and type(json.model) == "string" and json.model or nil)
        if about or model or req.on_data then
          abouts[rec.handle] = { about = about, model = model, streamed = req.on_data ~= nil }
        end
      end
    elseif t == "call" then
      local seen = rec.handle and abouts[rec.handle]
      local about = seen and seen.about
      local key = self:_bound("key", rec.key or "none")
      local model = self:_bound("model", seen and seen.model)
      local provider, operation = about and about.provider, about and about.operation
      local kind = rec.kind
      if rec.latency then
        store:observe(F.gen_ai_client_operation_duration_seconds,
                      self:_labels(F.gen_ai_client_operation_duration_seconds, key, provider, operation, model, kind),
                      rec.latency)
      end
      store:add(F.sturdy_calls_total, self:_labels(F.sturdy_calls_total, key, rec.class or "success",
                                                   rec.status, kind), 1)
      local attempts = rec.attempts or {}
      for i = 1, #attempts do
        local a = attempts[i]
        if a.status or a.kind ~= "circuit_open" then -- an attempt the breaker refused was never sent
          store:add(F.http_client_attempts_total, self:_labels(F.http_client_attempts_total, key, a.status, a.kind), 1)
        end
        if a.status == 429 then store:add(F.sturdy_throttled_total, self:_labels(F.sturdy_throttled_total, key), 1) end
      end
      if seen and seen.streamed and rec.ok then
        local last = attempts[#attempts]
        if last and last.latency and last.ttfb and rec.latency then
          local ttft = rec.latency - last.latency + last.ttfb
          local f = F.gen_ai_client_operation_time_to_first_chunk_seconds
          store:observe(f, self:_labels(f, key, provider, operation, model), ttft > 0 and ttft or 0)
        end
      end
      if rec.response and about then replies[rec.response] = seen end
    elseif t == "retry" then
      store:add(F.sturdy_retries_total, self:_labels(F.sturdy_retries_total, self:_bound("key", rec.key or "none"),
                                                     rec.class), 1)
    elseif t == "breaker" then
      local f = F.sturdy_breaker_transitions_total
      store:add(f, self:_labels(f, self:_bound("key", rec.key or "none"), rec.from, rec.to), 1)
    elseif t == "usage" then
      local seen = rec.response and replies[rec.response]
      local about = seen and seen.about
      local key = self:_bound("key", rec.key or "none")
      local model = self:_bound("model", seen and seen.model)
      local provider, operation = about and about.provider, about and about.operation
      local usage = rec.usage or {}
      local f = F.gen_ai_client_token_usage_total
      for _, kind in ipairs(TOKEN_TYPES) do
        local n = tonumber(usage[kind])
        if n and n == n and n >= 0 and n < huge and (n > 0 or kind == "input" or kind == "output") then
          store:add(f, self:_labels(f, key, provider, operation, model, kind), n)
        end
      end
      local cost = tonumber(rec.cost)
      if cost and cost == cost and cost >= 0 and cost < huge then
        store:add(F.sturdy_cost_usd_total, self:_labels(F.sturdy_cost_usd_total, key, provider, operation, model),
                  cost)
      end
    end
  end
end

--- Counts client's calls and reads its gauges at each render. Returns the
-- registry. With `shared`, inside nginx, the worker also publishes the
-- client's gauges every `interval` seconds.
function Registry:observe(client)
  if type(client) ~= "table" or type(client.observe) ~= "function" or type(client.stats) ~= "function" then
    fail("registry:observe takes a sturdy client, got %s", type(client))
  end
  client:observe(self:observer())
  self.clients[#self.clients + 1] = client
  if self.store.dict and not self.timer then
    local ngx_ = rawget(_G, "ngx")
    local ok = ngx_.timer.every(self.interval, function(premature)
      if not premature then self:publish() end
    end)
    self.timer = ok
  end
  return self
end

local SOURCE_OPTIONS = { name = "string" }

--- Adds a source of counts read at each render: an object with `stats()`,
-- such as a cache (`sturdy.cache`: hits, misses, stale, bypass and
-- entries, per target when it has them) or a fallback chain
-- (`sturdy.fallback`: calls, answered, failed, degraded, and per target
-- calls, successes, failures, skipped, fallbacks). opts: `name` (the
-- `cache` or `chain` label; default its `name` field, else "default").
-- Returns the registry.
function Registry:add_source(obj, opts)
  if type(obj) ~= "table" or type(obj.stats) ~= "function" then
    fail("registry:add_source takes an object with a stats method, got %s", type(obj))
  end
  opts = opts or {}
  if type(opts) ~= "table" then fail("registry:add_source options must be a table, got %s", type(opts)) end
  for k, v in pairs(opts) do
    if not SOURCE_OPTIONS[k] then fail("unknown option '%s' in registry:add_source", tostring(k)) end
    if type(v) ~= SOURCE_OPTIONS[k] then fail("option '%s' in registry:add_source must be a string", k) end
  end
  local name = opts.name or (type(obj.name) == "string" and obj.name) or "default"
  self.sources[#self.sources + 1] = { obj = obj, name = name }
  return self
end

local BREAKER_STATES = { closed = 0, half_open = 1, open = 2, forced_open = 2 }
local DIMENSIONS = { "requests", "tokens", "input_tokens", "output_tokens" }

-- Sets gauge (family f, labels) from one more client or worker, merged by
-- the family's rule. gauges.round marks the series set in this render
-- (gauges.set counts them); a series keeps its text while its value stays
-- the same.
local function put_gauge(gauges, f, labels, v)
  if v == nil or v ~= v then return end
  local index = f.index
  local fam = gauges[index]
  local s = fam[labels]
  local round = gauges.round
  if not s then
    fam[labels] = { labels = labels, value = v, round = round }
    gauges.count[index] = gauges.count[index] + 1
    gauges.dirty[index] = true
    gauges.set = gauges.set + 1
    return
  end
  local old = s.value
  if s.round ~= round then
    s.round = round
    gauges.set = gauges.set + 1
    if old == v then return end
  elseif f.merge == "max" then
    if v <= old then return end
  elseif f.merge == "min" then
    if v >= old then return end
  else
    v = old + v
  end
  s.value, s.text = v, nil
  gauges.dirty[index] = true
end

-- Drops the gauges not set in this render (a key gone, a client closed).
local function drop_stale(gauges)
  local round, count = gauges.round, 0
  for i = 1, #FAMILIES do count = count + gauges.count[i] end
  if gauges.set == count then return end -- every one was set
  for i = 1, #FAMILIES do
    local fam = gauges[i]
    for labels, s in pairs(fam) do
      if s.round ~= round then
        fam[labels] = nil
        gauges.count[i] = gauges.count[i] - 1
        gauges.dropped = (gauges.dropped or 0) + 1
        gauges.dirty[i] = true
      end
    end
  end
end

-- The label texts of a key's gauges, made once per key.
function Registry:_key_labels(key)
  local t = self.key_labels[key]
  if t then return t end
  local F = FAMILY
  t = { key = self:_labels(F.sturdy_in_flight, key), dims = {} }
  for _, dim in ipairs(DIMENSIONS) do t.dims[dim] = self:_labels(F.sturdy_ratelimit_limit, key, dim) end
  self.key_labels[key] = t
  return t
end

-- The gauges of the observed clients and the counts of the sources, into
-- the registry's gauge series (kept between renders).
function Registry:_gauges()
  local gauges = self.gauge_data
  gauges.round, gauges.set = gauges.round + 1, 0
  local F = FAMILY
  local live = {}
  for _, client in ipairs(self.clients) do
    local ok, total = pcall(client.stats, client)
    if ok then
      live[#live + 1] = client
      for _, k in ipairs(total.keys or {}) do
        local s = client:stats(k, "gauges")
        if s then
          local key = self:_bound("key", k)
          local labels = self:_key_labels(key)
          local kl = labels.key
          put_gauge(gauges, F.sturdy_in_flight, kl, s.in_flight)
          put_gauge(gauges, F.sturdy_queue_depth, kl, s.queued)
          put_gauge(gauges, F.sturdy_paced_total, kl, s.paced)
          if s.breaker then put_gauge(gauges, F.sturdy_breaker_state, kl, BREAKER_STATES[s.breaker.state]) end
          local limits = s.limits
          if limits then
            put_gauge(gauges, F.sturdy_ratelimit_paused_seconds, kl, tonumber(limits.paused_for) or 0)
            if key ~= "other" then
              for _, dim in ipairs(DIMENSIONS) do
                local l = limits[dim]
                if l then
                  local dl = labels.dims[dim]
                  put_gauge(gauges, F.sturdy_ratelimit_limit, dl, l.limit)
                  put_gauge(gauges, F.sturdy_ratelimit_remaining, dl, l.remaining)
                end
              end
            end
          end
        end
      end
    end
  end
  self.clients = live -- a closed client is dropped
  for _, src in ipairs(self.sources) do self:_source(gauges, src) end
  drop_stale(gauges)
  return gauges
end

local CACHE_RESULTS = { hits = "hit", misses = "miss", stale = "stale", bypass = "bypass" }

function Registry:_source(gauges, src)
  local ok, s = pcall(src.obj.stats, src.obj)
  if not ok or type(s) ~= "table" then return end
  local F = FAMILY
  local name = src.name
  local targets = type(s.targets) == "table" and s.targets or {}
  if s.hits ~= nil or s.misses ~= nil then
    local f = F.sturdy_cache_requests_total
    if next(targets) then
      for target, t in pairs(targets) do
        local tl = self:_bound("target", target)
        for field, result in pairs(CACHE_RESULTS) do
          put_gauge(gauges, f, self:_labels(f, name, tl, result), tonumber(t[field]))
        end
      end
    else
      for field, result in pairs(CACHE_RESULTS) do
        put_gauge(gauges, f, self:_labels(f, name, nil, result), tonumber(s[field]))
      end
    end
    put_gauge(gauges, F.sturdy_cache_entries, self:_labels(F.sturdy_cache_entries, name), tonumber(s.entries))
  elseif s.answered ~= nil or s.failed ~= nil then
    local f = F.sturdy_fallback_target_calls_total
    for target, t in pairs(targets) do
      local tl = self:_bound("target", target)
      put_gauge(gauges, f, self:_labels(f, name, tl, "success"), tonumber(t.successes))
      put_gauge(gauges, f, self:_labels(f, name, tl, "failure"), tonumber(t.failures))
      put_gauge(gauges, f, self:_labels(f, name, tl, "skipped"), tonumber(t.skipped))
      put_gauge(gauges, F.sturdy_fallbacks_total, self:_labels(F.sturdy_fallbacks_total, name, tl),
                tonumber(t.fallbacks))
    end
    local fc = F.sturdy_fallback_calls_total
    for _, outcome in ipairs { "answered", "failed", "degraded" } do
      put_gauge(gauges, fc, self:_labels(fc, name, outcome), tonumber(s[outcome]))
    end
  end
end

--- With `shared` inside nginx: writes this worker's gauges to the dict now
-- (the timer does it every `interval` seconds; render does it first).
function Registry:publish()
  if self.store.dict then self.store:publish(self:_gauges(), self.interval * 3) end
end

-- ---------------------------------------------------------------------------
-- Rendering
-- ---------------------------------------------------------------------------

-- The text of a histogram series. Its lines' fixed parts (name, labels, le)
-- are made once, in parts, between the slots of its numbers.
local function histogram_text(f, s)
  local parts = s.parts
  if not parts then
    parts = {}
    local name, labels = f.name, s.labels
    local sep = labels == "" and "" or ","
    for i, le in ipairs(f.le) do
      parts[2 * i - 1] = (i == 1 and "" or "\n") .. name .. "_bucket{" .. labels .. sep .. 'le="' .. le .. '"} '
    end
    local braces = labels == "" and " " or "{" .. labels .. "} "
    local n = 2 * #f.le
    parts[n + 1] = "\n" .. name .. "_sum" .. braces
    parts[n + 3] = "\n" .. name .. "_count" .. braces
    parts[n + 5] = "\n"
    s.parts = parts
  end
  -- counts are whole numbers below 2^53: Lua writes them plainly
  local acc, counts, n = 0, s.counts, #f.le
  for i = 1, n do
    acc = acc + counts[i]
    parts[2 * i] = acc
  end
  parts[2 * n + 2] = number_text(s.sum)
  parts[2 * n + 4] = s.count
  return concat(parts)
end

local function value_text(f, s)
  local prefix = s.prefix
  if not prefix then
    local labels = s.labels
    prefix = labels == "" and f.name .. " " or f.name .. "{" .. labels .. "} "
    s.prefix = prefix
  end
  return prefix .. number_text(s.value) .. "\n"
end

-- The series of a family in label order, sorted again only when one was added or dropped.
local function ordered(orders, f, fam, count, round)
  local o = orders[f.index]
  if o and o.fam == fam and o.count == count and o.round == round then return o.list end
  local list = {}
  for labels in pairs(fam) do list[#list + 1] = labels end
  sort(list)
  orders[f.index] = { fam = fam, count = count, list = list, round = round }
  return list
end

-- Whether a series of data changed, came or went since the last render; clears the marks.
local function take_dirty(data)
  local dirty, any = data.dirty, false
  for i = 1, #FAMILIES do
    if dirty[i] then dirty[i], any = false, true end
  end
  return any
end

--- The metrics as text: format "prometheus" (the text exposition format
-- 0.0.4, the default) or "openmetrics" (OpenMetrics 1.0.0, ending in `# EOF`).
function Registry:render(fmt)
  fmt = fmt or "prometheus"
  if fmt ~= "prometheus" and fmt ~= "openmetrics" then
    fail("registry:render takes \"prometheus\" or \"openmetrics\", got %s", tostring(fmt))
  end
  local data, gauges
  if self.store.dict then
    self:publish()
    data, gauges = self.store:snapshot()
  else
    data, gauges = self.store:snapshot(), self:_gauges()
  end
  -- the text of the last render stands while nothing changed; otherwise a
  -- series' text is made again only when its numbers changed
  local changed = take_dirty(data)
  changed = take_dirty(gauges) or changed
  if changed then self.rendered = {} end
  local text = self.rendered[fmt]
  if text then return text end
  local out, n, orders = {}, 0, self.orders
  for i, f in ipairs(FAMILIES) do
    local from = f.merge and gauges or data
    local count = from.count[i]
    if count > 0 then
      local fam = from[i]
      -- gauges' order is made again when the set of series may have changed (a round dropped some)
      local list = ordered(orders, f, fam, count, f.merge and from.dropped or 0)
      local make = f.buckets and histogram_text or value_text
      n = n + 1
      out[n] = f.head[fmt]
      for j = 1, #list do
        local s = fam[list[j]]
        local series = s.text
        if not series then
          series = make(f, s)
          s.text = series
        end
        out[n + j] = series
      end
      n = n + #list
    end
  end
  if fmt == "openmetrics" then out[n + 1] = "# EOF\n" end
  text = concat(out)
  self.rendered[fmt] = text
  return text
end

--- The content type for a format ("prometheus" or "openmetrics").
function Registry.content_type(_, fmt)
  return metrics.CONTENT_TYPES[fmt or "prometheus"]
end

--- Inside nginx (content phase): answers the scrape, in OpenMetrics when the
-- Accept header asks for it.
function Registry:serve()
  local ngx_ = rawget(_G, "ngx")
  if type(ngx_) ~= "table" then fail("registry:serve runs only inside nginx") end
  local accept = ngx_.var.http_accept or ""
  local fmt = accept:find("application/openmetrics-text", 1, true) and "openmetrics" or "prometheus"
  ngx_.header["Content-Type"] = metrics.CONTENT_TYPES[fmt]
  ngx_.print(self:render(fmt))
end

--- A registry observing one client (a shortcut for registry(opts):observe(client)).
function metrics.for_client(client, opts)
  return metrics.registry(opts):observe(client)
end

return metrics
