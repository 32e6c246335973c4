--- sturdy: LLM API calls that hold up in production.
-- The client facade: options checked once at creation (sturdy.options),
-- requests handed to the curl transport, results turned into responses or
-- sturdy.Error values. Every decision (admission, retries, what an outcome
-- does to the key) is the C decision core's; this module only asks and reports.
-- @module sturdy
local policy = require "sturdy.policy"
local options = require "sturdy.options"
local cjson = require "cjson.safe"

local sturdy = { _VERSION = "0.2.0" }

local type, pairs, ipairs, tostring = type, pairs, ipairs, tostring
local setmetatable, getmetatable, error, pcall = setmetatable, getmetatable, error, pcall
local rawget, rawset = rawget, rawset
local floor = math.floor
local format, concat = string.format, table.concat

local one_line = options.one_line

local function fail(msg, ...)
  error("sturdy: " .. format(msg, ...), 0)
end

-- -------------------------------------------------------------------------
-- Errors
-- -------------------------------------------------------------------------

--- A failed call: `kind`, `class`, `status`, `message`, `detail`, `retryable`,
-- `retry_after`, `attempts`, `request_id`, `type` (the provider's error type),
-- `committed`, `stopped`, `headers`, `body`.
-- @type Error
local Error = { __name = "sturdy.Error" }

-- Fields a transport may leave in a compact `_detail` (timings, attempts,
-- raw_headers, key, request_id, http_version) become values on first access.
local function detail_of(t, k)
  local d = rawget(t, "_detail")
  if d == nil then return nil end
  local v = d:get(k)
  if v ~= nil then rawset(t, k, v) end
  return v
end

local function header_table(t)
  local raw = rawget(t, "raw_headers") or detail_of(t, "raw_headers") or ""
  local h = setmetatable(policy.header_table(raw), {
    __index = function(h, k) if type(k) == "string" then return rawget(h, k:lower()) end end,
  })
  rawset(t, "headers", h)
  return h
end

Error.__index = function(t, k)
  if k == "headers" then return header_table(t) end
  local v = Error[k]
  if v ~= nil then return v end
  return detail_of(t, k)
end

-- One friendly line per kind; the technical part goes to err.detail.
local MESSAGES = {
  rate_limited = "rate limited by the server",
  overloaded = "the server is overloaded",
  server = "the server failed",
  request_timeout = "the server timed out reading the request",
  conflict = "the server reported a conflict",
  bad_request = "the server rejected the request as invalid",
  auth = "the server rejected the credentials",
  permission = "the credentials lack permission for this request",
  not_found = "the server does not know this path or model",
  too_large = "the request is too large for the server",
  client_error = "the server refused the request",
  bad_response = "the server's response could not be used",
  response_too_large = "the response is larger than max_response",
  connection = "the connection failed or broke",
  dns = "the host name could not be resolved",
  tls = "the TLS connection could not be verified or set up",
  connect_timeout = "timed out connecting",
  first_byte_timeout = "timed out waiting for the response to start",
  idle_timeout = "the response stalled",
  total_timeout = "the call ran past its deadline",
  circuit_open = "the circuit breaker for this upstream is open",
  queue_full = "too many calls are waiting for this upstream",
  budget_exceeded = "the call would cross a spend cap",
  canceled = "the call was canceled",
  bad_url = "the URL is not usable",
  transport = "the transfer failed",
  wait_timeout = "the call is still in flight",
  stream_truncated = "the stream ended before its terminal event",
  stream_error = "the stream could not be read",
}
sturdy.MESSAGES = MESSAGES

-- What stopped the retries of a retryable failure, for tostring.
local STOPPED = {
  attempts = "attempts used up",
  deadline = "the deadline leaves no time for another attempt",
  budget_exhausted = "the retry budget is spent",
  committed = "part of the reply was already delivered",
  hint_too_long = "the server asked for a wait longer than honor_retry_after",
}

-- Reads a provider error body: Anthropic {"type":"error","error":{...}} and
-- OpenAI {"error":{...}}; anything else is kept as its first bytes.
local function parse_error_body(err, body)
  if body == nil or body == "" then return end
  local doc = body:find("^%s*{") and cjson.decode(body)
  local e = type(doc) == "table" and doc.error
  if type(e) == "table" then
    err.type = type(e.type) == "string" and e.type or (type(e.code) == "string" and e.code or nil)
    if type(e.message) == "string" then err.detail = one_line(e.message, 500) end
  else
    err.detail = one_line(body, 200)
  end
end

--- Makes an error from its fields (`kind` at least).
function Error.new(fields)
  local err = setmetatable(fields, Error)
  err.message = err.message or MESSAGES[err.kind] or err.kind
  err.retryable = err.retryable or false
  return err
end

function Error:__tostring()
  local parts = { "sturdy: ", self.kind or "error" }
  if self.status or self.type then
    parts[#parts + 1] = " ("
    parts[#parts + 1] = concat({ self.status and tostring(self.status) or nil, self.type }, " ")
    parts[#parts + 1] = ")"
  end
  parts[#parts + 1] = ": "
  parts[#parts + 1] = self.message
  if self.detail and self.detail ~= "" and self.detail ~= self.message then
    parts[#parts + 1] = " - " .. self.detail
  end
  if self.retry_after then
    -- a long hint in plain seconds, never as 8.64e+07
    parts[#parts + 1] = format(self.retry_after < 1e6 and "; retry after %gs" or "; retry after %.0fs",
                               self.retry_after)
  end
  if self.attempts and #self.attempts > 1 then
    parts[#parts + 1] = format("; %d attempts", #self.attempts)
  end
  if self.stopped and STOPPED[self.stopped] then
    parts[#parts + 1] = "; not retried: " .. STOPPED[self.stopped]
  end
  if self.request_id then parts[#parts + 1] = " [" .. self.request_id .. "]" end
  return one_line(concat(parts), 1000)
end

sturdy.Error = Error

--- True when v is a sturdy.Error.
function sturdy.is_error(v)
  return getmetatable(v) == Error
end

--- A successful reply: `status`, `headers` (case-insensitive), `body`,
-- `timings`, `http_version`, `request_id`, `attempts`.
-- @type Response
local Response = { __name = "sturdy.Response" }
Response.__index = function(t, k)
  if k == "headers" then return header_table(t) end
  return detail_of(t, k)
end
sturdy.Response = Response

local function to_response(r)
  if r.kind == nil then return setmetatable(r, Response) end
  r.message = MESSAGES[r.kind]
  local from_status = r.from_status
  r.from_status = nil
  local err = setmetatable(r, Error)
  err.message = err.message or err.kind
  -- a body explains a failure only when the status is the failure
  if from_status then parse_error_body(err, r.body) end
  return nil, err
end

-- -------------------------------------------------------------------------
-- Client
-- -------------------------------------------------------------------------

--- A client: one curl engine, its upstream keys, and the options it was made with.
-- @type Client
local Client = {}
Client.__index = Client

local function open_engine(self)
  if self._closing or not self._engine then fail("the client is closed") end
  return self._engine
end

local function strip_userinfo(url)
  return (url:gsub("^(%a[%w+.-]*://)[^/?#@]*@", "%1"))
end

local host_of = options.url_host
sturdy.url_host = host_of

-- Is this an nginx phase where cosockets work (rewrite, access, content, timer)?
local function cosocket_phase()
  local ngx_ = rawget(_G, "ngx")
  if type(ngx_) ~= "table" or type(ngx_.get_phase) ~= "function" then return false end
  local phase = ngx_.get_phase()
  return phase == "rewrite" or phase == "access" or phase == "content" or phase == "timer"
    or phase == "ssl_cert" or phase == "ssl_session_fetch"
end

--- The transport module for a `transport` option: "curl" (libcurl, in
-- scripts and apps) or "ngx" (cosockets, inside nginx); nil chooses "ngx"
-- where nginx's cosockets work, else "curl". The curl transport is loaded
-- only when chosen, so nothing blocking is ever loaded inside nginx.
function sturdy.transport(name)
  if name == nil then name = cosocket_phase() and "ngx" or "curl" end
  if name == "curl" then return require "sturdy.core" end
  if name == "ngx" then return require "sturdy.ngx" end
  fail("option 'transport' must be curl or ngx, got %s", tostring(name))
end

--- Creates a client. See README for the options; unknown names and wrong
-- types raise, naming the option.
function sturdy.client(cfg)
  local compiled, settings = options.client(cfg)
  cfg = cfg or {}
  -- a shared scope hears every retry and event of the engine
  compiled.notices = { retries = cfg.on_retry ~= nil or cfg.observe ~= nil or cfg.shared ~= nil,
                       events = cfg.on_event ~= nil or cfg.observe ~= nil or cfg.shared ~= nil }
  compiled.transport.user_agent = compiled.transport.user_agent or ("sturdy/" .. sturdy._VERSION)
  local base_url = cfg.base_url and cfg.base_url:gsub("/+$", "")
  local self = setmetatable({
    _limits = { attempts = compiled.retry.attempts, total_ms = compiled.client.timeout_ms.total },
    base_url = base_url and strip_userinfo(base_url),
    key = cfg.key or host_of(base_url),
    max_response = cfg.max_response,
    _on_error = cfg.on_error, _on_retry = cfg.on_retry, _on_event = cfg.on_event, _yield = cfg.yield,
    _active = 0,
    _q = {}, _qh = 1, _qt = 0,            -- items taken from the engine, not yet delivered
    _delivering = 0,                      -- calls whose on_data is running
    _observers = cfg.observe and { cfg.observe } or nil,
    _budget = cfg.budget ~= nil,          -- spend caps: record_usage settles and charges
  }, Client)
  self._engine = sturdy.transport(cfg.transport).engine(compiled)
  if settings.shared then
    self._shared = require("sturdy.shared").new(self._engine, settings.shared, compiled,
                                                function(record) self:_notify(record) end)
  end
  if cfg.logger or cfg.on_span_start or cfg.on_span_end or cfg.alerts or (cfg.on_alert and cfg.budget) then
    require("sturdy.telemetry").attach(self, cfg) -- logs, spans, alerts: observers
  end
  return self
end

--- True when the client has spend caps (its `budget` option): providers then
-- send each call's worst case for the caps to reserve.
function Client:budgeted()
  return self._budget
end

--- The upstream key of a request: its own `key`, else the host of its
-- absolute `url`, else the client's `key` option or the host of its base_url;
-- plus "/model" when the JSON body names one, so a sick model does not trip
-- another. (A client `key` option also keys absolute URLs.)
function Client:key_for(req)
  return open_engine(self):key_for(req)
end

--- What one call of this client may use unless it says otherwise:
-- `attempts` (retry.attempts) and `total` (timeout.total in seconds, nil when
-- false). Fallback chains bound each target's call by these.
function Client:call_limits()
  local l = self._limits
  return { attempts = l.attempts, total = l.total_ms > 0 and l.total_ms / 1000 or nil }
end

-- The JSON body of a request, encoded; nil when it has none.
local function json_body(req)
  if type(req) ~= "table" then return nil end -- the core names the problem
  local json = req.json
  if json == nil then return nil end
  if type(json) ~= "table" then fail("option 'json' in request must be a table, got %s", type(json)) end
  local body, err = cjson.encode(json)
  if not body then fail("request 'json' cannot be encoded: %s", err) end
  return body
end

-- -------------------------------------------------------------------------
-- Non-blocking use: handles, poll, run, batch
-- -------------------------------------------------------------------------

--- A submitted call: `done`, `result`, `wait`, `cancel`; for stream readers
-- `commit` and `fail_attempt`.
-- @type Handle
local Handle = { __name = "sturdy.Handle" }
Handle.__index = Handle
sturdy.Handle = Handle

local BATCH_SCHEMA = { concurrency = "count", on_progress = "function", progress = "boolean" }

-- Seconds (nil = none) to the engine's milliseconds.
local function wait_ms(timeout, where)
  if timeout == nil then return nil end
  if type(timeout) ~= "number" or timeout < 0 or timeout ~= timeout then
    fail("%s takes a timeout in seconds >= 0, got %s", where, tostring(timeout))
  end
  return timeout * 1000
end

local now = policy.monotime
sturdy.monotime = now

-- Hands a record to every observer (metrics, logs, spans). Observers only
-- watch: an error one raises is reported on stderr, never to the call.
local function observe(self, record)
  local observers = self._observers
  for i = 1, #observers do
    local ok, e = pcall(observers[i], record)
    if not ok then io.stderr:write(format("sturdy: observer failed: %s\n", tostring(e))) end
  end
end

-- What observers see of a request: its fields, but header values that are
-- secrets masked; the values themselves only through the record's
-- secrets() (for scrubbing), never as data an observer could keep or print.
local telemetry_secrets = require("sturdy.telemetry").secrets_of

local function request_view(req)
  local view = {}
  for k, v in pairs(req) do view[k] = v end
  local headers = req.headers
  if type(headers) ~= "table" then return view, nil end
  local secrets = telemetry_secrets(headers)
  if #secrets == 0 then return view, nil end
  local masked = {}
  for name, v in pairs(headers) do
    local value = tostring(v)
    for i = 1, #secrets do
      if value:find(secrets[i], 1, true) then value = "[redacted]"; break end
    end
    masked[name] = value
  end
  view.headers = masked
  return view, function() return telemetry_secrets(headers) end
end

-- The record of a call's start: observers may put headers to send in
-- record.headers (trace context); the request is then a copy with them.
local function announce(self, engine, h, req)
  if type(req) ~= "table" then return req end -- the core names the problem
  local ok, key = pcall(engine.key_for, engine, req)
  local view, secrets = request_view(req)
  local record = { type = "start", handle = h, key = ok and key or nil, request = view, secrets = secrets,
                   about = require("sturdy.provider").about(req) }
  observe(self, record)
  local extra = record.headers
  if type(extra) ~= "table" or next(extra) == nil then return req end
  local copy, headers = {}, {}
  for k, v in pairs(req) do copy[k] = v end
  local given = type(req.headers) == "table" and req.headers or {}
  for name, v in pairs(given) do
    if type(name) ~= "string" or extra[name:lower()] == nil then headers[name] = v end
  end
  for name, v in pairs(extra) do headers[name] = v end
  copy.headers = headers
  return copy
end

--- Starts a request and returns a handle at once. callback(res, err), if
-- given, runs from a later poll, run or wait, never from submit itself.
function Client:submit(req, callback)
  if callback ~= nil and type(callback) ~= "function" then
    fail("submit's callback must be a function, got %s", type(callback))
  end
  local engine = open_engine(self)
  local h = setmetatable({ client = self, callback = callback, _done = false }, Handle)
  if self._observers then
    h._t0 = now()
    req = announce(self, engine, h, req)
  end
  local shared = self._shared
  -- with a shared scope the request is held until it has its place
  h._request = engine:submit(h, req, json_body(req), shared ~= nil)
  h.on_data = req.on_data
  self._active = self._active + 1
  if shared then shared:admit(h) end
  return h
end

-- Calls fn(...) for the user. An error it raises goes to the client's
-- on_error hook, or onto the list `errors` (made when needed), which is returned.
local function call_user(self, errors, h, fn, ...)
  local ok, e = pcall(fn, ...)
  if ok then return errors, e end
  if self._on_error then
    pcall(self._on_error, e, h)
    return errors
  end
  errors = errors or {}
  errors[#errors + 1] = e
  return errors
end

-- Hooks only inform: an error one raises is reported on stderr, never to the call.
local function call_hook(name, fn, arg)
  local ok, e = pcall(fn, arg)
  if not ok then io.stderr:write(format("sturdy: %s hook failed: %s\n", name, tostring(e))) end
end

local function finish_handle(self, errors, h, raw)
  h._res, h._err = to_response(raw)
  h._request, h._done = nil, true
  self._active = self._active - 1
  if self._shared then self._shared:done(h) end
  if self._observers then
    local r = h._res or h._err
    observe(self, {
      type = "call", handle = h, key = r.key, ok = h._res ~= nil, status = r.status, kind = r.kind,
      class = r.class or "success", attempts = r.attempts, retryable = r.retryable, stopped = r.stopped,
      retry_after = r.retry_after, request_id = r.request_id, latency = h._t0 and now() - h._t0,
      ttfb = r.timings and r.timings.ttfb, response = h._res, error = h._err,
    })
  end
  if h.callback then errors = call_user(self, errors, h, h.callback, h._res, h._err) end
  return errors
end

-- Hands a call its streamed bytes. While its on_data runs, that call's later
-- items (more bytes, its end) wait on the handle, so a callback that drives
-- the client never sees the call end before its bytes, nor out of order.
-- Bytes taken from the engine reach on_data only while h:current(attempt):
-- a hook may have canceled the call or the engine retried the attempt since.
local function deliver_data(self, errors, h, chunk, attempt)
  h._delivering = true
  self._delivering = self._delivering + 1
  local keep
  errors, keep = call_user(self, errors, h, h.on_data, chunk, attempt)
  if keep == false then h:cancel() end
  local later = h._later
  while later and later[1] do
    local item = table.remove(later, 1)
    if item[1] == "done" then
      errors = finish_handle(self, errors, h, item[2])
    elseif h:current(item[3]) then
      errors, keep = call_user(self, errors, h, h.on_data, item[2], item[3])
      if keep == false then h:cancel() end
    end
  end
  h._delivering, h._later = false, nil
  self._delivering = self._delivering - 1
  return errors
end

-- Delivers one item of the ready queue (see engine:take).
local function deliver(self, errors, what, a, b, c)
  if what == "done" or what == "data" then
    if a._delivering then
      local later = a._later or {}
      a._later = later
      later[#later + 1] = { what, b, c }
      return errors
    end
    if what == "done" then return finish_handle(self, errors, a, b) end
    if a.on_data and a:current(c) then return deliver_data(self, errors, a, b, c) end
  elseif what == "retry" then
    if self._shared then self._shared:retry(a) end
    if self._on_retry then call_hook("on_retry", self._on_retry, a) end
    if self._observers then a.type = "retry"; observe(self, a) end
  elseif what == "event" then
    if self._shared then self._shared:event(a) end
    if self._on_event then call_hook("on_event", self._on_event, a) end
    if self._observers then observe(self, a) end
  end
  return errors
end

-- Hands what the engine has ready to Lua, in order: hooks, streamed bytes,
-- finished calls. Items wait in the client's own queue and are taken one at a
-- time, so a callback that drives the client (poll, run, wait) goes on with
-- the items after its own: nothing taken is stranded, nothing runs twice.
function Client:_dispatch()
  local errors
  local more = true
  while true do
    local q, i = self._q, self._qh
    if i > self._qt then
      local engine = self._engine
      if not more or not engine or self._closing then break end
      self._qt, more = engine:take(q, self._qt)
      if i > self._qt then break end
    end
    local what, a, b, c = q[i], q[i + 1], q[i + 2], q[i + 3]
    q[i], q[i + 1], q[i + 2], q[i + 3] = nil, nil, nil, nil
    self._qh = i + 4
    errors = deliver(self, errors, what, a, b, c)
  end
  if self._qh > self._qt then self._qh, self._qt = 1, 0 end
  return errors
end

-- Timers (see Client:after) wait in a binary min-heap on (due, seq), so the
-- earliest is timers[1]; a cancelled one stays until it comes up.
local function timer_before(a, b)
  return a.due < b.due or (a.due == b.due and a.seq < b.seq)
end

local function heap_push(h, x)
  local i = #h + 1
  h[i] = x
  while i > 1 do
    local p = (i - i % 2) / 2
    if not timer_before(h[i], h[p]) then break end
    h[i], h[p] = h[p], h[i]
    i = p
  end
end

local function heap_pop(h)
  local top, n = h[1], #h
  h[1] = h[n]
  h[n] = nil
  n = n - 1
  local i = 1
  while true do
    local l, r, m = 2 * i, 2 * i + 1, i
    if l <= n and timer_before(h[l], h[m]) then m = l end
    if r <= n and timer_before(h[r], h[m]) then m = r end
    if m == i then break end
    h[i], h[m] = h[m], h[i]
    i = m
  end
  return top
end

-- Runs the timers that are due, earliest first; one that a timer adds runs
-- on a later turn.
local function fire_timers(self, errors)
  local timers, t = self._timers, now()
  local due = {}
  while timers[1] and timers[1].due <= t do due[#due + 1] = heap_pop(timers) end
  if not timers[1] then self._timers = nil end
  for _, timer in ipairs(due) do
    if not timer.cancelled then
      timer.cancelled = true
      errors = call_user(self, errors, nil, timer.fn)
    end
  end
  return errors
end

-- The one driving loop: steps the engine (waiting at most wait_ms for
-- activity, and no longer than the next timer) and dispatches what is
-- ready, then runs due timers. Returns the callback errors.
function Client:_turn(wait_ms_)
  local engine = self._engine
  if self._closing or not engine then return end
  local timers = self._timers
  if timers and wait_ms_ and wait_ms_ > 0 then
    local left = (timers[1].due - now()) * 1000
    if left < wait_ms_ then wait_ms_ = left > 0 and left or 0 end
  end
  local _, ready = engine:step(wait_ms_)
  local errors
  if ready or self._qh <= self._qt then errors = self:_dispatch() end
  if self._timers and not self._closing then errors = fire_timers(self, errors) end
  return errors
end

-- Queues an event of the client's own (the shared scope's) for the next
-- dispatch, after what is already queued: hooks never run from submit.
function Client:_notify(record)
  local q, t = self._q, self._qt
  q[t + 1], q[t + 2], q[t + 3], q[t + 4] = "event", record, false, false
  self._qt = t + 4
end

local Timer = { __name = "sturdy.Timer" }
Timer.__index = Timer

--- Stops a timer from firing (harmless once it fired).
function Timer:cancel()
  self.cancelled = true
end

--- Runs fn() once, from the poll, run or wait that drives the client after
-- `seconds` have passed (a timer does not keep run going by itself). Returns a
-- timer with `cancel()`. An error fn raises goes where a callback's goes.
function Client:after(seconds, fn)
  if type(seconds) ~= "number" or seconds ~= seconds or seconds < 0 or seconds > options.MAX_SECONDS then
    fail("after takes seconds from 0 to %d, got %s", options.MAX_SECONDS, tostring(seconds))
  end
  if type(fn) ~= "function" then fail("after takes a function, got %s", type(fn)) end
  open_engine(self)
  self._timer_seq = (self._timer_seq or 0) + 1
  local timer = setmetatable({ due = now() + seconds, fn = fn, seq = self._timer_seq }, Timer)
  local timers = self._timers or {}
  self._timers = timers
  heap_push(timers, timer)
  return timer
end

local function append_all(all, errors)
  if errors then
    all = all or {}
    for _, e in ipairs(errors) do all[#all + 1] = e end
  end
  return all
end

--- Does the work that is ready, waiting at most timeout seconds (default 0)
-- for some; fires callbacks. Returns how many calls are still active, and a
-- list of callback errors when there were any and no on_error hook.
function Client:poll(timeout)
  local ms_ = wait_ms(timeout, "poll") or 0
  open_engine(self)
  local errors = self:_turn(ms_)
  return self._active, errors
end

--- Drives the engine until no call is in flight or waiting (but the calls
-- whose on_data is running, when run is called from there: they end after it).
function Client:run()
  local all
  while self._active > self._delivering and not self._closing and self._engine do
    all = append_all(all, self:_turn(1000))
  end
  return all
end

--- The sockets the engine waits on ({fd, read, write} each), for external
-- event loops.
function Client:fds()
  return open_engine(self):fds()
end

--- The seconds until the engine next needs driving, or a timer is due (nil when idle).
function Client:timeout()
  local t = open_engine(self):timeout()
  t = t and t / 1000
  local timers = self._timers
  if timers then
    local left = math.max(0, timers[1].due - now())
    if not t or left < t then t = left end
  end
  return t
end

--- How many calls are active.
function Client:pending()
  return self._active
end

--- True once the call is done.
function Handle:done()
  return self._done
end

--- res, err once done; nothing before.
function Handle:result()
  if self._done then return self._res, self._err end
end

--- Drives the engine until this call is done (other callbacks may fire), or
-- until timeout seconds pass: then nil and an error of kind "wait_timeout".
function Handle:wait(timeout)
  local limit = wait_ms(timeout, "wait")
  if self._delivering then
    fail("wait on a call from inside its own on_data (or stream events) would never return")
  end
  local deadline = limit and now() + limit / 1000
  local client = self.client
  while not self._done do
    if client._closing or not client._engine then
      -- closed while waiting: close fires every callback, this one included
      break
    end
    local left = deadline and (deadline - now()) * 1000
    if left and left <= 0 then
      return nil, Error.new { kind = "wait_timeout", class = "timeout", pending = true }
    end
    client:_turn(left and math.min(left, 1000) or 1000)
  end
  return self._res, self._err
end

--- Ends the call with kind "canceled"; its callback fires once, from the next
-- poll, run or wait, and no more of its bytes reach on_data. Returns true, or
-- false when the call's end was in already (then it stands, and comes once).
function Handle:cancel()
  if self._done or self._canceled or not self._request then return false end
  if not self._request:cancel() then return false end
  self._canceled = true
  return true
end

--- For stream readers: the caller has seen part of the reply, so the call is
-- never retried now (with `commit = "manual"`).
function Handle:commit()
  if not self._done and self._request then self._request:commit() end
end

--- For stream readers: whether bytes of this attempt (on_data's second
-- argument) are still of use: false once the call was canceled or retried
-- that attempt, so events held back from it must go.
function Handle:current(attempt)
  return not self._done and not self._canceled and self._request ~= nil and self._request:current(attempt)
end

--- For stream readers: the body says this attempt failed (an error event in a
-- 200 stream). It is judged again with this class and kind and retried by the
-- usual rules unless committed.
function Handle:fail_attempt(class, kind, detail)
  if not self._done and self._request then self._request:fail_attempt(class, kind, detail) end
end

--- For hedging (sturdy.hedge): bytes of the current attempt's response received so far.
function Handle:received()
  if self._done or not self._request then return 0 end
  return self._request:received()
end

--- For hedging: milliseconds to wait for the first byte before asking
-- hedge_admit, or nil when this call is not to be hedged (the decision core's
-- st_hedge_plan). policy: { after = ms | nil (a quantile), quantile, max_ratio }.
function Handle:hedge_plan(hp)
  if self._done or not self._request then return nil end
  if not self._request.hedge_plan then
    fail("hedging needs the curl transport (the ngx transport does not hedge yet)")
  end
  return self._request:hedge_plan(hp)
end

--- For hedging: may a hedge of this call go to key (nil: its own) now? true
-- and the milliseconds left before its deadline (nil: none), or false and the
-- cap that refused ("deadline", "breaker", "concurrency", "limiter", "budget").
function Handle:hedge_admit(hp, key)
  if self._done or not self._request then return false, "done" end
  return self._request:hedge_admit(hp, key)
end

--- For hedging: cancels this call as the hedge leg that lost; the time it
-- waited without a byte counts in its key's time-to-first-byte window.
function Handle:lose()
  if not self._done and self._request then self._request:lose() end
end

--- Drives the client until done() returns true: from a coroutine with the
-- client's `yield` option it polls and yields, as request does; elsewhere it
-- blocks, waiting for activity. Returns false when the client was closed first.
function Client:wait_for(done)
  local yield = self._yield
  local co, main = coroutine.running()
  local yielding = yield and co and not main
  while not done() do
    if self._closing or not self._engine then return false end
    if yielding then
      self:poll(0)
      if done() then break end
      yield()
    else
      self:_turn(1000)
    end
  end
  return true
end

--- Sends a request and waits for its outcome: a response, or nil and a sturdy.Error.
-- With the client's `yield` option, inside a coroutine, it yields while waiting.
function Client:request(req)
  local yield = self._yield
  if yield then
    local co, main = coroutine.running()
    if co and not main then
      local h = self:submit(req)
      while true do
        if not h._done and not self._closing and self._engine then self:poll(0) end
        if h._done then return h._res, h._err end
        if self._closing or not self._engine then
          return nil, Error.new { kind = "canceled", class = "canceled", detail = "the client was closed" }
        end
        yield()
      end
    end
  end
  local on_data = type(req) == "table" and req.on_data
  if not on_data then return self:submit(req):wait() end
  -- a blocking call hands an error raised by on_data to its caller
  local h, raised
  local copy = {}
  for k, v in pairs(req) do copy[k] = v end
  copy.on_data = function(chunk, attempt)
    local ok, keep = pcall(on_data, chunk, attempt)
    if ok then return keep end
    raised = keep
    h:cancel()
    return false
  end
  h = self:submit(copy)
  local res, err = h:wait()
  if raised ~= nil then error(raised, 0) end
  return res, err
end

local function progress_bar(done, total, failed)
  local width = 30
  local filled = total > 0 and floor(width * done / total) or width
  io.stderr:write(format("\r[%s%s] %d/%d%s", string.rep("#", filled), string.rep(".", width - filled),
                         done, total, failed > 0 and format(" (%d failed)", failed) or ""))
  if done == total then io.stderr:write("\n") end
end

local function check_batch_options(opts)
  if type(opts) ~= "table" then fail("batch options must be a table, got %s", type(opts)) end
  for k, v in pairs(opts) do
    local want = BATCH_SCHEMA[k]
    if want == nil then fail("unknown option '%s' in batch options", tostring(k)) end
    if want == "count" then
      if type(v) ~= "number" or v < 1 or v ~= floor(v) or v > 1e6 then
        fail("option '%s' in batch options must be a whole number from 1 to 1000000, got %s", k, tostring(v))
      end
    elseif type(v) ~= want then
      fail("option '%s' in batch options must be a %s, got %s", k, want, type(v))
    end
  end
end

--- Runs a list of requests, at most `concurrency` in flight, and returns the
-- outcomes in input order: each a response or a sturdy.Error; then the errors
-- on_progress raised, if it raised any and there is no on_error hook.
function Client:batch(requests, opts)
  if type(requests) ~= "table" then fail("batch takes a list of requests, got %s", type(requests)) end
  opts = opts or {}
  check_batch_options(opts)
  open_engine(self)
  local total = #requests
  for i = 1, total do
    if type(requests[i]) ~= "table" then fail("batch request #%d must be a table, got %s", i, type(requests[i])) end
    self._engine:check(requests[i], json_body(requests[i])) -- every request is checked before any is sent
  end
  local concurrency = opts.concurrency or 32
  local on_progress = opts.on_progress
  if opts.progress and policy.isatty(2) then
    local user = on_progress
    on_progress = function(done, n, failed)
      progress_bar(done, n, failed)
      if user then user(done, n, failed) end
    end
  end
  local results, next_index, in_flight, done, failed = {}, 1, 0, 0, 0
  local errors
  local launch
  local function finished(i, res, err)
    results[i] = res or err
    in_flight, done = in_flight - 1, done + 1
    if err then failed = failed + 1 end
    if on_progress then errors = call_user(self, errors, nil, on_progress, done, total, failed) end
    launch()
  end
  function launch()
    while in_flight < concurrency and next_index <= total and not self._closing and self._engine do
      local i = next_index
      next_index, in_flight = i + 1, in_flight + 1
      self:submit(requests[i], function(res, err) finished(i, res, err) end)
    end
  end
  launch()
  while done < total do
    if self._closing or not self._engine then
      -- closed from a callback: what never started ends as canceled
      for i = 1, total do
        results[i] = results[i] or Error.new { kind = "canceled", class = "canceled",
                                               detail = "the client was closed" }
      end
      break
    end
    errors = append_all(errors, self:_turn(1000))
  end
  -- errors raised by on_progress are returned beside the complete results
  return results, errors
end

--- Adds an observer: fn(record) hears every call's start (`type = "start"`:
-- key, handle, request; an observer may set `record.headers` to a table of
-- lowercase header names and values to send with it, such as trace
-- context), every call's end (`type = "call"`:
-- key, ok, status, kind, class, attempts (each with status, kind, delay,
-- hinted, ttfb, latency), retryable, stopped, retry_after, request_id,
-- latency (seconds since submit), ttfb, response, error), every retry
-- (`"retry"`: key, attempt, class, kind, status, delay, hinted, handle), every
-- event of a key (`"breaker"`, `"limit_learned"`, `"paused"`) or of the shared
-- scope (`"shared"`), and the usage
-- providers record (`"usage"`: key, model, usage, cost, stop_reason,
-- request_id). Metrics, logs and spans are observers. An observer may call
-- any client method; an error it raises goes to stderr.
function Client:observe(fn)
  if type(fn) ~= "function" then fail("observe takes a function, got %s", type(fn)) end
  local engine = open_engine(self)
  self._observers = self._observers or {}
  self._observers[#self._observers + 1] = fn
  engine:want_notices(true, true)
  return fn
end

--- Removes an observer added with observe.
function Client:unobserve(fn)
  local observers = self._observers or {}
  for i = #observers, 1, -1 do
    if observers[i] == fn then table.remove(observers, i) end
  end
  if #observers == 0 then
    self._observers = nil
    local shared = self._shared ~= nil
    if self._engine then self._engine:want_notices(self._on_retry ~= nil or shared, self._on_event ~= nil or shared) end
  end
end

-- Hands budget warnings (key events) to on_event and the observers.
local function budget_events(self, events)
  for i = 1, #events do deliver(self, nil, "event", events[i]) end
end

-- A count or amount record_usage takes: a finite number >= 0, else it raises
-- (a NaN would stay in the key's totals for good).
local function check_amount(v, what)
  if type(v) ~= "number" or v ~= v or v < 0 or v == math.huge then
    fail("record_usage takes %s as a finite number >= 0, got %s", what, tostring(v))
  end
end

--- Records the real usage of a call under its key: corrects the rate
-- limiter's token estimates, and adds usage and cost to the key's totals.
-- usage: { input, output, cache_read, cache_write }; estimated: { input,
-- output } or nil; cost in dollars or nil; reply (optional): { model,
-- stop_reason, request_id, response } for observers, and for the spend caps
-- `hold` (the result's: the call's reservation is settled at this cost) or
-- `tag` (no reservation: the cost is charged to the key and tag). `lost =
-- true` records a hedge that lost (its cost counts; `hedges_lost`, `hedge_cost`).
function Client:record_usage(key, usage, estimated, cost, reply)
  local engine = open_engine(self)
  if type(key) ~= "string" then fail("record_usage takes a key string, got %s", type(key)) end
  if type(usage) ~= "table" then fail("record_usage takes a usage table, got %s", type(usage)) end
  for _, k in ipairs { "input", "output", "cache_read", "cache_write" } do check_amount(usage[k], "usage." .. k) end
  if estimated ~= nil then
    if type(estimated) ~= "table" then fail("record_usage takes estimated as a table, got %s", type(estimated)) end
    check_amount(estimated.input, "estimated.input")
    check_amount(estimated.output, "estimated.output")
  end
  if cost ~= nil then check_amount(cost, "cost") end
  if reply ~= nil and type(reply) ~= "table" then fail("record_usage takes reply as a table, got %s", type(reply)) end
  reply = reply or {}
  local events -- budget warnings, heard last: a hook may close the client
  if self._budget then
    local tokens = usage.input + usage.output + usage.cache_read + usage.cache_write
    local settled = false
    if reply.hold then settled, events = engine:settle(reply.hold, cost or 0, tokens) end
    if not settled and not reply.hold then events = engine:charge(key, reply.tag, cost or 0, tokens) end
  end
  local used_in = usage.input + usage.cache_read + usage.cache_write
  if estimated then
    local deltas = { input_tokens = used_in - estimated.input, output_tokens = usage.output - estimated.output,
                     tokens = used_in + usage.output - estimated.input - estimated.output }
    for dim, delta in pairs(deltas) do engine:correct(key, dim, delta) end
    if self._shared then self._shared:correct(key, deltas) end
  end
  local totals = self._usage or {}
  self._usage = totals
  local t = totals[key] or { calls = 0, input = 0, output = 0, cache_read = 0, cache_write = 0, cost = 0 }
  totals[key] = t
  if reply.lost then -- the hedge fields appear with the first hedge lost
    t.hedges_lost, t.hedge_cost = (t.hedges_lost or 0) + 1, (t.hedge_cost or 0) + (cost or 0)
  else
    t.calls = t.calls + 1
  end
  t.input, t.output = t.input + usage.input, t.output + usage.output
  t.cache_read, t.cache_write = t.cache_read + usage.cache_read, t.cache_write + usage.cache_write
  t.cost = t.cost + (cost or 0)
  if self._observers then
    observe(self, { type = "usage", key = key, usage = usage, cost = cost, model = reply.model,
                    stop_reason = reply.stop_reason, request_id = reply.request_id, response = reply.response,
                    tag = reply.tag, lost = reply.lost })
  end
  if events and events[1] then budget_events(self, events) end
end

--- Hands a record to the client's observers, as its own records are: for the
-- layers above the client to say what they learned about a call, e.g. a
-- provider whose reply could not be used
-- (`{ type = "reply_failed", key, response, error }`). Does nothing without observers.
function Client:notify(record)
  if type(record) ~= "table" or type(record.type) ~= "string" then
    fail("notify takes a record table with a type, got %s", type(record))
  end
  if self._observers then observe(self, record) end
end

--- Each upstream key's reachability with its breaker and limiter state; see
-- sturdy.health. Cheap and non-blocking: it reads the client's own state.
function Client:health(key)
  return require("sturdy.health").of(self, key)
end

--- Without a key: the client's totals and the keys it has seen. With one:
-- that upstream's breaker, latency percentiles, limits, queue and in-flight.
-- With part "gauges" as well: at least `in_flight`, `queued`, `paced`,
-- `breaker.state` and `limits`, what a metrics exporter reads, made without
-- the latency windows (the rest may be left out).
function Client:stats(key, part)
  local engine = open_engine(self)
  if key ~= nil then
    if type(key) ~= "string" then fail("stats takes a key string, got %s", type(key)) end
    if part ~= nil and part ~= "gauges" then fail("stats takes part \"gauges\" or none, got %s", tostring(part)) end
    if part and engine.upstream_gauges then return engine:upstream_gauges(key) end
    local s = engine:upstream_stats(key)
    if s and self._usage then s.usage = self._usage[key] end
    return s
  end
  local s = engine:stats()
  s.keys = engine:keys()
  if self._shared then s.shared = self._shared:stats() end
  if engine.budget then s.budget = engine:budget() end
  if self._usage then
    local total = { calls = 0, input = 0, output = 0, cache_read = 0, cache_write = 0, cost = 0 }
    for _, u in pairs(self._usage) do
      for k, v in pairs(u) do total[k] = (total[k] or 0) + v end
    end
    s.usage = total
  end
  return s
end

--- Cancels what is in flight or waiting, fires those callbacks once, and
-- frees the engine. Later calls raise; closing twice is harmless. It may be
-- called from any callback or hook.
function Client:close()
  if self._closing then return end
  self._closing = true -- from here on submit raises, so nothing new starts
  local engine = self._engine
  self._timers = nil
  engine:cancel_all()
  if self._shared then self._shared:close() end
  -- the ends already queued, then the engine's: streamed bytes and hooks are
  -- dropped, the calls are over
  local ends, q, more = {}, self._q, true
  for i = self._qh, self._qt, 4 do
    if q[i] == "done" then ends[#ends + 1] = q[i + 1]; ends[#ends + 1] = q[i + 2] end
    q[i], q[i + 1], q[i + 2], q[i + 3] = nil, nil, nil, nil
  end
  self._qh, self._qt = 1, 0
  while more do
    local n
    n, more = engine:take(q, 0)
    for i = 1, n, 4 do
      if q[i] == "done" then ends[#ends + 1] = q[i + 1]; ends[#ends + 1] = q[i + 2] end
      q[i], q[i + 1], q[i + 2], q[i + 3] = nil, nil, nil, nil
    end
  end
  engine:close()
  self._engine = nil
  local errors
  for i = 1, #ends, 2 do errors = finish_handle(self, errors, ends[i], ends[i + 1]) end
  for _, e in ipairs(errors or {}) do
    io.stderr:write("sturdy: a callback failed during close: ", tostring(e), "\n")
  end
end

Client.__close = Client.close

function Client:__tostring()
  return format("sturdy.client (%s)", self.base_url or "no base_url")
end

sturdy.Client = Client

--- Diagnoses the path to url (DNS, connect, TLS, first byte, proxy); see
-- sturdy.diagnose. Loaded on first use.
function sturdy.diagnose(url, opts) return require("sturdy.diagnose").run(url, opts) end

return setmetatable(sturdy, { __index = function(_, k)
  -- helpers loaded on first use, so `require "sturdy"` does not pay for them
  if k == "options" then return options end
  if k == "fallback" or k == "cache" then return require("sturdy." .. k) end
  return nil
end })
