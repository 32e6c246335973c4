-- Limits shared through Redis (sturdy.shared): what they cost per call, and
-- what accuracy leases trade for fewer round trips.
--
-- 1. Overhead. N sequential calls to the mock's /echo through client:request,
--    under a limit so high it never waits: the anchor is the same calls with
--    the limit kept in the process (measured in the same run, rounds
--    interleaved); then with the limit in Redis, without leases and with
--    leases of 4 and 16. Per call: wall time and client CPU (os.clock), the
--    median over rounds, with ratios to the anchor and the Redis scripts run
--    per call. Redis's own CPU is not the client's and is not counted.
-- 2. Accuracy of leases. 4 processes x 250 calls against the mock's 50/s
--    limiter (a burst of 50), no limit configured: for leases of 1, 4 and 16,
--    the 429s, the wall time against the ideal (n / rate) and the most calls
--    the mock received in any one second (the provider allows 50 + its burst).
--
--   lua bench/shared.lua            (make bench-shared)
--
-- BENCH_ROUNDS (default 7) rounds of BENCH_N (default 2000) calls for part 1;
-- BENCH_SHARED_FLEET=0 skips part 2 (a minute).
package.path = "lua/?.lua;lua/?/init.lua;./?.lua;" .. package.path
local version = _VERSION:match("%d+%.%d+")
local build = jit and "luajit" or ("lua" .. version)
package.cpath = (os.getenv("STURDY_CPATH") or ("build/" .. build .. "/?.so")) .. ";" .. package.cpath

local sturdy = require "sturdy"
local sturdy_redis = require "sturdy.redis"
local mock = require "spec.support.mock"
local redis_server = require "spec.support.redis"
local fleet = require "spec.support.fleet"

local ROUNDS = tonumber(os.getenv("BENCH_ROUNDS")) or 7
local N = tonumber(os.getenv("BENCH_N")) or 2000
local FLEET = os.getenv("BENCH_SHARED_FLEET") ~= "0"

local now, clock = sturdy.monotime, os.clock

local function median(xs)
  table.sort(xs)
  local n = #xs
  if n % 2 == 1 then return xs[(n + 1) / 2] end
  return (xs[n / 2] + xs[n / 2 + 1]) / 2
end

local m = assert(mock.start())
local rs = assert(redis_server.start())
local conn = assert(sturdy_redis.connect(sturdy_redis.settings { port = rs.port }))

local function scripts_run()
  local info = conn:raw_cmd("INFO commandstats")
  return tonumber(info:match("cmdstat_evalsha:calls=(%d+)") or 0)
       + tonumber(info:match("cmdstat_eval:calls=(%d+)") or 0)
end

local MODES = {
  { name = "local limit", opts = {} },
  { name = "Redis, no lease", opts = { shared = { redis = { port = rs.port } } } },
  { name = "Redis, lease 4", opts = { shared = { redis = { port = rs.port }, lease = 4 } } },
  { name = "Redis, lease 16", opts = { shared = { redis = { port = rs.port }, lease = 16 } } },
}

local ok, err = pcall(function()
  -- each round runs every mode, in an order rotated from round to round
  local function measure(title, run)
    print(title)
    local wall, cpu, scripts = {}, {}, {}
    for i = 1, #MODES do wall[i], cpu[i], scripts[i] = {}, {}, {} end
    for r = 1, ROUNDS do
      for k = 0, #MODES - 1 do
        local i = (r + k - 1) % #MODES + 1
        conn:flushall()
        local opts = { base_url = m.http_url, limits = { rpm = 1e9 } }
        for key, v in pairs(MODES[i].opts) do opts[key] = v end
        local c = sturdy.client(opts)
        local req = { path = "/echo", key = "bench" }
        assert(c:request(req)) -- the connections are made
        local s0 = scripts_run()
        collectgarbage("collect")
        local t0, c0 = now(), clock()
        run(c, req)
        wall[i][#wall[i] + 1] = (now() - t0) / N
        cpu[i][#cpu[i] + 1] = (clock() - c0) / N
        scripts[i][#scripts[i] + 1] = (scripts_run() - s0) / N
        c:close()
      end
    end
    local w0, c0 = median(wall[1]), median(cpu[1])
    for i, mode in ipairs(MODES) do
      local w, c = median(wall[i]), median(cpu[i])
      print(("  %-16s %7.1f us wall (x%.2f, %+.1f us)  %6.1f us CPU (x%.2f, %+.1f us)  %.2f scripts"):format(
        mode.name, w * 1e6, w / w0, (w - w0) * 1e6, c * 1e6, c / c0, (c - c0) * 1e6, median(scripts[i])))
    end
  end

  measure(("== admission only: %d submits, each canceled once admitted, per call; %d rounds, medians")
            :format(N, ROUNDS),
    function(c, req)
      for _ = 1, N do c:submit(req):cancel() end
      c:run()
    end)
  measure(("== whole calls: %d sequential calls to /echo, per call; %d rounds, medians"):format(N, ROUNDS),
    function(c, req)
      for _ = 1, N do assert(c:request(req)) end
    end)

  if not FLEET then return end
  print("== leases: 4 processes x 250 calls against a 50/s limiter (burst 50), no limit configured")
  for _, lease in ipairs { 1, 4, 16 } do
    conn:flushall()
    m:reset()
    m:config { rate_limit = { rpm = 3000, burst = 50 } }
    local cfgs = {}
    for i = 1, 4 do
      cfgs[i] = { url = m.http_url, redis = { port = rs.port }, n = 250, concurrency = 32, scenario = "lease",
                  steps = "200", shared = { processes = 4, lease = lease } }
    end
    local outs = fleet.start(cfgs):wait(180)
    local first, last, okn = math.huge, 0, 0
    for _, o in ipairs(outs) do
      assert(o.ok, tostring(o.failed))
      okn = okn + o.ok
      first, last = math.min(first, o.started), math.max(last, o.finished)
    end
    local c = m:counters()
    local times = m:scenario("lease").times
    table.sort(times)
    local most, j = 0, 1
    for i = 1, #times do
      while times[i] - times[j] >= 1 do j = j + 1 end
      if i - j + 1 > most then most = i - j + 1 end
    end
    print(("  lease %-3d %d/1000 ok in %.2f s (ideal 20.0 s, x%.3f); 429s %d (%.2f%%); most in one second %d "
      .. "(the provider allows 100)"):format(lease, okn, last - first, (last - first) / 20, c.rate_limited,
      100 * c.rate_limited / c.requests, most))
  end
  print("== leases under a trickle: 4 processes x 100 calls, one every 100 ms each (40/s: 80% of the limit)")
  for _, lease in ipairs { 1, 4, 16 } do
    conn:flushall()
    m:reset()
    m:config { rate_limit = { rpm = 3000, burst = 50 } }
    local cfgs = {}
    for i = 1, 4 do
      cfgs[i] = { url = m.http_url, redis = { port = rs.port }, n = 100, every = 0.1,
                  shared = { processes = 4, lease = lease } }
    end
    local lat = {}
    for _, o in ipairs(fleet.start(cfgs):wait(180)) do
      assert(o.ok, tostring(o.failed))
      for _, l in ipairs(o.latencies) do lat[#lat + 1] = l end
    end
    table.sort(lat)
    local c = m:counters()
    print(("  lease %-3d latency p50 %.1f ms, p95 %.1f ms, max %.1f ms; 429s %d"):format(lease,
      lat[math.ceil(#lat * 0.5)] * 1e3, lat[math.ceil(#lat * 0.95)] * 1e3, lat[#lat] * 1e3, c.rate_limited))
  end
end)
conn:quit()
rs:stop()
m:stop()
assert(ok, err)
