--- The sturdy mock API: nginx + `ngx_http_lua` on two loopback ports (plain
-- HTTP, and HTTPS with HTTP/2 and a throwaway CA), serving sturdy.mock.server.
-- It imitates the Anthropic and OpenAI endpoints and injects faults on
-- request (spec/support/README.md lists the endpoints, steps and counters).
--
--    local mock = require "sturdy.mock"
--    local m = assert(mock.start())
--    -- m.http_url, m.https_url, m.ca_file, m:counters(), m:reset(), m:config{...}
--    m:stop()
--
-- `sturdy mock` serves it from a shell. Needs nginx with its Lua module
-- (Debian: nginx, libnginx-mod-http-lua, lua-resty-core), the openssl
-- command, and luasocket and lua-cjson for this Lua. Works on Lua 5.1-5.4
-- and LuaJIT.
-- @module sturdy.mock

local socket = require "socket"
local cjson = require "cjson"

local M = {}

local Mock = {}
Mock.__index = Mock

local START_TRIES = 5
local READY_TIMEOUT = 5      -- seconds to wait for nginx to answer
local STOP_TIMEOUT = 5       -- seconds to wait for nginx to exit
local CONTROL_TIMEOUT = 5    -- seconds for one control request

-- Shell and file helpers

local function quote(s)
  return "'" .. tostring(s):gsub("'", "'\\''") .. "'"
end

-- Helper programs (nginx, openssl) run without the sanitizer runtime that
-- `make test-asan` preloads into the Lua interpreter.
local function clean_env(cmd)
  return "env -u LD_PRELOAD -u ASAN_OPTIONS -u LSAN_OPTIONS -u UBSAN_OPTIONS sh -c " .. quote(cmd)
end

-- os.execute differs: 5.1/LuaJIT return a wait status, 5.2+ return
-- ok, "exit"|"signal", code. Returns the exit code (128+N for signal N).
local function execute(cmd)
  local a, how, code = os.execute(cmd)
  if type(a) == "number" then
    if a > 255 or a == 0 then
      return math.floor(a / 256)
    end
    return 128 + a
  end
  if how == "signal" then
    return 128 + (code or 0)
  end
  return code or (a and 0 or 1)
end

local function run(cmd)
  return execute(clean_env(cmd))
end

local function capture(cmd)
  local p = io.popen(clean_env(cmd))
  if not p then
    return nil
  end
  local out = p:read("*a")
  p:close()
  return (out:gsub("%s+$", ""))
end

local function read_file(path)
  local f = io.open(path, "rb")
  if not f then
    return nil
  end
  local data = f:read("*a")
  f:close()
  return data
end

local function write_file(path, data)
  local f = assert(io.open(path, "wb"))
  assert(f:write(data))
  f:close()
end

local function file_exists(path)
  local f = io.open(path, "rb")
  if f then
    f:close()
  end
  return f ~= nil
end

-- Where a module file is on package.path (package.searchpath is 5.2+).
local function search_path(name)
  local file = name:gsub("%.", "/")
  for pattern in package.path:gmatch("[^;]+") do
    local path = pattern:gsub("%?", file)
    if file_exists(path) then
      return path
    end
  end
  return nil
end

-- The directory nginx's lua_package_path needs so that its
-- require "sturdy.mock.server" finds the file beside this one, absolute.
local function lua_root()
  local src = debug.getinfo(1, "S").source
  local dir = src:match("^@(.*)/[^/]*$") or "."
  local server = dir .. "/server.lua"
  if not file_exists(server) then
    server = search_path("sturdy.mock.server") or server
  end
  local root = server:match("^(.*)/sturdy/mock/server%.lua$") or "."
  if root:sub(1, 1) ~= "/" then
    root = capture("pwd") .. "/" .. root
  end
  return root
end

local LUA_ROOT = lua_root()

-- Processes

-- Our own pid and start time from /proc, so nginx can stop itself if we die
-- without calling m:stop(). nil where /proc is missing.
local function own_identity()
  local stat = read_file("/proc/self/stat")
  if not stat then
    return nil
  end
  local pid = stat:match("^(%d+)")
  local fields = {}
  for field in (stat:match("%) (.*)$") or ""):gmatch("%S+") do
    fields[#fields + 1] = field
  end
  return tonumber(pid), fields[20]
end

local function alive(pid)
  local stat = read_file("/proc/" .. pid .. "/stat")
  if stat then
    -- A zombie is dead even if nobody reaped it yet.
    local state = stat:match("%) (%a)")
    return state ~= "Z" and state ~= "X"
  end
  if file_exists("/proc/self/stat") then
    return false
  end
  return run("kill -0 " .. pid .. " 2>/dev/null") == 0
end

local function read_pid(dir)
  local s = read_file(dir .. "/nginx.pid")
  return s and tonumber(s:match("%d+"))
end

local function wait_exit(pid, timeout)
  local deadline = socket.gettime() + timeout
  while alive(pid) do
    if socket.gettime() > deadline then
      return false
    end
    socket.sleep(0.02)
  end
  return true
end

local function kill(pid)
  run("kill -TERM " .. pid .. " 2>/dev/null")
  if not wait_exit(pid, STOP_TIMEOUT) then
    run("kill -KILL " .. pid .. " 2>/dev/null")
    wait_exit(pid, 1)
  end
end

-- Control requests: a tiny HTTP/1.0 client (one request per connection, body
-- delimited by close), so it needs nothing beyond a luasocket TCP socket.

local function http_call(port, method, path, body, timeout)
  body = body or ""
  local c = socket.tcp()
  c:settimeout(timeout or CONTROL_TIMEOUT)
  local ok, err = c:connect("127.0.0.1", port)
  if not ok then
    c:close()
    return nil, err
  end
  ok, err = c:send(method .. " " .. path .. " HTTP/1.0\r\n"
    .. "Host: 127.0.0.1:" .. port .. "\r\n"
    .. "Content-Type: application/json\r\n"
    .. "Content-Length: " .. #body .. "\r\n\r\n" .. body)
  if not ok then
    c:close()
    return nil, err
  end
  local data, rerr, partial = c:receive("*a")
  c:close()
  data = data or partial
  local status = data and tonumber(data:match("^HTTP/%d%.%d (%d%d%d)"))
  if not status then
    return nil, "no HTTP reply from mock (" .. tostring(rerr) .. ")"
  end
  return status, data:match("\r\n\r\n(.*)$") or ""
end

local function control(port, method, path, value)
  local status, body = http_call(port, method, path, value ~= nil and cjson.encode(value) or nil)
  if not status then
    return nil, body
  end
  local ok, decoded = pcall(cjson.decode, body)
  if not ok then
    return nil, "bad JSON from mock " .. path .. ": " .. body
  end
  if status ~= 200 then
    return nil, decoded.error or ("mock " .. path .. " answered " .. status)
  end
  return decoded
end

-- Setup pieces

-- Two distinct free loopback ports. Both are held until both are known so
-- they differ; nginx may still lose a race for them, hence start retries.
local function free_ports()
  local a = assert(socket.bind("127.0.0.1", 0))
  local b = assert(socket.bind("127.0.0.1", 0))
  local _, pa = a:getsockname()
  local _, pb = b:getsockname()
  a:close()
  b:close()
  return tonumber(pa), tonumber(pb)
end

local CA_CONF = [[
[req]
distinguished_name = dn
prompt = no
x509_extensions = v3_ca
[dn]
CN = sturdy mock CA
[v3_ca]
basicConstraints = critical,CA:TRUE
keyUsage = critical,keyCertSign,cRLSign
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always
]]

local SERVER_EXT = [[
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature,keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = DNS:localhost,IP:127.0.0.1
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid,issuer
]]

-- A CA (ca.pem) that signs the server certificate (server.pem), EC P-256 so
-- it takes milliseconds. Own config files keep it independent of openssl.cnf.
local function make_certs(dir)
  write_file(dir .. "/ca.cnf", CA_CONF)
  write_file(dir .. "/server.ext", SERVER_EXT)
  local steps = {
    "openssl ecparam -name prime256v1 -genkey -noout -out ca.key",
    "openssl req -config ca.cnf -x509 -new -key ca.key -sha256 -days 3650 -out ca.pem",
    "openssl ecparam -name prime256v1 -genkey -noout -out server.key",
    "openssl req -config ca.cnf -new -key server.key -subj /CN=localhost -out server.csr",
    "openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial"
      .. " -days 3650 -sha256 -extfile server.ext -out server.pem",
  }
  local cmd = "cd " .. quote(dir) .. " && (" .. table.concat(steps, " && ") .. ") >openssl.log 2>&1"
  if run(cmd) ~= 0 then
    return nil, "openssl failed: " .. (read_file(dir .. "/openssl.log") or "?")
  end
  return true
end

local function find_modules_dir(opts)
  if opts.modules_dir then
    return opts.modules_dir
  end
  for _, dir in ipairs({ "/usr/share/nginx/modules", "/usr/lib/nginx/modules" }) do
    if file_exists(dir .. "/ngx_http_lua_module.so") then
      return dir
    end
  end
  return nil   -- OpenResty: the Lua module is built in
end

-- Lua 5.1 C module dirs holding cjson.so, for lua_package_cpath.
local function lua51_cpath()
  local dirs = capture("ls -d /usr/lib/*/lua/5.1 /usr/lib/lua/5.1 /usr/local/lib/lua/5.1 2>/dev/null") or ""
  local out = {}
  for dir in dirs:gmatch("%S+") do
    out[#out + 1] = dir .. "/?.so"
  end
  return table.concat(out, ";")
end

local NGINX_CONF = [[
${load_modules}
${user}
worker_processes 1;
daemon on;
master_process on;
pid ${dir}/nginx.pid;
error_log ${dir}/error.log warn;

events { worker_connections 1024; }

http {
  access_log ${access_log};
  client_body_temp_path ${dir}/tmp/body;
  proxy_temp_path ${dir}/tmp/proxy;
  fastcgi_temp_path ${dir}/tmp/fastcgi;
  uwsgi_temp_path ${dir}/tmp/uwsgi;
  scgi_temp_path ${dir}/tmp/scgi;

  lua_package_path "${lua_root}/?.lua;/usr/share/lua/5.1/?.lua;/usr/share/lua/5.1/?/init.lua;;";
  lua_package_cpath "${cpath};;";
  lua_shared_dict mock 32m;
  lua_need_request_body on;
  lua_check_client_abort on;
  lua_socket_log_errors off;

  client_max_body_size 64m;
  client_body_buffer_size 1m;
  keepalive_requests 10000;
  keepalive_timeout 60s;
  server_tokens off;

  init_by_lua_block {
    require("sturdy.mock.server").init({ prefix = "${dir}", fixtures = "${fixtures}",
                                         owner_pid = ${owner_pid}, owner_start = ${owner_start} })
  }
  init_worker_by_lua_block { require("sturdy.mock.server").init_worker() }

  server {
    listen 127.0.0.1:${port};
    listen 127.0.0.1:${tls_port} ssl http2;
    server_name localhost;
    ssl_certificate ${dir}/server.pem;
    ssl_certificate_key ${dir}/server.key;
    ssl_protocols TLSv1.2 TLSv1.3;

    location / {
      content_by_lua_block { require("sturdy.mock.server").handle() }
    }
  }
}
]]

local function render(template, vars)
  return (template:gsub("%${([%w_]+)}", function(name)
    return tostring(assert(vars[name], name))
  end))
end

local function write_conf(dir, opts, port, tls_port)
  local modules = find_modules_dir(opts)
  local load = ""
  if modules then
    load = "load_module " .. modules .. "/ndk_http_module.so;\n"
        .. "load_module " .. modules .. "/ngx_http_lua_module.so;"
  end
  local owner_pid, owner_start = own_identity()
  -- As root, workers would run as "nobody" and could not use the 0700 temp dir.
  local is_root = capture("id -u") == "0"
  write_file(dir .. "/nginx.conf", render(NGINX_CONF, {
    load_modules = load,
    user = is_root and "user root;" or "",
    access_log = opts.access_log and (dir .. "/access.log") or "off",
    dir = dir,
    lua_root = LUA_ROOT,
    fixtures = opts.fixtures or (LUA_ROOT .. "/../spec/fixtures/streams"),
    cpath = lua51_cpath(),
    port = port,
    tls_port = tls_port,
    owner_pid = owner_pid or "nil",
    owner_start = owner_start and ('"' .. owner_start .. '"') or "nil",
  }))
end

local function wait_ready(port, dir, timeout)
  local deadline = socket.gettime() + timeout
  repeat
    local status = http_call(port, "GET", "/_mock/counters", nil, 0.5)
    if status == 200 and read_pid(dir) then
      return true
    end
    socket.sleep(0.02)
  until socket.gettime() > deadline
  return false
end

-- Mock object

--- Stops nginx and removes the temp dir (kept if started with `keep = true`).
-- Stopping twice is harmless.
-- @treturn true
function Mock:stop()
  if self.stopped then
    return true
  end
  self.stopped = true
  local pid = self.pid or read_pid(self.dir)
  if pid then
    kill(pid)
  end
  if not self.keep then
    run("rm -rf " .. quote(self.dir))
  end
  return true
end

--- Clears counters, scenarios and the rate limiter (back to the start state).
-- @treturn[1] true
-- @return[2] nil
-- @treturn[2] string what failed
function Mock:reset()
  local ok, err = control(self.port, "POST", "/_mock/reset", {})
  return ok and true, err
end

--- What the mock received: `requests`, `connections`, `rate_limited`,
-- `paths` (count per path) and `scenarios` (per id: `count`, `times`,
-- `statuses`, `steps`). Control requests are not counted.
-- @treturn[1] table the decoded `/_mock/counters`
-- @return[2] nil
-- @treturn[2] string what failed
function Mock:counters()
  return control(self.port, "GET", "/_mock/counters")
end

--- What the mock saw of one scenario.
-- @string id the `x-mock-scenario` value
-- @treturn table `{ count, times, statuses, steps }` (count 0 when it saw none)
function Mock:scenario(id)
  local c = assert(self:counters())
  return c.scenarios[id] or { count = 0, times = {}, statuses = {}, steps = {} }
end

--- Configures the mock: `m:config{ rate_limit = { rpm = 60, burst = 2 } }`
-- turns the rate limiter on, `{ rate_limit = false }` off. Unknown keys are an error.
-- @tab tbl the configuration
-- @treturn[1] true
-- @return[2] nil
-- @treturn[2] string what failed
function Mock:config(tbl)
  local ok, err = control(self.port, "POST", "/_mock/config", tbl)
  return ok and true, err
end

--- nginx's error log so far (for failing tests).
-- @treturn string
function Mock:error_log()
  return read_file(self.dir .. "/error.log") or ""
end

-- Start

--- Starts the mock: nginx on two loopback ports, with a fresh CA.
-- @tab[opt] opts all optional:
--
--  * `nginx`: path of the nginx binary (default /usr/sbin/nginx, else PATH)
--  * `modules_dir`: where ndk_http_module.so and ngx_http_lua_module.so live
--  * `keep`: true leaves the temp dir in place after stop (debugging)
--  * `access_log`: true writes DIR/access.log (off by default: benchmarks)
--  * `tries`: start attempts with fresh ports (default 5)
--  * `timeout`: seconds to wait for nginx to answer (default 5)
--  * `fixtures`: the directory the `replay` step reads (default: the checkout's
--    spec/fixtures/streams)
--  * `port`, `tls_port`: listen on these (default: free ports); one try then
-- @treturn[1] Mock `http_url` ("http://127.0.0.1:PORT"), `https_url`
-- ("https://localhost:PORT", HTTP/2), `ca_file` (PEM of the CA that signed the
-- server certificate), `port`, `tls_port`, `dir`, and the methods above
-- @return[2] nil
-- @treturn[2] string why it did not start (nginx's own log included)
-- @usage local m = assert(require("sturdy.mock").start())
-- print(m.http_url)
-- m:stop()
function M.start(opts)
  opts = opts or {}
  for _, name in ipairs({ "port", "tls_port" }) do
    local p = opts[name]
    if p ~= nil and (type(p) ~= "number" or p < 1 or p > 65535 or p % 1 ~= 0) then
      error("sturdy: mock option '" .. name .. "' must be a port number 1-65535, got " .. tostring(p), 2)
    end
  end
  if opts.port and opts.port == opts.tls_port then
    error("sturdy: mock options 'port' and 'tls_port' must differ", 2)
  end
  local nginx = opts.nginx or (file_exists("/usr/sbin/nginx") and "/usr/sbin/nginx" or "nginx")
  local dir = capture("mktemp -d /tmp/sturdy-mock.XXXXXX")
  if not dir or dir == "" then
    return nil, "mktemp failed"
  end
  local function fail(msg)
    if not opts.keep then
      run("rm -rf " .. quote(dir))
    end
    return nil, msg
  end

  run("mkdir -p " .. quote(dir .. "/tmp"))
  local ok, err = make_certs(dir)
  if not ok then
    return fail(err)
  end

  local last_err
  local fixed = opts.port or opts.tls_port
  for _ = 1, fixed and 1 or opts.tries or START_TRIES do
    local port, tls_port = free_ports()
    port, tls_port = opts.port or port, opts.tls_port or tls_port
    if port == tls_port then
      tls_port = port == 65535 and port - 1 or port + 1
    end
    write_conf(dir, opts, port, tls_port)
    local cmd = quote(nginx) .. " -p " .. quote(dir .. "/") .. " -c " .. quote(dir .. "/nginx.conf")
      .. " -e " .. quote(dir .. "/error.log") .. " >" .. quote(dir .. "/start.log") .. " 2>&1"
    if run(cmd) == 0 and wait_ready(port, dir, opts.timeout or READY_TIMEOUT) then
      return setmetatable({
        dir = dir,
        port = port,
        tls_port = tls_port,
        http_url = "http://127.0.0.1:" .. port,
        https_url = "https://localhost:" .. tls_port,
        ca_file = dir .. "/ca.pem",
        pid = read_pid(dir),
        keep = opts.keep,
      }, Mock)
    end
    last_err = (read_file(dir .. "/start.log") or "") .. (read_file(dir .. "/error.log") or "")
    local pid = read_pid(dir)
    if pid then
      kill(pid)
    end
    os.remove(dir .. "/nginx.pid")
  end
  return fail("nginx did not start: " .. (last_err or "?"))
end

-- For spec/support/with_mock.lua.
M.execute = execute
M.quote = quote

--- Request headers that script the mock: scenario `id` answers with the steps
-- of `list` in turn (the last one repeats).
-- @string id the scenario's name (its counters are kept under it)
-- @string list steps separated by `|`, e.g. `"529|529|200"`
-- @treturn table the headers
function M.steps(id, list)
  return { ["x-mock-scenario"] = id, ["x-mock-steps"] = list, ["x-mock-steps-sep"] = "|" }
end

return M
