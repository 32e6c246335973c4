--- What logs, spans and alerts share: the client's records joined into one
-- view per call, and the client options that attach them.
--
-- A client's observers hear a call in pieces: `start` (before it is sent),
-- `retry` (each attempt that is retried), `call` (its end at the transport),
-- and for provider calls then `usage` or `reply_failed` (the reply read).
-- `telemetry.calls` joins them: `on_start(call)` at the start and
-- `on_end(call)` once the call is over, with the usage of a provider call
-- when its reply was read.
--
-- A call view: `key`, `about` (what a provider says the request is:
-- provider, operation, model, max_tokens; nil for a plain request),
-- `streamed`, `t0` (monotonic seconds at the start), `wall0` (epoch seconds
-- at the start), `ok`, `status`, `kind`, `class`, `error` (a sturdy.Error),
-- `attempts` (each `{ status, kind, delay, hinted, ttfb, latency }`),
-- `latency`, `ttfb`, `ttft` (a stream's time to its first chunk),
-- `request_id`, `response_model`, `usage` (`{ input, output, cache_read,
-- cache_write }`), `cost`, `stop_reason`, `record` (the call record),
-- `secrets` (the secret header values it was sent with, for scrubbing).
-- Never the prompt or the reply.
-- @module sturdy.telemetry
local policy = require "sturdy.policy"

local telemetry = {}

local type, pairs, setmetatable = type, pairs, setmetatable
local format = string.format

local monotime, walltime = policy.monotime, policy.walltime
telemetry.monotime, telemetry.walltime = monotime, walltime

local function fail(msg, ...)
  error("sturdy: " .. format(msg, ...), 0)
end

--- The host, port and model in an upstream key "host[:port]/model" (any
-- part may be nil: a key of the caller's own naming has no such shape).
function telemetry.split_key(key)
  if type(key) ~= "string" then return nil end
  local host, model = key:match("^([^/]+)/(.+)$")
  host = host or key
  local name, port = host:match("^%[?([^%]]*)%]?:(%d+)$")
  if name then return name, tonumber(port), model end
  return host, nil, model
end

-- Random bytes for ids: /dev/urandom read 4 KiB at a time, so ids differ
-- between processes whatever the Lua's own seed; math.random without it.
local pool, pool_at = "", 1

local function random_bytes(n)
  if pool_at + n - 1 > #pool then
    local f = io.open("/dev/urandom", "rb")
    pool = f and f:read(4096) or ""
    if f then f:close() end
    pool_at = 1
    if #pool < n then
      local t = {}
      for i = 1, n do t[i] = string.char(math.random(0, 255)) end
      return table.concat(t)
    end
  end
  local s = pool:sub(pool_at, pool_at + n - 1)
  pool_at = pool_at + n
  return s
end

--- n random bytes as 2n lowercase hex digits (trace, span and log ids).
function telemetry.random_hex(n)
  return (random_bytes(n):gsub(".", function(c) return format("%02x", c:byte()) end))
end

-- Header names whose values are secrets: scrubbed from anything written.
local function secret_header(name)
  name = name:lower()
  return name == "authorization" or name == "proxy-authorization" or name == "cookie"
    or name:find("key", 1, true) ~= nil or name:find("token", 1, true) ~= nil
    or name:find("secret", 1, true) ~= nil or name:find("auth", 1, true) ~= nil
end

--- Adds to list (made when nil) the secret values in a headers table: those
-- of authorization, cookie and *key* / *token* / *secret* / *auth* headers,
-- and the credential after a scheme ("Bearer X" gives X too). Returns list.
function telemetry.secrets_of(headers, list)
  list = list or {}
  if type(headers) ~= "table" then return list end
  for name, value in pairs(headers) do
    if type(name) == "string" and (type(value) == "string" or type(value) == "number") and secret_header(name) then
      value = tostring(value)
      if #value >= 4 then list[#list + 1] = value end
      local credential = value:match("^%a[%w%-]*%s+(%S+)$")
      if credential and #credential >= 4 then list[#list + 1] = credential end
    end
  end
  return list
end

local function plain(s)
  return (s:gsub("[%^%$%(%)%%%.%[%]%*%+%-%?]", "%%%0"))
end

--- s with every secret of the lists replaced by "[redacted]", and anything
-- shaped like an API key (sk-..., sk-ant-...) too; at most max bytes (cut
-- with "..."), control characters as spaces. Non-strings pass through.
function telemetry.scrub(s, secrets, more, max)
  if type(s) ~= "string" then return s end
  for _, list in pairs { secrets or {}, more or {} } do
    for i = 1, #list do
      if s:find(list[i], 1, true) then s = s:gsub(plain(list[i]), "[redacted]") end
    end
  end
  s = s:gsub("sk%-[%w_%-]+", "[redacted]"):gsub("%c", " ")
  max = max or 256
  if #s > max then s = s:sub(1, max) .. "..." end
  return s
end

-- The time from a call's start to the first byte of its last attempt: for a
-- stream, when its first chunk arrived.
local function first_chunk(rec)
  local attempts = rec.attempts
  local last = attempts and attempts[#attempts]
  if not (last and last.latency and last.ttfb and rec.latency) then return nil end
  local t = rec.latency - last.latency + last.ttfb
  if t < 0 then t = 0 end
  return t
end

local function fill_end(call, rec)
  call.record = rec
  call.key = rec.key or call.key
  call.ok, call.status, call.kind, call.class = rec.ok, rec.status, rec.kind, rec.class
  call.attempts, call.error, call.request_id = rec.attempts or {}, rec.error, rec.request_id
  call.retry_after, call.stopped = rec.retry_after, rec.stopped
  call.latency, call.ttfb = rec.latency, rec.ttfb
  if call.streamed then call.ttft = first_chunk(rec) end
  call.t_end = monotime()
  if not call.t0 then
    call.t0 = call.t_end - (rec.latency or 0)
    call.wall0 = walltime() - (rec.latency or 0)
  end
end

--- An observer that joins a client's records into call views.
-- handlers: `on_start(call)`, `on_end(call)`, `on_retry(record)` and
-- `on_event(record)` (breaker, limit_learned, paused), each optional.
-- A successful provider call ends at its `usage` or `reply_failed` record;
-- one whose reply is never read (a prepared request whose finish is never
-- called) never ends, and is forgotten with its response.
function telemetry.calls(handlers)
  if type(handlers) ~= "table" then fail("telemetry.calls takes a table of handlers, got %s", type(handlers)) end
  local on_start, on_end = handlers.on_start, handlers.on_end
  local on_retry, on_event = handlers.on_retry, handlers.on_event
  local by_handle = setmetatable({}, { __mode = "k" })
  local by_response = setmetatable({}, { __mode = "k" })
  local about_of = require("sturdy.provider").about

  return function(rec)
    local t = rec.type
    if t == "start" then
      local req = rec.request
      local call = {
        key = rec.key, about = rec.about or about_of(req), streamed = type(req) == "table" and req.on_data ~= nil,
        t0 = monotime(), wall0 = walltime(), start = rec,
        secrets = rec.secrets and rec.secrets() or {},
      }
      by_handle[rec.handle] = call
      if on_start then on_start(call, rec) end
    elseif t == "call" then
      local h = rec.handle
      local call = h and by_handle[h]
      if call then by_handle[h] = nil else call = { key = rec.key, secrets = {} } end
      fill_end(call, rec)
      if rec.ok and call.about and call.about.usage and rec.response then
        by_response[rec.response] = call -- its usage (or why its reply failed) follows
      elseif on_end then
        on_end(call)
      end
    elseif t == "usage" or t == "reply_failed" then
      local call = rec.response and by_response[rec.response]
      if not call then return end
      by_response[rec.response] = nil
      if t == "usage" then
        call.usage, call.cost, call.stop_reason = rec.usage, rec.cost, rec.stop_reason
        call.response_model = rec.model
      else
        call.ok, call.error = false, rec.error
        call.kind, call.class = rec.error and rec.error.kind, rec.error and rec.error.class
      end
      if on_end then on_end(call) end
    elseif t == "retry" then
      if on_retry then on_retry(rec) end
    elseif on_event then
      on_event(rec)
    end
  end
end

--- The client options of logs, spans and alerts, attached as observers:
-- `logger` (with `log_level`, `log_sample`, `log_bodies`), `on_span_start`
-- and `on_span_end`, `alerts` (with `on_alert`). sturdy.client calls it.
function telemetry.attach(client, cfg)
  local secrets = telemetry.secrets_of(cfg.headers)
  if cfg.logger then
    require("sturdy.log").attach(client, {
      logger = cfg.logger, level = cfg.log_level, sample = cfg.log_sample, bodies = cfg.log_bodies,
      secrets = secrets,
    })
  end
  if cfg.on_span_start or cfg.on_span_end then
    require("sturdy.trace").attach(client, { on_span_start = cfg.on_span_start, on_span_end = cfg.on_span_end,
                                             secrets = secrets })
  end
  if cfg.alerts then
    local rules = {}
    for k, v in pairs(cfg.alerts) do rules[k] = v end
    require("sturdy.alerts").new { rules = rules, on_alert = cfg.on_alert }:watch(client)
  elseif cfg.on_alert then -- with budget: its warnings alone
    client:observe(require("sturdy.alerts").budget_observer(cfg.on_alert))
  end
end

return telemetry
