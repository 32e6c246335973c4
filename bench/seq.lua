--- N sequential POSTs through sturdy's client:request, for comparison with
--- `bare seq`. Prints: requests_per_s=<float> cpu_us=<float> ok=<n> failed=<n>
--- (cpu_us: this process's CPU time per request, os.clock)
---
--- usage: lua bench/seq.lua N [BODYFILE]   (from the repository root)
--- env:   STURDY_MOCK_URL  base URL of the mock API (required)
---        STURDY_CPATH     where sturdy/core.so is, e.g. build/lua5.4/?.so
local version = _VERSION:match("%d+%.%d+")
local build = jit and "luajit" or ("lua" .. version)
package.path = "lua/?.lua;lua/?/init.lua;" .. package.path
package.cpath = (os.getenv("STURDY_CPATH") or ("build/" .. build .. "/?.so")) .. ";" .. package.cpath

local sturdy = require "sturdy"

-- a wall clock with sub-millisecond resolution; os.clock is CPU time
local function clock()
  local ok, system = pcall(require, "system")
  if ok and type(system) == "table" and system.monotime then return system.monotime end
  local ok2, socket = pcall(require, "socket")
  if ok2 and type(socket) == "table" and socket.gettime then return socket.gettime end
  error("bench/seq.lua needs luasystem or luasocket for a wall clock", 0)
end

local function die(msg)
  io.stderr:write("seq.lua: ", msg, "\n")
  os.exit(2)
end

local n = tonumber(arg[1])
if not n or n < 1 or n ~= math.floor(n) then die("usage: seq.lua N [BODYFILE]") end
local base_url = os.getenv("STURDY_MOCK_URL") or die("STURDY_MOCK_URL is not set")

local f = io.open(arg[2] or "bench/request.json", "rb") or die("cannot open the body file")
local body = f:read("*a")
f:close()

local now = clock()
local client = sturdy.client { base_url = base_url }
local req = { method = "POST", path = "/v1/messages", body = body }

local ok, failed, reported = 0, 0, 0
local t0, c0 = now(), os.clock()
for _ = 1, n do
  local res, err = client:request(req)
  if res and res.status >= 200 and res.status < 300 and #res.body > 0 then
    ok = ok + 1
  else
    failed = failed + 1
    if reported < 3 then
      reported = reported + 1
      io.stderr:write("seq.lua: ", tostring(err or ("HTTP status " .. tostring(res.status))), "\n")
    end
  end
end
local elapsed, cpu = now() - t0, os.clock() - c0
client:close()

print(string.format("requests_per_s=%.1f cpu_us=%.2f ok=%d failed=%d", elapsed > 0 and ok / elapsed or 0,
                    cpu * 1e6 / n, ok, failed))
os.exit(failed == 0 and 0 or 1)
