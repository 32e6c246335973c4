--- Goodput under a provider's rate limit that sturdy is not told about:
--- the mock answers 429 beyond a continuously refilling 3000 requests/min
--- bucket; 1000 calls go through client:batch at concurrency 100 with no
--- limits configured. sturdy learns the limit from the rate-limit headers and
--- paces itself. Prints the run time against the ideal and the 429s received.
---
--- usage: lua bench/goodput.lua [N] [RPM]   (under spec/support/with_mock.lua)
local version = _VERSION:match("%d+%.%d+")
local build = jit and "luajit" or ("lua" .. version)
package.path = "lua/?.lua;lua/?/init.lua;" .. package.path
package.cpath = (os.getenv("STURDY_CPATH") or ("build/" .. build .. "/?.so")) .. ";" .. package.cpath

local sturdy = require "sturdy"
local cjson = require "cjson"

local n = tonumber(arg[1]) or 1000
local rpm = tonumber(arg[2]) or 3000
local base_url = os.getenv("STURDY_MOCK_URL") or error("STURDY_MOCK_URL is not set")

-- the provider's side: a bucket of one second's worth, refilling continuously
local control = sturdy.client { base_url = base_url }
local burst = rpm / 60
assert(control:request { method = "POST", path = "/_mock/reset" })
assert(control:request { method = "POST", path = "/_mock/config",
                         json = { rate_limit = { rpm = rpm, burst = burst } } })

local throttled = 0
local client = sturdy.client {
  base_url = base_url,
  limits = { concurrency = 100 },
  on_retry = function(info) if info.status == 429 then throttled = throttled + 1 end end,
}
local body = cjson.encode { model = "claude-goodput", max_tokens = 16,
                            messages = { { role = "user", content = "pace me" } } }
local reqs = {}
for i = 1, n do reqs[i] = { method = "POST", path = "/v1/messages", body = body, key = "goodput" } end

local t0 = sturdy.monotime()
local results = client:batch(reqs, { concurrency = 100, progress = true })
local elapsed = sturdy.monotime() - t0

local ok = 0
for _, r in ipairs(results) do if not sturdy.is_error(r) then ok = ok + 1 end end
local counters = cjson.decode(assert(control:request { path = "/_mock/counters" }).body)
local received_429 = counters.rate_limited or 0
local ideal = n / (rpm / 60)
local s = client:stats("goodput")
print(("goodput: %d/%d succeeded in %.2f s (ideal %.1f s, ratio %.3f); 429s received %d (%.2f%% of %d requests sent), "
  .. "learned limit %s/min"):format(ok, n, elapsed, ideal, elapsed / ideal, received_429,
  100 * received_429 / math.max(1, counters.requests), counters.requests,
  tostring(s.limits.requests and s.limits.requests.limit)))
assert(control:request { method = "POST", path = "/_mock/config", json = { rate_limit = false } })
client:close()
control:close()
local pass = ok == n and received_429 <= 0.01 * n and elapsed <= 1.05 * ideal
print(pass and "goodput: within bounds (all succeed, 429s <= 1%, time <= 1.05x ideal)"
  or "goodput: OUT OF BOUNDS (want all succeed, 429s <= 1%, time <= 1.05x ideal)")
os.exit(pass and 0 or 1)
