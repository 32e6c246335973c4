-- bin/sturdy, run as a user runs it, against the mock API.
local mock = require "spec.support.mock"
local socket = require "socket"
local cjson = require "cjson"

local LUA = arg and arg[-1] or "lua"

local function quote(s)
  return "'" .. tostring(s):gsub("'", "'\\''") .. "'"
end

local function read_file(path)
  local f = io.open(path, "rb")
  if not f then return "" end
  local data = f:read("*a")
  f:close()
  return data
end

-- Runs `sturdy ARGS` with env (a table; false unsets a variable). Returns the
-- exit status, stdout and stderr.
local function sturdy(args, env)
  local out, err = os.tmpname(), os.tmpname()
  local words = { "env", "-u", "ANTHROPIC_API_KEY", "-u", "OPENAI_API_KEY", "-u", "http_proxy",
                  "-u", "https_proxy", "-u", "all_proxy", "-u", "HTTPS_PROXY", "-u", "ALL_PROXY",
                  "LUA_PATH=" .. quote(package.path), "LUA_CPATH=" .. quote(package.cpath) }
  for k, v in pairs(env or {}) do
    words[#words + 1] = k .. "=" .. quote(v)
  end
  words[#words + 1] = LUA .. " bin/sturdy " .. args .. " >" .. out .. " 2>" .. err .. "; echo $?"
  local p = io.popen(table.concat(words, " "))
  local status = tonumber(p:read("*a"):match("(%d+)%s*$"))
  p:close()
  local stdout, stderr = read_file(out), read_file(err)
  os.remove(out)
  os.remove(err)
  return status, stdout, stderr
end

-- One line on stderr, as every failure prints.
local function one_line(stderr)
  assert.matches("^sturdy: [^\n]+\n$", stderr)
  return stderr:match("^sturdy: ([^\n]+)")
end

local function closed_port()
  local s = assert(socket.bind("127.0.0.1", 0))
  local _, port = s:getsockname()
  s:close()
  return tonumber(port)
end

local function path_count(m, path)
  return assert(m:counters()).paths[path] or 0
end

describe("sturdy (the command line)", function()
  local m

  setup(function() m = assert(mock.start()) end)
  teardown(function() m:stop() end)

  describe("help and usage", function()
    it("lists the commands", function()
      local status, out = sturdy("--help")
      assert.equal(0, status)
      for _, cmd in ipairs { "diagnose URL", "chat PROMPT", "mock", "bench URL", "metrics URL" } do
        assert.matches("\n  " .. cmd, out, 1, true)
      end
      local s2, _, err = sturdy("")
      assert.equal(2, s2)
      assert.matches("^usage: sturdy COMMAND", err)
    end)

    it("gives every command --help", function()
      for _, cmd in ipairs { "diagnose", "chat", "mock", "bench", "metrics" } do
        local status, out, err = sturdy(cmd .. " --help")
        assert.equal(0, status, cmd)
        assert.equal("", err, cmd)
        assert.matches("^usage: sturdy " .. cmd, out)
      end
    end)

    it("exits 2 with one line for a bad command line", function()
      local cases = {
        { "frobnicate", 'unknown command "frobnicate" (see: sturdy --help)' },
        { "diagnose", "diagnose: needs a URL (see: sturdy diagnose --help)" },
        { "diagnose ftp://x/", 'diagnose: the URL must start with http:// or https://, got "ftp://x/"' },
        { "diagnose http://x/ --frob", "diagnose: unknown option --frob" },
        { "diagnose http://x/ --timeout soon", 'diagnose: --timeout takes a positive number of seconds, got "soon"' },
        { "chat", "chat: needs a PROMPT" },
        { "chat --provider gemini hi", 'chat: --provider takes anthropic or openai, got "gemini"' },
        { "bench http://x/ -n 0", 'bench: --requests takes a whole number >= 1, got "0"' },
        { "bench http://x/ -c", "bench: --concurrency needs a value" },
        { "bench http://x/ -H nocolon", 'bench: -H takes "Name: value", got "nocolon"' },
        { "metrics", "metrics: needs a URL" },
        { "metrics ftp://x/", 'metrics: the URL must start with http:// or https://, got "ftp://x/"' },
        { "mock --port 70000", "mock: --port takes a port up to 65535" },
      }
      for _, c in ipairs(cases) do
        local status, out, err = sturdy(c[1])
        assert.equal(2, status, c[1])
        assert.equal("", out, c[1])
        assert.matches(c[2], one_line(err), 1, true)
      end
    end)
  end)

  describe("diagnose", function()
    it("names the untrusted certificate and exits 1", function()
      local status, out, err = sturdy("diagnose " .. m.https_url .. "/echo")
      assert.equal(1, status)
      assert.matches("\n  tls +FAIL ", out)
      local line = one_line(err)
      assert.matches("^TLS failure: the certificate 'CN ?= ?localhost' is not trusted", line)
      assert.matches("--ca-file", line, 1, true)
    end)

    it("succeeds with --ca-file", function()
      local status, out, err = sturdy("diagnose " .. m.https_url .. "/echo --ca-file " .. quote(m.ca_file))
      assert.equal(0, status, err)
      assert.equal("", err)
      for _, name in ipairs { "proxy", "dns", "connect", "tls", "first_byte" } do
        assert.matches("\n?  " .. name .. " +ok ", out)
      end
      assert.matches("TLSv1%.%d, TLS_", out)
      assert.matches("\nverdict: ok: localhost port " .. m.tls_port .. " answered HTTP 200 in [%d.]+ m?s\n$", out)
    end)

    it("says connection refused for a closed port", function()
      local port = closed_port()
      local status, _, err = sturdy("diagnose http://127.0.0.1:" .. port .. "/")
      assert.equal(1, status)
      assert.equal("connection refused: 127.0.0.1 port " .. port, one_line(err))
    end)

    it("reports a DNS failure", function()
      local status, _, err = sturdy("diagnose https://nowhere.sturdy.invalid/")
      assert.equal(1, status)
      assert.matches("^DNS failure: nowhere%.sturdy%.invalid does not resolve", one_line(err))
    end)

    it("takes the proxy from --proxy and from the environment", function()
      local port = closed_port()
      local status, out, err = sturdy("diagnose http://upstream.sturdy.invalid/echo --proxy " .. m.http_url)
      assert.equal(0, status, err)
      assert.matches("proxy +ok +" .. m.http_url:gsub("%p", "%%%0") .. " %(from the proxy option%)", out)
      status, out, err = sturdy("diagnose " .. m.http_url .. "/echo",
                                { http_proxy = "http://user:pw@127.0.0.1:" .. port })
      assert.equal(1, status)
      assert.matches("http://%*%*%*@127%.0%.0%.1:" .. port .. " %(from %$http_proxy%)", out)
      assert.equal("connection refused: the proxy 127.0.0.1 port " .. port, one_line(err))
      assert.not_matches("user:pw", out .. err, 1, true)
      status = sturdy("diagnose " .. m.http_url .. "/echo",
                      { http_proxy = "http://127.0.0.1:" .. port, no_proxy = "localhost,127.0.0.1" })
      assert.equal(0, status)
    end)

    it("prints JSON with --json", function()
      local status, out = sturdy("diagnose " .. m.http_url .. "/echo --json")
      assert.equal(0, status)
      local r = cjson.decode(out)
      assert.is_true(r.ok)
      assert.equal("first_byte", r.steps[#r.steps].name)
      assert.equal(200, r.steps[#r.steps].status)
    end)
  end)

  describe("chat", function()
    it("streams an Anthropic answer with the key from the environment", function()
      local before = path_count(m, "/v1/messages")
      local status, out, err = sturdy("chat --base-url " .. m.http_url .. " Hello from the shell",
                                      { ANTHROPIC_API_KEY = "sk-ant-cli-secret-1234" })
      assert.equal(0, status, err)
      assert.equal("Echo: Hello from the shell\n", out)
      assert.equal("", err)
      assert.equal(before + 1, path_count(m, "/v1/messages"))
    end)

    it("streams an OpenAI answer, and picks openai when only its key is set", function()
      local status, out, err = sturdy("chat --base-url " .. m.http_url .. " --model gpt-test Hi there",
                                      { OPENAI_API_KEY = "sk-openai-cli-secret" })
      assert.equal(0, status, err)
      assert.equal("Echo: Hi there\n", out)
    end)

    it("reads the prompt from stdin with -", function()
      local status, out = sturdy("chat --base-url " .. m.http_url .. " - < spec/support/README.md",
                                 { ANTHROPIC_API_KEY = "sk-x" })
      assert.equal(0, status)
      assert.matches("^Echo: # Mock API for the tests", out)
    end)

    it("exits 1 with one line without a key, and never prints a key", function()
      local status, out, err = sturdy("chat --base-url " .. m.http_url .. " hi")
      assert.equal(1, status)
      assert.equal("", out)
      assert.equal("anthropic needs an API key: pass api_key or set ANTHROPIC_API_KEY", one_line(err))
      -- a failed call: what failed, never the key
      status, out, err = sturdy("chat --base-url " .. m.https_url .. " hi",
                                { ANTHROPIC_API_KEY = "sk-ant-never-shown-42" })
      assert.equal(1, status)
      assert.matches("^tls: the TLS connection could not be verified", one_line(err))
      assert.not_matches("never-shown", out .. err, 1, true)
      -- and with its CA it works
      status, out = sturdy("chat --base-url " .. m.https_url .. " --ca-file " .. quote(m.ca_file) .. " hi",
                           { ANTHROPIC_API_KEY = "sk-ant-never-shown-42" })
      assert.equal(0, status)
      assert.equal("Echo: hi\n", out)
    end)
  end)

  describe("bench", function()
    it("runs N requests C at a time, with percentiles and a histogram", function()
      local before = path_count(m, "/echo")
      local status, out, err = sturdy("bench " .. m.http_url .. "/echo -n 40 -c 4 --progress")
      assert.equal(0, status, err)
      assert.equal(before + 40, path_count(m, "/echo")) -- exactly N reached the server
      assert.matches("^sturdy bench GET " .. m.http_url:gsub("%p", "%%%0") .. "/echo: 40 requests, 4 at a time\n", out)
      assert.matches("\n  40 ok, 0 failed in [%d.]+ s: [%d.]+ requests/s\n", out)
      local p = {}
      for _, name in ipairs { "min", "p50", "p90", "p95", "p99", "p99.9", "max" } do
        p[#p + 1] = tonumber(out:match(" " .. name:gsub("%.", "%%.") .. " ([%d.]+) ms"))
        assert.is_number(p[#p], name .. " in:\n" .. out)
      end
      for i = 2, #p do assert.is_true(p[i] >= p[i - 1], out) end -- percentiles in order
      local rows, total = 0, 0
      for count in out:gmatch("\n +[%d.]+ m?s %- [%d.]+ m?s +[|┤][^\n]* (%d+)") do
        rows, total = rows + 1, total + tonumber(count)
      end
      assert.is_true(rows >= 1, out)
      assert.equal(40, total, out) -- every latency is in the histogram once
      -- the live progress line, redrawn in place, ends at 40/40
      assert.matches("\r%[#+%] 40/40 ", err)
    end)

    it("counts failures by kind and exits 1", function()
      local status, out, err = sturdy("bench " .. m.http_url .. "/v1/anything -n 6 -c 2 -H 'x-mock-steps: 500'")
      assert.equal(1, status)
      assert.matches("\n  0 ok, 6 failed in ", out)
      assert.matches("\n  failures: server %(500%) 6\n", out)
      assert.equal("6 of 6 requests failed", one_line(err))
    end)

    it("sends a body with --data", function()
      local body = '{"model":"claude-x","max_tokens":5,"messages":[{"role":"user","content":"hi"}]}'
      local before = path_count(m, "/v1/messages")
      local status, out = sturdy("bench " .. m.http_url .. "/v1/messages -n 3 -c 1 --data " .. quote(body))
      assert.equal(0, status)
      assert.matches("sturdy bench POST ", out)
      assert.equal(before + 3, path_count(m, "/v1/messages"))
    end)
  end)

  describe("mock", function()
    it("serves the mock API until interrupted", function()
      local port, tls_port = closed_port(), closed_port()
      local dir = os.tmpname()
      os.remove(dir)
      assert(os.execute("mkdir " .. dir))
      -- the status is kept by a subshell that waits for it
      local cmd = ("(env LUA_PATH=%s LUA_CPATH=%s %s bin/sturdy mock --port %d --tls-port %d >%s/out 2>&1 & "
        .. "echo $! >%s/pid; wait $!; echo $? >%s/status) >/dev/null 2>&1 &"):format(
        quote(package.path), quote(package.cpath), LUA, port, tls_port, dir, dir, dir)
      os.execute(cmd)
      local out
      for _ = 1, 250 do
        out = read_file(dir .. "/out")
        if out:find("try:", 1, true) then break end
        socket.sleep(0.02)
      end
      assert.matches("\n  http   http://127.0.0.1:" .. port .. "\n", out)
      assert.matches("\n  https  https://localhost:" .. tls_port .. " ", out)

      local c = assert(socket.connect("127.0.0.1", port))
      c:send("GET /_mock/counters HTTP/1.0\r\nHost: x\r\n\r\n")
      local reply = c:receive("*a")
      c:close()
      assert.matches("^HTTP/1%.1 200", reply)

      os.execute("kill -INT " .. read_file(dir .. "/pid"):match("%d+"))
      local status
      for _ = 1, 250 do
        status = read_file(dir .. "/status"):match("%d+")
        if status then break end
        socket.sleep(0.02)
      end
      assert.equal("0", status)
      assert.matches("\nstopped\n$", read_file(dir .. "/out"))
      assert.is_nil(socket.connect("127.0.0.1", port)) -- nginx is gone
      os.execute("rm -rf " .. dir)
    end)
  end)
  describe("metrics", function()
    it("prints the metrics of its calls, which promtool accepts and which match the mock's counts", function()
      m:reset()
      local status, out, err = sturdy("metrics " .. m.http_url .. "/echo -n 6 -c 2 --key probe "
                                      .. "-H 'x-mock-steps: 503,200' -H 'x-mock-scenario: cli-metrics' "
                                      .. "-H 'x-secret: hunter22'")
      assert.equal(0, status, err)
      assert.matches('sturdy_calls_total{key="probe",class="success",status="200"} 6', out, 1, true)
      local sc = m:scenario("cli-metrics")
      -- the first attempt met the 503, every later one a 200
      assert.equal(7, sc.count)
      assert.matches('http_client_attempts_total{key="probe",http_response_status_code="503",'
                     .. 'error_type="overloaded"} 1', out, 1, true)
      assert.matches('sturdy_retries_total{key="probe",class="overloaded"} 1', out, 1, true)
      assert.is_nil(out:find("hunter22", 1, true))
      local path = os.tmpname()
      local f = assert(io.open(path, "wb"))
      f:write(out)
      f:close()
      assert.is_true(os.execute("promtool check metrics < " .. path .. " >/dev/null 2>&1") == true
                     or os.execute("promtool check metrics < " .. path .. " >/dev/null 2>&1") == 0)
      os.remove(path)
      local s2, om = sturdy("metrics " .. m.http_url .. "/echo -n 1 --openmetrics")
      assert.equal(0, s2)
      assert.matches("# EOF\n$", om)
    end)
  end)
end)
