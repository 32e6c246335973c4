--- Soak: mixed faults from the mock API at concurrency 64 for SOAK_SECONDS,
--- through the public API only (sturdy.client, submit/poll/wait/cancel/run/
--- stats/request/batch, the Anthropic and OpenAI providers and their streams).
--- Hooks call back into the client while it runs (SOAK_HOOKS=0: they only
--- count). The harness tracks every call itself: submitted, completed, lost
--- (never completed) and double-completed (completed twice), and the outcome
--- kinds; it samples RSS and open fds, and exits non-zero when a call is lost
--- or completed twice, or RSS / fds grow past the tolerance after warm-up.
---
--- usage: lua bench/soak.lua   (under spec/support/with_mock.lua; see bench/README.md)
local version = _VERSION:match("%d+%.%d+")
local build = jit and "luajit" or ("lua" .. version)
package.path = "lua/?.lua;lua/?/init.lua;" .. package.path
package.cpath = (os.getenv("STURDY_CPATH") or ("build/" .. build .. "/?.so")) .. ";" .. package.cpath

local sturdy = require "sturdy"
local anthropic = require "sturdy.anthropic"
local openai = require "sturdy.openai"

local floor, random, format = math.floor, math.random, string.format

local function env_number(name, default)
  local v = os.getenv(name)
  if v == nil or v == "" then return default end
  return tonumber(v) or error(name .. " must be a number, got " .. v)
end

local SECONDS = env_number("SOAK_SECONDS", 600)
local HOOKS = env_number("SOAK_HOOKS", 1) ~= 0
-- what hooks call back into, when on: any of stats, submit, cancel, poll
local HOOK_CALLS = {}
for name in (os.getenv("SOAK_HOOK_CALLS") or "stats,submit,cancel,poll"):gmatch("[^,%s]+") do
  HOOK_CALLS[name] = true
end
local CONCURRENCY = env_number("SOAK_CONCURRENCY", 64)
local WARMUP = env_number("SOAK_WARMUP", math.min(30, SECONDS / 4))
local SEED = floor(env_number("SOAK_SEED", os.time()))
-- after warm-up, RSS may grow by at most max(RSS_SLACK_KB, RSS_RATIO x baseline),
-- and the open fds by at most FD_SLACK
local RSS_RATIO = env_number("SOAK_RSS_RATIO", 0.25)
local RSS_SLACK_KB = env_number("SOAK_RSS_SLACK_KB", 16 * 1024)
local FD_SLACK = env_number("SOAK_FD_SLACK", 16)
local base_url = os.getenv("STURDY_MOCK_URL") or error("STURDY_MOCK_URL is not set (run under with_mock.lua)")

math.randomseed(SEED)
local now = sturdy.monotime

---------------------------------------------------------------------------
-- The process, from /proc
---------------------------------------------------------------------------

local function read_all(path)
  local f = io.open(path, "r")
  if not f then return nil end
  local s = f:read("*a")
  f:close()
  return s
end

local PID = assert(read_all("/proc/self/stat"), "needs /proc"):match("^(%d+)")

local function rss_kb()
  return tonumber(read_all("/proc/self/status"):match("VmRSS:%s*(%d+)"))
end

-- Entries of /proc/PID/fd; the pipe that lists them is one of them, every time.
local function fd_count()
  local p = assert(io.popen("ls /proc/" .. PID .. "/fd"))
  local n = 0
  for _ in p:lines() do n = n + 1 end
  p:close()
  return n
end

local function sample()
  collectgarbage("collect")
  collectgarbage("collect")
  return { rss = rss_kb(), fds = fd_count(), lua_kb = floor(collectgarbage("count")) }
end

---------------------------------------------------------------------------
-- Bookkeeping: every call is a record; its completion is counted once
---------------------------------------------------------------------------

local counts = { submitted = 0, completed = 0, double = 0, hook_errors = 0 }
local kinds, by_scenario, doubles = {}, {}, {}
local live, live_n = {}, 0        -- records not yet completed, for random picks
local next_id = 0

local function track(scenario)
  next_id = next_id + 1
  live_n = live_n + 1
  local rec = { id = next_id, scenario = scenario, slot = live_n, t0 = now() }
  live[live_n] = rec
  counts.submitted = counts.submitted + 1
  return rec
end

local function bump(t, k)
  t[k] = (t[k] or 0) + 1
end

local function kind_of(res, err)
  if err == nil and res ~= nil then return "ok" end
  if sturdy.is_error(err) then return err.kind or "error" end
  return "not_an_error:" .. type(err)
end

local function complete(rec, kind)
  if rec.done then
    counts.double = counts.double + 1
    doubles[#doubles + 1] = format("%s #%d: %s then %s", rec.scenario, rec.id, rec.done, kind)
    return
  end
  rec.done = kind
  -- swap-remove from the live list
  local last = live[live_n]
  live[rec.slot], last.slot = last, rec.slot
  live[live_n], live_n = nil, live_n - 1
  counts.completed = counts.completed + 1
  bump(kinds, kind)
  local s = by_scenario[rec.scenario] or {}
  by_scenario[rec.scenario] = s
  bump(s, kind)
end

local function pick_live()
  if live_n == 0 then return nil end
  return live[random(live_n)]
end

---------------------------------------------------------------------------
-- The client, the providers and the hooks
---------------------------------------------------------------------------

local client, claude, gpt
local hook_count = { on_retry = 0, on_event = 0, on_error = 0, stream_event = 0 }
local launch   -- defined below; hooks launch calls too

local function chance(p)
  return random() < p
end

-- What a hook does to the client besides counting, when SOAK_HOOKS is on.
local function meddle(where, key)
  if not HOOKS then return end
  if HOOK_CALLS.stats then
    local s = client:stats(key)
    if key and s ~= nil and type(s.in_flight) ~= "number" then
      error("soak: stats(" .. key .. ") from " .. where .. " has no in_flight")
    end
    if chance(0.15) then client:stats() end
  end
  if HOOK_CALLS.submit and chance(0.08) and live_n < CONCURRENCY * 1.25 then launch(true) end
  if HOOK_CALLS.cancel and chance(0.05) then
    local other = pick_live()
    if other and other.cancel then other.cancel() end
  end
  if HOOK_CALLS.poll and chance(0.05) then client:poll(0) end
end

local function on_retry(info)
  hook_count.on_retry = hook_count.on_retry + 1
  meddle("on_retry", info.key)
end

local function on_event(ev)
  hook_count.on_event = hook_count.on_event + 1
  meddle("on_event", ev.key)
end

local function on_error(e, _)
  hook_count.on_error = hook_count.on_error + 1
  if not tostring(e):find("soak: deliberate", 1, true) then
    counts.hook_errors = counts.hook_errors + 1
    io.stderr:write("soak: a callback raised: ", tostring(e), "\n")
  end
  meddle("on_error")
end

client = sturdy.client {
  base_url = base_url,
  timeout = { connect = 2, first_byte = 10, idle = 5, total = 30 },
  retry = { attempts = 4, base = 0.05, cap = 0.5, honor_retry_after = 5,
            budget = { ratio = 0.5, min_per_s = 10 } },
  breaker = { window = 10, min_calls = 20, failure_rate = 0.6, open_for = 1, max_open_for = 4 },
  limits = { concurrency = 32, queue = 10000 },
  on_retry = on_retry, on_event = on_event, on_error = on_error,
  yield = coroutine.yield,
}
claude = anthropic.new { client = client, api_key = "sk-ant-soak", model = "soak-a" }
gpt = openai.new { client = client, api_key = "sk-openai-soak", model = "soak-gpt" }

---------------------------------------------------------------------------
-- Scenarios: mock steps (spec/support/README.md), one mock scenario per call
---------------------------------------------------------------------------

local MODELS = { "soak-a", "soak-b", "soak-c", "soak-d" }

local function steps_headers(rec, steps, sep)
  local h = { ["x-mock-scenario"] = format("soak-%d-%d", SEED, rec.id), ["x-mock-steps"] = steps }
  if sep then h["x-mock-steps-sep"] = sep end
  return h
end

local function body(model)
  return { model = model or MODELS[random(#MODELS)], max_tokens = 32,
           messages = { { role = "user", content = "soak " .. random(1e6) } } }
end

-- An HTTP-date n seconds ahead, for retry-after
local function http_date(n)
  return os.date("!%a, %d %b %Y %H:%M:%S GMT", os.time() + n)
end

-- A submit callback that completes rec, then (hooks on) meddles, and sometimes raises.
local function callback_for(rec, finish)
  return function(res, err)
    if finish and res then res, err = finish(res) end
    complete(rec, kind_of(res, err))
    if HOOKS then
      meddle("callback")
      if chance(0.02) then error("soak: deliberate error from a callback") end
    end
  end
end

-- Plain submit of a /v1/messages body with these steps.
local function submit_steps(name, steps, opts)
  return function()
    opts = opts or {}
    local rec = track(name)
    local h = client:submit({ method = "POST", path = "/v1/messages", json = body(opts.model),
                              headers = steps and steps_headers(rec, steps, opts.sep) or nil,
                              timeout = opts.timeout, priority = opts.priority }, callback_for(rec))
    rec.cancel = function() h:cancel() end
    rec.handle = h
  end
end

-- Through a provider's prepare: the reply decoded into a result.
local function provider_call(name, p, steps)
  return function()
    local rec = track(name)
    local req, finish = p:prepare(body(p.model), { headers = steps and steps_headers(rec, steps) or nil })
    local h = client:submit(req, callback_for(rec, finish))
    rec.cancel = function() h:cancel() end
    rec.handle = h
  end
end

-- A non-blocking stream: complete at its terminal event or its error event.
local TERMINAL = { message_stop = true, done = true }
local function stream_call(name, p, steps, timeout)
  return function()
    local rec = track(name)
    local s
    s = p:stream(body(p.model), {
      headers = steps and steps_headers(rec, steps) or nil, timeout = timeout,
      on_event = function(ev)
        hook_count.stream_event = hook_count.stream_event + 1
        if ev.type == "error" then
          complete(rec, kind_of(nil, ev.error))
        elseif TERMINAL[ev.type] then
          complete(rec, "ok")
        end
        if HOOKS then
          meddle("stream")
          if HOOK_CALLS.cancel and chance(0.01) then s:cancel() end
        end
      end,
    })
    rec.cancel = function() s:cancel() end
  end
end

-- client:request inside a coroutine (the client yields while it waits).
local tasks = {}
local function request_in_coroutine(name, steps)
  return function()
    local rec = track(name)
    tasks[#tasks + 1] = { rec = rec, co = coroutine.create(function()
      local res, err = client:request { method = "POST", path = "/v1/messages", json = body(),
                                        headers = steps and steps_headers(rec, steps) or nil }
      complete(rec, kind_of(res, err))
    end) }
  end
end

-- A small batch, run to its end from the main loop (it drives everything else meanwhile).
local function small_batch(name)
  return function()
    local recs, reqs = {}, {}
    for i = 1, 3 do
      recs[i] = track(name)
      reqs[i] = { method = "POST", path = "/v1/messages", json = body(),
                  headers = steps_headers(recs[i], i == 2 and "529,200" or "200") }
    end
    local results = client:batch(reqs, { concurrency = 3 })
    for i = 1, 3 do
      local r = results[i]
      if sturdy.is_error(r) then complete(recs[i], kind_of(nil, r)) else complete(recs[i], kind_of(r, nil)) end
    end
  end
end

-- A call that waits at the server, for cancels and waits to land on.
local function slow_call(name)
  return submit_steps(name, "200;delay=1500")
end

local STALL = { idle = 0.3 }
local SCENARIOS = {
  { 14, "ok", submit_steps("ok", nil) },
  { 6, "ok_anthropic", provider_call("ok_anthropic", claude, nil) },
  { 4, "ok_openai", provider_call("ok_openai", gpt, nil) },
  { 5, "429_ms_then_ok", submit_steps("429_ms_then_ok", "429;retry-after-ms=150,429;retry-after-ms=80,200") },
  { 2, "429_s_then_ok", submit_steps("429_s_then_ok", "429;retry-after=1,200") },
  { 1, "429_date_then_ok", function()
      return submit_steps("429_date_then_ok", "429;retry-after=" .. http_date(2) .. "|200", { sep = "|" })()
    end },
  { 1, "429_hint_too_long", submit_steps("429_hint_too_long", "429;retry-after=7200", { model = "soak-hint" }) },
  { 5, "529_burst_then_ok", submit_steps("529_burst_then_ok", "529,529;retry-after-ms=60,200") },
  { 2, "529_until_spent", submit_steps("529_until_spent", "529;retry-after-ms=50") },
  { 2, "503_then_ok", submit_steps("503_then_ok", "503,200") },
  { 4, "drop_mid_then_ok", submit_steps("drop_mid_then_ok", "drop_mid,200") },
  { 1, "drop_mid_always", submit_steps("drop_mid_always", "drop_mid") },
  { 2, "drop_then_ok", submit_steps("drop_then_ok", "drop,200") },
  { 3, "stall_then_ok", submit_steps("stall_then_ok", "stall_mid;stall=2000,200", { timeout = STALL }) },
  { 1, "stall_always", submit_steps("stall_always", "stall_mid;stall=2000", { timeout = STALL }) },
  { 5, "stream_ok", stream_call("stream_ok", claude, nil) },
  { 3, "stream_ok_openai", stream_call("stream_ok_openai", gpt, nil) },
  { 2, "stream_truncated", stream_call("stream_truncated", claude, "truncated") },
  { 2, "stream_error_then_ok", stream_call("stream_error_then_ok", claude, "stream_error,200") },
  { 1, "stream_error_committed", stream_call("stream_error_committed", claude, "stream_error;after_delta=1") },
  { 1, "stream_error_openai", stream_call("stream_error_openai", gpt, "stream_error;after_delta=1") },
  { 2, "stream_drop_mid", stream_call("stream_drop_mid", claude, "drop_mid,200") },
  { 1, "stream_stall", stream_call("stream_stall", claude, "stall_mid;stall=2000,200", STALL) },
  { 2, "stream_529_then_ok", stream_call("stream_529_then_ok", claude, "529,200") },
  { 3, "request_coroutine", request_in_coroutine("request_coroutine", "529,200") },
  { 3, "slow_for_cancel", slow_call("slow_for_cancel") },
  { 0.3, "batch", small_batch("batch") },
}

local total_weight = 0
for _, s in ipairs(SCENARIOS) do total_weight = total_weight + s[1] end

local function pick_scenario()
  local x = random() * total_weight
  for _, s in ipairs(SCENARIOS) do
    x = x - s[1]
    if x <= 0 then return s end
  end
  return SCENARIOS[1]
end

-- Starts one call of a random scenario. A batch runs to its end inside
-- launch, so one is never started from a hook, nor while another runs.
local in_batch = false
function launch(from_hook)
  local s = pick_scenario()
  if s[2] ~= "batch" then return s[3]() end
  if from_hook or in_batch then return SCENARIOS[1][3]() end
  in_batch = true
  s[3]()
  in_batch = false
end

---------------------------------------------------------------------------
-- The main loop
---------------------------------------------------------------------------

local function resume_tasks()
  local i = 1
  while i <= #tasks do
    local t = tasks[i]
    if coroutine.status(t.co) == "dead" then
      table.remove(tasks, i)
    else
      local ok, e = coroutine.resume(t.co)
      if not ok then
        io.stderr:write("soak: a request coroutine raised: ", tostring(e), "\n")
        complete(t.rec, "raised")
        table.remove(tasks, i)
      else
        i = i + 1
      end
    end
  end
end

local function progress(t0, label)
  io.stderr:write(format("soak: %5.0f s %s: submitted %d completed %d live %d double %d rss %d kB\n",
    now() - t0, label, counts.submitted, counts.completed, live_n, counts.double, rss_kb()))
end

local next_report, next_sample
local function drive(t0, until_t, feeding)
  local samples = {}
  next_report, next_sample = next_report or t0, next_sample or t0
  while now() < until_t do
    if feeding then
      while live_n < CONCURRENCY do launch(false) end
    end
    local _, errors = client:poll(0.01)
    for _, e in ipairs(errors or {}) do
      counts.hook_errors = counts.hook_errors + 1
      io.stderr:write("soak: poll returned a callback error: ", tostring(e), "\n")
    end
    resume_tasks()
    if feeding and chance(0.05) then
      -- wait on some call for a moment, or cancel one
      local rec = pick_live()
      if rec and rec.handle then
        if rec.scenario == "slow_for_cancel" and chance(0.5) then rec.cancel() else rec.handle:wait(0.02) end
      end
    end
    if feeding and chance(0.01) then client:stats() end
    if now() >= next_report then
      progress(t0, feeding and "running" or "draining")
      next_report = next_report + 10
    end
    if feeding and now() >= next_sample then
      samples[#samples + 1] = { t = now() - t0, s = sample() }
      next_sample = next_sample + 30
    end
    if not feeding and live_n == 0 and client:pending() == 0 then break end
  end
  return samples
end

local t0 = now()
local start = sample()
local calls = {}
for _, name in ipairs { "stats", "submit", "cancel", "poll" } do
  if HOOK_CALLS[name] then calls[#calls + 1] = name end
end
print(format("soak: %.0f s at concurrency %d, hooks %s, seed %d, mock %s", SECONDS, CONCURRENCY,
  HOOKS and ("on (" .. table.concat(calls, ", ") .. ")") or "off (they only count)", SEED, base_url))
print(format("soak: start rss %d kB, fds %d", start.rss, start.fds))

drive(t0, t0 + WARMUP, true)
local warm = sample()
print(format("soak: after %.0f s warm-up: rss %d kB, fds %d, lua heap %d kB", WARMUP, warm.rss, warm.fds, warm.lua_kb))
local samples = drive(t0, t0 + SECONDS, true)

-- No new calls: everything in flight must complete (the longest is bounded by
-- the total timeout, 30 s, plus hinted pauses within honor_retry_after).
local drain_until = now() + 60
drive(t0, drain_until, false)
if live_n == 0 and client:pending() == 0 then
  local errs = client:run()   -- idle: returns at once
  if errs then counts.hook_errors = counts.hook_errors + #errs end
end
local stop = sample()
local elapsed = now() - t0

---------------------------------------------------------------------------
-- Report
---------------------------------------------------------------------------

local function sorted_keys(t)
  local ks = {}
  for k in pairs(t) do ks[#ks + 1] = k end
  table.sort(ks)
  return ks
end

print(format("soak: ran %.0f s; submitted %d, completed %d, lost %d, double-completed %d",
  elapsed, counts.submitted, counts.completed, live_n, counts.double))
print(format("soak: rss start %d kB, after warm-up %d kB, end %d kB; fds start %d, after warm-up %d, end %d",
  start.rss, warm.rss, stop.rss, start.fds, warm.fds, stop.fds))
for _, x in ipairs(samples) do
  print(format("soak:   at %4.0f s rss %d kB fds %d lua heap %d kB", x.t, x.s.rss, x.s.fds, x.s.lua_kb))
end
local parts = {}
for _, k in ipairs(sorted_keys(kinds)) do parts[#parts + 1] = k .. "=" .. kinds[k] end
print("soak: by kind: " .. table.concat(parts, " "))
for _, name in ipairs(sorted_keys(by_scenario)) do
  local p = {}
  for _, k in ipairs(sorted_keys(by_scenario[name])) do p[#p + 1] = k .. "=" .. by_scenario[name][k] end
  print(format("soak:   %-24s %s", name, table.concat(p, " ")))
end
print(format("soak: hooks ran: on_retry %d, on_event %d, on_error %d, stream events %d; unexpected callback errors %d",
  hook_count.on_retry, hook_count.on_event, hook_count.on_error, hook_count.stream_event, counts.hook_errors))
local totals = client:stats()
print(format("soak: client stats: %d keys", #(totals.keys or {})))

local failures = {}
if live_n > 0 then
  local lost = {}
  for i = 1, math.min(live_n, 20) do
    local r = live[i]
    lost[#lost + 1] = format("%s #%d (%.1f s old)", r.scenario, r.id, now() - r.t0)
  end
  failures[#failures + 1] = format("%d calls lost: %s", live_n, table.concat(lost, ", "))
end
if counts.double > 0 then
  failures[#failures + 1] = format("%d calls completed twice: %s", counts.double,
    table.concat(doubles, "; ", 1, math.min(#doubles, 20)))
end
local rss_allowed = floor(warm.rss + math.max(RSS_SLACK_KB, RSS_RATIO * warm.rss))
if stop.rss > rss_allowed then
  failures[#failures + 1] = format("rss grew from %d kB after warm-up to %d kB (allowed %d kB)",
    warm.rss, stop.rss, rss_allowed)
end
if stop.fds > warm.fds + FD_SLACK then
  failures[#failures + 1] = format("fds grew from %d after warm-up to %d (allowed +%d)", warm.fds, stop.fds, FD_SLACK)
end
if counts.hook_errors > 0 then
  failures[#failures + 1] = format("%d unexpected errors from callbacks", counts.hook_errors)
end
client:close()
if #failures > 0 then
  for _, f in ipairs(failures) do print("soak: FAIL: " .. f) end
  os.exit(1)
end
print(format("soak: ok (rss within max(%d kB, %g%%) and fds within +%d of the warm-up figures)",
  RSS_SLACK_KB, RSS_RATIO * 100, FD_SLACK))
