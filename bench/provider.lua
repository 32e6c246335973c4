--- N sequential Anthropic calls, through sturdy.anthropic (`messages`) or
--- through a bare client:request with the same body and headers, to price the
--- provider layer (guard, estimates, decoding, usage, cost).
--- Prints: requests_per_s=<float> cpu_us=<float> ok=<n> failed=<n>
---
--- usage: lua bench/provider.lua N anthropic|request [BODYFILE]   (from the repository root)
--- env:   STURDY_MOCK_URL (required), STURDY_CPATH (where sturdy/*.so are)
local version = _VERSION:match("%d+%.%d+")
local build = jit and "luajit" or ("lua" .. version)
package.path = "lua/?.lua;lua/?/init.lua;" .. package.path
package.cpath = (os.getenv("STURDY_CPATH") or ("build/" .. build .. "/?.so")) .. ";" .. package.cpath

local sturdy = require "sturdy"
local anthropic = require "sturdy.anthropic"
local cjson = require "cjson"

local function die(msg)
  io.stderr:write("provider.lua: ", msg, "\n")
  os.exit(2)
end

local n, mode = tonumber(arg[1]), arg[2]
if not n or n < 1 or (mode ~= "anthropic" and mode ~= "request") then
  die("usage: provider.lua N anthropic|request [BODYFILE]")
end
local base_url = os.getenv("STURDY_MOCK_URL") or die("STURDY_MOCK_URL is not set")
local f = io.open(arg[3] or "bench/request.json", "rb") or die("cannot open the body file")
local params = cjson.decode(f:read("*a"))
f:close()

local KEY = "sk-ant-bench-0000000000000000"
-- no rate-limit headers from the mock (limits=0): both sides run unpaced, so
-- the figures price the provider layer, not the wait for the mock's advertised
-- output-token limit that the provider's max_tokens reservations would meet
local client = sturdy.client { base_url = base_url, headers = { ["x-mock-steps"] = "200;limits=0" } }
local claude = anthropic.new { client = client, api_key = KEY }
-- the request the provider sends, made once: the bare side sends the same
-- body and headers (without the token estimates, which only the provider
-- corrects from the reply's usage)
local req = claude:prepare(params)
req.tokens = nil

local ok, failed = 0, 0
local t0, c0 = sturdy.monotime(), os.clock()
for _ = 1, n do
  local r, err
  if mode == "anthropic" then
    r, err = claude:messages(params)
  else
    r, err = client:request(req)
  end
  if r then
    ok = ok + 1
  else
    failed = failed + 1
    if failed <= 3 then io.stderr:write("provider.lua: ", tostring(err), "\n") end
  end
end
local elapsed, cpu = sturdy.monotime() - t0, os.clock() - c0
client:close()
print(string.format("requests_per_s=%.1f cpu_us=%.2f ok=%d failed=%d", elapsed > 0 and ok / elapsed or 0,
                    cpu * 1e6 / n, ok, failed))
os.exit(failed == 0 and 0 or 1)
