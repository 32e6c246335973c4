-- make demo-openresty: examples/openresty/nginx.conf (two workers) in front
-- of the bundled mock API, driven with wrk while the API rate limits, then is
-- well, then is down; after each part, what happened: throughput, latency
-- percentiles, and the breaker and limiter state the workers share.
--
--   lua5.4 examples/openresty/demo.lua      (from a checkout, after make LUA=luajit)
--
-- DEMO_SECONDS per part (default 3), DEMO_CONNECTIONS for wrk (default 32).
local socket = require "socket"
local cjson = require "cjson"
local mock = require "sturdy.mock"

local SECONDS = tonumber(os.getenv("DEMO_SECONDS")) or 3
local CONNECTIONS = tonumber(os.getenv("DEMO_CONNECTIONS")) or 32

local function capture(cmd)
  local p = assert(io.popen(cmd .. " 2>&1"))
  local out = p:read("*a")
  p:close()
  return (out:gsub("%s+$", ""))
end

local function read_file(path)
  local f = io.open(path, "rb")
  if not f then return nil end
  local s = f:read("*a")
  f:close()
  return s
end

local function exists(path)
  return read_file(path) ~= nil
end

local function fail(msg)
  io.stderr:write("demo-openresty: ", msg, "\n")
  os.exit(1)
end

local ROOT = capture("pwd")
local HERE = ROOT .. "/examples/openresty"
if not exists(HERE .. "/nginx.conf") then fail("run it from the checkout's top folder (make demo-openresty)") end
if not exists(ROOT .. "/build/luajit/sturdy/policy.so") then
  fail("build/luajit/sturdy/policy.so is missing: nginx runs LuaJIT; run make LUA=luajit")
end
if capture("command -v wrk") == "" then fail("wrk is missing (Debian package wrk; make deps installs it)") end

---------------------------------------------------------------------------
-- The example's nginx.conf, pointed at this checkout, the mock and a free port

local function free_port()
  local s = assert(socket.bind("127.0.0.1", 0))
  local _, port = s:getsockname()
  s:close()
  return tonumber(port)
end

local function http_get(port, path)
  local c = socket.tcp()
  c:settimeout(10)
  local ok, err = c:connect("127.0.0.1", port)
  if not ok then return nil, err end
  c:send("GET " .. path .. " HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
  local out = c:receive("*a")
  c:close()
  if not out then return nil, "no reply" end
  return tonumber(out:match("^HTTP/%d%.%d (%d+)")), out:match("\r\n\r\n(.*)$")
end

-- Replaces the line holding `find` (plain text) with `with`; the example must have it.
local function replace_line(conf, find, with)
  local start = conf:find(find, 1, true)
  if not start then fail("examples/openresty/nginx.conf has no line with " .. find) end
  local line_start = start
  while line_start > 1 and conf:sub(line_start - 1, line_start - 1) ~= "\n" do line_start = line_start - 1 end
  local line_end = conf:find("\n", start, true) or #conf
  return conf:sub(1, line_start - 1) .. with .. conf:sub(line_end)
end

local function render(dir, port, m)
  local conf = assert(read_file(HERE .. "/nginx.conf"))
  local modules
  for _, d in ipairs { "/usr/share/nginx/modules", "/usr/lib/nginx/modules" } do
    if exists(d .. "/ngx_http_lua_module.so") then modules = d end
  end
  local head = modules and ("load_module " .. modules .. "/ndk_http_module.so;\nload_module " .. modules
                            .. "/ngx_http_lua_module.so;\n") or ""
  if capture("id -u") == "0" then head = head .. "user root;\n" end
  local cpath = {}
  for d in capture("ls -d /usr/lib/*/lua/5.1 /usr/lib/lua/5.1 /usr/local/lib/lua/5.1 2>/dev/null"):gmatch("%S+") do
    cpath[#cpath + 1] = d .. "/?.so"
  end
  conf = replace_line(conf, "lua_package_path", ('  lua_package_path "%s/lua/?.lua;%s/lua/?/init.lua;%s/?.lua;'
    .. '/usr/share/lua/5.1/?.lua;/usr/share/lua/5.1/?/init.lua;;";'):format(ROOT, ROOT, HERE))
  conf = replace_line(conf, "lua_package_cpath", ('  lua_package_cpath "%s/build/luajit/?.so;%s;;";')
    :format(ROOT, table.concat(cpath, ";")))
  conf = replace_line(conf, "lua_ssl_trusted_certificate", "  lua_ssl_trusted_certificate " .. m.ca_file .. ";")
  conf = replace_line(conf, "listen 8080", ("    listen 127.0.0.1:%d reuseport;"):format(port))
  conf = replace_line(conf, "access_log off;", table.concat({ "  access_log off;",
    "  client_body_temp_path " .. dir .. "/tmp/body;", "  proxy_temp_path " .. dir .. "/tmp/proxy;",
    "  fastcgi_temp_path " .. dir .. "/tmp/fastcgi;", "  uwsgi_temp_path " .. dir .. "/tmp/uwsgi;",
    "  scgi_temp_path " .. dir .. "/tmp/scgi;" }, "\n"))
  return head .. conf
end

---------------------------------------------------------------------------
-- Driving it

local UNITS = { us = 1e-3, ms = 1, s = 1e3 }

local function wrk(port, seconds)
  local out = capture(("env -u LD_PRELOAD wrk -t1 -c%d -d%ds --timeout 30s --latency "
    .. "'http://127.0.0.1:%d/chat?q=Hello'"):format(CONNECTIONS, seconds, port))
  local pct = {}
  for p, v, unit in out:gmatch("\n%s*(%d+)%%%s+([%d.]+)(%a+)") do pct[p] = tonumber(v) * (UNITS[unit] or 0) end
  return { rps = tonumber(out:match("Requests/sec:%s*([%d.]+)")) or 0,
           non2xx = tonumber(out:match("Non%-2xx or 3xx responses:%s*(%d+)")) or 0, pct = pct,
           total = tonumber(out:match("(%d+) requests in")) or 0 }
end

-- /stats of every worker (reuseport spreads the connections; a few tries find them all).
local function stats_of_workers(port)
  local seen = {}
  for _ = 1, 40 do
    local status, body = http_get(port, "/stats")
    local s = status == 200 and cjson.decode(body)
    if s then seen[s.worker] = s end
    if seen[0] and seen[1] then break end
  end
  return seen
end

local function report(title, run, port, m)
  print(("%s: %d calls in %ds, %.0f/s; p50 %.1f ms, p90 %.1f ms, p99 %.1f ms; %d not 2xx")
    :format(title, run.total, SECONDS, run.rps, run.pct["50"] or 0, run.pct["90"] or 0, run.pct["99"] or 0,
            run.non2xx))
  local workers = stats_of_workers(port)
  for id = 0, 1 do
    local s = workers[id]
    if s then
      for key, u in pairs(s.upstreams) do
        local limit = u.limits and u.limits.requests
        print(("  worker %d, %s: breaker %s (opens %d, %d calls %d failed in its window), requests limit %s, "
               .. "%d paced, %d refused by the breaker; this worker %d calls, latency p50 %.1f ms")
          :format(id, key, u.breaker.state, u.breaker.opens, u.breaker.calls, u.breaker.failures,
                  limit and limit.limit and (("%d/min"):format(limit.limit)) or "not known", u.paced, u.circuit_open,
                  s.client.requests, (u.latency.p50 or 0) * 1000))
      end
    end
  end
  if m then
    local c = m:counters()
    print(("  the API received %d calls, answered %d with 429"):format(c.requests, c.rate_limited))
  end
end

local function main()
  local m = assert(mock.start())
  local dir = capture("mktemp -d /tmp/sturdy-openresty.XXXXXX")
  os.execute("mkdir -p " .. dir .. "/logs " .. dir .. "/tmp")
  local port = free_port()
  local f = assert(io.open(dir .. "/nginx.conf", "wb"))
  f:write(render(dir, port, m))
  f:close()
  local env = ("ANTHROPIC_API_KEY=sk-demo-key STURDY_BASE_URL=%s"):format(m.http_url)
  local rc = os.execute(("env -u LD_PRELOAD %s nginx -p %s/ -c %s/nginx.conf -e %s/logs/error.log")
    :format(env, dir, dir, dir))
  local ok = rc == true or rc == 0
  local pid
  local function stop()
    pid = pid or tonumber(read_file(dir .. "/logs/nginx.pid") or "")
    if pid then os.execute("kill " .. pid) end
    socket.sleep(0.3)
    m:stop()
    os.execute("rm -rf " .. dir)
  end
  if not ok then
    print(read_file(dir .. "/logs/error.log") or "")
    stop()
    fail("nginx did not start")
  end
  for _ = 1, 100 do
    if http_get(port, "/ping") == 200 then break end
    socket.sleep(0.05)
  end
  pid = tonumber(read_file(dir .. "/logs/nginx.pid") or "")
  print(("nginx with two workers on 127.0.0.1:%d, the mock API at %s; wrk -c%d /chat"):format(port, m.http_url,
                                                                                           CONNECTIONS))
  local status, body = http_get(port, "/chat?q=Hello")
  print("GET /chat?q=Hello -> " .. tostring(status) .. " " .. tostring(body and body:gsub("%s+$", "")))

  -- sturdy learns the limits from the API's headers and paces to them (a
  -- limit that drops later is waited out: the debt taken under the old one stays)
  m:config { rate_limit = { rpm = 1200 } }
  report("the API limited to 1200/min", wrk(port, SECONDS), port, m)
  m:reset()
  m:config { rate_limit = false }
  report("the API well (it advertises 4000/min)", wrk(port, SECONDS), port, m)
  m:stop()
  report("the API down", wrk(port, SECONDS), port)
  local log = read_file(dir .. "/logs/error.log") or ""
  local errors = {}
  for line in log:gmatch("[^\n]+") do
    if line:find("%[error%]") or line:find("%[crit%]") or line:find("%[alert%]") then errors[#errors + 1] = line end
  end
  print(("nginx error log: %d error lines"):format(#errors))
  for i = 1, math.min(5, #errors) do print("  " .. errors[i]) end
  stop()
end

main()
