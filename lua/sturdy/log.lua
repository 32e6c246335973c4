--- Structured logs: one event per attempt and one per call, as tables for a
-- function of yours, JSON lines on stderr, or lines for nginx's error log.
--
--   local client = sturdy.client { base_url = url, logger = "json", log_level = "info", log_sample = 0.1 }
--   -- {"ts":"2026-01-05T10:00:00.123Z","level":"info","event":"call","id":"5f0c...",
--   --  "key":"api.anthropic.com/claude-sonnet-4-5",...}
--
-- Events (fields absent when unknown):
--
-- - `call`, when a call is over: `id` (sturdy's id of the call), `request_id`
--   (the provider's), `key`, `provider`, `model`, `response_model`, `ok`,
--   `class`, `status`, `error_type` (the error kind), `attempts` (how many),
--   `latency`, `ttfb`, `ttft` (a stream's first chunk), `input_tokens`,
--   `output_tokens`, `cache_read_tokens`, `cache_write_tokens`, `cost`
--   (dollars), `stop_reason`, `retry_after`, `stopped` (why a retryable
--   failure was not retried).
-- - `attempt`, for each attempt of the call, in order, written just before
--   its `call` event: `id`, `key`, `model`, `attempt` (1, 2, ...), `class`,
--   `status`, `error_type`, `latency`, `ttfb`, `delay` (the wait chosen
--   before the next attempt) and `delay_reason` (`retry_after`: the server's
--   hint; `backoff`: the class's jittered backoff).
--
-- Every event has `ts` (UTC, milliseconds), `level` and `event`. Levels:
-- `debug` (an attempt that succeeded), `info` (a call that succeeded),
-- `warn` (an attempt that failed), `error` (a call that failed); events
-- below `level` (default `info`) are not written. `sample` (0 to 1, default
-- 1) keeps that share of successful calls, spread evenly (0.25: the first,
-- then exactly one in four) with their attempts; failures are always written.
--
-- Never written: the prompt, the reply, headers, error messages (a careless
-- server may echo a request's headers in them). Strings from the server
-- (request ids, model names, error types) are scrubbed of the call's secret
-- header values and of anything shaped like an API key. With `bodies = true`
-- the call event also has `request_body` and `response_body` (the first
-- 4096 bytes), scrubbed the same way.
-- @module sturdy.log
local telemetry = require "sturdy.telemetry"
local cjson = require "cjson.safe"

local log = {}

local type, pairs, ipairs, tostring = type, pairs, ipairs, tostring
local format, concat, floor = string.format, table.concat, math.floor

local function fail(msg, ...)
  error("sturdy: " .. format(msg, ...), 0)
end

local LEVELS = { debug = 1, info = 2, warn = 3, error = 4 }
log.LEVELS = LEVELS

-- The order fields are written in; others follow, sorted.
local ORDER = { "ts", "level", "event", "id", "request_id", "key", "provider", "model", "response_model",
                "attempt", "ok", "class", "status", "error_type", "attempts", "latency", "ttfb", "ttft",
                "delay", "delay_reason", "input_tokens", "output_tokens", "cache_read_tokens",
                "cache_write_tokens", "cost", "stop_reason", "retry_after", "stopped" }
local ORDERED = {}
for _, k in ipairs(ORDER) do ORDERED[k] = true end

local function json_value(v)
  if type(v) == "number" then
    if v ~= v or v == math.huge or v == -math.huge then return "null" end
    if v == floor(v) and v > -1e15 and v < 1e15 then return format("%d", v) end
    return format("%.6g", v)
  end
  -- cjson writes "/" as "\/"; keys read better as "host/model"
  return ((cjson.encode(v) or "null"):gsub("\\/", "/"))
end

--- An event as one line of JSON, fields in a fixed order (ts, level, event,
-- id, ...), without a newline.
function log.json(ev)
  local parts = {}
  for _, k in ipairs(ORDER) do
    local v = ev[k]
    if v ~= nil then parts[#parts + 1] = format("%q:%s", k, json_value(v)) end
  end
  local rest = {}
  for k in pairs(ev) do
    if type(k) == "string" and not ORDERED[k] then rest[#rest + 1] = k end
  end
  table.sort(rest)
  for _, k in ipairs(rest) do parts[#parts + 1] = cjson.encode(k) .. ":" .. json_value(ev[k]) end
  return "{" .. concat(parts, ",") .. "}"
end

local function iso_time(t)
  local s = floor(t)
  return os.date("!%Y-%m-%dT%H:%M:%S", s) .. format(".%03dZ", floor((t - s) * 1000))
end

-- ngx.log levels by ours
local NGX_LEVELS = { debug = "DEBUG", info = "INFO", warn = "WARN", error = "ERR" }

--- The writer for a logger option: a function is used as is; "json" writes
-- JSON lines to stderr; "ngx" writes them to nginx's error log with
-- ngx.log at the event's level.
function log.writer(logger)
  if type(logger) == "function" then return logger end
  if logger == "json" then
    return function(ev)
      io.stderr:write(log.json(ev), "\n")
    end
  end
  if logger == "ngx" then
    return function(ev)
      local ngx_ = rawget(_G, "ngx")
      if type(ngx_) ~= "table" then fail("logger 'ngx' runs only inside nginx") end
      ngx_.log(ngx_[NGX_LEVELS[ev.level]], log.json(ev))
    end
  end
  fail("option 'logger' must be a function, \"json\" or \"ngx\", got %s",
       type(logger) == "string" and format("%q", logger:sub(1, 40)) or type(logger))
end

local function new_id()
  return telemetry.random_hex(8)
end

-- The body of a request as text (its JSON encoded), or nil.
local function request_body(req)
  if type(req) ~= "table" then return nil end
  if type(req.body) == "string" then return req.body end
  if type(req.json) == "table" then return cjson.encode(req.json) end
end

local function check_options(opts)
  if type(opts) ~= "table" then fail("sturdy.log takes a table of options, got %s", type(opts)) end
  local level = opts.level or "info"
  if not LEVELS[level] then
    fail("option 'log_level' must be one of debug, info, warn, error, got %s", tostring(level))
  end
  local sample = opts.sample
  if sample == nil then sample = 1 end
  if type(sample) ~= "number" or not (sample >= 0 and sample <= 1) then
    fail("option 'log_sample' must be a number from 0 to 1, got %s", tostring(sample))
  end
  if opts.bodies ~= nil and type(opts.bodies) ~= "boolean" then
    fail("option 'log_bodies' must be a boolean, got %s", type(opts.bodies))
  end
  return LEVELS[level], sample
end

--- An observer that writes the events of a client's calls (add it with
-- client:observe, or give the client `logger`). opts: `logger` (a function
-- taking the event table, "json" or "ngx"), `level`, `sample`, `bodies`,
-- `secrets` (more strings to scrub, e.g. the client's own header values).
function log.observer(opts)
  local threshold, sample = check_options(opts)
  local write = log.writer(opts.logger)
  local bodies = opts.bodies
  local extra = opts.secrets or {}
  -- successes are kept when the credit reaches a whole one: the first, then one in 1/sample
  local credit = sample > 0 and 1 - sample or 0

  local function emit(ev)
    if LEVELS[ev.level] >= threshold then write(ev) end
  end

  local function keep_success()
    if sample >= 1 then return true end
    credit = credit + sample
    if credit >= 1 - 1e-9 then
      credit = credit - 1
      return true
    end
    return false
  end

  local function on_start(call, rec)
    call.log_id = new_id()
    if bodies then call.log_request = request_body(rec.request) end
  end

  local function on_end(call)
    if call.ok and not keep_success() then return end
    local secrets = call.secrets
    local function clean(s, max) return telemetry.scrub(s, secrets, extra, max) end
    local about = call.about or {}
    local id = call.log_id or new_id()
    local _, _, key_model = telemetry.split_key(call.key)
    local model = about.model or key_model
    local ts = iso_time(telemetry.walltime())
    local attempts = call.attempts or {}
    for i, a in ipairs(attempts) do
      local failed = a.kind ~= nil
      local delay = i < #attempts and a.delay or nil
      local class = "success" -- a failed attempt's class is known for the last one only
      if failed then class = i == #attempts and call.class or nil end
      emit {
        ts = ts, level = failed and "warn" or "debug", event = "attempt", id = id, key = clean(call.key),
        model = clean(model), attempt = i, class = class,
        status = a.status, error_type = a.kind, latency = a.latency, ttfb = a.ttfb, delay = delay,
        delay_reason = delay and (a.hinted and "retry_after" or "backoff") or nil,
      }
    end
    local usage = call.usage or {}
    local ev = {
      ts = ts, level = call.ok and "info" or "error", event = "call", id = id,
      request_id = clean(call.request_id, 128), key = clean(call.key), provider = about.provider,
      model = clean(model), response_model = clean(call.response_model, 128), ok = call.ok == true,
      class = call.class, status = call.status, error_type = call.kind, attempts = #attempts,
      latency = call.latency, ttfb = call.ttfb, ttft = call.ttft,
      input_tokens = usage.input, output_tokens = usage.output,
      cache_read_tokens = usage.cache_read, cache_write_tokens = usage.cache_write,
      cost = call.cost, stop_reason = clean(call.stop_reason, 64), retry_after = call.retry_after,
      stopped = call.stopped,
    }
    if bodies then
      ev.request_body = clean(call.log_request, 4096)
      local res = call.record and call.record.response
      ev.response_body = res and clean(res.body, 4096) or nil
    end
    emit(ev)
  end

  return telemetry.calls { on_start = on_start, on_end = on_end }
end

--- Adds a logging observer to client (see log.observer for opts); returns it.
function log.attach(client, opts)
  return client:observe(log.observer(opts))
end

return log
