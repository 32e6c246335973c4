-- sturdy.cosocket inside nginx against a plain proxy_pass, both to the
-- mock's /echo over kept-alive connections, one nginx worker, wrk at the same
-- concurrency; the mock alone as the ceiling. Prints each round and the
-- medians, with the cosocket location's throughput as a ratio of
-- proxy_pass's and its added p50. At 1 connection the p50s are per-request
-- latency; at 32 the mock is saturated and p50 is mostly queueing. A
-- hand-written cosocket exchange ("bare cosocket") shows nginx's own share.
--
--   lua5.4 bench/cosocket.lua        (make bench-cosocket)
--
-- BENCH_ROUNDS (default 5), BENCH_SECONDS per run (default 4),
-- BENCH_CONNECTIONS (default "1,32").
package.path = "./?.lua;" .. package.path

local mock = require "spec.support.mock"
local runner = require "spec.support.ngx_runner"

local ROUNDS = tonumber(os.getenv("BENCH_ROUNDS")) or 5
local SECONDS = tonumber(os.getenv("BENCH_SECONDS")) or 4
local CONNECTIONS = os.getenv("BENCH_CONNECTIONS") or "1,32"

local function capture(cmd)
  local p = assert(io.popen(cmd .. " 2>&1"))
  local out = p:read("*a")
  p:close()
  return out
end

local UNITS = { us = 1e-3, ms = 1, s = 1e3 }

-- wrk's requests/s and p50 in ms.
local function wrk(url, seconds, connections)
  local out = capture(string.format("env -u LD_PRELOAD wrk -t1 -c%d -d%ds --latency %s", connections, seconds, url))
  local rps = tonumber(out:match("Requests/sec:%s*([%d.]+)"))
  local p50, unit = out:match("\n%s*50%%%s+([%d.]+)(%a+)")
  local errors = out:match("Non%-2xx or 3xx responses:%s*(%d+)") or out:match("Socket errors:[^\n]*")
  if not rps or not p50 or not UNITS[unit] then error("cannot read wrk's output:\n" .. out) end
  return rps, tonumber(p50) * UNITS[unit], errors
end

local function median(t)
  local s = {}
  for i, v in ipairs(t) do s[i] = v end
  table.sort(s)
  local n = #s
  if n % 2 == 1 then return s[(n + 1) / 2] end
  return (s[n / 2] + s[n / 2 + 1]) / 2
end

local function main()
  if capture("command -v wrk") == "" then
    io.stderr:write("bench: wrk is missing (Debian package wrk; make deps installs it)\n")
    return 1
  end
  local m = assert(mock.start())
  local r, err = runner.start {
    mock = m,
    lua_path = runner.root .. "/bench/ngx/?.lua",
    http = string.format([[
  upstream mock_upstream {
    server 127.0.0.1:%d;
    keepalive 64;
  }
]], m.port),
    server = string.format([[
    location = /proxy_pass {
      proxy_pass http://mock_upstream/echo;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }
    location = /cosocket {
      content_by_lua_block { require("cosocket_bench").handle("%s/echo") }
    }
    location = /bare_cosocket {
      content_by_lua_block { require("cosocket_bench").bare("127.0.0.1", %d, "/echo") }
    }
]], m.http_url, m.port),
  }
  if not r then
    m:stop()
    error(err)
  end
  local ok, failure = pcall(function()
    local targets = {
      { name = "mock direct", url = m.http_url .. "/echo" },
      { name = "proxy_pass", url = r.url .. "/proxy_pass" },
      { name = "cosocket", url = r.url .. "/cosocket" },
      { name = "bare cosocket", url = r.url .. "/bare_cosocket" },
    }
    for _, t in ipairs(targets) do wrk(t.url, 1, 32) end   -- warm up: pools, JIT
    for connections in CONNECTIONS:gmatch("%d+") do
      connections = tonumber(connections)
      local rps, p50 = {}, {}
      print(string.format("wrk -t1 -c%d -d%ds, one nginx worker each; %d rounds", connections, SECONDS, ROUNDS))
      for round = 1, ROUNDS do
        for i = 1, #targets do
          -- alternate the order so drift favours neither side
          local t = targets[(round % 2 == 1) and i or (#targets - i + 1)]
          local x, lat, errors = wrk(t.url, SECONDS, connections)
          rps[t.name] = rps[t.name] or {}
          p50[t.name] = p50[t.name] or {}
          table.insert(rps[t.name], x)
          table.insert(p50[t.name], lat)
          print(string.format("  round %d  %-13s %9.0f req/s  p50 %.3f ms%s", round, t.name, x, lat,
                              errors and ("  errors: " .. errors) or ""))
        end
      end
      print(string.format("medians at c=%d:", connections))
      for _, t in ipairs(targets) do
        print(string.format("  %-13s %9.0f req/s  p50 %.3f ms", t.name, median(rps[t.name]), median(p50[t.name])))
      end
      local ratio = median(rps.cosocket) / median(rps.proxy_pass)
      local added = median(p50.cosocket) - median(p50.proxy_pass)
      print(string.format("  cosocket / proxy_pass throughput: %.2fx (target >= 0.70)", ratio))
      print(string.format("  cosocket added p50: %+.3f ms (target <= 0.200)", added))
      print(string.format("  bare cosocket / proxy_pass throughput: %.2fx, added p50 %+.3f ms",
                          median(rps["bare cosocket"]) / median(rps.proxy_pass),
                          median(p50["bare cosocket"]) - median(p50.proxy_pass)))
    end
    local seq = r:run("cosocket_bench", "sequential medians", { n = 5000 })
    print(string.format("inside nginx, 5000 calls in a row: sturdy %.1f us, bare cosocket %.1f us per call "
      .. "(medians): sturdy adds %.1f us", seq.sturdy, seq.bare, seq.sturdy - seq.bare))
  end)
  r:stop()
  m:stop()
  if not ok then error(failure, 0) end
  return 0
end

os.exit(main())
