-- make bench-openresty: the ngx transport inside nginx, against the mock API.
--
--  1. A worker is never blocked: one worker, wrk -c100 -d10s against /chat
--     (a sturdy call to the mock's 200 ms endpoint per request) while a second
--     wrk at one connection measures /ping on the same worker.
--  2. Overhead against proxy_pass: /relay (a sturdy call to the mock's /echo,
--     which advertises no rate limit, its reply passed on) and a plain proxy_pass to the same
--     endpoint, one worker each, wrk at the same concurrency, rounds in
--     alternating order; the mock alone is the ceiling. Then, inside nginx,
--     calls in a row: sturdy's client, sturdy.cosocket alone, a bare exchange.
--  3. Two workers against a hard-down API (every call 503), calls at a fixed
--     rate in both workers: what the API receives in all.
--  4. Two workers against the mock's rate limit, sending 3x what it
--     advertises: the share of 429s.
--
--   lua5.4 bench/openresty.lua        (make bench-openresty)
--
-- BENCH_ROUNDS (default 3), BENCH_SECONDS per wrk run (default 10 for part 1,
-- 5 for part 2), BENCH_CONNECTIONS for part 2 (default "1,32"),
-- BENCH_PARTS (default "1,2,3,4").
package.path = "./?.lua;" .. package.path

local socket = require "socket"
local cjson = require "cjson"
local mock = require "spec.support.mock"
local runner = require "spec.support.ngx_runner"

local ROUNDS = tonumber(os.getenv("BENCH_ROUNDS")) or 3
local SECONDS = tonumber(os.getenv("BENCH_SECONDS"))
local CONNECTIONS = os.getenv("BENCH_CONNECTIONS") or "1,32"
local PARTS = os.getenv("BENCH_PARTS") or "1,2,3,4"

local function capture(cmd)
  local p = assert(io.popen(cmd .. " 2>&1"))
  local out = p:read("*a")
  p:close()
  return out
end

local function median(t)
  local s = {}
  for i, v in ipairs(t) do s[i] = v end
  table.sort(s)
  local n = #s
  if n == 0 then return 0 end
  if n % 2 == 1 then return s[(n + 1) / 2] end
  return (s[n / 2] + s[n / 2 + 1]) / 2
end

local UNITS = { us = 1e-3, ms = 1, s = 1e3 }

-- wrk's output: requests/s, latency percentiles (ms), non-2xx and socket errors.
local function read_wrk(out)
  local pct = {}
  for p, v, unit in out:gmatch("\n%s*(%d+)%%%s+([%d.]+)(%a+)") do pct[tonumber(p)] = tonumber(v) * UNITS[unit] end
  local rps = tonumber(out:match("Requests/sec:%s*([%d.]+)"))
  if not rps or not pct[50] then error("cannot read wrk's output:\n" .. out) end
  return { rps = rps, pct = pct, non2xx = tonumber(out:match("Non%-2xx or 3xx responses:%s*(%d+)")) or 0,
           errors = out:match("Socket errors:[^\n]*") }
end

local tmp = capture("mktemp -d /tmp/sturdy-bench.XXXXXX"):gsub("%s+$", "")

local function wrk(url, seconds, connections, script)
  return read_wrk(capture(("env -u LD_PRELOAD wrk -t1 -c%d -d%ds --latency %s %s"):format(connections, seconds,
    script and ("-s " .. script) or "", url)))
end

local function write(path, text)
  local f = assert(io.open(path, "wb"))
  f:write(text)
  f:close()
end

-- CPU seconds (user + system) a process has used, from /proc.
local function cpu_seconds(pid)
  local f = io.open("/proc/" .. pid .. "/stat")
  if not f then return 0 end
  local stat = f:read("*a")
  f:close()
  local fields = {}
  for x in stat:match("%) (.*)$"):gmatch("%S+") do fields[#fields + 1] = x end
  return (tonumber(fields[12]) + tonumber(fields[13])) / 100
end

-- The pid of nginx's (first) worker under master pid.
local function worker_pid(master)
  return tonumber(capture("pgrep -P " .. master):match("%d+"))
end

local function start(m, opts)
  opts.mock = m
  opts.lua_path = runner.root .. "/bench/ngx/?.lua"
  opts.shared_dicts = { sturdy = "16m" }
  local r, err = runner.start(opts)
  if not r then error(err) end
  return r
end

---------------------------------------------------------------------------
-- 1. A worker is never blocked

local function part_slow(m)
  local seconds = SECONDS or 10
  local r = start(m, { workers = 1, server = ([[
    location = /chat { content_by_lua_block { require("openresty_bench").slow("%s") } }
    location = /ping { content_by_lua_block { ngx.say("pong") } }
]]):format(m.http_url) })
  print(("1. one worker: wrk -c100 -d%ds /chat (a sturdy call to the mock's 200 ms endpoint each), "
         .. "and wrk -c1 /ping on the same worker meanwhile; %d rounds"):format(seconds, ROUNDS))
  local idle = wrk(r.url .. "/ping", 2, 1)
  print(("   /ping alone: p50 %.3f ms, p99 %.3f ms"):format(idle.pct[50], idle.pct[99]))
  wrk(r.url .. "/chat", 2, 100) -- warm up: connections, JIT
  local rps, p99s = {}, {}
  local worker = worker_pid(r.pid)
  for round = 1, ROUNDS do
    local cpu0 = cpu_seconds(worker)
    local slow_out, ping_out = tmp .. "/slow.txt", tmp .. "/ping.txt"
    os.execute(("env -u LD_PRELOAD wrk -t1 -c100 -d%ds --latency %s/chat > %s 2>&1 & sleep 0.5; "
                .. "env -u LD_PRELOAD wrk -t1 -c1 -d%ds --latency %s/ping > %s 2>&1; wait")
      :format(seconds, r.url, slow_out, seconds - 1, r.url, ping_out))
    local slow = read_wrk(assert(io.open(slow_out)):read("*a"))
    local ping = read_wrk(assert(io.open(ping_out)):read("*a"))
    local busy = (cpu_seconds(worker) - cpu0) / seconds
    rps[round], p99s[round] = slow.rps, ping.pct[99]
    print(("   round %d: /chat %.0f req/s (p50 %.1f ms, %d not 2xx%s); /ping p50 %.3f ms, p99 %.3f ms; "
           .. "the worker was busy %.0f%% of the time"):format(round, slow.rps, slow.pct[50], slow.non2xx,
           slow.errors and (", " .. slow.errors) or "", ping.pct[50], ping.pct[99], busy * 100))
  end
  print(("   medians: /chat %.0f req/s (target >= 400: 80%% of 100 / 0.2 s); /ping p99 %.3f ms (target < 5)")
    :format(median(rps), median(p99s)))
  r:stop()
end

---------------------------------------------------------------------------
-- 2. Overhead against proxy_pass

local function part_overhead(m)
  local seconds = SECONDS or 5
  local script = tmp .. "/post.lua"
  write(script, [[
wrk.method = "POST"
wrk.headers["content-type"] = "application/json"
wrk.body = '{"model":"claude-bench","max_tokens":16,"messages":[{"role":"user","content":"hello"}]}'
]])
  local r = start(m, { workers = 1,
    http = ("  upstream mock_upstream {\n    server 127.0.0.1:%d;\n    keepalive 64;\n  }\n"):format(m.port),
    server = ([[
    location = /proxy_pass {
      proxy_pass http://mock_upstream/echo;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }
    location = /relay { content_by_lua_block { require("openresty_bench").relay("%s") } }
]]):format(m.http_url) })
  local targets = {
    { name = "mock direct", url = m.http_url .. "/echo" },
    { name = "proxy_pass", url = r.url .. "/proxy_pass" },
    { name = "sturdy", url = r.url .. "/relay" },
  }
  print(("2. overhead: POST /echo (no rate limit advertised) through sturdy (/relay) and through proxy_pass, "
         .. "one nginx worker each, wrk -d%ds, %d rounds in alternating order"):format(seconds, ROUNDS))
  for _, t in ipairs(targets) do wrk(t.url, 2, 32, script) end -- warm up
  local worker = worker_pid(r.pid)
  for connections in CONNECTIONS:gmatch("%d+") do
    connections = tonumber(connections)
    local rps, p50, cpu = {}, {}, {}
    for round = 1, ROUNDS do
      for i = 1, #targets do
        local t = targets[(round % 2 == 1) and i or (#targets - i + 1)]
        local cpu0 = cpu_seconds(worker)
        local x = wrk(t.url, seconds, connections, script)
        local per_call = (cpu_seconds(worker) - cpu0) / math.max(1, x.rps * seconds) * 1e6
        rps[t.name] = rps[t.name] or {}
        p50[t.name] = p50[t.name] or {}
        cpu[t.name] = cpu[t.name] or {}
        table.insert(rps[t.name], x.rps)
        table.insert(p50[t.name], x.pct[50])
        table.insert(cpu[t.name], per_call)
        print(("   c=%d round %d  %-11s %8.0f req/s  p50 %.3f ms%s%s"):format(connections, round, t.name, x.rps,
          x.pct[50], t.name == "mock direct" and "" or ("  nginx worker CPU %.0f us/call"):format(per_call),
          (x.non2xx > 0 or x.errors) and (" (%d not 2xx %s)"):format(x.non2xx, x.errors or "") or ""))
      end
    end
    print(("   medians at c=%d: mock direct %.0f req/s; proxy_pass %.0f req/s, p50 %.3f ms; sturdy %.0f req/s, "
           .. "p50 %.3f ms"):format(connections, median(rps["mock direct"]), median(rps.proxy_pass),
           median(p50.proxy_pass), median(rps.sturdy), median(p50.sturdy)))
    print(("   sturdy / proxy_pass throughput %.2fx (target >= 0.70); added p50 %+.3f ms (target <= 0.200); "
           .. "nginx worker CPU per call: proxy_pass %.0f us, sturdy %.0f us")
      :format(median(rps.sturdy) / median(rps.proxy_pass), median(p50.sturdy) - median(p50.proxy_pass),
              median(cpu.proxy_pass), median(cpu.sturdy)))
  end
  local seq = r:run("openresty_bench", "sequential", { n = 3000 })
  print(("   inside nginx, 3000 calls in a row (medians): sturdy client %.1f us, sturdy.cosocket %.1f us, "
         .. "a bare cosocket exchange %.1f us: the client adds %.1f us to the cosocket, which adds %.1f us "
         .. "to the bare exchange"):format(seq.client, seq.cosocket, seq.bare, seq.client - seq.cosocket,
         seq.cosocket - seq.bare))
  r:stop()
end

---------------------------------------------------------------------------
-- 3 and 4: two workers, calls at a fixed rate in each

-- Starts the driver in both workers (reuseport spreads the connections) and
-- waits for both results.
local function drive_both(r, run, cfg, timeout)
  local encoded = require("mime").b64(cjson.encode(cfg))
  encoded = encoded:gsub("[+/=]", { ["+"] = "%2B", ["/"] = "%2F", ["="] = "%3D" })
  local started = {}
  for _ = 1, 200 do
    local status, body = r:request("GET", "/drive?run=" .. run .. "&cfg=" .. encoded)
    if status == 200 then
      local out = cjson.decode(body)
      if out.started then started[out.worker] = true end
    end
    if started[0] and started[1] then break end
  end
  assert(started[0] and started[1], "the driver did not start in both workers")
  local deadline = socket.gettime() + timeout
  repeat
    socket.sleep(0.5)
    local _, body = r:request("GET", "/result?run=" .. run)
    local results = cjson.decode(body)
    if #results == 2 then return results end
  until socket.gettime() > deadline
  error("the drivers did not finish in " .. timeout .. " s")
end

local DRIVER_LOCATIONS = [[
    location = /drive { content_by_lua_block { require("openresty_bench").drive() } }
    location = /result { content_by_lua_block { require("openresty_bench").result() } }
]]

local function part_down(m)
  local r = start(m, { workers = 2, server = DRIVER_LOCATIONS })
  local rate, seconds, min_calls, probes, open_for = 50, 4, 20, 3, 2
  print(("3. two workers against a hard-down API (every call 503): %d calls/s in each for %d s; breaker "
         .. "min_calls %d, probes %d, open_for %d s; retries as configured by default"):format(rate, seconds,
         min_calls, probes, open_for))
  local results = drive_both(r, "down", {
    rate = rate, seconds = seconds, grace = 0, path = "/echo", body = "{}",
    headers = { ["x-mock-steps"] = "503", ["x-mock-scenario"] = "down" },
    client = { base_url = m.http_url, breaker = { min_calls = min_calls, probes = probes, open_for = open_for } },
  }, 60)
  local got = m:scenario("down").count
  local opens = 0
  for _, w in ipairs(results) do
    local b = w.stats.breaker
    opens = math.max(opens, b.opens)
    print(("   worker %d: %d calls made, outcomes %s; the shared breaker: %s, opened %d times")
      :format(w.worker, w.submitted, cjson.encode(w.results), b.state, b.opens))
  end
  local half_opens = math.max(0, opens - 1)
  print(("   the API received %d calls in all: one breaker's min_calls %d + %d probes x %d half-open = %d "
         .. "(each worker alone would send its own %d first)"):format(got, min_calls, probes, half_opens,
         min_calls + probes * half_opens, min_calls))
  r:stop()
end

local function part_rate(m)
  local r = start(m, { workers = 2, server = DRIVER_LOCATIONS })
  local rpm, seconds = 1200, tonumber(os.getenv("BENCH_RATE_SECONDS")) or 20
  local rate = 3 * rpm / 60 / 2
  m:reset()
  m:config { rate_limit = { rpm = rpm } }
  print(("4. two workers against the mock's limit of %d/min (it advertises it in its headers; sturdy is told "
         .. "nothing): %d calls/s in each, 3x the limit in all, for %d s; calls that cannot start within "
         .. "5 s end locally"):format(rpm, rate, seconds))
  local results = drive_both(r, "rate", {
    rate = rate, seconds = seconds, grace = 15, path = "/v1/messages",
    body = '{"model":"claude-bench","max_tokens":16,"messages":[{"role":"user","content":"pace me"}]}',
    client = { base_url = m.http_url, timeout = { total = 5 } },
  }, seconds + 60)
  local c = m:counters()
  local elapsed = 0
  for _, w in ipairs(results) do elapsed = math.max(elapsed, w.took) end
  for _, w in ipairs(results) do
    local lim = w.stats.limits.requests or {}
    print(("   worker %d: %d calls made, outcomes %s; learned %s/min, %d paced, %d 429s received")
      :format(w.worker, w.submitted, cjson.encode(w.results), tostring(lim.learned), w.stats.paced,
              w.stats.throttled))
  end
  print(("   the API received %d calls in %.1f s, %.1f/s (its limit %.1f/s), and answered %d with 429: %.2f%% "
         .. "(target <= 1%%)"):format(c.requests, elapsed, c.requests / elapsed, rpm / 60, c.rate_limited,
         100 * c.rate_limited / math.max(1, c.requests)))
  r:stop()
end

---------------------------------------------------------------------------

local function main()
  if capture("command -v wrk") == "" then
    io.stderr:write("bench: wrk is missing (Debian package wrk; make deps installs it)\n")
    return 1
  end
  local m = assert(mock.start())
  local ok, failure = pcall(function()
    local parts = { part_slow, part_overhead, part_down, part_rate }
    for p in PARTS:gmatch("%d") do
      m:reset()
      parts[tonumber(p)](m)
    end
  end)
  m:stop()
  os.execute("rm -rf " .. tmp)
  if not ok then error(failure, 0) end
  return 0
end

os.exit(main())
