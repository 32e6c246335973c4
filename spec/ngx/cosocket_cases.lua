-- Cases for spec/cosocket_spec.lua, run inside nginx by spec/support/ngx_runner.
-- Each returns what the outer spec asserts on; assertions here name what failed.
-- luacheck: globals ngx

local http = require "sturdy.cosocket"
local policy = require "sturdy.policy"
local cjson = require "cjson.safe"

local C = {}

local function client(opts)
  return assert(http.new(opts))
end

-- Mock request headers that pick fault steps ("|" separated).
local function steps(list, id)
  return { ["x-mock-steps"] = list, ["x-mock-steps-sep"] = "|", ["x-mock-scenario"] = id or list }
end

-- GET /echo: the decoded echo and the response.
local function echo(c, url, extra)
  local req = { url = url .. "/echo" }
  for k, v in pairs(extra or {}) do req[k] = v end
  local res, err = c:request(req)
  assert(res, err and (err.kind .. ": " .. tostring(err.detail)))
  assert(res.status == 200, "status " .. tostring(res.status))
  return assert(cjson.decode(res.body)), res
end

-- An error as plain fields (no timings table), for the outer asserts.
local function plain_error(err)
  return { kind = err.kind, class = err.class, detail = err.detail, status = err.status,
           total = err.timings and err.timings.total }
end

local function expect_error(res, err)
  assert(not res, "expected an error, got status " .. tostring(res and res.status))
  assert(type(err) == "table" and err.kind and err.class, "errors are { kind, class, detail }")
  return plain_error(err)
end

-- The raw response the runner's /raw location writes: ?b=<base64 bytes>.
local function raw_url(ctx, bytes)
  return ctx.vars.self_url .. "/raw?b=" .. ngx.escape_uri(ngx.encode_base64(bytes))
end

---------------------------------------------------------------------------
-- Bodies

C["content-length reply"] = function(ctx)
  local c = client()
  local body = string.rep("x", 5000)
  local e, res = echo(c, ctx.mock.http_url, { method = "POST", body = body,
                                               headers = { ["content-type"] = "text/plain" } })
  return {
    echoed_body = #e.body, content_length_sent = e.headers["content-length"],
    content_length = res.headers["Content-Length"], body_len = #res.body,
    raw_has_length = res.raw_headers:find("content-length\0", 1, true) ~= nil
                     or res.raw_headers:find("Content-Length\0", 1, true) ~= nil,
    http_version = res.http_version, timings = res.timings,
  }
end

C["chunked reply"] = function(ctx)
  local c = client()
  local res, err = c:request { url = ctx.mock.http_url .. "/v1/x", method = "POST", body = "{}",
                               headers = steps("huge;size=300000;chunked=1", "chunked" .. ctx.args.n) }
  assert(res, err and err.detail)
  return { status = res.status, te = res.headers["transfer-encoding"], cl = res.headers["content-length"],
           len = #res.body, tail = res.body:sub(-2), head = res.body:sub(1, 8) }
end

-- Raw replies from the runner's own /raw location.
C["raw reply"] = function(ctx)
  local c = client(ctx.args.opts)
  local res, err = c:request { url = raw_url(ctx, ctx.args.bytes), method = ctx.args.method }
  if not res then return { error = plain_error(err) } end
  return { status = res.status, body = res.body, headers = res.headers, http_version = res.http_version }
end

-- The reader: pieces as they arrive, nil at the end, then nil again.
C["reader"] = function(ctx)
  local c = client()
  local res = assert(c:open { url = ctx.mock.http_url .. "/v1/x", method = "POST", body = "{}",
                              headers = steps("huge;size=200000", "reader" .. ctx.args.n) })
  local pieces, total = 0, 0
  while true do
    local piece, err = res:read()
    assert(not err, err and err.detail)
    if not piece then break end
    pieces, total = pieces + 1, total + #piece
  end
  local again, again_err = res:read()
  return { pieces = pieces, total = total, again = again == nil and again_err == nil }
end

---------------------------------------------------------------------------
-- Keep-alive

C["keepalive reuse"] = function(ctx)
  local c = client()
  local out = {}
  for i = 1, 3 do
    local e, res = echo(c, ctx.mock.http_url)
    out[i] = { connection = e.connection, requests = e.connection_requests, reused = res.reused,
               connect = res.timings.connect }
  end
  return out
end

-- The server answers completely (keep-alive allowed), then closes while the
-- connection sits in the pool with the next request already sent on it.
C["stale pooled connection"] = function(ctx)
  local c = client()
  local url = raw_url(ctx, "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok") .. "&linger=100"
  local first = assert(c:request { url = url })
  local second, err = c:request { url = url }
  assert(second, err and err.detail)
  return { first = first.status, second = second.status, second_reused = second.reused }
end

-- A body not read to its end: that connection is closed, the next call gets another.
C["no reuse after an incomplete body"] = function(ctx)
  local c = client()
  local first = echo(c, ctx.mock.http_url)
  local res = assert(c:open { url = ctx.mock.http_url .. "/echo", method = "POST",
                              body = string.rep("y", 100000) })
  assert(res:read())
  res:close()
  local after_close = echo(c, ctx.mock.http_url)
  -- drop_mid: the body breaks off; that connection is not pooled either
  local r2, err = c:request { url = ctx.mock.http_url .. "/echo", headers = steps("drop_mid", "dm" .. ctx.args.n) }
  assert(not r2 and err.kind == "connection", "drop_mid is a connection error")
  local after_drop = echo(c, ctx.mock.http_url)
  return { first = first.connection, after_close = after_close.connection, after_drop = after_drop.connection,
           drop_detail = err.detail }
end

C["keepalive off"] = function(ctx)
  local c = client { keepalive = false }
  local a, ra = echo(c, ctx.mock.http_url)
  local b, rb = echo(c, ctx.mock.http_url)
  return { a = a.connection, b = b.connection, reused = ra.reused or rb.reused, sent = a.headers.connection }
end

-- The pool name holds TLS, server name and verify: none of them shares.
C["pool names"] = function(ctx)
  local url = "https://127.0.0.1:" .. ctx.mock.tls_port
  local verified = client()
  local a = echo(verified, url, { server_name = "localhost" })
  local b = echo(verified, url, { server_name = "localhost" })
  local unverified = client { insecure_skip_tls_verify = true }
  local u = echo(unverified, url, { server_name = "localhost" })
  local plain = echo(verified, ctx.mock.http_url)
  return { a = a.connection, b = b.connection, unverified = u.connection, plain = plain.connection,
           scheme_a = a.scheme, scheme_plain = plain.scheme }
end

---------------------------------------------------------------------------
-- TLS

C["tls verified"] = function(ctx)
  local url = "https://127.0.0.1:" .. ctx.mock.tls_port
  -- keepalive off: a pool of its own, so a fresh handshake
  local e, res = echo(client { keepalive = false }, url, { server_name = "localhost" })
  local c = client()
  local e1 = echo(c, url, { server_name = "localhost" })
  local e2, res2 = echo(c, url, { server_name = "localhost" })
  return { scheme = e.scheme, http_version = e.http_version, tls = res.timings.tls, connect = res.timings.connect,
           reused = res2.reused, tls_again = res2.timings.tls, same = e1.connection == e2.connection }
end

-- https://localhost:PORT: the name goes through nginx's resolver (the
-- specs' DNS helper), SNI and the certificate check use it.
C["by name"] = function(ctx)
  local c = client()
  local e = echo(c, "https://localhost:" .. ctx.mock.tls_port)
  -- the helper resolves *.test too, but the certificate does not hold it
  local res, err = c:request { url = "https://mock.test:" .. ctx.mock.tls_port .. "/echo" }
  return { scheme = e.scheme, host_header = e.headers.host, wrong = expect_error(res, err) }
end

C["tls error"] = function(ctx)
  local c = client()
  local res, err = c:request { url = "https://127.0.0.1:" .. ctx.mock.tls_port .. "/echo",
                               server_name = ctx.args.server_name }
  return expect_error(res, err)
end

---------------------------------------------------------------------------
-- Proxies

C["via proxy"] = function(ctx)
  local c = client { proxy = ctx.args.proxy }
  local https = "https://127.0.0.1:" .. ctx.mock.tls_port
  local t1, r1 = echo(c, https, { server_name = "localhost" })
  local t2, r2 = echo(c, https, { server_name = "localhost" })
  local p1 = echo(c, ctx.mock.http_url)
  local p2 = echo(c, ctx.mock.http_url)
  return {
    tls_scheme = t1.scheme, tls_line = t1.request_line, tls_reused = r2.reused,
    tls_same = t1.connection == t2.connection, tls_timing = r1.timings.tls,
    http_line = p1.request_line, http_auth = p1.headers["proxy-authorization"],
    http_same = p1.connection == p2.connection, tls_auth_leaked = t1.headers["proxy-authorization"],
  }
end

C["proxy refuses"] = function(ctx)
  local c = client { proxy = ctx.args.proxy }
  local res, err = c:request { url = "https://example.invalid/echo" }
  return expect_error(res, err)
end

C["no_proxy"] = function(ctx)
  local c = client { proxy = ctx.args.proxy, no_proxy = "example.com,127.0.0.1" }
  local e = echo(c, ctx.mock.http_url)
  return { line = e.request_line }
end

---------------------------------------------------------------------------
-- Failures and timeouts

-- ctx.args: url (or path on the mock), steps, timeout, deadline_in, method, body, max_response
C["fails"] = function(ctx)
  local a = ctx.args
  local c = client { timeout = a.client_timeout, max_head = a.max_head, max_response = a.max_response }
  local url = a.url or (ctx.mock.http_url .. (a.path or "/echo"))
  local started = policy.monotime()
  local res, err = c:request {
    url = url, method = a.method, body = a.body, timeout = a.timeout, server_name = a.server_name,
    headers = a.steps and steps(a.steps, a.id) or nil,
    deadline = a.deadline_in and started + a.deadline_in or nil,
  }
  local out = expect_error(res, err)
  out.elapsed = policy.monotime() - started
  return out
end

---------------------------------------------------------------------------
-- Streaming

-- An SSE reply fed to the C parser piece by piece as the pieces arrive.
C["sse stream"] = function(ctx)
  local c = client()
  local parser = policy.sse()
  local started = policy.monotime()
  local events, pieces, first_event_at = {}, 0, nil
  local body = cjson.encode({ model = "claude-mock", stream = true, max_tokens = 16,
                              messages = { { role = "user", content = "stream me please" } } })
  local res, err = c:request {
    url = ctx.mock.http_url .. "/v1/messages", method = "POST", body = body,
    headers = { ["content-type"] = "application/json", ["x-mock-steps"] = "200;drip=40",
                ["x-mock-scenario"] = "sse" .. ctx.args.n },
    on_chunk = function(piece)
      pieces = pieces + 1
      local got = assert(parser:feed(piece))
      for _, ev in ipairs(got) do
        events[#events + 1] = ev.event
        first_event_at = first_event_at or (policy.monotime() - started)
      end
    end,
  }
  assert(res, err and err.detail)
  return { pieces = pieces, events = events, first_event_at = first_event_at, total = res.timings.total,
           body = res.body, inside_event = parser:finish(), content_type = res.headers["content-type"] }
end

-- on_chunk returning false stops the call.
C["on_chunk stops"] = function(ctx)
  local c = client()
  local seen = 0
  local res, err = c:request { url = ctx.mock.http_url .. "/v1/x", method = "POST", body = "{}",
                               headers = steps("huge;size=500000", "stop" .. ctx.args.n),
                               on_chunk = function() seen = seen + 1; return false end }
  local out = expect_error(res, err)
  out.seen = seen
  return out
end

---------------------------------------------------------------------------
-- Arguments

C["bad arguments"] = function()
  local c = client()
  local out = {}
  local function catch(name, fn)
    local ok, e = pcall(fn)
    out[name] = ok and "no error" or tostring(e)
  end
  catch("option", function() http.new { timeuot = {} } end)
  catch("timeout", function() http.new { timeout = { connect = -1 } } end)
  catch("nan", function() http.new { timeout = { idle = 0 / 0 } } end)
  catch("insecure", function() http.new { insecure_skip_tls_verify = "yes" } end)
  catch("proxy", function() http.new { proxy = "https://user:secret@127.0.0.1:1" } end)
  catch("field", function() c:request { url = "http://127.0.0.1:1/", bdy = "x" } end)
  catch("header", function() c:request { url = "http://127.0.0.1:1/", headers = { ["x-key"] = "a\r\nb: secret" } } end)
  catch("reserved", function() c:request { url = "http://127.0.0.1:1/", headers = { ["Content-Length"] = "5" } } end)
  catch("method", function() c:request { url = "http://127.0.0.1:1/", method = "get" } end)
  local res, err = c:request { url = "ftp://127.0.0.1/x" }
  out.bad_url = expect_error(res, err)
  return out
end

return C
