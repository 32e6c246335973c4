--- sturdy: LLM API calls that hold up in production.
-- The client facade: validates configuration, turns requests into engine
-- specs, and results into responses or sturdy.Error values.
local core = require "sturdy.core"
local policy = require "sturdy.policy"
local cjson = require "cjson.safe"

local sturdy = { _VERSION = "0.2.0" }

local type, pairs, ipairs, tostring = type, pairs, ipairs, tostring
local setmetatable, error, floor = setmetatable, error, math.floor
local lower, format, concat = string.lower, string.format, table.concat

---------------------------------------------------------------------------
-- Errors
---------------------------------------------------------------------------

local Error = { __name = "sturdy.Error" }
-- lazy_headers is defined with the client; the error shares it
local lazy_headers
Error.__index = function(t, k)
  if k == "headers" then return lazy_headers(t) end
  return Error[k]
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
  budget_exhausted = "retries stopped: the retry budget is spent",
  canceled = "the call was canceled",
  bad_url = "the URL is not usable",
  transport = "the transfer failed",
}

--- Flattens a string to one printable line of at most n bytes.
local function one_line(s, n)
  s = tostring(s):gsub("[%c]+", " ")
  if #s > n then s = s:sub(1, n) .. "..." end
  return s
end

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
  if self.detail and self.detail ~= "" then
    parts[#parts + 1] = " - " .. self.detail
  end
  if self.retry_after then parts[#parts + 1] = format("; retry after %gs", self.retry_after) end
  if self.attempts and #self.attempts > 1 then
    parts[#parts + 1] = format("; %d attempts", #self.attempts)
  end
  if self.request_id then parts[#parts + 1] = " [" .. self.request_id .. "]" end
  return one_line(concat(parts), 1000)
end

sturdy.Error = Error

function sturdy.is_error(v)
  return getmetatable(v) == Error
end

---------------------------------------------------------------------------
-- Option checking: unknown names and wrong types raise, naming the option.
---------------------------------------------------------------------------

local function fail(msg, ...)
  error("sturdy: " .. format(msg, ...), 0)
end

local CHECKS = {
  string = function(v) return type(v) == "string" end,
  number = function(v) return type(v) == "number" and v == v end,
  positive = function(v) return type(v) == "number" and v > 0 and v < math.huge end,
  count = function(v) return type(v) == "number" and v >= 1 and v == floor(v) end,
  table = function(v) return type(v) == "table" end,
  ["function"] = function(v) return type(v) == "function" end,
  boolean = function(v) return type(v) == "boolean" end,
  ["positive|false"] = function(v) return v == false or (type(v) == "number" and v > 0) end,
  ["table|false"] = function(v) return v == false or type(v) == "table" end,
  ["number|table"] = function(v) return type(v) == "table" or (type(v) == "number" and v > 0) end,
}

-- Checked by type() alone, without a call (requests pass through here)
local PLAIN_TYPES = { string = true, table = true, ["function"] = true, boolean = true }

local WANTS = {
  positive = "a positive number", count = "a whole number >= 1",
  ["positive|false"] = "a positive number or false", ["table|false"] = "a table or false",
  ["number|table"] = "a positive number or a table of them by class",
}

local function check_options(t, schema, where)
  if type(t) ~= "table" then fail("%s must be a table, got %s", where, type(t)) end
  for k, v in pairs(t) do
    local want = schema[k]
    if want == nil then
      fail("unknown option '%s' in %s", tostring(k), where)
    end
    if type(want) == "table" then
      check_options(v, want, where .. "." .. k)
    elseif not (PLAIN_TYPES[want] and type(v) == want) and not CHECKS[want](v) then
      fail("option '%s' in %s must be %s, got %s", k, where, WANTS[want] or ("a " .. want),
           type(v) == "string" and format("%q", one_line(v, 40)) or type(v))
    end
  end
end

local TIMEOUT_SCHEMA = {
  connect = "positive|false", first_byte = "positive|false",
  idle = "positive|false", total = "positive|false",
}

local CLIENT_SCHEMA = {
  base_url = "string", headers = "table", key = "string",
  timeout = TIMEOUT_SCHEMA,
  retry = {
    attempts = "count", base = "number|table", cap = "positive", jitter = "string",
    honor_retry_after = "positive", retry_on = "table", never_retry_on = "table",
    budget = "table|false",
  },
  tls = {
    ca_file = "string", ca_path = "string", client_cert = "string", client_key = "string",
    client_key_password = "string",
  },
  proxy = "string", no_proxy = "string", user_agent = "string",
  max_response = "positive", on_retry = "function", seed = "positive",
  on_error = "function", yield = "function", on_event = "function",
  breaker = "table|false",
  limits = {
    rpm = "positive", tpm = "positive", itpm = "positive", otpm = "positive",
    concurrency = "count", queue = "count", burst = "positive",
  },
}

local BREAKER_SCHEMA = {
  window = "positive", buckets = "count", min_calls = "count", failure_rate = "number",
  slow_call = "positive|false", slow_rate = "number", open_for = "positive", max_open_for = "positive",
  probes = "count", probe_timeout = "positive", failure_classes = "table", mode = "string",
}
local BREAKER_MODES = { normal = true, forced_open = true, disabled = true, metrics_only = true }
local PRIORITIES = { high = true, normal = true, low = true }

local BUDGET_SCHEMA = { ratio = "number", min_per_s = "number", window = "positive" }

local REQUEST_SCHEMA = {
  method = "string", path = "string", url = "string", headers = "table", body = "string",
  json = "table", key = "string", timeout = TIMEOUT_SCHEMA, max_response = "positive",
  attempts = "count", on_data = "function", stream = "boolean", priority = "string",
  tokens = { input = "number", output = "number" },
}

local CLASSES = {
  throttled = true, overloaded = true, transient = true, timeout = true, fatal = true,
}
local JITTERS = { full = true, equal = true, decorrelated = true, none = true }

local DEFAULT_TIMEOUT = { connect = 10, first_byte = 60, idle = 30, total = 600 }

---------------------------------------------------------------------------
-- Headers
---------------------------------------------------------------------------

local function check_header(name, value, where)
  if type(name) ~= "string" or not name:find("^[%w!#$%%&'*+%-.^_`|~]+$") then
    fail("header name %s in %s is not a valid HTTP token", format("%q", tostring(name)), where)
  end
  if type(value) ~= "string" and type(value) ~= "number" then
    fail("header '%s' in %s must be a string, got %s", name, where, type(value))
  end
  value = tostring(value)
  if value:find("[\r\n%z]") then
    -- the value is not echoed: it may be a secret
    fail("header '%s' in %s contains CR, LF or NUL", name, where)
  end
  return value
end

-- libcurl's Expect: 100-continue only adds a round trip for API calls
local NO_EXPECT = "Expect:"
local JSON_TYPE = "Content-Type: application/json"

-- The header lines every request of a client starts from, with and without a body.
local function base_lines(client_lines, client_names)
  local with_body, without = {}, {}
  for i = 1, #client_lines do
    with_body[i], without[i] = client_lines[i], client_lines[i]
  end
  if not client_names["content-type"] then with_body[#with_body + 1] = JSON_TYPE end
  with_body[#with_body + 1] = NO_EXPECT
  without[#without + 1] = NO_EXPECT
  return { [true] = with_body, [false] = without }
end

-- Header lines for libcurl: the request's own, then the client's it does not override.
local function header_lines(client, headers, has_body)
  if headers == nil then return client._lines[has_body] end
  local lines, seen = {}, {}
  for name, value in pairs(headers) do
    value = check_header(name, value, "request headers")
    local lname = lower(name)
    if seen[lname] then fail("header '%s' given twice in request headers", name) end
    seen[lname] = true
    lines[#lines + 1] = name .. ": " .. value
  end
  local client_lines, client_names = client._header_lines, client._header_names
  for i = 1, #client_lines do
    if not seen[client_names[i]] then lines[#lines + 1] = client_lines[i] end
  end
  if has_body and not seen["content-type"] and not client_names["content-type"] then
    lines[#lines + 1] = JSON_TYPE
  end
  lines[#lines + 1] = NO_EXPECT
  return lines
end

local header_meta = {
  __index = function(t, k)
    if type(k) == "string" then return rawget(t, lower(k)) end
  end,
}

-- res.headers and err.headers are built from the engine's raw block on first use.
function lazy_headers(t)
  local h = setmetatable(policy.header_table(rawget(t, "raw_headers") or ""), header_meta)
  rawset(t, "headers", h)
  return h
end

local Response = { __name = "sturdy.Response" }
Response.__index = function(t, k)
  if k == "headers" then return lazy_headers(t) end
end
sturdy.Response = Response

---------------------------------------------------------------------------
-- Client
---------------------------------------------------------------------------

local Client = {}
Client.__index = Client

local function ms(v)
  return v and floor(v * 1000 + 0.5) or 0
end

local KNOWN_METHODS = { GET = true, POST = true, PUT = true, PATCH = true, DELETE = true, HEAD = true }

local TIMEOUT_NAMES = { "connect", "first_byte", "idle", "total" }

-- Timeouts in ms for the engine (0 = none), a request's own overriding the client's.
local function timeouts_ms(base, override)
  local out = {}
  for i, name in ipairs(TIMEOUT_NAMES) do
    local v = base[name]
    if override and override[name] ~= nil then v = override[name] end
    out[i] = v and ms(v) or 0
  end
  return out
end

local function engine_options(cfg)
  local retry = cfg.retry or {}
  local opts = {
    proxy = cfg.proxy, no_proxy = cfg.no_proxy,
    user_agent = cfg.user_agent or ("sturdy/" .. sturdy._VERSION),
    seed = cfg.seed, on_retry = cfg.on_retry, on_event = cfg.on_event,
    attempts = retry.attempts, jitter = retry.jitter,
    cap_ms = retry.cap and ms(retry.cap),
    honor_retry_after_ms = retry.honor_retry_after and ms(retry.honor_retry_after),
  }
  for k, v in pairs(cfg.tls or {}) do opts[k] = v end
  if retry.jitter and not JITTERS[retry.jitter] then
    fail("option 'jitter' in retry must be one of full, equal, decorrelated, none; got %q", retry.jitter)
  end
  if type(retry.base) == "number" then
    opts.base_ms = {}
    for class in pairs(CLASSES) do opts.base_ms[class] = ms(retry.base) end
  elseif type(retry.base) == "table" then
    opts.base_ms = {}
    for class, v in pairs(retry.base) do
      if not CLASSES[class] then fail("unknown class '%s' in retry.base", tostring(class)) end
      if type(v) ~= "number" or v <= 0 then fail("retry.base.%s must be a positive number", class) end
      opts.base_ms[class] = ms(v)
    end
  end
  -- retry_on / never_retry_on take class names or HTTP statuses
  opts.retried, opts.status_retried = {}, {}
  for _, spec in ipairs { { retry.retry_on, true, "retry_on" }, { retry.never_retry_on, false, "never_retry_on" } } do
    for _, v in ipairs(spec[1] or {}) do
      if CLASSES[v] then
        opts.retried[v] = spec[2]
      elseif type(v) == "number" and v >= 100 and v <= 599 and v == floor(v) then
        opts.status_retried[v] = spec[2]
      else
        fail("retry.%s takes class names (throttled, overloaded, transient, timeout, fatal) "
             .. "or HTTP statuses, got %s", spec[3], tostring(v))
      end
    end
  end
  if cfg.breaker == false then
    opts.breaker = false
  elseif cfg.breaker then
    local b = cfg.breaker
    check_options(b, BREAKER_SCHEMA, "client options.breaker")
    if b.mode and not BREAKER_MODES[b.mode] then
      fail("breaker.mode must be normal, forced_open, disabled or metrics_only, got %q", b.mode)
    end
    for _, class in ipairs(b.failure_classes or {}) do
      if not CLASSES[class] then fail("unknown class '%s' in breaker.failure_classes", tostring(class)) end
    end
    opts.breaker = {
      window_ms = b.window and ms(b.window), buckets = b.buckets, min_calls = b.min_calls,
      failure_rate = b.failure_rate, slow_call_ms = b.slow_call == false and 0 or (b.slow_call and ms(b.slow_call)),
      slow_rate = b.slow_rate, open_ms = b.open_for and ms(b.open_for),
      max_open_ms = b.max_open_for and ms(b.max_open_for), probes = b.probes,
      probe_timeout_ms = b.probe_timeout and ms(b.probe_timeout), failure_classes = b.failure_classes,
      mode = b.mode,
    }
  end
  if cfg.limits then
    local l = cfg.limits
    opts.limits = {
      requests = l.rpm, tokens = l.tpm, input_tokens = l.itpm, output_tokens = l.otpm,
      burst_s = l.burst, concurrency = l.concurrency, queue = l.queue,
    }
  end
  if retry.budget == false then
    opts.budget = false
  elseif retry.budget then
    check_options(retry.budget, BUDGET_SCHEMA, "retry.budget")
    opts.budget = {
      ratio = retry.budget.ratio, min_per_s = retry.budget.min_per_s,
      slot_ms = retry.budget.window and ms(retry.budget.window) / 10,
    }
  end
  return opts
end

local function host_of(url)
  return url and url:match("^%a[%w+.-]*://([^/?#]+)")
end

--- Creates a client. See README for the options.
function sturdy.client(cfg)
  cfg = cfg or {}
  check_options(cfg, CLIENT_SCHEMA, "client options")
  if cfg.base_url and not cfg.base_url:find("^https?://[^/]") then
    fail("option 'base_url' must start with http:// or https:// and name a host, got %q",
         one_line(cfg.base_url, 80))
  end
  local timeout = {}
  for k, v in pairs(DEFAULT_TIMEOUT) do timeout[k] = v end
  for k, v in pairs(cfg.timeout or {}) do timeout[k] = v end

  local lines, names = {}, {}
  for name, value in pairs(cfg.headers or {}) do
    value = check_header(name, value, "client headers")
    lines[#lines + 1] = name .. ": " .. value
    names[#names + 1] = lower(name)
    names[lower(name)] = true
  end

  local self = setmetatable({
    base_url = cfg.base_url and cfg.base_url:gsub("/+$", ""),
    key = cfg.key or host_of(cfg.base_url),
    _timeout = timeout,
    max_response = cfg.max_response,
    _header_lines = lines, _header_names = names,
    _lines = base_lines(lines, names),
    _timeout_ms = timeouts_ms(timeout),
    _on_error = cfg.on_error, _yield = cfg.yield,
    _active = 0,
  }, Client)
  self._engine = core.engine(engine_options(cfg))
  return self
end

--- The upstream key of a request: its own, else the client's (or the URL's
-- host) plus "/model" when the JSON body names one, so a sick model does not
-- trip another.
function Client:_key_for(req, url)
  if req.key then return req.key end
  local key = self.key or host_of(url or req.url)
  local model = type(req.json) == "table" and req.json.model
  if type(model) == "string" then key = key .. "/" .. model end
  return key
end

-- Checks a request table and returns the engine's positional arguments.
function Client:_args(req)
  if type(req) ~= "table" then fail("request must be a table, got %s", type(req)) end
  check_options(req, REQUEST_SCHEMA, "request")
  local url = req.url
  if not url then
    local path = req.path or "/"
    if not self.base_url then fail("request needs 'url', or 'path' with a client base_url") end
    if path:byte(1) ~= 47 then fail("request 'path' must start with '/', got %q", one_line(path, 80)) end
    url = self.base_url .. path
  elseif not url:find("^https?://[^/]") then
    fail("request 'url' must start with http:// or https://, got %q", one_line(url, 80))
  end
  local body = req.body
  if req.json then
    if body then fail("request takes 'body' or 'json', not both") end
    local err
    body, err = cjson.encode(req.json)
    if not body then fail("request 'json' cannot be encoded: %s", err) end
  end
  local method = req.method or (body and "POST" or "GET")
  if not KNOWN_METHODS[method] and not method:find("^%u+$") then
    fail("request 'method' must be an upper-case HTTP method, got %q", method)
  end
  local t = req.timeout and timeouts_ms(self._timeout, req.timeout) or self._timeout_ms
  local priority = req.priority
  if priority and not PRIORITIES[priority] then
    fail("request 'priority' must be high, normal or low, got %q", one_line(priority, 40))
  end
  local tokens = req.tokens
  return method, url, self:_key_for(req, url), body,
    header_lines(self, req.headers, body ~= nil), t[1], t[2], t[3], t[4],
    req.max_response or self.max_response, req.attempts, req.on_data or req.stream,
    priority, tokens and tokens.input, tokens and tokens.output
end

local function to_response(r)
  if r.kind == nil then return setmetatable(r, Response) end
  local err = Error.new {
    kind = r.kind, class = r.class, status = r.status, detail = r.detail,
    retry_after = r.retry_after, committed = r.committed, attempts = r.attempts,
    request_id = r.request_id, raw_headers = r.raw_headers, body = r.body, timings = r.timings,
    retryable = r.class ~= "fatal" and r.class ~= "canceled",
  }
  if r.status then parse_error_body(err, r.body) end
  if r.cause then
    r.cause.message = MESSAGES[r.cause.kind]
    r.cause.detail = err.detail
    err.cause = Error.new(r.cause)
  end
  return nil, err
end

---------------------------------------------------------------------------
-- Non-blocking use: handles, poll, run, batch
---------------------------------------------------------------------------

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

--- Starts a request and returns a handle at once. callback(res, err), if
-- given, runs from a later poll, run or wait, never from submit itself.
function Client:submit(req, callback)
  if callback ~= nil and type(callback) ~= "function" then
    fail("submit's callback must be a function, got %s", type(callback))
  end
  local h = setmetatable({ client = self, callback = callback, _done = false }, Handle)
  h._request = self._engine:submit(h, self:_args(req))
  self._active = self._active + 1
  return h
end

-- Calls fn(...) for the user. An error it raises goes to the client's
-- on_error hook, or onto the list `errors` (made when needed), which is returned.
function Client:_call_user(errors, h, fn, ...)
  local ok, e = pcall(fn, ...)
  if ok then return errors end
  if self._on_error then
    pcall(self._on_error, e, h)
    return errors
  end
  errors = errors or {}
  errors[#errors + 1] = e
  return errors
end

-- Hands streamed bytes to their handles, then runs the callback of each
-- finished handle. Returns the errors raised, when there is no on_error hook.
function Client:_dispatch()
  local errors
  -- streamed bodies first: a stream's last bytes come before its end
  local data = self._engine:take_data()
  for i = 1, #data do
    local h = data[i][1]
    if h.on_chunk then errors = self:_call_user(errors, h, h.on_chunk, data[i][2], data[i][3]) end
  end
  local finished = self._engine:take_done()
  for i = 1, #finished do
    local h = finished[i]
    h._res, h._err = to_response(h.raw)
    h.raw, h._request, h._done = nil, nil, true
    self._active = self._active - 1
    if h.callback then errors = self:_call_user(errors, h, h.callback, h._res, h._err) end
  end
  return errors
end

--- Does the work that is ready, waiting at most timeout seconds (default 0)
-- for some; fires callbacks. Returns how many calls are still active, and a
-- list of callback errors when there were any and no on_error hook.
function Client:poll(timeout)
  local ms_ = wait_ms(timeout, "poll") or 0
  self._engine:step(ms_)
  local errors = self:_dispatch()
  return self._active, errors
end

--- Drives the engine until no call is in flight or waiting.
function Client:run()
  local all
  while self._active > 0 do
    local _, errors = self:poll(1)
    if errors then
      all = all or {}
      for _, e in ipairs(errors) do all[#all + 1] = e end
    end
  end
  return all
end

--- The sockets the engine waits on ({fd, read, write} each) and the seconds
-- until it next needs driving (nil when idle), for external event loops.
function Client:fds()
  return self._engine:fds()
end

function Client:timeout()
  local t = self._engine:timeout()
  return t and t / 1000
end

function Client:pending()
  return self._active
end

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
  local deadline = limit and now() + limit / 1000
  local client = self.client
  while not self._done do
    local left = deadline and (deadline - now()) * 1000
    if left and left <= 0 then
      return nil, Error.new { kind = "wait_timeout", class = "timeout", pending = true,
                              message = "the call is still in flight" }
    end
    client._engine:step(left and math.min(left, 1000) or 1000)
    client:_dispatch()
  end
  return self._res, self._err
end

--- Ends the call with kind "canceled"; its callback fires once, from the next
-- poll, run or wait.
function Handle:cancel()
  if not self._done and self._request then self._request:cancel() end
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
        self:poll(0)
        if h._done then return h._res, h._err end
        yield()
      end
    end
  end
  return to_response(self._engine:perform(self:_args(req)))
end

local function progress_bar(done, total, failed)
  local width = 30
  local filled = total > 0 and floor(width * done / total) or width
  io.stderr:write(format("\r[%s%s] %d/%d%s", string.rep("#", filled), string.rep(".", width - filled),
                         done, total, failed > 0 and format(" (%d failed)", failed) or ""))
  if done == total then io.stderr:write("\n") end
end

--- Runs a list of requests, at most `concurrency` in flight, and returns the
-- outcomes in input order: each a response or a sturdy.Error; then the errors
-- on_progress raised, if it raised any and there is no on_error hook.
function Client:batch(requests, opts)
  if type(requests) ~= "table" then fail("batch takes a list of requests, got %s", type(requests)) end
  opts = opts or {}
  check_options(opts, BATCH_SCHEMA, "batch options")
  local total = #requests
  for i = 1, total do
    if type(requests[i]) ~= "table" then fail("batch request #%d must be a table, got %s", i, type(requests[i])) end
    self:_args(requests[i]) -- every request is checked before any is sent
  end
  local concurrency = opts.concurrency or 32
  local on_progress = opts.on_progress
  if opts.progress and core.isatty(2) then
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
    if on_progress then errors = self:_call_user(errors, nil, on_progress, done, total, failed) end
    launch()
  end
  function launch()
    while in_flight < concurrency and next_index <= total do
      local i = next_index
      next_index, in_flight = i + 1, in_flight + 1
      self:submit(requests[i], function(res, err) finished(i, res, err) end)
    end
  end
  launch()
  while done < total do
    local _, errs = self:poll(1)
    for _, e in ipairs(errs or {}) do errors = errors or {}; errors[#errors + 1] = e end
  end
  -- errors raised by on_progress are returned beside the complete results
  return results, errors
end

--- Without a key: the client's totals and the keys it has seen. With one:
-- that upstream's breaker, latency percentiles, limits, queue and in-flight.
function Client:stats(key)
  if key ~= nil then
    if type(key) ~= "string" then fail("stats takes a key string, got %s", type(key)) end
    local s = self._engine:upstream_stats(key)
    if s and self._usage then s.usage = self._usage[key] end
    return s
  end
  local s = self._engine:stats()
  s.keys = self._engine:keys()
  if self._usage then
    local total = { calls = 0, input = 0, output = 0, cache_read = 0, cache_write = 0, cost = 0 }
    for _, u in pairs(self._usage) do
      for k, v in pairs(u) do total[k] = total[k] + v end
    end
    s.usage = total
  end
  return s
end

--- Cancels what is in flight or waiting, fires those callbacks once, and
-- frees the engine. Later calls raise; closing twice is harmless.
function Client:close()
  if self._closed then return end
  self._engine:cancel_all()
  self:_dispatch()
  self._engine:close()
  self._closed = true
end

Client.__close = Client.close

function Client:__tostring()
  return format("sturdy.client (%s)", self.base_url or "no base_url")
end

sturdy.Client = Client

return sturdy
