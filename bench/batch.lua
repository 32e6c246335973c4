--- N POSTs through sturdy's client:batch at a given concurrency, for
--- comparison with `bare multi`. Prints: requests_per_s=<float> cpu_us=<float> ok=<n> failed=<n>
---
--- usage: lua bench/batch.lua N CONCURRENCY [BODYFILE]   (from the repository root)
--- env:   STURDY_MOCK_URL  base URL of the mock API (required)
---        STURDY_CPATH     where sturdy/core.so is, e.g. build/lua5.4/?.so
local version = _VERSION:match("%d+%.%d+")
local build = jit and "luajit" or ("lua" .. version)
package.path = "lua/?.lua;lua/?/init.lua;" .. package.path
package.cpath = (os.getenv("STURDY_CPATH") or ("build/" .. build .. "/?.so")) .. ";" .. package.cpath

local sturdy = require "sturdy"

local function die(msg)
  io.stderr:write("batch.lua: ", msg, "\n")
  os.exit(2)
end

local n, concurrency = tonumber(arg[1]), tonumber(arg[2])
if not n or n < 1 or not concurrency or concurrency < 1 then die("usage: batch.lua N CONCURRENCY [BODYFILE]") end
local base_url = os.getenv("STURDY_MOCK_URL") or die("STURDY_MOCK_URL is not set")

local f = io.open(arg[3] or "bench/request.json", "rb") or die("cannot open the body file")
local body = f:read("*a")
f:close()

local client = sturdy.client { base_url = base_url, limits = { concurrency = concurrency } }
local req = { method = "POST", path = "/v1/messages", body = body }
local reqs = {}
for i = 1, n do reqs[i] = req end

local t0, c0 = sturdy.monotime(), os.clock()
local results = client:batch(reqs, { concurrency = concurrency })
local elapsed, cpu = sturdy.monotime() - t0, os.clock() - c0
client:close()

local ok, failed = 0, 0
for _, r in ipairs(results) do
  if sturdy.is_error(r) or #r.body == 0 then
    failed = failed + 1
    if failed <= 3 then io.stderr:write("batch.lua: ", tostring(r), "\n") end
  else
    ok = ok + 1
  end
end
print(string.format("requests_per_s=%.1f cpu_us=%.2f ok=%d failed=%d", elapsed > 0 and ok / elapsed or 0,
                    cpu * 1e6 / n, ok, failed))
os.exit(failed == 0 and 0 or 1)
