-- sturdy.cosocket inside a real nginx (spec/support/ngx_runner.lua) against
-- the mock on loopback: bodies, keep-alive, TLS, CONNECT proxies, each
-- timeout and failure kind, limits, and SSE fed to the C parser as it arrives.
-- The cases themselves are in spec/ngx/cosocket_cases.lua.
local socket = require "socket"
local mock = require "spec.support.mock"
local runner = require "spec.support.ngx_runner"

-- Locations on the runner itself: /raw writes ?b=<base64> raw onto the
-- connection and closes it (after ?linger= ms): replies no real server would
-- send. /phase calls the client where nginx allows no cosocket.
local RAW_LOCATION = [[
    location = /raw {
      content_by_lua_block {
        local bytes = ngx.decode_base64(ngx.unescape_uri(ngx.var.arg_b or "")) or ""
        local sock = assert(ngx.req.socket(true))
        sock:send(bytes)
        local linger = tonumber(ngx.var.arg_linger)
        if linger then ngx.sleep(linger / 1000) end
        return ngx.exit(444)
      }
    }
    location = /phase {
      set_by_lua_block $phase_error {
        local c = require("sturdy.cosocket").new()
        local ok, err = pcall(c.request, c, { url = "http://127.0.0.1:1/" })
        return ok and "no error" or tostring(err)
      }
      return 200 $phase_error;
    }
]]

describe("sturdy.cosocket in nginx", function()
  local m, r, proxy, dns
  local n = 0

  -- A fresh scenario id per call, so mock step sequences never carry over.
  local function run(case, args, phase)
    n = n + 1
    args = args or {}
    args.n = n
    return r:run("cosocket_cases", case, args, phase)
  end

  setup(function()
    m = assert(mock.start())
    dns = assert(runner.spawn("dns_server.lua"))
    r = assert(runner.start { mock = m, server = RAW_LOCATION, resolver = "127.0.0.1:" .. dns.port .. " ipv6=off" })
    r.vars = { self_url = r.url }
    proxy = assert(runner.spawn("connect_proxy.lua"))
  end)

  teardown(function()
    if proxy then proxy:stop() end
    if dns then dns:stop() end
    if r then r:stop() end
    if m then m:stop() end
  end)

  describe("bodies", function()
    it("sends a Content-Length body and reads a Content-Length reply", function()
      local out = run("content-length reply")
      assert.equal(5000, out.echoed_body)
      assert.equal("5000", out.content_length_sent)
      assert.equal(out.body_len, tonumber(out.content_length))
      assert.is_true(out.raw_has_length)
      assert.equal(1.1, out.http_version)
      local t = out.timings
      assert.is_true(t.ttfb > 0 and t.ttfb <= t.total, "ttfb within total")
      assert.equal(0, t.tls)
    end)

    it("reads a chunked reply to its exact length", function()
      local out = run("chunked reply")
      assert.equal(200, out.status)
      assert.equal("chunked", out.te)
      assert.is_nil(out.cl)
      assert.equal(300000, out.len)
      assert.equal('{"type":', out.head)
      assert.equal('"}', out.tail)
    end)

    it("hands the body out through a reader, piece by piece", function()
      local out = run("reader")
      assert.equal(200000, out.total)
      assert.is_true(out.pieces > 1)
      assert.is_true(out.again)
    end)

    it("parses chunk sizes strictly, skips trailers and chunk extensions", function()
      local ok = run("raw reply", { bytes = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        .. "5;name=value\r\nhello\r\nA\r\n0123456789\r\n0\r\nx-trailer: 1\r\nx-other: 2\r\n\r\n" })
      assert.equal("hello0123456789", ok.body)
      assert.is_nil(ok.headers["x-trailer"])
      for _, size in ipairs({ "0x5", "+5", " 5", "5 5", "-1", "", "g", "1234567890abcdef0" }) do
        local out = run("raw reply", { bytes = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
          .. size .. "\r\nhello\r\n0\r\n\r\n" })
        assert.is_table(out.error, "chunk size " .. size)
        assert.equal("bad_response", out.error.kind, "chunk size " .. size)
        assert.equal("fatal", out.error.class)
      end
      local no_crlf = run("raw reply", { bytes = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        .. "5\r\nhelloXX0\r\n\r\n" })
      assert.equal("bad_response", no_crlf.error.kind)
      local cut = run("raw reply", { bytes = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel" })
      assert.equal("connection", cut.error.kind)
      assert.equal("transient", cut.error.class)
    end)

    it("reads until close without a length, and knows bodiless replies", function()
      local close = run("raw reply", { bytes = "HTTP/1.0 200 OK\r\nX-A: 1\r\n\r\nall of it" })
      assert.equal("all of it", close.body)
      assert.equal(1.0, close.http_version)
      assert.equal("1", close.headers["x-a"])
      local nocontent = run("raw reply", { bytes = "HTTP/1.1 204 No Content\r\n\r\n" })
      assert.equal(204, nocontent.status)
      assert.equal("", nocontent.body)
      local head = run("raw reply", { method = "HEAD", bytes = "HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n" })
      assert.equal(200, head.status)
      assert.equal("", head.body)
      local interim = run("raw reply", { bytes = "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\n"
        .. "Link: </a>\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok" })
      assert.equal(201, interim.status)
      assert.equal("ok", interim.body)
      assert.is_nil(interim.headers.link)
      local short = run("raw reply", { bytes = "HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc" })
      assert.equal("connection", short.error.kind)
      assert.matches("7 bytes short", short.error.detail)
      local bad_length = run("raw reply", { bytes = "HTTP/1.1 200 OK\r\nContent-Length: 1e3\r\n\r\n" })
      assert.equal("bad_response", bad_length.error.kind)
      local folded = run("raw reply", { bytes = "HTTP/1.1 200 OK\r\nX-A: 1\r\n  folded\r\n\r\n" })
      assert.equal("bad_response", folded.error.kind)
    end)
  end)

  describe("keep-alive", function()
    it("reuses one connection for calls in a row", function()
      m:reset()
      local out = run("keepalive reuse")
      assert.equal(out[1].connection, out[2].connection)
      assert.equal(out[1].connection, out[3].connection)
      assert.equal(out[1].requests + 1, out[2].requests)
      assert.equal(out[1].requests + 2, out[3].requests)
      assert.is_true(out[2].reused and out[3].reused)
      assert.equal(0, out[3].connect)
      assert.equal(1, m:counters().connections)
    end)

    it("reuses across phases and timers of one worker", function()
      local a = run("keepalive reuse", nil, "access")
      local b = run("keepalive reuse", nil, "rewrite")
      local c = run("keepalive reuse", nil, "timer")
      assert.equal(a[3].connection, b[1].connection)
      assert.equal(b[3].connection, c[1].connection)
    end)

    it("pools a connection only after a complete body", function()
      local out = run("no reuse after an incomplete body")
      assert.are_not.equal(out.first, out.after_close)
      assert.are_not.equal(out.after_close, out.after_drop)
    end)

    it("sends Connection: close and never reuses when keepalive is off", function()
      local out = run("keepalive off")
      assert.are_not.equal(out.a, out.b)
      assert.is_false(out.reused)
      assert.equal("close", out.sent)
    end)

    it("tries a fresh connection when the server closed a pooled one unanswered", function()
      local out = run("stale pooled connection")
      assert.equal(200, out.first)
      assert.equal(200, out.second)
      assert.is_false(out.second_reused)
    end)

    it("keeps TLS, server name and verify setting in the pool name", function()
      local out = run("pool names")
      assert.equal(out.a, out.b)
      assert.are_not.equal(out.a, out.unverified)
      assert.are_not.equal(out.a, out.plain)
      assert.equal("https", out.scheme_a)
      assert.equal("http", out.scheme_plain)
    end)
  end)

  describe("TLS", function()
    it("verifies the mock's certificate against lua_ssl_trusted_certificate", function()
      local out = run("tls verified")
      assert.equal("https", out.scheme)
      assert.equal(1.1, out.http_version)
      assert.is_true(out.tls > 0 and out.connect > 0)
      assert.is_true(out.reused)
      assert.is_true(out.same, "same connection")
      assert.equal(0, out.tls_again)
    end)

    it("resolves the URL's host through nginx's resolver and checks that name", function()
      local out = run("by name")
      assert.equal("https", out.scheme)
      assert.equal("localhost:" .. m.tls_port, out.host_header)
      assert.equal("tls", out.wrong.kind, out.wrong.detail)
      -- nginx names the mismatch, except for a handshake that completes at once
      -- (see sturdy.cosocket's handshake): then it says only that it failed
      assert.is_truthy(out.wrong.detail:find("host mismatch", 1, true)
                       or out.wrong.detail:find("certificate verification failed", 1, true), out.wrong.detail)
    end)

    it("refuses a name the certificate does not hold", function()
      local out = run("tls error", { server_name = "wrong.example" })
      assert.equal("tls", out.kind, out.detail)
      assert.equal("fatal", out.class)
      assert.is_truthy(out.detail:find("host mismatch", 1, true)
                       or out.detail:find("certificate verification failed", 1, true), out.detail)
    end)

    -- Each try is a fresh handshake: some complete at once, which lua-resty-core
    -- 0.1.25 mishandles (see the comment at sslhandshake in sturdy.cosocket).
    it("refuses the mock's certificate without its CA, every time", function()
      local plain = assert(runner.start { mock = m, trusted_certificate = "/etc/ssl/certs/ca-certificates.crt" })
      local ok, outs = pcall(function()
        local list = {}
        for i = 1, 20 do
          list[i] = plain:run("cosocket_cases", "tls error", { server_name = "localhost" })
        end
        return list
      end)
      plain:stop()
      assert(ok, outs)
      for _, out in ipairs(outs) do
        assert.equal("tls", out.kind, out.detail)
        assert.equal("fatal", out.class)
        assert.matches("verif", out.detail)
      end
    end)
  end)

  describe("CONNECT proxy", function()
    it("tunnels https and sends absolute-form http through the proxy, reusing both", function()
      local before = assert(proxy:get("/_proxy/counters"))
      local out = run("via proxy", { proxy = "http://user:p%40ss@127.0.0.1:" .. proxy.port })
      local after = assert(proxy:get("/_proxy/counters"))
      assert.equal("https", out.tls_scheme)
      assert.equal("GET /echo HTTP/1.1", out.tls_line)
      assert.is_true(out.tls_reused and out.tls_same)
      assert.is_true(out.tls_timing > 0)
      assert.equal("GET " .. m.http_url .. "/echo HTTP/1.1", out.http_line)
      assert.is_true(out.http_same)
      assert.equal(1, after.tunnels - before.tunnels)
      assert.equal(1, after.forwarded - before.forwarded)
      assert.equal("Basic dXNlcjpwQHNz", out.http_auth)   -- user:p@ss
      assert.is_nil(out.tls_auth_leaked)                  -- only the proxy sees it over TLS
      assert.equal("Basic dXNlcjpwQHNz", after.auth)
    end)

    it("reports a refused CONNECT as a connection error", function()
      local out = run("proxy refuses", { proxy = "http://127.0.0.1:" .. proxy.port })
      assert.equal("connection", out.kind)
      assert.matches("403", out.detail)
    end)

    it("goes direct for no_proxy hosts", function()
      local before = assert(proxy:get("/_proxy/counters"))
      local out = run("no_proxy", { proxy = "http://127.0.0.1:" .. proxy.port })
      local after = assert(proxy:get("/_proxy/counters"))
      assert.equal("GET /echo HTTP/1.1", out.line)
      assert.equal(before.connections + 1, after.connections)   -- the counters call itself
    end)
  end)

  describe("timeouts and failures", function()
    -- A listener that never accepts: the kernel completes TCP handshakes
    -- into its backlog, and nothing ever answers.
    local silent
    setup(function() silent = assert(socket.bind("127.0.0.1", 0, 4)) end)
    teardown(function() silent:close() end)

    local function silent_port()
      local _, port = silent:getsockname()
      return port
    end

    it("connect_timeout: a TLS handshake nobody answers", function()
      local out = run("fails", { url = "https://127.0.0.1:" .. silent_port() .. "/",
                                 server_name = "localhost", timeout = { connect = 0.3 } })
      assert.equal("connect_timeout", out.kind)
      assert.equal("timeout", out.class)
      assert.is_true(out.elapsed >= 0.29 and out.elapsed < 2, "elapsed " .. out.elapsed)
    end)

    it("first_byte_timeout: a reply that starts late", function()
      local out = run("fails", { steps = "200;delay=3000", timeout = { first_byte = 0.3 } })
      assert.equal("first_byte_timeout", out.kind)
      assert.equal("timeout", out.class)
      assert.is_true(out.elapsed >= 0.29 and out.elapsed < 2, "elapsed " .. out.elapsed)
    end)

    it("idle_timeout: a body that stalls", function()
      local out = run("fails", { path = "/v1/messages", method = "POST",
                                 body = '{"model":"m","messages":[{"role":"user","content":"hi"}]}',
                                 steps = "stall_mid;stall=3000", timeout = { idle = 0.3 } })
      assert.equal("idle_timeout", out.kind)
      assert.equal("timeout", out.class)
      assert.equal(200, out.status)
      assert.is_true(out.elapsed >= 0.29 and out.elapsed < 2, "elapsed " .. out.elapsed)
    end)

    it("total_timeout: a body that keeps dripping past the total", function()
      local out = run("fails", { path = "/v1/x", method = "POST", body = "{}",
                                 steps = "huge;size=100000;drip=150;pieces=50", timeout = { total = 0.5 } })
      assert.equal("total_timeout", out.kind)
      assert.equal("timeout", out.class)
      assert.is_true(out.elapsed >= 0.49 and out.elapsed < 2, "elapsed " .. out.elapsed)
    end)

    it("total_timeout: the call's deadline bounds every phase", function()
      local out = run("fails", { steps = "200;delay=3000", deadline_in = 0.3, timeout = { first_byte = 10 } })
      assert.equal("total_timeout", out.kind)
      assert.is_true(out.elapsed >= 0.29 and out.elapsed < 2, "elapsed " .. out.elapsed)
      local past = run("fails", { deadline_in = -1 })
      assert.equal("total_timeout", past.kind)
    end)

    it("connection: refused, and closed before a reply", function()
      local refused = run("fails", { url = "http://127.0.0.1:" .. runner.free_port() .. "/" })
      assert.equal("connection", refused.kind)
      assert.equal("transient", refused.class)
      assert.matches("refused", refused.detail)
      local dropped = run("fails", { steps = "drop" })
      assert.equal("connection", dropped.kind)
      assert.matches("closed", dropped.detail)
    end)

    it("dns: a name nginx's resolver cannot resolve", function()
      local out = run("fails", { url = "http://no-such-host.invalid/" })
      assert.equal("dns", out.kind)
      assert.equal("transient", out.class)
    end)

    it("response_too_large: over max_response with a content-length, at once", function()
      local out = run("fails", { path = "/v1/x", method = "POST", body = "{}", max_response = 100000,
                                 steps = "huge;size=300000" })
      assert.equal("response_too_large", out.kind)
      assert.equal("fatal", out.class)
      assert.equal(200, out.status)
      assert.matches("content%-length 300000", out.detail)
    end)

    it("response_too_large: over max_response without a content-length", function()
      local out = run("fails", { path = "/v1/x", method = "POST", body = "{}", max_response = 100000,
                                 steps = "huge;size=300000;chunked=1" })
      assert.equal("response_too_large", out.kind)
      assert.equal(200, out.status)
    end)

    it("bad_response: a garbage status line", function()
      local out = run("fails", { steps = "garbage" })
      assert.equal("bad_response", out.kind)
      assert.equal("fatal", out.class)
      assert.matches("2OO", out.detail)
    end)

    it("bad_response: a response head larger than its limit", function()
      local out = run("fails", { steps = "big_head;size=400000" })
      assert.equal("bad_response", out.kind)
      assert.equal("response head too large", out.detail)
      local small = run("fails", { steps = "big_head;size=20000", max_head = 8192 })
      assert.equal("response head too large", small.detail)
      local fits = run("raw reply", { bytes = "HTTP/1.1 200 OK\r\nX-A: " .. string.rep("a", 5000)
        .. "\r\nContent-Length: 0\r\n\r\n" })
      assert.equal(200, fits.status)
    end)
  end)

  describe("streaming", function()
    it("feeds an SSE body to policy.sse() as it arrives", function()
      local out = run("sse stream")
      assert.equal("text/event-stream", out.content_type)
      assert.equal("", out.body)
      assert.equal("message_start", out.events[1])
      assert.equal("message_stop", out.events[#out.events])
      assert.is_true(out.pieces >= #out.events / 2, "pieces " .. out.pieces)
      -- the first event was parsed long before the stream ended
      assert.is_true(out.first_event_at < out.total / 2,
                     string.format("first event at %.3f of %.3f s", out.first_event_at, out.total))
      assert.is_false(out.inside_event)
    end)

    it("stops when on_chunk returns false", function()
      local out = run("on_chunk stops")
      assert.equal("canceled", out.kind)
      assert.equal("canceled", out.class)
      assert.equal(1, out.seen)
    end)
  end)

  describe("arguments", function()
    it("raises on programming mistakes, naming them, and never echoes header values", function()
      local out = run("bad arguments")
      assert.matches("sturdy: unknown option 'timeuot'", out.option)
      assert.matches("timeout.connect must be a positive number", out.timeout)
      assert.matches("timeout.idle", out.nan)
      assert.matches("insecure_skip_tls_verify must be true or false", out.insecure)
      assert.matches("HTTPS proxy is not supported", out.proxy)
      assert.is_nil(out.proxy:find("secret"))
      assert.matches("unknown request field 'bdy'", out.field)
      assert.matches("contains CR, LF or NUL", out.header)
      assert.is_nil(out.header:find("secret"))
      assert.matches("set by the transport", out.reserved)
      assert.matches("method", out.method)
      assert.equal("bad_url", out.bad_url.kind)
      assert.equal("fatal", out.bad_url.class)
    end)

    it("names the phase where nginx allows no cosocket", function()
      local status, body = r:request("GET", "/phase")
      assert.equal(200, status)
      assert.matches("sturdy: cosockets cannot be used in the set phase", body)
    end)

    it("needs nginx: outside it, new() says so", function()
      local c, err = require("sturdy.cosocket").new()
      assert.is_nil(c)
      assert.matches("needs OpenResty", err)
    end)

    it("says what to build when the LuaJIT policy.so is missing", function()
      local r2, err = runner.start { build = "/nonexistent" }
      assert.is_nil(r2)
      assert.matches("make LUA=luajit", err)
    end)
  end)
end)
