--- Tracing hooks: one span per call and one per attempt, with the
-- OpenTelemetry GenAI and HTTP attribute names, for an OTel SDK (or any
-- tracer) of your choice; sturdy depends on none.
--
--   local client = sturdy.client {
--     base_url = url,
--     on_span_start = function(span) ... end,   -- optional
--     on_span_end = function(span) ... end,
--   }
--
-- A span: `name`, `kind` ("client"), `trace_id` (32 hex digits), `span_id`
-- (16), `parent_span_id` (nil for a root), `trace_flags` (2 hex digits),
-- `start_time` and `end_time` (epoch seconds, microseconds), `status`
-- ("ok" or "error"), `attributes` (a flat table of OTel attribute names).
--
-- - The call span starts when the call is submitted (`on_span_start`) and
--   ends when it is over (`on_span_end`): for a provider call once its reply
--   is read, with the usage. Name: "chat claude-sonnet-4-5" (operation and
--   model) for provider calls, the method for others. Attributes:
--   `gen_ai.operation.name`, `gen_ai.provider.name`, `gen_ai.request.model`,
--   `gen_ai.request.max_tokens`, `gen_ai.response.model`,
--   `gen_ai.response.finish_reasons`, `gen_ai.usage.input_tokens`,
--   `gen_ai.usage.output_tokens`, `gen_ai.usage.cache_read.input_tokens`,
--   `gen_ai.usage.cache_creation.input_tokens`, `server.address`,
--   `server.port`, `http.request.method`, `http.response.status_code`,
--   `error.type` (the error kind), and `sturdy.key`, `sturdy.attempts`,
--   `sturdy.cost_usd`, `sturdy.request_id` (the provider's request id).
-- - Each attempt is a child of the call span, reported when the call is
--   over (`on_span_start` then `on_span_end`), with start and end times
--   worked back from its duration and the delays chosen between attempts.
--   Name: the method. Attributes: `http.request.method`,
--   `http.response.status_code`, `http.request.resend_count` (from the
--   second attempt), `server.address`, `server.port`, `error.type`,
--   `sturdy.attempt`, `sturdy.retry.delay` and `sturdy.retry.hinted` (the
--   wait chosen before the next attempt, and whether the server asked for it).
--
-- Trace context: a request whose headers carry a W3C `traceparent` joins
-- that trace (the call span's parent is the span it names); the request is
-- sent with a `traceparent` naming the call span, so the server's spans are
-- its children. Without one, each call starts a trace of its own.
--
-- Never an attribute: the prompt, the reply, a header, an error message.
-- Strings from the server are scrubbed of the call's secrets.
--
-- Wiring to an OTel SDK: sturdy's spans carry their own ids and times, so
-- an exporter can send them as they are, e.g. as OTLP/JSON with
-- `trace.otlp(spans)`, posted to a collector's `/v1/traces`; with an SDK
-- whose tracer takes a start time and a parent context (such as
-- opentelemetry-lua in OpenResty), start a span in `on_span_start` and
-- end it in `on_span_end`, keyed by `span.span_id`.
-- @module sturdy.trace
local telemetry = require "sturdy.telemetry"

local trace = {}

local type, pairs, ipairs, tostring = type, pairs, ipairs, tostring
local format = string.format

local function fail(msg, ...)
  error("sturdy: " .. format(msg, ...), 0)
end

local ZERO_TRACE, ZERO_SPAN = string.rep("0", 32), string.rep("0", 16)

--- Reads a W3C traceparent value: trace id, parent span id and flags, or
-- nil when it is not a valid version-00 (or later) header.
function trace.parse_traceparent(v)
  if type(v) ~= "string" then return nil end
  local version, trace_id, span_id, flags = v:lower():match("^%s*(%x%x)%-(%x+)%-(%x+)%-(%x%x)")
  if not version or version == "ff" or #trace_id ~= 32 or #span_id ~= 16 then return nil end
  if trace_id == ZERO_TRACE or span_id == ZERO_SPAN then return nil end
  return trace_id, span_id, flags
end

-- The traceparent header a request carries (any case), or nil.
local function given_traceparent(req)
  local headers = type(req) == "table" and type(req.headers) == "table" and req.headers
  if not headers then return nil end
  for name, v in pairs(headers) do
    if type(name) == "string" and name:lower() == "traceparent" then return v end
  end
end

--- An observer that reports spans of a client's calls (add it with
-- client:observe, or give the client `on_span_start` / `on_span_end`).
-- opts: `on_span_start`, `on_span_end` (functions of a span; either may be
-- nil), `secrets` (more strings to scrub).
function trace.observer(opts)
  if type(opts) ~= "table" then fail("sturdy.trace takes a table of options, got %s", type(opts)) end
  local on_start, on_end = opts.on_span_start, opts.on_span_end
  for name, fn in pairs { on_span_start = on_start, on_span_end = on_end } do
    if fn ~= nil and type(fn) ~= "function" then fail("option '%s' must be a function, got %s", name, type(fn)) end
  end
  local extra = opts.secrets or {}

  local function call_start(call, rec)
    local req = rec.request
    local trace_id, parent, flags = trace.parse_traceparent(given_traceparent(req))
    local about = call.about
    local method = type(req) == "table" and type(req.method) == "string" and req.method:upper()
      or (type(req) == "table" and (req.json or req.body) and "POST" or "GET")
    local host, port = telemetry.split_key(call.key)
    local attributes = {
      ["sturdy.key"] = call.key, ["server.address"] = host, ["server.port"] = port,
      ["http.request.method"] = method,
    }
    local name = method
    if about then
      name = about.operation .. " " .. tostring(about.model)
      attributes["gen_ai.operation.name"] = about.operation
      attributes["gen_ai.provider.name"] = about.provider
      attributes["gen_ai.request.model"] = about.model
      attributes["gen_ai.request.max_tokens"] = about.max_tokens
    end
    local span = {
      name = name, kind = "client", trace_id = trace_id or telemetry.random_hex(16),
      span_id = telemetry.random_hex(8), parent_span_id = parent, trace_flags = flags or "01",
      start_time = call.wall0, attributes = attributes,
    }
    call.span, call.method = span, method
    -- the server's spans are the call span's children
    rec.headers = rec.headers or {}
    rec.headers.traceparent = format("00-%s-%s-%s", span.trace_id, span.span_id, span.trace_flags)
    if on_start then on_start(span) end
  end

  -- The attempts' spans, their times worked back from the call's end.
  local function attempt_spans(call, span, end_time)
    local attempts = call.attempts or {}
    local host, port = telemetry.split_key(call.key)
    local spans = {}
    local t = end_time
    for i = #attempts, 1, -1 do
      local a = attempts[i]
      if i < #attempts then t = t - (a.delay or 0) end
      local start = t - (a.latency or 0)
      if start < span.start_time then start = span.start_time end
      if t < start then t = start end
      local attributes = {
        ["http.request.method"] = call.method, ["http.response.status_code"] = a.status,
        ["server.address"] = host, ["server.port"] = port, ["error.type"] = a.kind,
        ["sturdy.attempt"] = i,
      }
      if i > 1 then attributes["http.request.resend_count"] = i - 1 end
      if i < #attempts then
        attributes["sturdy.retry.delay"] = a.delay
        attributes["sturdy.retry.hinted"] = a.hinted and true or false
      end
      spans[i] = {
        name = call.method, kind = "client", trace_id = span.trace_id, span_id = telemetry.random_hex(8),
        parent_span_id = span.span_id, trace_flags = span.trace_flags, start_time = start, end_time = t,
        status = a.kind and "error" or "ok", attributes = attributes,
      }
      t = start
    end
    return spans
  end

  local function call_end(call)
    local span = call.span
    if not span then -- the call started before this observer was added
      call_start(call, { request = {} })
      span = call.span
      span.start_time = call.wall0
    end
    local end_time = call.wall0 + (call.latency or (telemetry.monotime() - call.t0))
    local now = telemetry.walltime()
    if end_time > now then end_time = now end
    for _, a in ipairs(attempt_spans(call, span, end_time)) do
      if on_start then on_start(a) end
      if on_end then on_end(a) end
    end
    local secrets = call.secrets
    local function clean(s) return telemetry.scrub(s, secrets, extra, 256) end
    local attr = span.attributes
    attr["http.response.status_code"] = call.status
    attr["error.type"] = call.kind
    attr["sturdy.attempts"] = #(call.attempts or {})
    attr["sturdy.request_id"] = clean(call.request_id)
    if call.about then
      local usage = call.usage or {}
      attr["gen_ai.response.model"] = clean(call.response_model)
      attr["gen_ai.response.finish_reasons"] = call.stop_reason and { clean(call.stop_reason) } or nil
      attr["gen_ai.usage.input_tokens"] = usage.input
      attr["gen_ai.usage.output_tokens"] = usage.output
      attr["gen_ai.usage.cache_read.input_tokens"] = usage.cache_read
      attr["gen_ai.usage.cache_creation.input_tokens"] = usage.cache_write
      attr["sturdy.cost_usd"] = call.cost
    end
    span.end_time = end_time
    span.status = call.ok and "ok" or "error"
    if on_end then on_end(span) end
  end

  return telemetry.calls { on_start = call_start, on_end = call_end }
end

--- Adds a tracing observer to client (see trace.observer for opts); returns it.
function trace.attach(client, opts)
  return client:observe(trace.observer(opts))
end

local function any_value(v)
  if type(v) == "boolean" then return { boolValue = v } end
  if type(v) == "number" then
    if v == math.floor(v) and v > -2 ^ 53 and v < 2 ^ 53 then return { intValue = format("%d", v) } end
    return { doubleValue = v }
  end
  if type(v) == "table" then
    local values = {}
    for i, x in ipairs(v) do values[i] = any_value(x) end
    return { arrayValue = { values = values } }
  end
  return { stringValue = tostring(v) }
end

local function nanos(t)
  return format("%.0f", t * 1e9)
end

--- Spans as an OTLP/JSON ExportTraceServiceRequest (a Lua table: encode it
-- with cjson and POST it to a collector's /v1/traces). service: the
-- `service.name` resource attribute (default "sturdy").
function trace.otlp(spans, service)
  local out = {}
  for i, s in ipairs(spans) do
    local attributes = {}
    local names = {}
    for k in pairs(s.attributes or {}) do names[#names + 1] = k end
    table.sort(names)
    for _, k in ipairs(names) do attributes[#attributes + 1] = { key = k, value = any_value(s.attributes[k]) } end
    out[i] = {
      traceId = s.trace_id, spanId = s.span_id, parentSpanId = s.parent_span_id, name = s.name,
      kind = 3, -- SPAN_KIND_CLIENT
      startTimeUnixNano = nanos(s.start_time), endTimeUnixNano = nanos(s.end_time or s.start_time),
      attributes = attributes, status = { code = s.status == "error" and 2 or 1 },
    }
  end
  return {
    resourceSpans = { {
      resource = { attributes = { { key = "service.name", value = { stringValue = service or "sturdy" } } } },
      scopeSpans = { { scope = { name = "sturdy" }, spans = out } },
    } },
  }
end

return trace
