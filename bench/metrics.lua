-- What a scrape costs: sturdy.metrics rendering the metrics of one client
-- with 50 upstream keys (the text format and OpenMetrics), each key with
-- provider calls, a retry, streamed calls and learned rate limits, so every
-- family has series. The anchor, measured in the same run, is reading the
-- same 50 keys' state with client:stats(key): what any exporter must do at
-- least. Figures are medians over rounds, in CPU time (os.clock).
--
--   STURDY_MOCK_URL=... lua bench/metrics.lua      (make bench-metrics starts the mock)
--
-- BENCH_ROUNDS (default 31) rounds; BENCH_KEYS (default 50) keys.
local anthropic = require "sturdy.anthropic"
local sturdy = require "sturdy"
local metrics = require "sturdy.metrics"

local ROUNDS = tonumber(os.getenv("BENCH_ROUNDS")) or 31
local KEYS = tonumber(os.getenv("BENCH_KEYS")) or 50
local REPEAT = 20 -- renders timed together per round, so the clock's grain does not matter
local url = assert(os.getenv("STURDY_MOCK_URL"), "set STURDY_MOCK_URL (make bench-metrics starts the mock)")

local function median(xs)
  table.sort(xs)
  local n = #xs
  if n % 2 == 1 then return xs[(n + 1) / 2] end
  return (xs[n / 2] + xs[n / 2 + 1]) / 2
end

local function measure(fn)
  local per = {}
  for r = 1, ROUNDS do
    collectgarbage("collect")
    local t0 = os.clock()
    for _ = 1, REPEAT do fn() end
    per[r] = (os.clock() - t0) / REPEAT
  end
  return median(per)
end

local client = sturdy.client { base_url = url, retry = { base = 0.001, cap = 0.002 } }
local registry = metrics.for_client(client)
local ask = { max_tokens = 16, messages = { { role = "user", content = "hello" } } }
for i = 1, KEYS do
  local p = anthropic.new { client = client, api_key = "sk-bench", model = "bench-model-" .. i }
  assert(p:messages(ask))
  assert(p:messages(ask, { headers = { ["x-mock-steps"] = "529,200", ["x-mock-scenario"] = "b" .. i } }))
  local events, stream = p:stream(ask)
  for _ in events do end
  assert(stream:result())
end
local keys = client:stats().keys
assert(#keys == KEYS, "expected " .. KEYS .. " keys, got " .. #keys)

-- A render right after a call on every key: the series those calls changed are written again.
local providers = {}
for i = 1, KEYS do
  providers[i] = anthropic.new { client = client, api_key = "sk-bench", model = "bench-model-" .. i }
end
local function after_calls(fmt)
  local per = {}
  for r = 1, ROUNDS do
    for i = 1, KEYS do assert(providers[i]:messages(ask)) end
    collectgarbage("collect")
    local t0 = os.clock()
    registry:render(fmt)
    per[r] = os.clock() - t0
  end
  return median(per)
end

local text = registry:render()
local lines = select(2, text:gsub("\n", "\n"))
local anchor = measure(function() for _, k in ipairs(keys) do client:stats(k) end end)
local prom = measure(function() registry:render() end)
local om = measure(function() registry:render("openmetrics") end)
local prom_changed = after_calls()
local om_changed = after_calls("openmetrics")

print(string.format("metrics render, %d keys, %d lines (%d bytes), %s, median of %d rounds:",
                    KEYS, lines, #text, _VERSION .. (rawget(_G, "jit") and " (LuaJIT)" or ""), ROUNDS))
print(string.format("  anchor: client:stats(key) x %d            %.3f ms", KEYS, anchor * 1e3))
print(string.format("  text format, a call on every key since   %.3f ms   %.2f x anchor", prom_changed * 1e3,
                    prom_changed / anchor))
print(string.format("  text format, nothing new since           %.3f ms   %.2f x anchor", prom * 1e3, prom / anchor))
print(string.format("  OpenMetrics, a call on every key since   %.3f ms   %.2f x anchor", om_changed * 1e3,
                    om_changed / anchor))
print(string.format("  OpenMetrics, nothing new since           %.3f ms   %.2f x anchor", om * 1e3, om / anchor))
client:close()
