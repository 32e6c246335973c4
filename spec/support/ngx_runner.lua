-- Runs test code inside nginx (ngx_http_lua, LuaJIT) from busted outside.
--
--   local runner = require "spec.support.ngx_runner"
--   local r = assert(runner.start { mock = m, shared_dicts = { sturdy = "1m" } })
--   local value = r:run("cosocket_cases", "chunked reply", { size = 10 })          -- content phase
--   r:run("cosocket_cases", "chunked reply", nil, "timer")   -- or "access", "rewrite"
--   r:run_on(1, "cosocket_cases", "chunked reply")           -- in worker 1 (start with workers = 2)
--   r:stop()
--
-- A case module (spec/ngx/NAME.lua, on nginx's lua_package_path) returns a
-- table of functions; each gets ctx = { args, phase, mock = { http_url,
-- https_url, port, tls_port, ca_file }, vars } and returns a JSON-able value.
-- r:run returns that value, or raises with the error raised inside nginx (and
-- the nginx error log lines of that run). spec/support/README.md documents it.
--
-- Works on Lua 5.1-5.4 and LuaJIT with luasocket and lua-cjson only.

local socket = require "socket"
local cjson = require "cjson"
local mock = require "spec.support.mock"

local quote, execute = mock.quote, mock.execute

local M = {}

local Runner = {}
Runner.__index = Runner

local START_TRIES = 5
local READY_TIMEOUT = 5
local STOP_TIMEOUT = 5
local RUN_TIMEOUT = 60
-- Connections opened at most to reach one given worker; with reuseport each
-- lands on a worker picked by a hash of its source port, so with two workers
-- all of them missing has odds of 2^-200.
local WORKER_TRIES = 200
local PHASES = { content = true, access = true, rewrite = true, timer = true }

---------------------------------------------------------------------------
-- Shell, files, processes (the mock's helpers are local to mock.lua)

local function clean_env(cmd)
  return "env -u LD_PRELOAD -u ASAN_OPTIONS -u LSAN_OPTIONS -u UBSAN_OPTIONS sh -c " .. quote(cmd)
end

local function run(cmd)
  return execute(clean_env(cmd))
end

local function capture(cmd)
  local p = io.popen(clean_env(cmd))
  if not p then return nil end
  local out = p:read("*a")
  p:close()
  return (out:gsub("%s+$", ""))
end

local function read_file(path)
  local f = io.open(path, "rb")
  if not f then return nil end
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
  if f then f:close() end
  return f ~= nil
end

local function module_dir()
  local src = debug.getinfo(1, "S").source
  local dir = src:match("^@(.*)/[^/]*$") or "."
  if dir:sub(1, 1) ~= "/" then dir = capture("pwd") .. "/" .. dir end
  return dir
end

local SUPPORT_DIR = module_dir()
local ROOT = SUPPORT_DIR:gsub("/spec/support$", "")
if ROOT == SUPPORT_DIR then ROOT = SUPPORT_DIR .. "/../.." end

-- Our pid and start time, so nginx stops itself if we die without r:stop().
local function own_identity()
  local stat = read_file("/proc/self/stat")
  if not stat then return nil end
  local fields = {}
  for field in (stat:match("%) (.*)$") or ""):gmatch("%S+") do fields[#fields + 1] = field end
  return tonumber(stat:match("^(%d+)")), fields[20]
end

local function alive(pid)
  local stat = read_file("/proc/" .. pid .. "/stat")
  if stat then
    local state = stat:match("%) (%a)")
    return state ~= "Z" and state ~= "X"
  end
  if file_exists("/proc/self/stat") then return false end
  return run("kill -0 " .. pid .. " 2>/dev/null") == 0
end

local function wait_exit(pid, timeout)
  local deadline = socket.gettime() + timeout
  while alive(pid) do
    if socket.gettime() > deadline then return false end
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

local function read_pid(dir)
  local s = read_file(dir .. "/nginx.pid")
  return s and tonumber(s:match("%d+"))
end

local function free_port()
  local s = assert(socket.bind("127.0.0.1", 0))
  local _, port = s:getsockname()
  s:close()
  return tonumber(port)
end

---------------------------------------------------------------------------
-- HTTP/1.0 to nginx: one request per connection, body until close

local function connect(port, timeout)
  local c = socket.tcp()
  c:settimeout(timeout)
  local ok, err = c:connect("127.0.0.1", port)
  if not ok then
    c:close()
    return nil, err
  end
  return c
end

-- One request on the connected c, the reply read until nginx closes; closes c.
local function exchange(c, method, path, body)
  body = body or ""
  local ok, err = c:send(method .. " " .. path .. " HTTP/1.0\r\nHost: 127.0.0.1\r\n"
    .. "Content-Type: application/json\r\nContent-Length: " .. #body .. "\r\n\r\n" .. body)
  if not ok then
    c:close()
    return nil, err
  end
  local data, rerr, partial = c:receive("*a")
  c:close()
  data = data or partial
  local status = data and tonumber(data:match("^HTTP/%d%.%d (%d%d%d)"))
  if not status then return nil, "no HTTP reply from nginx (" .. tostring(rerr) .. ")" end
  return status, data:match("\r\n\r\n(.*)$") or ""
end

local function http_call(port, method, path, body, timeout)
  local c, err = connect(port, timeout)
  if not c then return nil, err end
  return exchange(c, method, path, body)
end

-- The id of the worker that accepted c. The request keeps c alive, so the next
-- request on c reaches that same worker.
local function worker_of(c)
  local ok, err = c:send("GET /_worker HTTP/1.0\r\nHost: 127.0.0.1\r\nConnection: keep-alive\r\n\r\n")
  if not ok then return nil, err end
  local line, lerr = c:receive("*l")
  if not line then return nil, "no reply to /_worker (" .. tostring(lerr) .. ")" end
  local length, keep
  repeat
    local header, herr = c:receive("*l")
    if not header then return nil, "reply to /_worker cut short (" .. tostring(herr) .. ")" end
    local name, value = header:match("^([%w%-]+):%s*(.-)%s*$")
    name = name and name:lower()
    if name == "content-length" then length = tonumber(value) end
    if name == "connection" then keep = value:lower() == "keep-alive" end
  until header == ""
  if not line:match("^HTTP/%d%.%d 200 ") or not length or not keep then
    return nil, "unexpected reply to /_worker: " .. line
  end
  local body = c:receive(length)
  local id = tonumber(body)
  if not id then return nil, "unexpected body from /_worker: " .. tostring(body) end
  return id
end

---------------------------------------------------------------------------
-- nginx.conf

local function find_modules_dir(opts)
  if opts.modules_dir then return opts.modules_dir end
  for _, dir in ipairs({ "/usr/share/nginx/modules", "/usr/lib/nginx/modules" }) do
    if file_exists(dir .. "/ngx_http_lua_module.so") then return dir end
  end
  return nil
end

local function lua51_cpath()
  local dirs = capture("ls -d /usr/lib/*/lua/5.1 /usr/lib/lua/5.1 /usr/local/lib/lua/5.1 2>/dev/null") or ""
  local out = {}
  for dir in dirs:gmatch("%S+") do out[#out + 1] = dir .. "/?.so" end
  return table.concat(out, ";")
end

local NGINX_CONF = [[
${load_modules}
${user}
worker_processes ${workers};
daemon on;
master_process on;
pid ${dir}/nginx.pid;
error_log ${dir}/error.log ${log_level};

events { worker_connections 4096; }

http {
  access_log off;
  client_body_temp_path ${dir}/tmp/body;
  proxy_temp_path ${dir}/tmp/proxy;
  fastcgi_temp_path ${dir}/tmp/fastcgi;
  uwsgi_temp_path ${dir}/tmp/uwsgi;
  scgi_temp_path ${dir}/tmp/scgi;

  lua_package_path "${lua_path};;";
  lua_package_cpath "${build}/?.so;${cpath};;";
  lua_need_request_body on;
  lua_socket_log_errors off;
  client_body_buffer_size 1m;
  client_max_body_size 16m;
  keepalive_requests 100000;
${shared_dicts}${resolver}${trusted}
  init_by_lua_block {
    require("ngx_runner_server").init({ prefix = "${dir}", owner_pid = ${owner_pid}, owner_start = ${owner_start} })
  }
  init_worker_by_lua_block { require("ngx_runner_server").init_worker() }

${http}
  server {
    listen 127.0.0.1:${port}${listen_options};
    server_name localhost;

    location = /_run/content {
      content_by_lua_block { require("ngx_runner_server").content() }
    }
    location = /_run/access {
      access_by_lua_block { require("ngx_runner_server").in_phase("access") }
      content_by_lua_block { require("ngx_runner_server").reply() }
    }
    location = /_run/rewrite {
      rewrite_by_lua_block { require("ngx_runner_server").in_phase("rewrite") }
      content_by_lua_block { require("ngx_runner_server").reply() }
    }
    location = /_run/timer {
      content_by_lua_block { require("ngx_runner_server").timer() }
    }
    location = /_ready {
      return 200 "ok";
    }
    location = /_worker {
      content_by_lua_block { require("ngx_runner_server").worker() }
    }
${server}
  }
}
]]

local function render(template, vars)
  return (template:gsub("%${([%w_]+)}", function(name)
    return tostring(assert(vars[name], name))
  end))
end

local function conf_lines(opts)
  local dicts = {}
  for name, size in pairs(opts.shared_dicts or {}) do
    if not tostring(name):match("^[%w_]+$") or not tostring(size):match("^%d+[kKmM]?$") then
      error("ngx_runner: shared_dicts takes name = size (\"1m\"), got " .. tostring(name) .. " = " .. tostring(size), 3)
    end
    dicts[#dicts + 1] = "  lua_shared_dict " .. name .. " " .. size .. ";\n"
  end
  table.sort(dicts)
  local resolver = ""
  if opts.resolver then
    resolver = "  resolver " .. opts.resolver .. ";\n  resolver_timeout " .. (opts.resolver_timeout or "2s") .. ";\n"
  end
  local trusted = ""
  local ca = opts.trusted_certificate
  if ca == nil and opts.mock then ca = opts.mock.ca_file end
  if ca then
    trusted = "  lua_ssl_trusted_certificate " .. ca .. ";\n  lua_ssl_verify_depth 4;\n"
  end
  return table.concat(dicts), resolver, trusted
end

---------------------------------------------------------------------------
-- Runner

--- Stops nginx and removes its directory (kept with keep = true).
function Runner:stop()
  if self.stopped then return true end
  self.stopped = true
  local pid = self.pid or read_pid(self.dir)
  if pid then kill(pid) end
  if not self.keep then run("rm -rf " .. quote(self.dir)) end
  return true
end

function Runner:error_log()
  return read_file(self.dir .. "/error.log") or ""
end

-- Lines at level error or worse written since byte offset `from`.
function Runner:errors_since(from)
  local log = self:error_log():sub(from + 1)
  local out = {}
  for line in log:gmatch("[^\n]+") do
    if line:find("%[error%]") or line:find("%[crit%]") or line:find("%[alert%]") or line:find("%[emerg%]") then
      out[#out + 1] = line
    end
  end
  return table.concat(out, "\n")
end

--- A plain request to this nginx: status, body (or nil, err).
function Runner:request(method, path, body, timeout)
  return http_call(self.port, method, path, body, timeout or RUN_TIMEOUT)
end

-- A connection to nginx that worker `id` accepted (nil, err when none did).
local function connect_to_worker(self, id, timeout)
  local seen = {}
  for _ = 1, WORKER_TRIES do
    local c, err = connect(self.port, timeout)
    if not c then return nil, err end
    local got, werr = worker_of(c)
    if got == id then return c end
    c:close()
    if not got then return nil, werr end
    seen[got] = (seen[got] or 0) + 1
  end
  local reached = {}
  for w, n in pairs(seen) do reached[#reached + 1] = string.format("worker %d %d times", w, n) end
  table.sort(reached)
  return nil, string.format("no connection reached worker %d in %d tries (reached: %s)", id, WORKER_TRIES,
                            table.concat(reached, ", "))
end

-- Runs the case on `worker` (nil: whichever accepts); returns true, value or
-- false, message.
local function run_case(self, worker, module, name, args, phase, timeout)
  phase = phase or "content"
  if not PHASES[phase] then return false, "ngx_runner: unknown phase '" .. tostring(phase) .. "'" end
  local log_size = #self:error_log()
  local payload = cjson.encode({
    module = module, case = name, args = args or {}, mock = self.mock, vars = self.vars,
    timeout = timeout or RUN_TIMEOUT,
  })
  local where = string.format("in nginx (%s%s) %s[%q]", phase, worker and (", worker " .. worker) or "",
                              module, name)
  local c, err
  if worker then
    c, err = connect_to_worker(self, worker, (timeout or RUN_TIMEOUT) + 5)
  else
    c, err = connect(self.port, (timeout or RUN_TIMEOUT) + 5)
  end
  local status, body
  if c then status, body = exchange(c, "POST", "/_run/" .. phase, payload) else body = err end
  if not status then
    return false, where .. ": no reply: " .. tostring(body) .. "\n" .. self:errors_since(log_size)
  end
  local ok, out = pcall(cjson.decode, body)
  if not ok or type(out) ~= "table" then
    return false, where .. ": HTTP " .. status .. ": " .. body:sub(1, 500) .. "\n" .. self:errors_since(log_size)
  end
  if not out.ok then
    local log = self:errors_since(log_size)
    return false, where .. ": " .. tostring(out.error) .. (log ~= "" and ("\nnginx error log:\n" .. log) or "")
  end
  if out.value == cjson.null then return true, nil end
  return true, out.value
end

--- Runs cases[name](ctx) of case module `module` inside nginx, in `phase`
-- ("content" by default, "access", "rewrite" or "timer"). Returns the value
-- it returned; raises with the inner error when it raised.
function Runner:run(module, name, args, phase, timeout)
  local ok, value = run_case(self, nil, module, name, args, phase, timeout)
  if not ok then error(value, 2) end
  return value
end

--- Runs the case as Runner:run does, in worker `worker` (0 to workers - 1):
-- the runner opens connections until that worker accepts one (bounded; raises
-- naming the workers reached when it gets none).
function Runner:run_on(worker, module, name, args, phase, timeout)
  if type(worker) ~= "number" or worker ~= math.floor(worker) or worker < 0 or worker >= self.workers then
    error("ngx_runner: run_on takes a worker id from 0 to " .. (self.workers - 1) .. ", got " .. tostring(worker), 2)
  end
  local ok, value = run_case(self, worker, module, name, args, phase, timeout)
  if not ok then error(value, 2) end
  return value
end

--- Starts nginx on a loopback port.
-- opts (all optional):
--   mock                 a started mock (spec.support.mock): its URLs reach cases
--                        as ctx.mock, its CA becomes lua_ssl_trusted_certificate
--   trusted_certificate  a PEM file instead of the mock's CA, or false for none
--   workers              worker_processes (default 1)
--   shared_dicts         { name = "1m", ... } -> lua_shared_dict
--   resolver             e.g. "127.0.0.1:5353 ipv6=off" (and resolver_timeout, default "2s")
--   http, server         extra text inside http { } and server { }
--   vars                 a table handed to every case as ctx.vars
--   lua_path             more lua_package_path entries, searched first
--   build                folder holding sturdy/policy.so built for LuaJIT
--                        (default build/luajit, made by `make LUA=luajit`)
--   log_level            error_log level (default "warn")
--   keep                 leave the temp dir after stop (debugging)
function M.start(opts)
  opts = opts or {}
  local build = opts.build or (ROOT .. "/build/luajit")
  if not file_exists(build .. "/sturdy/policy.so") then
    return nil, "ngx_runner: " .. build .. "/sturdy/policy.so is missing; nginx runs LuaJIT and needs "
      .. "sturdy.policy built for it: run `make LUA=luajit` (make test does it)"
  end
  local nginx = opts.nginx or (file_exists("/usr/sbin/nginx") and "/usr/sbin/nginx" or "nginx")
  local dir = capture("mktemp -d /tmp/sturdy-ngx.XXXXXX")
  if not dir or dir == "" then return nil, "mktemp failed" end
  run("mkdir -p " .. quote(dir .. "/tmp"))
  local modules = find_modules_dir(opts)
  local load = ""
  if modules then
    load = "load_module " .. modules .. "/ndk_http_module.so;\n"
        .. "load_module " .. modules .. "/ngx_http_lua_module.so;"
  end
  local dicts, resolver, trusted = conf_lines(opts)
  local owner_pid, owner_start = own_identity()
  local m = opts.mock
  local last_err
  for _ = 1, opts.tries or START_TRIES do
    local port = free_port()
    write_file(dir .. "/nginx.conf", render(NGINX_CONF, {
      load_modules = load,
      user = capture("id -u") == "0" and "user root;" or "",
      workers = opts.workers or 1,
      dir = dir, build = build, cpath = lua51_cpath(),
      lua_path = (opts.lua_path and (opts.lua_path .. ";") or "") .. table.concat({
        ROOT .. "/lua/?.lua", ROOT .. "/lua/?/init.lua", ROOT .. "/spec/ngx/?.lua", SUPPORT_DIR .. "/?.lua",
        "/usr/share/lua/5.1/?.lua", "/usr/share/lua/5.1/?/init.lua" }, ";"),
      log_level = opts.log_level or "warn",
      shared_dicts = dicts, resolver = resolver, trusted = trusted,
      http = opts.http or "", server = opts.server or "",
      port = port,
      -- with several workers, reuseport gives each worker its own socket, so a
      -- connection stays with the worker the kernel hashed it to (run_on relies on it)
      listen_options = (opts.workers or 1) > 1 and " reuseport" or "",
      owner_pid = owner_pid or "nil",
      owner_start = owner_start and ('"' .. owner_start .. '"') or "nil",
    }))
    local cmd = quote(nginx) .. " -p " .. quote(dir .. "/") .. " -c " .. quote(dir .. "/nginx.conf")
      .. " -e " .. quote(dir .. "/error.log") .. " >" .. quote(dir .. "/start.log") .. " 2>&1"
    if run(cmd) == 0 then
      local deadline = socket.gettime() + (opts.timeout or READY_TIMEOUT)
      repeat
        if http_call(port, "GET", "/_ready", nil, 0.5) == 200 and read_pid(dir) then
          return setmetatable({
            dir = dir, port = port, url = "http://127.0.0.1:" .. port, pid = read_pid(dir),
            keep = opts.keep, vars = opts.vars, workers = opts.workers or 1,
            mock = m and { http_url = m.http_url, https_url = m.https_url, port = m.port,
                           tls_port = m.tls_port, ca_file = m.ca_file } or nil,
          }, Runner)
        end
        socket.sleep(0.02)
      until socket.gettime() > deadline
    end
    last_err = (read_file(dir .. "/start.log") or "") .. (read_file(dir .. "/error.log") or "")
    local pid = read_pid(dir)
    if pid then kill(pid) end
    os.remove(dir .. "/nginx.pid")
  end
  if not opts.keep then run("rm -rf " .. quote(dir)) end
  return nil, "ngx_runner: nginx did not start: " .. (last_err or "?")
end

---------------------------------------------------------------------------
-- Helper processes (the CONNECT proxy): the same Lua that runs this file

local function own_lua()
  local pid = own_identity()
  local exe = pid and capture("readlink /proc/" .. pid .. "/exe")
  if exe and exe ~= "" then return exe end
  return "lua5.4"
end

local Helper = {}
Helper.__index = Helper

function Helper:stop()
  if self.stopped then return true end
  self.stopped = true
  kill(self.pid)
  run("rm -rf " .. quote(self.dir))
  return true
end

--- GET path from the helper: decoded JSON.
function Helper:get(path)
  local status, body = http_call(self.port, "GET", path, nil, 5)
  if status ~= 200 then return nil, body end
  return cjson.decode(body)
end

--- Starts spec/support/SCRIPT with the running Lua; it binds 127.0.0.1:0,
-- writes its port to a file and exits when this process does.
function M.spawn(script)
  local dir = capture("mktemp -d /tmp/sturdy-helper.XXXXXX")
  local owner = own_identity() or 0
  local cmd = string.format("cd %s && exec %s %s %s %d >%s 2>&1 & echo $!", quote(ROOT), quote(own_lua()),
    quote(SUPPORT_DIR .. "/" .. script), quote(dir .. "/port"), owner, quote(dir .. "/log"))
  local pid = tonumber(capture(cmd))
  if not pid then return nil, "could not start " .. script end
  local deadline = socket.gettime() + READY_TIMEOUT
  repeat
    local port = tonumber((read_file(dir .. "/port") or ""):match("%d+"))
    if port then
      return setmetatable({ pid = pid, port = port, dir = dir, url = "http://127.0.0.1:" .. port }, Helper)
    end
    socket.sleep(0.02)
  until socket.gettime() > deadline or not alive(pid)
  local log = read_file(dir .. "/log") or ""
  kill(pid)
  run("rm -rf " .. quote(dir))
  return nil, script .. " did not start: " .. log
end

M.free_port = free_port
M.root = ROOT

return M
