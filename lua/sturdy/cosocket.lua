--- sturdy.cosocket: HTTP/1.1 over OpenResty cosockets (ngx.socket.tcp), so a
-- call never blocks an nginx worker.
--
--   local http = require "sturdy.cosocket"
--   local c = assert(http.new { timeout = { connect = 5, first_byte = 60, idle = 30, total = 600 } })
--   local res, err = c:request { url = "https://api.example.com/v1/x", method = "POST",
--                                headers = { ["content-type"] = "application/json" }, body = json }
--   -- res.status, res.http_version, res.raw_headers, res.headers, res.body, res.timings, res.reused
--   -- err = { kind = "first_byte_timeout", class = "timeout", detail = "...", status = ?, timings = ? }
--
--   local res = assert(c:open(req))   -- after the head; the body through a reader:
--   repeat local chunk, rerr = res:read() ... until not chunk
--
-- Bodies: Content-Length, chunked (strict chunk sizes, trailers skipped) or
-- until the server closes. The status line and header lines go through the C
-- parser every transport shares (sturdy.policy). A connection returns to the
-- keep-alive pool only after a complete body; its pool name holds the host,
-- port, TLS, server name, verify setting and proxy. TLS is verified against
-- nginx's lua_ssl_trusted_certificate. Timeouts are seconds: connect (TCP, proxy
-- CONNECT and TLS), first_byte (from the start of the attempt), idle (between
-- bytes after the first) and total, bounded by the call's absolute deadline
-- (policy.monotime() seconds); each maps onto the socket's settimeouts.
-- Runtime failures return nil and an error table; wrong arguments raise.
-- luacheck: read globals ngx

local policy = require "sturdy.policy"

local monotime = policy.monotime
local new_head, status_line, header_table = policy.head, policy.status_line, policy.header_table
local type, pairs, tostring, tonumber, pcall, error = type, pairs, tostring, tonumber, pcall, error
local setmetatable = setmetatable
local floor, min = math.floor, math.min
local concat = table.concat
local lower, format, find, sub, byte = string.lower, string.format, string.find, string.sub, string.byte

local M = {}

local DEFAULT_TIMEOUT = { connect = 10, first_byte = 60, idle = 30, total = 600 }
local DEFAULT_MAX_RESPONSE = 64 * 1024 * 1024
local DEFAULT_MAX_HEAD = 256 * 1024
local DEFAULT_POOL_IDLE = 60          -- seconds a pooled connection may sit unused
local DEFAULT_POOL_SIZE = 64
local RECV_SIZE = 64 * 1024           -- most bytes one receiveany asks for
local MAX_TIMEOUT_MS = 2147483647     -- nginx timers take at most this
local MAX_CHUNK_DIGITS = 15           -- hex digits of a chunk size (< 2^60)

-- The phases where nginx lets a cosocket connect.
local COSOCKET_PHASES = {
  rewrite = true, access = true, content = true, timer = true,
  ssl_cert = true, ssl_session_fetch = true, ssl_client_hello = true,
}

local CLASS_OF = {
  connect_timeout = "timeout", first_byte_timeout = "timeout", idle_timeout = "timeout",
  total_timeout = "timeout", connection = "transient", dns = "transient", tls = "fatal",
  response_too_large = "fatal", bad_response = "fatal", bad_url = "fatal", canceled = "canceled",
}

---------------------------------------------------------------------------
-- Arguments (programming mistakes raise, naming the argument)
---------------------------------------------------------------------------

local function fail(msg, ...)
  error("sturdy: " .. format(msg, ...), 3)
end

local function check_seconds(v, name, allow_false)
  if v == false and allow_false then return false end
  if type(v) ~= "number" or v ~= v or v <= 0 then
    fail("%s must be a positive number of seconds%s, got %s", name, allow_false and " or false" or "",
         type(v) == "number" and tostring(v) or type(v))
  end
  return v
end

local function check_size(v, name)
  if type(v) ~= "number" or v ~= v or v < 1 then
    fail("%s must be a number of bytes >= 1, got %s", name, type(v) == "number" and tostring(v) or type(v))
  end
  return v
end

local TIMEOUT_NAMES = { connect = true, first_byte = true, idle = true, total = true }

-- A timeout table merged over base: each value seconds or false (none).
local function merge_timeouts(base, t, where)
  if t == nil then return base end
  if type(t) ~= "table" then fail("%s must be a table, got %s", where, type(t)) end
  local out = { connect = base.connect, first_byte = base.first_byte, idle = base.idle, total = base.total }
  for k, v in pairs(t) do
    if not TIMEOUT_NAMES[k] then fail("unknown timeout '%s' in %s", tostring(k), where) end
    out[k] = check_seconds(v, where .. "." .. k, true)
  end
  return out
end

---------------------------------------------------------------------------
-- URLs
---------------------------------------------------------------------------

local function is_ip_literal(host)
  return find(host, "^%d+%.%d+%.%d+%.%d+$") ~= nil or find(host, ":", 1, true) ~= nil
end

-- scheme, host (IPv6 without brackets), port, path; or nil, why.
local function parse_url(url)
  local scheme, authority, rest = url:match("^(%a[%w+.-]*)://([^/?#]*)(.*)$")
  if not scheme then return nil, "not an absolute http(s) URL" end
  scheme = lower(scheme)
  if scheme ~= "http" and scheme ~= "https" then return nil, "scheme '" .. scheme .. "' is not http or https" end
  if find(authority, "@", 1, true) then return nil, "credentials in the URL are not supported" end
  local host, port = authority:match("^%[([%x:.]+)%]:?(%d*)$")
  if not host then host, port = authority:match("^([^:]+):?(%d*)$") end
  if not host or host == "" then return nil, "no host in the URL" end
  if port == "" then
    port = scheme == "https" and 443 or 80
  else
    port = tonumber(port)
    if port < 1 or port > 65535 then return nil, "port out of range" end
  end
  rest = rest:gsub("#.*$", "")
  if rest == "" then rest = "/" elseif byte(rest) == 63 then rest = "/" .. rest end  -- "?q" -> "/?q"
  if find(rest, "[%c ]") then return nil, "the path has spaces or control characters" end
  return scheme, lower(host), port, rest
end

local function authority_of(host, port, default_port)
  local h = find(host, ":", 1, true) and ("[" .. host .. "]") or host
  if port == default_port then return h end
  return h .. ":" .. port
end

-- Proxy credentials, each a small number of its own for pool names.
local auth_ids, auth_count = {}, 0

-- "http://[user:pass@]host:port" -> { host, port, auth = "Basic ..." | nil, id }
local function parse_proxy(url)
  if type(url) ~= "string" then fail("proxy must be a string, got %s", type(url)) end
  local scheme, userinfo, hostport = url:match("^(%a+)://([^@/]*)@([^/]*)/?$")
  if not scheme then
    scheme, hostport = url:match("^(%a+)://([^@/]*)/?$")
  end
  if not scheme or lower(scheme) ~= "http" then
    -- the URL is not echoed: it may hold credentials
    fail("proxy must be an http://host:port URL (an HTTPS proxy is not supported)")
  end
  local ok, host, port = parse_url("http://" .. hostport)
  if not ok then fail("proxy has no usable host and port") end
  local auth
  if userinfo and userinfo ~= "" then
    local unescaped = userinfo:gsub("%%(%x%x)", function(h) return string.char(tonumber(h, 16)) end)
    auth = "Basic " .. ngx.encode_base64(unescaped)
  end
  -- Pool names may reach debug logs: credentials appear there only as a number.
  local id = authority_of(host, port, nil)
  if auth then
    if not auth_ids[auth] then
      auth_count = auth_count + 1
      auth_ids[auth] = auth_count
    end
    id = id .. "#" .. auth_ids[auth]
  end
  return { host = host, port = port, auth = auth, id = id }
end

-- no_proxy: "*", or a comma list of host names (a name covers its subdomains).
local function parse_no_proxy(s)
  if s == nil then return nil end
  if type(s) ~= "string" then fail("no_proxy must be a string, got %s", type(s)) end
  local list = {}
  for name in s:gmatch("[^,%s]+") do
    list[#list + 1] = lower((name:gsub("^%.", "")))
  end
  return list
end

local function bypasses_proxy(no_proxy, host)
  if not no_proxy then return false end
  for i = 1, #no_proxy do
    local n = no_proxy[i]
    if n == "*" or host == n or (#host > #n and sub(host, -#n - 1) == "." .. n) then return true end
  end
  return false
end

---------------------------------------------------------------------------
-- Errors and timeouts
---------------------------------------------------------------------------

local function new_error(kind, detail, status)
  return { kind = kind, class = CLASS_OF[kind], detail = detail, status = status }
end

local function to_ms(seconds)
  if seconds >= MAX_TIMEOUT_MS / 1000 then return MAX_TIMEOUT_MS end
  local ms = floor(seconds * 1000 + 0.5)
  return ms < 1 and 1 or ms     -- 0 would mean nginx's configured default
end

-- The socket timeout for the next operation: the earlier of the phase's end
-- (absolute, or nil) and the call's deadline, and the kind that ends it.
-- Returns ms, kind; or nil, kind when that time has already passed.
local function budget(call, phase_end, phase_kind, now)
  local limit, kind = call.deadline, "total_timeout"
  if phase_end and (not limit or phase_end < limit) then limit, kind = phase_end, phase_kind end
  if not limit then return MAX_TIMEOUT_MS, kind end
  local left = limit - now
  if left <= 0 then return nil, kind end
  return to_ms(left), kind
end

---------------------------------------------------------------------------
-- A call on one connection
---------------------------------------------------------------------------

local Call = {}
Call.__index = Call

-- Sets all three socket timeouts for the next operation of a phase.
-- Returns true, or nil and the timeout error when no time is left.
function Call:arm(phase_end, phase_kind)
  local ms, kind = budget(self, phase_end, phase_kind, monotime())
  if not ms then
    return nil, new_error(kind, kind:gsub("_", " ") .. " before " .. self.step)
  end
  self.armed_kind = kind
  self.sock:settimeouts(ms, ms, ms)
  return true
end

-- A socket error turned into ours: "timeout" is whatever bound the step.
function Call:socket_error(err, kind_otherwise)
  if err == "timeout" then
    local kind = self.armed_kind
    return new_error(kind, format("%s while %s (%.3f s into the attempt)", kind:gsub("_", " "),
                                  self.step, monotime() - self.started), self.status)
  end
  return new_error(kind_otherwise, self.step .. ": " .. tostring(err), self.status)
end

-- The read phase: first byte from the attempt's start, then idle per read
-- (a proxy's CONNECT answer is read on the connect budget: read_end).
function Call:arm_read()
  if self.read_end ~= nil then return self:arm(self.read_end, "connect_timeout") end
  local t = self.timeouts
  if self.got_bytes then
    return self:arm(t.idle and monotime() + t.idle or nil, "idle_timeout")
  end
  return self:arm(t.first_byte and self.started + t.first_byte or nil, "first_byte_timeout")
end

-- Appends the next bytes off the wire to the buffer. Returns true or nil, err.
function Call:fill(why)
  self.step = why
  local ok, err = self:arm_read()
  if not ok then return nil, err end
  local data, rerr = self.sock:receiveany(RECV_SIZE)
  if not data then
    if rerr == "closed" then return nil, "closed" end
    return nil, self:socket_error(rerr, "connection")
  end
  if not self.got_bytes then
    self.got_bytes = true
    self.first_byte_at = monotime()
  end
  if self.pos > #self.buf then
    self.buf, self.pos = data, 1
  else
    self.buf, self.pos = sub(self.buf, self.pos) .. data, 1
  end
  return true
end

-- One line without its CR LF or LF; nil, "too_long" | "closed" | err.
function Call:line(limit, why)
  while true do
    local nl = find(self.buf, "\n", self.pos, true)
    if nl then
      local stop = nl - 1
      if stop >= self.pos and byte(self.buf, stop) == 13 then stop = stop - 1 end
      local line = sub(self.buf, self.pos, stop)
      self.pos = nl + 1
      return line
    end
    if #self.buf - self.pos + 1 > limit then return nil, "too_long" end
    local ok, err = self:fill(why)
    if not ok then return nil, err end
  end
end

-- Up to n buffered or newly received bytes (n >= 1); nil, "closed" | err.
function Call:some(n, why)
  if self.pos > #self.buf then
    local ok, err = self:fill(why)
    if not ok then return nil, err end
  end
  local stop = min(#self.buf, self.pos + n - 1)
  local piece = sub(self.buf, self.pos, stop)
  self.pos = stop + 1
  return piece
end

function Call:close()
  if self.sock then
    self.sock:close()
    self.sock = nil
  end
  self.buf, self.pos = "", 1
end

-- Back to the pool when the body is complete, the server allows it and no
-- stray bytes follow; closed otherwise.
function Call:release()
  local sock = self.sock
  if not sock then return end
  self.sock = nil
  local clean = self.pos > #self.buf
  self.buf, self.pos = "", 1
  if self.reusable and clean and sock:setkeepalive(self.pool_idle_ms) then return end
  sock:close()
end

-- Response-head parsers are kept for reuse: one per call in flight at most.
local function take_head(self)
  local heads = self.heads
  local n = #heads
  if n == 0 then return new_head(self.max_head) end
  local head = heads[n]
  heads[n] = nil
  return head
end

local function give_head(call)
  local head = call.head
  if head and not call.own_head then
    call.head = nil
    local heads = call.client.heads
    heads[#heads + 1] = head
  end
end

---------------------------------------------------------------------------
-- Connecting: TCP (via a proxy when set), CONNECT tunnel, TLS
---------------------------------------------------------------------------

local function connect_error_kind(err)
  if find(err, "could not be resolved", 1, true) or find(err, "no resolver defined", 1, true) then
    return "dns"
  end
  return "connection"
end

-- Reads a response head into call.head; sets call.status, call.version.
-- Returns true or nil, err. 1xx interim heads are skipped.
function Call:read_head()
  local head, max_head = self.head, self.max_head
  while true do
    self.step = "reading the status line"
    local line, err = self:line(max_head, self.step)
    if not line then
      if err == "too_long" then return nil, new_error("bad_response", "response head too large") end
      if err == "closed" then
        return nil, new_error("connection", "the server closed the connection before a response")
      end
      return nil, err
    end
    local status, version = status_line(line)
    if not status or version >= 2 then
      return nil, new_error("bad_response", "not an HTTP/1.x status line: " .. format("%q", sub(line, 1, 60)))
    end
    self.status, self.version = status, version
    head:reset()
    local used = 0
    while true do
      self.step = "reading the response head"
      line, err = self:line(max_head - used, self.step)
      if not line then
        if err == "too_long" then return nil, new_error("bad_response", "response head too large", status) end
        if err == "closed" then
          return nil, new_error("connection", "the server closed the connection inside the response head", status)
        end
        err.status = status
        return nil, err
      end
      if line == "" then break end
      used = used + #line + 2
      local ok, why = head:add(line)
      if not ok then
        if why == "too_large" then return nil, new_error("bad_response", "response head too large", status) end
        return nil, new_error("bad_response", "malformed header line " .. format("%q", sub(line, 1, 60)), status)
      end
    end
    if status >= 200 or status == 101 then return true end
  end
end

-- The proxy's answer to CONNECT: a head, 2xx, nothing more.
function Call:tunnel(target)
  local lines = { "CONNECT ", target, " HTTP/1.1\r\nHost: ", target, "\r\n" }
  if self.proxy.auth then
    lines[#lines + 1] = "Proxy-Authorization: " .. self.proxy.auth .. "\r\n"
  end
  lines[#lines + 1] = "\r\n"
  self.step = "sending CONNECT to the proxy"
  local _, err = self.sock:send(lines)
  if err then return nil, self:socket_error(err, "connection") end
  -- The tunnel is part of connecting: its reads run on the connect budget.
  self.read_end = self.connect_end or false
  local ok, herr = self:read_head()
  self.read_end, self.got_bytes = nil, false
  if not ok then
    herr.detail = "proxy CONNECT: " .. tostring(herr.detail)
    herr.status = nil
    return nil, herr
  end
  if self.status < 200 or self.status > 299 then
    return nil, new_error("connection", "the proxy answered CONNECT with " .. self.status)
  end
  if self.pos <= #self.buf then
    return nil, new_error("bad_response", "the proxy sent bytes after its CONNECT answer")
  end
  self.status, self.version = nil, nil
  return true
end

function Call:connect(target)
  local sock = self.sock
  local host, port = target.host, target.port
  local via = self.proxy
  if via then host, port = via.host, via.port end
  self.step = via and "connecting to the proxy" or "connecting"
  local ok, err = self:arm(self.connect_end, "connect_timeout")
  if not ok then return nil, err end
  ok, err = sock:connect(find(host, ":", 1, true) and ("[" .. host .. "]") or host, port,
                         { pool = self.pool_name, pool_size = self.pool_size })
  if not ok then
    if err == "timeout" then return nil, self:socket_error(err) end
    return nil, new_error(connect_error_kind(err), format("%s %s:%d: %s", self.step, host, port, err))
  end
  local t = monotime()
  self.reused = (sock:getreusedtimes() or 0) > 0
  if self.reused then return true end
  self.timings.connect = t - self.started
  if target.tls then
    if via then
      ok, err = self:tunnel(authority_of(target.host, target.port, nil))
      if not ok then return nil, err end
    end
    self.step = "the TLS handshake"
    ok, err = self:arm(self.connect_end, "connect_timeout")
    if not ok then return nil, err end
    -- reused_session nil, never false: lua-resty-core 0.1.25 answers true to
    -- false when a handshake that completed at once failed verification, and
    -- fails an assertion with nil; the pcall turns that into a tls error.
    local done, session, herr = pcall(sock.sslhandshake, sock, nil, target.server_name, target.verify)
    if not done then
      if not find(tostring(session), "assertion failed", 1, true) then error(session, 0) end
      ok, err = nil, "certificate verification failed"
    else
      ok, err = session ~= nil and session ~= false, herr
    end
    if not ok then
      if err == "timeout" then return nil, self:socket_error(err) end
      local hint = ""
      if is_ip_literal(target.server_name) and find(tostring(err), "mismatch", 1, true) then
        hint = " (an address is checked as a name: set server_name to a name the certificate holds)"
      end
      return nil, new_error("tls", "TLS handshake with " .. target.server_name .. ": " .. tostring(err) .. hint)
    end
    self.timings.tls = monotime() - t
  end
  return true
end

---------------------------------------------------------------------------
-- Requests
---------------------------------------------------------------------------

local RESERVED = { ["content-length"] = true, ["transfer-encoding"] = true, connection = true }

local function check_header(name, value)
  if type(name) ~= "string" or not find(name, "^[%w!#$%%&'*+%-.^_`|~]+$") then
    fail("header name %s is not a valid HTTP token", format("%q", tostring(name)))
  end
  if RESERVED[lower(name)] then fail("header '%s' is set by the transport", name) end
  if type(value) == "number" then value = tostring(value) end
  if type(value) ~= "string" then fail("header '%s' must be a string, got %s", name, type(value)) end
  if find(value, "[\r\n%z]") then
    fail("header '%s' contains CR, LF or NUL", name)   -- the value is not echoed: it may be a secret
  end
  return value
end

-- headers: { name = value | { values } } and/or a list of "Name: value" lines
-- (a line with an empty value is skipped, as libcurl drops it).
local function add_headers(out, headers)
  local host
  for k, v in pairs(headers) do
    if type(k) == "number" then
      if type(v) ~= "string" then fail("header line %d must be a string, got %s", k, type(v)) end
      local name, value = v:match("^([^:]*):[ \t]*(.-)[ \t]*$")
      if not name then fail("header line %d has no colon", k) end
      if value ~= "" then
        value = check_header(name, value)
        if lower(name) == "host" then host = value else out[#out + 1] = name .. ": " .. value .. "\r\n" end
      end
    elseif type(v) == "table" then
      for i = 1, #v do out[#out + 1] = k .. ": " .. check_header(k, v[i]) .. "\r\n" end
    else
      v = check_header(k, v)
      if lower(k) == "host" then host = v else out[#out + 1] = k .. ": " .. v .. "\r\n" end
    end
  end
  return host
end

local BODYLESS_STATUS = { [204] = true, [304] = true }
local METHODS_WITH_BODY = { POST = true, PUT = true, PATCH = true }

-- The request bytes as a list for sock:send.
local function request_bytes(call, req, target)
  local method = req.method or (req.body and "POST" or "GET")
  if type(method) ~= "string" or not find(method, "^%u+$") then
    fail("method must be an upper-case HTTP method, got %s", type(method) == "string" and format("%q", method)
         or type(method))
  end
  local body = req.body
  if body ~= nil and type(body) ~= "string" then fail("body must be a string, got %s", type(body)) end
  local path = target.path
  if call.proxy and not target.tls then
    path = "http://" .. authority_of(target.host, target.port, nil) .. path   -- absolute form
  end
  local out = { method, " ", path, " HTTP/1.1\r\n", "", "" }
  local host = req.headers and add_headers(out, req.headers)
  out[5] = "Host: " .. (host or target.authority) .. "\r\n"
  if call.proxy and not target.tls and call.proxy.auth then
    out[6] = "Proxy-Authorization: " .. call.proxy.auth .. "\r\n"
  end
  if body then
    out[#out + 1] = "Content-Length: " .. #body .. "\r\n"
  elseif METHODS_WITH_BODY[method] then
    out[#out + 1] = "Content-Length: 0\r\n"
  end
  if not call.keepalive then out[#out + 1] = "Connection: close\r\n" end
  out[#out + 1] = "\r\n"
  if body and body ~= "" then out[#out + 1] = body end
  return out, method
end

local Response = {}
Response.__index = function(res, k)
  if k == "headers" then
    local h = setmetatable(header_table(res.raw_headers), {
      __index = function(t, name) if type(name) == "string" then return rawget(t, lower(name)) end end,
    })
    rawset(res, "headers", h)
    return h
  end
  return Response[k]
end

-- How the body is delimited, from the head. Returns mode, length or nil, err.
local function body_framing(call, method)
  local status, head = call.status, call.head
  if status == 101 then call.reusable = false end   -- the connection speaks another protocol now
  if method == "HEAD" or BODYLESS_STATUS[status] or status < 200 then return "none", 0 end
  local te = head:get("transfer-encoding")
  if te then
    te = lower(te)
    if find(te, "chunked%s*$") then return "chunked" end
    call.reusable = false
    return "close"
  end
  local cl = head:get("content-length")
  if cl then
    if not find(cl, "^%d+$") then
      return nil, new_error("bad_response", "bad content-length " .. format("%q", sub(cl, 1, 40)), status)
    end
    local n = tonumber(cl)
    if n > call.max_response then
      return nil, new_error("response_too_large",
        format("content-length %s exceeds max_response (%d bytes)", sub(cl, 1, 20), call.max_response), status)
    end
    return "length", n
  end
  call.reusable = false
  return "close"
end

local function finish_timings(call)
  local tm = call.timings
  tm.total = monotime() - call.started
end

-- The error path of a read: the socket is closed, the error carries the status and timings.
local function read_failed(call, err)
  give_head(call)
  call:close()
  call.done = true
  finish_timings(call)
  err.status = err.status or call.status
  err.timings = call.timings
  return nil, err
end

local function count_body(call, piece)
  call.received = call.received + #piece
  if call.received > call.max_response then
    return nil, new_error("response_too_large",
      format("body exceeds max_response (%d bytes)", call.max_response), call.status)
  end
  return piece
end

-- Next piece of a chunked body: nil at its end.
local function read_chunked(call)
  if call.chunk_left == 0 then
    if call.chunk_seen then
      local crlf, err = call:line(2, "reading a chunk's end")
      if crlf == nil then
        if err == "closed" then return nil, new_error("connection", "the body ended inside a chunk") end
        if err ~= "too_long" then return nil, err end
      end
      if crlf ~= "" then return nil, new_error("bad_response", "no CRLF after a chunk") end
    end
    local line, err = call:line(MAX_CHUNK_DIGITS + 256, "reading a chunk size")
    if not line then
      if err == "closed" then return nil, new_error("connection", "the body ended before its last chunk") end
      if err == "too_long" then return nil, new_error("bad_response", "chunk size line too long") end
      return nil, err
    end
    local hex = line:match("^(%x+)[ \t]*;") or line:match("^(%x+)$")
    if not hex or #hex > MAX_CHUNK_DIGITS then
      return nil, new_error("bad_response", "bad chunk size " .. format("%q", sub(line, 1, 40)))
    end
    local size = tonumber(hex, 16)
    if size == 0 then
      -- trailers: skipped, within the head limit
      local used = 0
      while true do
        local t, terr = call:line(call.max_head - used, "reading trailers")
        if not t then
          if terr == "too_long" then return nil, new_error("bad_response", "trailers too large") end
          if terr == "closed" then return nil, new_error("connection", "the body ended inside its trailers") end
          return nil, terr
        end
        if t == "" then return nil end
        used = used + #t + 2
      end
    end
    if call.received + size > call.max_response then
      return nil, new_error("response_too_large",
        format("body exceeds max_response (%d bytes)", call.max_response), call.status)
    end
    call.chunk_left, call.chunk_seen = size, true
  end
  local piece, err = call:some(min(call.chunk_left, RECV_SIZE), "reading the body")
  if not piece then
    if err == "closed" then return nil, new_error("connection", "the body ended inside a chunk") end
    return nil, err
  end
  call.chunk_left = call.chunk_left - #piece
  return count_body(call, piece)
end

--- The next piece of the body (a non-empty string); nil at its end (the
-- connection then goes back to the pool when it can); nil, err on failure
-- (the connection is closed).
function Response:read()
  local call = self._call
  if call.done then return nil, call.failed end
  local piece, err
  local mode = call.mode
  if mode == "length" then
    if call.left > 0 then
      piece, err = call:some(min(call.left, RECV_SIZE), "reading the body")
      if piece then
        call.left = call.left - #piece
        call.received = call.received + #piece
      elseif err == "closed" then
        err = new_error("connection", format("the body ended %d bytes short of its content-length", call.left))
      end
    end
  elseif mode == "chunked" then
    piece, err = read_chunked(call)
  elseif mode == "close" then
    piece, err = call:some(RECV_SIZE, "reading the body")
    if piece then
      piece, err = count_body(call, piece)
    elseif err == "closed" then
      err = nil
    end
  end
  if piece then return piece end
  if err then
    call.failed = err
    return read_failed(call, err)
  end
  call.done = true
  call:release()
  finish_timings(call)
  return nil
end

--- Abandons the body: the connection is closed, not pooled.
function Response:close()
  local call = self._call
  if not call.done then
    call.done = true
    call:close()
    finish_timings(call)
  end
end

---------------------------------------------------------------------------
-- The client
---------------------------------------------------------------------------

local Client = {}
Client.__index = Client

local CLIENT_OPTIONS = {
  timeout = true, max_response = true, max_head = true, proxy = true, no_proxy = true,
  keepalive = true, pool_size = true, insecure_skip_tls_verify = true,
}

local warned_insecure = false

--- http.new(opts) -> client, or nil and a message outside OpenResty.
-- opts: timeout { connect, first_byte, idle, total } (seconds or false),
-- max_response (bytes), max_head (bytes of status line + headers),
-- proxy ("http://[user:pass@]host:port"), no_proxy ("*" or "a.com,b.org"),
-- keepalive (seconds a pooled connection may idle, or false: Connection: close),
-- pool_size, insecure_skip_tls_verify (true turns certificate checks off).
function M.new(opts)
  if type(ngx) ~= "table" or not (ngx.socket and ngx.socket.tcp) then
    return nil, "sturdy.cosocket needs OpenResty (ngx.socket.tcp); outside nginx use the curl transport"
  end
  if opts == nil then opts = {} end
  if type(opts) ~= "table" then fail("http.new takes a table of options, got %s", type(opts)) end
  for k in pairs(opts) do
    if not CLIENT_OPTIONS[k] then fail("unknown option '%s' in http.new", tostring(k)) end
  end
  local self = setmetatable({
    timeouts = merge_timeouts(DEFAULT_TIMEOUT, opts.timeout, "timeout"),
    max_response = opts.max_response and check_size(opts.max_response, "max_response") or DEFAULT_MAX_RESPONSE,
    max_head = opts.max_head and check_size(opts.max_head, "max_head") or DEFAULT_MAX_HEAD,
    proxy = opts.proxy ~= nil and parse_proxy(opts.proxy) or nil,
    no_proxy = parse_no_proxy(opts.no_proxy),
    pool_idle_ms = DEFAULT_POOL_IDLE * 1000,
    pool_size = DEFAULT_POOL_SIZE,
    keepalive = true,
    verify = true,
    targets = {}, ntargets = 0, heads = {},
  }, Client)
  if opts.keepalive ~= nil or opts.pool_size ~= nil then self:set_keepalive(opts.keepalive, opts.pool_size) end
  local insecure = opts.insecure_skip_tls_verify
  if insecure ~= nil and insecure ~= false then
    if insecure ~= true then
      fail("insecure_skip_tls_verify must be true or false, got %s", type(insecure))
    end
    self.verify = false
    if not warned_insecure then
      warned_insecure = true
      ngx.log(ngx.WARN, "sturdy: TLS certificate verification is OFF (insecure_skip_tls_verify)")
    end
  end
  return self
end

--- Sets the timeouts in seconds (false: none); nil leaves one as it is.
function Client:set_timeouts(connect, first_byte, idle, total)
  local t = {}
  t.connect, t.first_byte, t.idle, t.total = connect, first_byte, idle, total
  self.timeouts = merge_timeouts(self.timeouts, t, "set_timeouts")
  return true
end

--- Keep-alive: seconds a pooled connection may idle (false: no reuse,
-- every request closes its connection), and the pool size per target.
function Client:set_keepalive(idle, pool_size)
  self.targets, self.ntargets = {}, 0   -- pool names hold the keep-alive setting
  if idle == false then
    self.keepalive = false
  elseif idle ~= nil then
    self.keepalive = true
    self.pool_idle_ms = to_ms(check_seconds(idle, "keepalive"))
  end
  if pool_size ~= nil then
    if type(pool_size) ~= "number" or pool_size < 1 or pool_size ~= floor(pool_size) then
      fail("pool_size must be a whole number >= 1, got %s", tostring(pool_size))
    end
    self.pool_size = pool_size
  end
  return true
end

local REQUEST_FIELDS = {
  url = true, method = true, headers = true, body = true, timeout = true, deadline = true,
  max_response = true, on_chunk = true, server_name = true, head = true,
}

local MAX_CACHED_TARGETS = 256

-- The target of a request: host, port, tls, server_name, verify, path,
-- authority, proxy and pool name. Cached per client by URL and server name.
local function target_of(self, req)
  local server_name = req.server_name
  if server_name ~= nil and type(server_name) ~= "string" then
    fail("server_name must be a string, got %s", type(server_name))
  end
  local key = server_name and (req.url .. "\n" .. server_name) or req.url
  local target = self.targets[key]
  if target then return target end
  local scheme, host, port, path = parse_url(req.url)
  if not scheme then return nil, host end
  local tls = scheme == "https"
  local proxy = self.proxy
  if proxy and bypasses_proxy(self.no_proxy, host) then proxy = nil end
  target = {
    host = host, port = port, tls = tls, path = path,
    server_name = tls and (server_name or host) or nil, verify = self.verify,
    authority = authority_of(host, port, tls and 443 or 80), proxy = proxy,
  }
  target.pool_name = concat({ "sturdy", tls and "https" or "http", host, port, target.server_name or "",
                              self.verify and "verify" or "noverify", proxy and proxy.id or "direct",
                              self.keepalive and "" or "close" }, "|")
  if self.ntargets >= MAX_CACHED_TARGETS then self.targets, self.ntargets = {}, 0 end
  self.targets[key], self.ntargets = target, self.ntargets + 1
  return target
end

local function new_call(self, req, target)
  local timeouts = merge_timeouts(self.timeouts, req.timeout, "request timeout")
  local started = monotime()
  local deadline = timeouts.total and started + timeouts.total or nil
  if req.deadline ~= nil then
    if type(req.deadline) ~= "number" or req.deadline ~= req.deadline then
      fail("deadline must be a policy.monotime() time in seconds, got %s", tostring(req.deadline))
    end
    if not deadline or req.deadline < deadline then deadline = req.deadline end
  end
  return setmetatable({
    client = self, timeouts = timeouts, started = started, deadline = deadline,
    connect_end = timeouts.connect and started + timeouts.connect or nil,
    max_response = req.max_response and check_size(req.max_response, "max_response") or self.max_response,
    max_head = self.max_head, head = req.head or take_head(self), own_head = req.head ~= nil,
    pool_name = target.pool_name,
    proxy = target.proxy, keepalive = self.keepalive, pool_idle_ms = self.pool_idle_ms, pool_size = self.pool_size,
    timings = { dns = 0, connect = 0, tls = 0, ttfb = 0, total = 0 },
    buf = "", pos = 1, received = 0, got_bytes = false, step = "starting",
  }, Call)
end

-- One try on one connection: connect (or reuse), send, read the head.
-- Returns true, or nil, err, and whether a fresh connection may try again.
local function exchange(call, target, bytes)
  call.sock = ngx.socket.tcp()
  local ok, err = call:connect(target)
  if not ok then return nil, err, false end
  ok, err = call:arm(call.timeouts.first_byte and call.started + call.timeouts.first_byte or nil,
                     "first_byte_timeout")
  if not ok then return nil, err, false end
  call.step = "sending the request"
  local _, serr = call.sock:send(bytes)
  if serr then return nil, call:socket_error(serr, "connection"), call.reused and serr ~= "timeout" end
  ok, err = call:read_head()
  if not ok then
    -- A pooled connection the server closed meanwhile: nothing came back.
    return nil, err, call.reused and not call.got_bytes and err.kind == "connection"
  end
  return true
end

--- client:open(req) -> res after the head, or nil, err. The body is read
-- with res:read(); res:close() abandons it.
-- req: url, method, headers, body, timeout, deadline, max_response, server_name,
-- head (a policy.head the response head is read into, which the caller keeps;
-- by default one of the client's own).
function Client:open(req)
  if type(req) ~= "table" then fail("request must be a table, got %s", type(req)) end
  for k in pairs(req) do
    if not REQUEST_FIELDS[k] then fail("unknown request field '%s'", tostring(k)) end
  end
  if req.head ~= nil and type(req.head) ~= "userdata" then
    fail("head must be a policy.head(), got %s", type(req.head))
  end
  if type(req.url) ~= "string" then fail("request url must be a string, got %s", type(req.url)) end
  local phase = ngx.get_phase()
  if not COSOCKET_PHASES[phase] then
    fail("cosockets cannot be used in the %s phase (use rewrite, access, content or a timer)", phase)
  end
  local target, why = target_of(self, req)
  if not target then return nil, new_error("bad_url", why) end
  local call = new_call(self, req, target)
  local bytes, method = request_bytes(call, req, target)
  local ok, err, again = exchange(call, target, bytes)
  if not ok and again then
    call:close()
    call.buf, call.pos, call.reused, call.status = "", 1, false, nil
    ok, err = exchange(call, target, bytes)
  end
  if not ok then return read_failed(call, err) end
  local tm = call.timings
  tm.ttfb = call.first_byte_at - call.started
  local conn = call.head:get("connection")
  call.reusable = call.keepalive and call.version == 1.1 and not (conn and find(lower(conn), "close", 1, true))
  local mode, length = body_framing(call, method)
  if not mode then return read_failed(call, length) end
  call.mode, call.left, call.chunk_left, call.chunk_seen = mode, length, 0, false
  local res = setmetatable({
    status = call.status, http_version = call.version, raw_headers = call.head:block(),
    timings = tm, reused = call.reused, _call = call,
  }, Response)
  give_head(call)
  if mode == "none" or (mode == "length" and length == 0) then
    call.done = true
    call:release()
    finish_timings(call)
  end
  return res
end

--- client:request(req) -> res with the whole body (res.body), or nil, err.
-- With req.on_chunk = function(piece), pieces go there as they arrive and
-- res.body is ""; on_chunk returning false stops the call (kind "canceled").
function Client:request(req)
  local on_chunk = type(req) == "table" and req.on_chunk or nil
  if on_chunk ~= nil and type(on_chunk) ~= "function" then
    fail("on_chunk must be a function, got %s", type(on_chunk))
  end
  local res, err = self:open(req)
  if not res then return nil, err end
  local parts, n = {}, 0
  while true do
    local piece, rerr = res:read()
    if not piece then
      if rerr then return nil, rerr end
      break
    end
    if on_chunk then
      local ok, more = pcall(on_chunk, piece)
      if not ok or more == false then
        res:close()
        if not ok then error(more, 0) end
        local e = new_error("canceled", "on_chunk returned false", res.status)
        e.timings = res.timings
        return nil, e
      end
    else
      n = n + 1
      parts[n] = piece
    end
  end
  res.body = n == 1 and parts[1] or concat(parts)
  res._call = nil
  return res
end

M.parse_url = parse_url

return M
