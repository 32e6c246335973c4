-- The engine against the mock API: success paths, timeouts, keep-alive,
-- TLS, limits and argument checking.
local sturdy = require "sturdy"
local cjson = require "cjson"
local mock = require "spec.support.mock"
local socket = require "socket"

local function steps(id, list, extra)
  local h = { ["x-mock-scenario"] = id, ["x-mock-steps"] = list }
  for k, v in pairs(extra or {}) do h[k] = v end
  return h
end

local function anthropic_body(text)
  return cjson.encode {
    model = "claude-test", max_tokens = 64,
    messages = { { role = "user", content = text or "hello" } },
  }
end

describe("sturdy client", function()
  local m, client

  setup(function()
    m = assert(mock.start())
  end)

  teardown(function()
    if client then client:close() end
    m:stop()
  end)

  before_each(function()
    m:reset()
    if client then client:close() end
    client = sturdy.client { base_url = m.http_url, retry = { attempts = 1 } }
  end)

  describe("success paths", function()
    it("POSTs JSON and returns status, headers, body and timings", function()
      local res, err = client:request { method = "POST", path = "/v1/messages", body = anthropic_body("hi") }
      assert.is_nil(err)
      assert.equal(200, res.status)
      local doc = cjson.decode(res.body)
      assert.equal("message", doc.type)
      assert.equal("claude-test", doc.model)
      assert.truthy(res.headers["request-id"])
      -- case-insensitive lookup
      assert.equal(res.headers["request-id"], res.headers["Request-Id"])
      assert.equal(res.headers["request-id"], res.request_id)
      assert.matches("application/json", res.headers["Content-Type"])
      for _, phase in ipairs { "dns", "connect", "tls", "ttfb", "total" } do
        assert.is_number(res.timings[phase])
        assert.is_true(res.timings[phase] >= 0)
      end
      assert.is_true(res.timings.total >= res.timings.ttfb)
      assert.equal(1.1, res.http_version)
      assert.equal(1, #res.attempts)
    end)

    it("sends method, headers and body as given, with a JSON content type by default", function()
      local res = assert(client:request {
        method = "PUT", path = "/echo", body = "{}", headers = { ["X-Trace"] = "abc" },
      })
      local echo = cjson.decode(res.body)
      assert.equal("PUT", echo.method)
      assert.equal("{}", echo.body)
      assert.equal("abc", echo.headers["x-trace"])
      assert.equal("application/json", echo.headers["content-type"])
      assert.is_nil(echo.headers["expect"])
    end)

    it("sends each method right on a reused connection and handle", function()
      local sequence = {
        { "POST", "{}" }, { "GET" }, { "HEAD" }, { "DELETE" }, { "PUT", "[1]" }, { "PATCH", "{}" },
        { "GET" }, { "POST" }, { "HEAD" }, { "POST", "x" },
      }
      for _, step in ipairs(sequence) do
        local res = assert(client:request { method = step[1], path = "/echo", body = step[2] })
        assert.equal(200, res.status)
        if step[1] == "HEAD" then
          assert.equal("", res.body)
        else
          local echo = cjson.decode(res.body)
          assert.equal(step[1], echo.method)
          assert.equal(step[2] or "", echo.body)
        end
      end
      assert.equal(1, client:stats().connections)
    end)

    it("encodes a json table", function()
      local res = assert(client:request { path = "/echo", json = { a = 1 } })
      local echo = cjson.decode(res.body)
      assert.equal("POST", echo.method)
      assert.same({ a = 1 }, cjson.decode(echo.body))
    end)

    it("merges client headers with request headers, the request winning", function()
      local c = sturdy.client { base_url = m.http_url, headers = { ["X-A"] = "client", ["X-B"] = "client" } }
      local res = assert(c:request { path = "/echo", headers = { ["x-b"] = "request" } })
      local echo = cjson.decode(res.body)
      assert.equal("client", echo.headers["x-a"])
      assert.equal("request", echo.headers["x-b"])
      c:close()
    end)

    it("keeps repeated response headers", function()
      local res = assert(client:request { path = "/echo", headers = { ["x-mock-repeat"] = "3" } })
      assert.same({ "1", "2", "3" }, res.headers["x-repeated"])
    end)
  end)

  describe("keep-alive", function()
    it("reuses one connection for sequential requests to one host", function()
      local first = assert(client:request { path = "/echo" })
      local second = assert(client:request { path = "/echo" })
      local a, b = cjson.decode(first.body), cjson.decode(second.body)
      assert.equal(a.connection, b.connection)
      assert.equal(1, client:stats().connections)
      assert.equal(2, tonumber(b.connection_requests))
    end)
  end)

  describe("TLS", function()
    it("fails verification against a self-signed server by default", function()
      local c = sturdy.client { base_url = m.https_url }
      local res, err = c:request { path = "/echo" }
      assert.is_nil(res)
      assert.equal("tls", err.kind)
      assert.equal("fatal", err.class)
      assert.equal(1, #err.attempts)
      assert.equal(0, m:counters().requests)
      c:close()
    end)

    it("verifies with the CA file and negotiates HTTP/2", function()
      local c = sturdy.client { base_url = m.https_url, tls = { ca_file = m.ca_file } }
      local res = assert(c:request { path = "/v1/messages", body = anthropic_body() })
      assert.equal(200, res.status)
      assert.equal(2, res.http_version)
      assert.is_true(res.timings.tls > 0)
      local again = assert(c:request { path = "/echo" })
      assert.equal(2, again.http_version)
      assert.equal(1, c:stats().connections)
      c:close()
    end)

    it("reports an unreadable client certificate as a TLS error", function()
      local c = sturdy.client { base_url = m.https_url,
                                tls = { ca_file = m.ca_file, client_cert = m.dir .. "/missing.pem" } }
      local _, err = c:request { path = "/echo" }
      assert.equal("tls", err.kind)
      c:close()
    end)
  end)

  describe("timeouts", function()
    it("ends a connection that never completes its handshake with connect_timeout", function()
      local server = assert(socket.bind("127.0.0.1", 0))
      local _, port = server:getsockname()
      local c = sturdy.client { base_url = "https://127.0.0.1:" .. port, timeout = { connect = 0.3 },
                                retry = { attempts = 1 } }
      local _, err = c:request { path = "/" }
      server:close()
      c:close()
      assert.equal("connect_timeout", err.kind)
      assert.equal("timeout", err.class)
    end)

    it("ends a reply that does not start in time with first_byte_timeout", function()
      local _, err = client:request { path = "/echo", timeout = { first_byte = 0.3 },
                                      headers = steps("fb", "200;delay=3000") }
      assert.equal("first_byte_timeout", err.kind)
      assert.equal("timeout", err.class)
      assert.is_nil(err.status)
    end)

    it("ends a body that stalls with idle_timeout", function()
      local _, err = client:request { path = "/v1/messages", body = anthropic_body(),
                                      timeout = { idle = 0.3 }, headers = steps("idle", "stall_mid;stall=5000") }
      assert.equal("idle_timeout", err.kind)
      assert.equal(200, err.status)
    end)

    it("ends a call that runs past the total deadline with total_timeout", function()
      local _, err = client:request { path = "/echo", timeout = { total = 0.4, first_byte = 10 },
                                      headers = steps("total", "200;delay=3000") }
      assert.equal("total_timeout", err.kind)
    end)
  end)

  describe("limits", function()
    it("refuses a response larger than max_response with a content length", function()
      local _, err = client:request { path = "/echo", max_response = 100000,
                                      headers = steps("huge", "huge;size=2000000") }
      assert.equal("response_too_large", err.kind)
      assert.equal("fatal", err.class)
    end)

    it("refuses a chunked response once it grows past max_response", function()
      local _, err = client:request { path = "/echo", max_response = 100000,
                                      headers = steps("huge-chunked", "huge;size=2000000;chunked=1") }
      assert.equal("response_too_large", err.kind)
    end)

    it("rejects header values with CR or LF before sending anything", function()
      local ok, msg = pcall(client.request, client, { path = "/echo", headers = { ["x-a"] = "a\r\nX-Evil: 1" } })
      assert.is_false(ok)
      assert.matches("header 'x%-a'.*CR, LF", msg)
      assert.not_matches("Evil", msg)
      ok = pcall(sturdy.client, { base_url = m.http_url, headers = { ["x-b"] = "a\nb" } })
      assert.is_false(ok)
      assert.equal(0, m:counters().requests)
    end)
  end)

  describe("errors", function()
    it("returns nil and a typed error for an HTTP error, with the provider's detail", function()
      local res, err = client:request { path = "/v1/messages", body = anthropic_body(),
                                        headers = steps("nf", "404") }
      assert.is_nil(res)
      assert.is_true(sturdy.is_error(err))
      assert.equal("not_found", err.kind)
      assert.equal(404, err.status)
      assert.equal("not_found_error", err.type)
      assert.truthy(err.request_id)
      local line = tostring(err)
      assert.matches("^sturdy: not_found %(404 not_found_error%)", line)
      assert.not_matches("\n", line)
    end)

    it("never shows request headers in an error", function()
      local c = sturdy.client { base_url = m.http_url, headers = { ["x-api-key"] = "sk-secret-123" },
                                retry = { attempts = 1 } }
      local _, err = c:request { path = "/echo", headers = steps("auth", "401") }
      assert.equal("auth", err.kind)
      assert.not_matches("sk%-secret", tostring(err))
      for _, v in pairs(err) do
        if type(v) == "string" then assert.not_matches("sk%-secret", v) end
      end
      c:close()
    end)

    it("reports a refused connection as a connection error", function()
      local server = assert(socket.bind("127.0.0.1", 0))
      local _, port = server:getsockname()
      server:close()
      local c = sturdy.client { base_url = "http://127.0.0.1:" .. port, retry = { attempts = 1 } }
      local _, err = c:request { path = "/" }
      assert.equal("connection", err.kind)
      assert.equal("transient", err.class)
      assert.is_true(err.retryable)
      c:close()
    end)
  end)

  describe("proxies", function()
    it("sends requests through the proxy option", function()
      local c = sturdy.client { base_url = "http://sturdy.test", proxy = m.http_url }
      local res = assert(c:request { path = "/echo" })
      assert.matches("http://sturdy.test/echo", cjson.decode(res.body).request_line, 1, true)
      c:close()
    end)

    it("honours http_proxy from the environment", function()
      local lua = arg and arg[-1] or "lua"
      local code = [[
        local sturdy = require "sturdy"
        local c = sturdy.client { base_url = "http://sturdy.test" }
        local res, err = c:request { path = "/echo" }
        io.write(res and res.body or tostring(err))
      ]]
      local cmd = ("http_proxy=%s LUA_PATH=%q LUA_CPATH=%q %s -e %q"):format(
        m.http_url, package.path, package.cpath, lua, code)
      local p = io.popen(cmd)
      local out = p:read("*a")
      p:close()
      local echo = cjson.decode(out)
      assert.matches("http://sturdy.test/echo", echo and echo.request_line or out, 1, true)
    end)
  end)

  describe("arguments", function()
    it("raises for unknown options, naming them", function()
      assert.has_error(function() sturdy.client { base_url = m.http_url, timeuot = {} } end,
        "sturdy: unknown option 'timeuot' in client options")
      assert.has_error(function() sturdy.client { timeout = { conect = 1 } } end,
        "sturdy: unknown option 'conect' in client options.timeout")
      assert.has_error(function() client:request { path = "/echo", bdy = "x" } end,
        "sturdy: unknown option 'bdy' in request")
    end)

    it("raises for wrong types, naming the option", function()
      assert.has_error(function() sturdy.client { base_url = 42 } end,
        "sturdy: option 'base_url' in client options must be a string, got number")
      assert.has_error(function() sturdy.client { timeout = { total = -1 } } end,
        "sturdy: option 'total' in client options.timeout must be a positive number or false, got number")
      assert.has_error(function() sturdy.client { base_url = "ftp://x" } end)
      assert.has_error(function() client:request { path = "echo" } end)
      assert.has_error(function() client:request "x" end, "sturdy: request must be a table, got string")
      assert.has_error(function() sturdy.client { retry = { jitter = "fulll" } } end)
      assert.has_error(function() sturdy.client { retry = { retry_on = { "sometimes" } } } end)
    end)

    it("raises when the client is closed", function()
      local c = sturdy.client { base_url = m.http_url }
      c:close()
      assert.has_error(function() c:request { path = "/echo" } end, "sturdy: the client is closed")
    end)
  end)
end)
