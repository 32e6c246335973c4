--- Network diagnosis of one URL, step by step.
--
-- `sturdy.diagnose(url, opts)` (this module's `run`) walks the path a call
-- takes and times each step: the proxy in use, DNS (every address), the TCP
-- connection, TLS (protocol, cipher, the server's certificate: subject,
-- issuer, days to expiry) and the time to the first byte of a reply to a
-- plain `GET`. It names the step that failed and why, in one line.
--
-- It blocks (up to about twice the timeout, plus the system resolver's own
-- timeout), so it belongs in a command line, a health page or a startup
-- check, not on a request path or inside an nginx worker. A network failure
-- never raises: it is the answer. TLS verification stays on; when it fails,
-- a second connection that sends nothing reads the certificate the server
-- presents, so the report can say who signed it.
--
--    local sturdy = require "sturdy"
--    local report = sturdy.diagnose("https://api.anthropic.com")
--    print(report.verdict)
--    for _, step in ipairs(report.steps) do print(step.name, step.ok, step.time, step.detail) end
--
-- From a shell: `sturdy diagnose URL [--ca-file F] [--proxy P]`.
-- @module sturdy.diagnose

local netdiag = require "sturdy.netdiag"
local sturdy = require "sturdy"

local M = {}

local format, lower = string.format, string.lower
local floor = math.floor

local DEFAULT_CONNECT_TIMEOUT = 10
local DEFAULT_TIMEOUT = 30
local EXPIRY_WARNING_DAYS = 14

local function fail(msg, ...)
  error("sturdy: " .. format(msg, ...), 0)
end

-- Options

local OPTION_TYPES = {
  ca_file = "string", ca_path = "string", proxy = "string", no_proxy = "string",
  timeout = "number|table", user_agent = "string",
}

local function positive(v)
  return type(v) == "number" and v > 0 and v < math.huge
end

-- Seconds to the C side's milliseconds: connect and total.
local function timeouts(t)
  if t == nil then return DEFAULT_CONNECT_TIMEOUT, DEFAULT_TIMEOUT end
  if type(t) == "number" then
    if not positive(t) then fail("diagnose option 'timeout' must be a positive number of seconds, got %s", t) end
    return t, t
  end
  for k, v in pairs(t) do
    if k ~= "connect" and k ~= "total" then
      fail("diagnose option 'timeout' takes connect and total (seconds), got '%s'", tostring(k))
    end
    if not positive(v) then fail("diagnose option 'timeout.%s' must be a positive number of seconds", k) end
  end
  local total = t.total or DEFAULT_TIMEOUT
  return math.min(t.connect or DEFAULT_CONNECT_TIMEOUT, total), total
end

local function check_options(opts)
  if opts == nil then return {} end
  if type(opts) ~= "table" then fail("diagnose options must be a table, got %s", type(opts)) end
  for k, v in pairs(opts) do
    local want = OPTION_TYPES[k]
    if not want then fail("unknown diagnose option '%s'", tostring(k)) end
    if want == "number|table" then
      if type(v) ~= "number" and type(v) ~= "table" then
        fail("diagnose option '%s' must be seconds or { connect =, total = }, got %s", k, type(v))
      end
    elseif type(v) ~= want then
      fail("diagnose option '%s' must be a %s, got %s", k, want, type(v))
    end
  end
  return opts
end

-- The proxy libcurl would use

local function env(name)
  local v = os.getenv(name)
  if v ~= nil and v ~= "" then return v end
end

-- libcurl's order: <scheme>_proxy (for http only the lower-case name, as
-- HTTP_PROXY can be set by a CGI request header), then all_proxy.
local function env_proxy(scheme)
  local names = scheme == "http" and { "http_proxy" } or { scheme .. "_proxy", scheme:upper() .. "_PROXY" }
  names[#names + 1] = "all_proxy"
  names[#names + 1] = "ALL_PROXY"
  for _, name in ipairs(names) do
    local v = env(name)
    if v then return v, name end
  end
end

local function ipv4_number(s)
  local a, b, c, d = s:match("^(%d+)%.(%d+)%.(%d+)%.(%d+)$")
  if not a then return nil end
  local n = 0
  for _, part in ipairs { a, b, c, d } do
    part = tonumber(part)
    if part > 255 then return nil end
    n = n * 256 + part
  end
  return n
end

-- One no_proxy entry against a host: "*", a name or domain suffix (a
-- leading dot is optional), an IP address, or an IPv4 CIDR range.
local function no_proxy_matches(entry, host)
  entry = lower(entry):gsub("^%.", "")
  if entry == "" then return false end
  if entry == "*" then return true end
  local net, bits = entry:match("^([%d.]+)/(%d+)$")
  if net then
    local h, n, b = ipv4_number(host), ipv4_number(net), tonumber(bits)
    if not (h and n and b <= 32) then return false end
    local size = 2 ^ (32 - b)
    return floor(h / size) == floor(n / size)
  end
  entry = entry:gsub("^%[(.*)%]$", "%1")
  return host == entry or host:sub(-(#entry + 1)) == "." .. entry
end

local function bypassed(no_proxy, host)
  host = lower(host)
  for entry in no_proxy:gmatch("[^,%s]+") do
    if no_proxy_matches(entry, host) then return true end
  end
  return false
end

-- Credentials never leave: "http://user:pw@proxy:3128" -> "http://***@proxy:3128".
local function masked(url)
  return (url:gsub("^(%a[%w+.-]*://)[^@/]*@", "%1***@"):gsub("^[^:/@]+:[^@/]*@", "***@"))
end

-- proxy URL or nil, and where it came from.
local function proxy_in_use(opts, scheme, host)
  local proxy, source = opts.proxy, "the proxy option"
  if proxy == nil then
    local name
    proxy, name = env_proxy(scheme)
    source = name and ("$" .. name)
  end
  if proxy == nil or proxy == "" then return nil, nil end
  local no_proxy = opts.no_proxy or env("no_proxy") or env("NO_PROXY")
  if no_proxy and bypassed(no_proxy, host) then
    return nil, opts.no_proxy and "the no_proxy option" or "$no_proxy"
  end
  return proxy, source
end

-- Steps and the verdict

local function ms(seconds)
  if seconds == nil then return "?" end
  if seconds < 0.001 then return format("%.2f ms", seconds * 1000) end
  if seconds < 1 then return format("%.1f ms", seconds * 1000) end
  return format("%.2f s", seconds)
end

local function where(host, port)
  if host:find(":", 1, true) then return format("[%s] port %d", host, port) end
  return format("%s port %d", host, port)
end

-- OpenSSL's verify codes (X509_V_ERR_*) a server's certificate commonly fails with.
local VERIFY_REASONS = {
  [2] = function(t) return format("the certificate of its issuer '%s' is unavailable", t.issuer or "?") end,
  [9] = function() return "it is not yet valid" end,
  [10] = function(t) return t.days_left and format("it expired %d days ago", -t.days_left) or "it has expired" end,
  [18] = function() return "it is self-signed" end,
  [19] = function() return "its chain ends in a self-signed CA that is not trusted here" end,
  [20] = function(t)
    return format("its issuer '%s' is not a trusted CA here (a private or self-signed CA)", t.issuer or "?")
  end,
  [21] = function() return "it cannot be verified with the one certificate the server sent" end,
}

local function tls_failure(f, t)
  local err = f.error or "?"
  if err:find("no alternative certificate subject name matches", 1, true)
     or err:find("does not match target host name", 1, true) then
    return format("the certificate '%s' does not name %s (%s)", t.subject or "?", f.host, err)
  end
  if f.curl_code == 60 then
    local reason = VERIFY_REASONS[t.verify_result]
    return format("the certificate '%s' is not trusted: %s; give the CA that signed it with ca_file (--ca-file) (%s)",
                  t.subject or "?", reason and reason(t) or "it failed verification", err)
  end
  if f.curl_code == 77 then
    return format("the CA file or path cannot be used (%s)", err)
  end
  if err:find("wrong version number", 1, true) then
    return format("no TLS on %s: is it a plain http:// port? (%s)", where(f.host, f.port), err)
  end
  return err
end

local function connect_failure(f, c, via)
  local target = c.ip and where(c.ip, c.port or f.dns.port) or where(f.dns.name, f.dns.port)
  if f.curl_code == 28 then
    return format("timed out connecting to %s%s after %s", via, target, ms(c.time))
  end
  if c.os_error then
    return format("%s: %s%s", lower(c.os_error), via, target)
  end
  return format("%s%s: %s", via, target, f.error or "the connection failed")
end

local function proxy_step(proxy, source)
  if proxy then
    return { name = "proxy", ok = true, time = 0, proxy = masked(proxy), source = source,
             detail = format("%s (from %s)", masked(proxy), source) }
  end
  return { name = "proxy", ok = true, time = 0,
           detail = source and format("none (%s bypasses it)", source) or "none: direct connection" }
end

-- The facts from sturdy.netdiag as steps, and the verdict.
local function build(f, proxy, source)
  local steps = { proxy_step(proxy, source) }
  local via = proxy and "the proxy " or ""
  local verdict, ok

  local d = f.dns
  local dns = { name = "dns", ok = d.state == "ok", time = d.time, host = d.name, addresses = d.addresses }
  steps[#steps + 1] = dns
  if dns.ok then
    local list = table.concat(d.addresses, ", ")
    if d.count > #d.addresses then list = list .. format(" and %d more", d.count - #d.addresses) end
    if list == d.name then list = "an IP address, nothing to look up" end
    dns.detail = format("%s%s: %s", proxy and "proxy " or "", d.name, list)
  else
    dns.detail = format("%s%s does not resolve: %s", proxy and "proxy " or "", d.name, f.error or "?")
    verdict = "DNS failure: " .. dns.detail
  end

  local c = f.connect
  if c then
    local step = { name = "connect", ok = c.state == "ok", time = c.time, address = c.ip, port = c.port }
    steps[#steps + 1] = step
    if step.ok then
      step.detail = format("%s%s", via, where(c.ip or d.addresses[1], c.port or d.port))
    else
      step.errno = c.errno
      step.detail = connect_failure(f, c, via)
      verdict = (c.os_error and "" or "connection failed: ") .. step.detail
    end
  end

  local t = f.tls
  if t then
    local step = {
      name = "tls", ok = t.state == "ok", time = t.time, protocol = t.protocol, cipher = t.cipher,
      subject = t.subject, issuer = t.issuer, expires = t.expire, days_left = t.days_left,
      verified = t.state == "ok", verify_result = t.verify_result,
    }
    steps[#steps + 1] = step
    if step.ok then
      step.detail = format("%s, %s; '%s' issued by '%s', %s", t.protocol or "?", t.cipher or "?",
                           t.subject or "?", t.issuer or "?",
                           t.days_left and format("expires in %d days", t.days_left)
                             or ("expires " .. (t.expire or "?")))
    else
      step.detail = tls_failure(f, t)
      verdict = "TLS failure: " .. step.detail
    end
  end

  local b = f.first_byte
  if b then
    local step = { name = "first_byte", ok = b.state == "ok", time = b.time, status = b.status,
                   http_version = b.http_version }
    steps[#steps + 1] = step
    if step.ok then
      step.detail = format("HTTP/%s %d", b.http_version or "?", b.status or 0)
      ok = true
      verdict = format("ok: %s answered HTTP %d in %s", where(f.host, f.port), b.status or 0, ms(f.total))
      if t and t.days_left and t.days_left < EXPIRY_WARNING_DAYS then
        verdict = verdict .. format(", but its certificate expires in %d days", t.days_left)
      end
    elseif f.curl_code == 28 then
      step.detail = format("no reply within %s", ms(b.time))
      verdict = format("timed out waiting for the first byte: %s accepted the request but sent nothing",
                       where(f.host, f.port))
    else
      step.detail = f.error or "no reply"
      verdict = "no reply: " .. step.detail
    end
  end

  return { ok = ok == true, steps = steps, verdict = verdict or ("failed: " .. (f.error or "?")),
           url_host = f.host, port = f.port, total = f.total }
end

-- Public

--- Diagnoses the path to `url` step by step. Never raises for a network
-- failure; raises (`"sturdy: ..."`) for a bad argument.
-- @string url `http://` or `https://` URL; a `GET` is sent to it
-- @tparam[opt] table opts options, the client's names:
--
--  * `ca_file`, `ca_path`: trusted CAs (default: the system's)
--  * `proxy`: proxy URL; without it the `*_proxy` environment variables
--    decide, as libcurl reads them
--  * `no_proxy`: hosts that bypass the proxy (default `$no_proxy`)
--  * `timeout`: seconds, or `{ connect = 10, total = 30 }` (the defaults)
--  * `user_agent`: default `sturdy/VERSION diagnose`
-- @treturn table `{ ok = bool, verdict = "one line", total = seconds, steps = { ... } }`.
-- Each step is `{ name, ok, time, detail, ... }`, in order: `proxy`
-- (`proxy`, `source`), `dns` (`host`, `addresses`), `connect` (`address`,
-- `port`, `errno`), `tls` for https (`protocol`, `cipher`, `subject`,
-- `issuer`, `expires`, `days_left`, `verified`, `verify_result`) and
-- `first_byte` (`status`, `http_version`). Steps stop at the first that
-- fails; times are seconds.
-- @usage local r = require("sturdy").diagnose("https://localhost:8443", { ca_file = "ca.pem" })
-- if not r.ok then io.stderr:write(r.verdict, "\n") end
function M.run(url, opts)
  if type(url) ~= "string" then fail("diagnose needs a URL string, got %s", type(url)) end
  local scheme = url:match("^(%a[%w+.-]*)://[^/]")
  scheme = scheme and lower(scheme)
  if scheme ~= "http" and scheme ~= "https" then
    fail("diagnose needs an http:// or https:// URL with a host, got %q", url:sub(1, 80))
  end
  opts = check_options(opts)
  local connect, total = timeouts(opts.timeout)
  local host = url:match("^%a[%w+.-]*://([^/?#]+)"):gsub("^.*@", ""):gsub(":%d*$", ""):gsub("^%[(.*)%]$", "%1")
  local proxy, source = proxy_in_use(opts, scheme, host)
  local facts, err = netdiag.run {
    url = url, proxy = proxy, ca_file = opts.ca_file, ca_path = opts.ca_path,
    user_agent = opts.user_agent or ("sturdy/" .. sturdy._VERSION .. " diagnose"),
    connect_timeout_ms = connect * 1000, timeout_ms = total * 1000,
  }
  if not facts then
    return { ok = false, steps = { proxy_step(proxy, source) }, verdict = "bad URL: " .. err, total = 0 }
  end
  return build(facts, proxy, source)
end

--- The report as text: one line per step, then the verdict.
-- @tparam table report what `run` returned
-- @treturn string lines without a trailing newline
function M.format(report)
  local lines = {}
  for _, step in ipairs(report.steps) do
    lines[#lines + 1] = format("  %-10s %-4s %10s  %s", step.name, step.ok and "ok" or "FAIL",
                               step.name == "proxy" and "" or ms(step.time), step.detail or "")
  end
  lines[#lines + 1] = "verdict: " .. report.verdict
  return table.concat(lines, "\n")
end

return M
