-- Starts and stops throwaway redis-servers on loopback ports, for the specs
-- of the Redis-backed parts. Works on Lua 5.1-5.4 and LuaJIT with luasocket.
--
--   local redis_server = require "spec.support.redis"
--   local r = assert(redis_server.start { password = "pw" })   -- r.port, r.dir
--   r:kill()      -- SIGKILL, as a crash
--   r:restart()   -- the same port again
--   r:stop()
--   local c = assert(redis_server.cluster { nodes = 3 })       -- c.ports, c.nodes
--   c:stop()
local socket = require "socket"
local mock = require "spec.support.mock"

local quote, execute = mock.quote, mock.execute

local M = {}
local Server = {}
Server.__index = Server

-- helpers run without the sanitizer runtime `make test-asan` preloads
local function run(cmd)
  return execute("env -u LD_PRELOAD -u ASAN_OPTIONS -u LSAN_OPTIONS -u UBSAN_OPTIONS sh -c " .. quote(cmd))
end

local function read_file(path)
  local f = io.open(path, "rb")
  if not f then return nil end
  local s = f:read("*a")
  f:close()
  return s
end

local function free_port()
  local s = assert(socket.bind("127.0.0.1", 0))
  local _, port = s:getsockname()
  s:close()
  return tonumber(port)
end

-- true once the server answers PING (or asks for a password, which is an answer too)
local function answers(port)
  local c = socket.tcp()
  c:settimeout(0.5)
  if not c:connect("127.0.0.1", port) then
    c:close()
    return false
  end
  c:send("PING\r\n")
  local line = c:receive("*l")
  c:close()
  return line ~= nil and (line == "+PONG" or line:find("NOAUTH", 1, true) ~= nil)
end

local function alive(pid)
  return run("kill -0 " .. pid .. " 2>/dev/null") == 0
end

-- cluster nodes also listen on port + 10000 (the cluster bus)
local function free_cluster_port()
  for _ = 1, 50 do
    local port = free_port()
    if port < 55000 then
      local bus = socket.bind("127.0.0.1", port + 10000)
      if bus then
        bus:close()
        return port
      end
    end
  end
  return free_port()
end

--- opts: password (requirepass), tries (fresh ports, default 5), port (this
-- one, no other), cluster (a cluster node: cluster-enabled).
function M.start(opts)
  opts = opts or {}
  local p = io.popen("mktemp -d /tmp/sturdy-redis.XXXXXX")
  local dir = p:read("*l")
  p:close()
  if not dir or dir == "" then return nil, "mktemp failed" end
  local last
  for _ = 1, opts.port and 1 or opts.tries or 5 do
    local port = opts.port or (opts.cluster and free_cluster_port() or free_port())
    local args = {
      "redis-server", "--port", tostring(port), "--bind", "127.0.0.1", "--save", "''", "--appendonly", "no",
      "--daemonize", "yes", "--dir", quote(dir), "--pidfile", quote(dir .. "/redis.pid"),
      "--logfile", quote(dir .. "/redis.log"),
    }
    if opts.password then
      args[#args + 1] = "--requirepass"
      args[#args + 1] = quote(opts.password)
    end
    if opts.cluster then
      args[#args + 1] = "--cluster-enabled yes --cluster-config-file nodes.conf --cluster-node-timeout 2000"
    end
    if run(table.concat(args, " ")) == 0 then
      local deadline = socket.gettime() + 5
      while socket.gettime() < deadline do
        if answers(port) then
          local pid = tonumber((read_file(dir .. "/redis.pid") or ""):match("%d+"))
          if pid then return setmetatable({ port = port, dir = dir, pid = pid, opts = opts }, Server) end
        end
        socket.sleep(0.02)
      end
    end
    last = read_file(dir .. "/redis.log") or "redis-server did not start"
    local pid = tonumber((read_file(dir .. "/redis.pid") or ""):match("%d+"))
    if pid then run("kill -TERM " .. pid) end
  end
  run("rm -rf " .. quote(dir))
  return nil, last
end

--- Kills the server (SIGKILL, as a crash); its directory stays for restart.
function Server:kill()
  run("kill -KILL " .. self.pid .. " 2>/dev/null")
  local deadline = socket.gettime() + 5
  while alive(self.pid) and socket.gettime() < deadline do socket.sleep(0.01) end
end

--- Starts the server again on the same port (after kill). True, or nil and an error.
function Server:restart()
  local opts = {}
  for k, v in pairs(self.opts) do opts[k] = v end
  opts.port = self.port
  local again, err = M.start(opts)
  if not again then return nil, err end
  run("rm -rf " .. quote(self.dir))
  self.dir, self.pid = again.dir, again.pid
  return true
end

--- Stops the server this module started (by its pid) and removes its directory.
function Server:stop()
  if self.stopped then return end
  self.stopped = true
  run("kill -TERM " .. self.pid .. " 2>/dev/null")
  local deadline = socket.gettime() + 5
  while alive(self.pid) and socket.gettime() < deadline do socket.sleep(0.02) end
  if alive(self.pid) then run("kill -KILL " .. self.pid .. " 2>/dev/null") end
  run("rm -rf " .. quote(self.dir))
end

local Cluster = {}
Cluster.__index = Cluster

local function cluster_ok(port)
  local p = io.popen("env -u LD_PRELOAD redis-cli -p " .. port .. " cluster info 2>/dev/null")
  local out = p:read("*a")
  p:close()
  return out:find("cluster_state:ok", 1, true) ~= nil
end

--- A Redis Cluster of opts.nodes (default 3) masters on loopback ports, every
-- slot covered, no replicas.
function M.cluster(opts)
  opts = opts or {}
  local nodes, addrs = {}, {}
  local function fail(err)
    for _, n in ipairs(nodes) do n:stop() end
    return nil, err
  end
  for i = 1, opts.nodes or 3 do
    local n, err = M.start { cluster = true }
    if not n then return fail(err) end
    nodes[i], addrs[i] = n, "127.0.0.1:" .. n.port
  end
  if run("redis-cli --cluster create " .. table.concat(addrs, " ")
         .. " --cluster-replicas 0 --cluster-yes >/dev/null 2>&1") ~= 0 then
    return fail("redis-cli --cluster create failed")
  end
  local deadline = socket.gettime() + 10
  while socket.gettime() < deadline do
    local all = true
    for _, n in ipairs(nodes) do all = all and cluster_ok(n.port) end
    if all then
      local ports = {}
      for i, n in ipairs(nodes) do ports[i] = n.port end
      return setmetatable({ nodes = nodes, ports = ports }, Cluster)
    end
    socket.sleep(0.05)
  end
  return fail("the cluster did not reach cluster_state:ok")
end

function Cluster:stop()
  for _, n in ipairs(self.nodes) do n:stop() end
end

return M
