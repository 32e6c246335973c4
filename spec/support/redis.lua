-- Starts and stops a throwaway redis-server on a free loopback port, for the
-- specs of the redis backend. Works on Lua 5.1-5.4 and LuaJIT with luasocket.
--
--   local redis_server = require "spec.support.redis"
--   local r = assert(redis_server.start { password = "pw" })   -- r.port, r.dir
--   r:stop()
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

--- opts: password (requirepass), tries (fresh ports, default 5).
function M.start(opts)
  opts = opts or {}
  local p = io.popen("mktemp -d /tmp/sturdy-redis.XXXXXX")
  local dir = p:read("*l")
  p:close()
  if not dir or dir == "" then return nil, "mktemp failed" end
  local last
  for _ = 1, opts.tries or 5 do
    local port = free_port()
    local args = {
      "redis-server", "--port", tostring(port), "--bind", "127.0.0.1", "--save", "''", "--appendonly", "no",
      "--daemonize", "yes", "--dir", quote(dir), "--pidfile", quote(dir .. "/redis.pid"),
      "--logfile", quote(dir .. "/redis.log"),
    }
    if opts.password then
      args[#args + 1] = "--requirepass"
      args[#args + 1] = quote(opts.password)
    end
    if run(table.concat(args, " ")) == 0 then
      local deadline = socket.gettime() + 5
      while socket.gettime() < deadline do
        if answers(port) then
          local pid = tonumber((read_file(dir .. "/redis.pid") or ""):match("%d+"))
          if pid then return setmetatable({ port = port, dir = dir, pid = pid }, Server) end
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

return M
