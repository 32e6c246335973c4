-- sturdy.diagnose against the mock API and against sockets that refuse or
-- stay silent: each failure is named in its step and in the verdict.
local sturdy = require "sturdy"
local netdiag = require "sturdy.netdiag"
local mock = require "spec.support.mock"
local socket = require "socket"

local function step(report, name)
  for _, s in ipairs(report.steps) do
    if s.name == name then return s end
  end
end

local function names(report)
  local out = {}
  for i, s in ipairs(report.steps) do out[i] = s.name end
  return table.concat(out, ",")
end

-- A loopback port nothing listens on (bound, then closed).
local function closed_port()
  local s = assert(socket.bind("127.0.0.1", 0))
  local _, port = s:getsockname()
  s:close()
  return tonumber(port)
end

local function echo_count(m)
  return assert(m:counters()).paths["/echo"] or 0
end

describe("sturdy.diagnose", function()
  local m

  setup(function() m = assert(mock.start()) end)
  teardown(function() m:stop() end)

  it("names an untrusted (self-signed CA) certificate and sends nothing", function()
    local before = echo_count(m)
    local r = sturdy.diagnose(m.https_url .. "/echo")
    assert.is_false(r.ok)
    assert.equal("proxy,dns,connect,tls", names(r))
    assert.is_true(step(r, "dns").ok)
    assert.is_true(step(r, "connect").ok)
    local tls = step(r, "tls")
    assert.is_false(tls.ok)
    assert.is_false(tls.verified)
    assert.equal(20, tls.verify_result) -- X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY
    assert.matches("localhost", tls.subject)
    assert.matches("sturdy mock CA", tls.issuer)
    assert.matches("^TLS failure: the certificate 'CN ?= ?localhost' is not trusted", r.verdict)
    assert.matches("sturdy mock CA' is not a trusted CA here (a private or self-signed CA)", r.verdict, 1, true)
    assert.matches("ca_file", r.verdict, 1, true)
    assert.not_matches("\n", r.verdict)
    assert.equal(before, echo_count(m)) -- neither connection sent a request
  end)

  it("succeeds with the CA file and reports TLS, certificate and first byte", function()
    local before = echo_count(m)
    local r = sturdy.diagnose(m.https_url .. "/echo", { ca_file = m.ca_file })
    assert.is_true(r.ok, r.verdict)
    assert.equal("proxy,dns,connect,tls,first_byte", names(r))
    for _, s in ipairs(r.steps) do
      assert.is_true(s.ok, s.name)
      assert.is_true(s.time >= 0 and s.time < 5, s.name)
    end
    local dns = step(r, "dns")
    assert.equal("localhost", dns.host)
    assert.is_true(#dns.addresses >= 1)
    assert.equal(m.tls_port, step(r, "connect").port)
    local tls = step(r, "tls")
    assert.matches("^TLSv1%.[23]$", tls.protocol)
    assert.matches("^TLS_", tls.cipher)
    assert.matches("sturdy mock CA", tls.issuer)
    -- the mock's certificate was made for 3650 days moments ago
    assert.is_true(tls.days_left == 3649 or tls.days_left == 3650, tostring(tls.days_left))
    local fb = step(r, "first_byte")
    assert.equal(200, fb.status)
    assert.equal("2", fb.http_version)
    assert.matches("^ok: localhost port " .. m.tls_port .. " answered HTTP 200 in ", r.verdict)
    assert.equal(before + 1, echo_count(m)) -- exactly one GET
  end)

  it("says 'connection refused' for a closed port", function()
    local port = closed_port()
    local r = sturdy.diagnose("http://127.0.0.1:" .. port .. "/")
    assert.is_false(r.ok)
    assert.equal("proxy,dns,connect", names(r))
    local c = step(r, "connect")
    assert.is_false(c.ok)
    assert.equal(111, c.errno) -- ECONNREFUSED on Linux
    assert.equal("connection refused: 127.0.0.1 port " .. port, r.verdict)
  end)

  it("reports a DNS failure for a name that does not resolve", function()
    local r = sturdy.diagnose("https://no-such-host.sturdy.invalid/v1/messages")
    assert.is_false(r.ok)
    assert.equal("proxy,dns", names(r))
    local dns = step(r, "dns")
    assert.is_false(dns.ok)
    assert.equal("no-such-host.sturdy.invalid", dns.host)
    assert.matches("^DNS failure: no%-such%-host%.sturdy%.invalid does not resolve: .+", r.verdict)
  end)

  it("has no TLS step for plain http", function()
    local r = sturdy.diagnose(m.http_url .. "/echo")
    assert.is_true(r.ok, r.verdict)
    assert.equal("proxy,dns,connect,first_byte", names(r))
    assert.equal("1.1", step(r, "first_byte").http_version)
    assert.matches("an IP address", step(r, "dns").detail)
  end)

  it("names https spoken to a plain-HTTP port", function()
    local r = sturdy.diagnose("https://127.0.0.1:" .. m.port .. "/echo")
    assert.is_false(r.ok)
    assert.is_false(step(r, "tls").ok)
    assert.matches("no TLS on 127.0.0.1 port " .. m.port, r.verdict, 1, true)
  end)

  it("times out waiting for a first byte that never comes", function()
    local server = assert(socket.bind("127.0.0.1", 0)) -- the kernel accepts; nobody answers
    local _, port = server:getsockname()
    local t0 = sturdy.monotime()
    local r = sturdy.diagnose("http://127.0.0.1:" .. port .. "/", { timeout = 0.3 })
    local took = sturdy.monotime() - t0
    server:close()
    assert.is_false(r.ok)
    assert.is_true(step(r, "connect").ok)
    assert.is_false(step(r, "first_byte").ok)
    assert.matches("^timed out waiting for the first byte", r.verdict)
    assert.is_true(took >= 0.25 and took < 2, tostring(took))
  end)

  describe("proxy", function()
    it("goes through the proxy, which resolves the target itself", function()
      local before = echo_count(m)
      -- the mock answers absolute-form requests, as a forward proxy would
      local r = sturdy.diagnose("http://upstream.sturdy.invalid/echo", { proxy = m.http_url })
      assert.is_true(r.ok, r.verdict)
      local p = step(r, "proxy")
      assert.equal(m.http_url, p.proxy)
      assert.equal("the proxy option", p.source)
      assert.equal("127.0.0.1", step(r, "dns").host) -- the proxy's name, not the target's
      assert.matches("^the proxy 127%.0%.0%.1 port", step(r, "connect").detail)
      assert.equal(before + 1, echo_count(m))
    end)

    it("never shows the proxy's credentials", function()
      local port = closed_port()
      local r = sturdy.diagnose(m.http_url .. "/echo", { proxy = "http://alice:hunter2@127.0.0.1:" .. port })
      assert.is_false(r.ok)
      assert.equal("http://***@127.0.0.1:" .. port, step(r, "proxy").proxy)
      assert.equal("connection refused: the proxy 127.0.0.1 port " .. port, r.verdict)
      local text = require("sturdy.diagnose").format(r) .. require("cjson").encode(r)
      assert.not_matches("hunter2", text, 1, true)
      assert.not_matches("alice", text, 1, true)
    end)

    it("is bypassed for hosts in no_proxy", function()
      local port = closed_port()
      for _, list in ipairs { "127.0.0.1", "example.com, 127.0.0.0/8", "*" } do
        local r = sturdy.diagnose(m.http_url .. "/echo", { proxy = "http://127.0.0.1:" .. port, no_proxy = list })
        assert.is_true(r.ok, list .. ": " .. r.verdict)
        assert.is_nil(step(r, "proxy").proxy, list)
        assert.matches("none %(the no_proxy option bypasses it%)", step(r, "proxy").detail)
      end
      local r = sturdy.diagnose(m.http_url .. "/echo", { proxy = "http://127.0.0.1:" .. port, no_proxy = "10.0.0.0/8" })
      assert.is_false(r.ok)
    end)
  end)

  describe("arguments", function()
    it("raise for programming mistakes, naming them", function()
      local cases = {
        { nil, nil, "needs a URL string" },
        { "ftp://example.com/", nil, "http:// or https://" },
        { "https://", nil, "http:// or https://" },
        { "https://example.com", "x", "options must be a table" },
        { "https://example.com", { cafile = "x" }, "unknown diagnose option 'cafile'" },
        { "https://example.com", { proxy = 5 }, "'proxy' must be a string" },
        { "https://example.com", { timeout = -1 }, "'timeout' must be a positive number" },
        { "https://example.com", { timeout = 0 / 0 }, "'timeout' must be a positive number" },
        { "https://example.com", { timeout = math.huge }, "'timeout' must be a positive number" },
        { "https://example.com", { timeout = { idle = 1 } }, "takes connect and total" },
      }
      for _, c in ipairs(cases) do
        local ok, err = pcall(sturdy.diagnose, c[1], c[2])
        assert.is_false(ok, c[3])
        assert.matches("^sturdy: ", err)
        assert.matches(c[3], err, 1, true)
      end
    end)

    it("are strict in the C binding too", function()
      assert.has_error(function()
        netdiag.run { url = "http://x/", connect_timeout_ms = 1, timeout_ms = 1, bogus = 1 }
      end, "sturdy: unknown netdiag option 'bogus'")
      assert.has_error(function() netdiag.run { url = "http://x/\0y", connect_timeout_ms = 1, timeout_ms = 1 } end,
                       "sturdy: netdiag option 'url' contains a NUL byte")
      assert.has_error(function() netdiag.run { url = "http://x/", connect_timeout_ms = 0 / 0, timeout_ms = 1 } end,
                       "sturdy: netdiag option 'connect_timeout_ms' must be >= 1 ms")
    end)
  end)

  describe("certificate dates", function()
    local JAN_1_2030 = 1893456000
    it("count whole days in OpenSSL's and GnuTLS's forms", function()
      assert.equal(0, netdiag.days_until("Jan  1 00:00:00 2030 GMT", JAN_1_2030))
      assert.equal(1, netdiag.days_until("Jan  2 00:00:00 2030 GMT", JAN_1_2030))
      assert.equal(0, netdiag.days_until("Jan  1 23:59:59 2030 GMT", JAN_1_2030))
      assert.equal(-1, netdiag.days_until("Dec 31 23:00:00 2029 GMT", JAN_1_2030)) -- an hour past
      assert.equal(366, netdiag.days_until("Jan 02 00:00:00 2031 GMT", JAN_1_2030))
      assert.equal(59, netdiag.days_until("2030-03-01 00:00:00 GMT", JAN_1_2030))
      assert.equal(789, netdiag.days_until("Feb 29 00:00:00 2032 GMT", JAN_1_2030)) -- a leap day
    end)

    it("refuse what is not a date", function()
      for _, s in ipairs { "", "garbage", "Feb 29 00:00:00 2031 GMT", "Foo  1 00:00:00 2030 GMT",
                           "Jan 1 00:00:00 2030 GMT", "Jan  1 24:00:00 2030 GMT", "2030-13-01 00:00:00" } do
        assert.is_nil(netdiag.days_until(s, JAN_1_2030), s)
      end
      assert.has_error(function() netdiag.days_until("Jan  1 00:00:00 2030 GMT", 0 / 0) end)
    end)
  end)

  it("is not loaded by require 'sturdy'", function()
    local lua = arg and arg[-1] or "lua"
    local cmd = ("LUA_PATH=%q LUA_CPATH=%q %s -e %q"):format(package.path, package.cpath, lua,
      'local s = require "sturdy"; io.write(tostring(package.loaded["sturdy.netdiag"]), " ", type(s.diagnose))')
    local p = io.popen(cmd)
    local out = p:read("*a")
    p:close()
    assert.equal("nil function", out)
  end)
end)
