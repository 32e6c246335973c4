-- The main job: 200 calls, in the Anthropic and OpenAI shapes, through a
-- fallback chain (Sonnet, then Haiku, then an OpenAI model) behind a cache,
-- against an API that misbehaves the way real ones do — an outage of the
-- primary model, rate limits with reset headers, server errors, a slow tail —
-- then one answer streamed to the terminal, and a report of what sturdy did.
--
--   make demo                                     against the bundled mock API
--   STURDY_LIVE=1 ANTHROPIC_API_KEY=... lua examples/demo.lua   against the real API
--                                                 (OPENAI_API_KEY adds the OpenAI target)
local sturdy = require "sturdy"
local anthropic = require "sturdy.anthropic"
local openai = require "sturdy.openai"
local fallback = require "sturdy.fallback"
local sturdy_cache = require "sturdy.cache"
local cjson = require "cjson"

local live = os.getenv("STURDY_LIVE") == "1" and os.getenv("ANTHROPIC_API_KEY")
local mock_url = os.getenv("STURDY_MOCK_URL")
if not live and not mock_url then
  io.stderr:write("demo: run it with `make demo` (the mock API), or set STURDY_LIVE=1 and ANTHROPIC_API_KEY\n")
  os.exit(2)
end

---------------------------------------------------------------------------
-- What happens, as sturdy reports it
---------------------------------------------------------------------------

local retries, throttled_seen, transitions = {}, 0, {}
local client = sturdy.client {
  base_url = live and "https://api.anthropic.com" or mock_url,
  timeout = { connect = 5, first_byte = 30, total = 45 },
  retry = { attempts = 4, base = { overloaded = 0.2, throttled = 0.25, transient = 0.05, timeout = 0.1 } },
  breaker = { window = 10, min_calls = 8, open_for = 1, max_open_for = 2, probes = 1 },
  limits = { concurrency = 16 },
  yield = coroutine.yield, -- the calls run in coroutines: a waiting call lets the others go on
  on_retry = function(info)
    retries[info.class] = (retries[info.class] or 0) + 1
    if info.status == 429 then throttled_seen = throttled_seen + 1 end
  end,
  on_event = function(ev)
    if ev.type == "breaker" then transitions[#transitions + 1] = ("%s %s -> %s"):format(ev.key, ev.from, ev.to) end
  end,
}

local control = not live and sturdy.client { base_url = mock_url }
local function mock(method, path, json)
  local res = assert(control:request { method = method, path = path, json = json })
  return cjson.decode(res.body)
end

local function steps(script, scenario)
  if live then return nil end
  return { ["x-mock-steps"] = script, ["x-mock-steps-sep"] = "|", ["x-mock-scenario"] = scenario }
end

---------------------------------------------------------------------------
-- The chain and the cache
---------------------------------------------------------------------------

local api_key = live or "sk-mock-demo"
local sonnet = anthropic.new { client = client, api_key = api_key, model = "claude-sonnet-4-5" }
local haiku = anthropic.new { client = client, api_key = api_key, model = "claude-haiku-4-5" }
local openai_key = live and os.getenv("OPENAI_API_KEY")
local gpt = (not live or openai_key) and openai.new {
  client = client, api_key = openai_key or "sk-mock-demo", model = "gpt-4o-mini",
  base_url = live and "https://api.openai.com" or nil,
}

-- the primary has an outage: its first 20 requests are overloaded
local OUTAGE = ("529|"):rep(20) .. "200"
local targets = {
  { provider = sonnet, name = "sonnet", attempts = 2, headers = steps(OUTAGE, "sonnet-outage") },
  { provider = haiku, name = "haiku", attempts = 2 },
  gpt and { provider = gpt, name = "gpt" } or nil,
}
local chain = fallback {
  targets = targets,
  wait_for_cooldown = true, timeout = 20, yield = coroutine.yield,
  degraded = "(every model is busy right now; please ask again in a minute)",
}
local cache = sturdy_cache { ttl = 600, stale_if_error = 3600, yield = coroutine.yield }
local cached = cache:wrap(chain)

---------------------------------------------------------------------------
-- The calls, and the trouble the mock injects into them
---------------------------------------------------------------------------

local prompts = { "a haiku about retries", "why jitter matters", "what a 529 means", "pacing under a rate limit",
                  "the cost of a slow tail", "circuit breakers in one line" }
-- questions many users ask, word for word: answered once, then from the cache
local faq = { "What is sturdy?", "How do I install it?", "Does it stream?", "Which providers?" }

local calls = {}
local n = live and 6 or 200
for i = 1, n do
  local prompt = prompts[i % #prompts + 1] .. " #" .. i
  local call = { method = "messages", params = { max_tokens = 48, messages = { { role = "user", content = prompt } } } }
  if i % 5 == 0 then
    local question = faq[(i / 5) % #faq + 1]
    call.params = { max_tokens = 48, temperature = 0, messages = { { role = "user", content = question } } }
  elseif i % 4 == 0 then -- the OpenAI shape: translated for whichever target serves it
    call.method = "chat"
    call.params = { max_completion_tokens = 48, messages = { { role = "user", content = prompt } } }
  elseif i % 9 == 1 then -- the slow tail
    call.opts = { headers = steps("200;delay=" .. (600 + (i * 37) % 900), "slow" .. i) }
  elseif i % 7 == 0 then -- a server error, retried
    call.opts = { headers = steps("500|200", "e" .. i) }
  end
  calls[i] = call
end

---------------------------------------------------------------------------
-- Run: 48 coroutines take the calls in turn; the loop drives the client
---------------------------------------------------------------------------

local started = sturdy.monotime()
if not live then
  mock("POST", "/_mock/reset")
  -- the provider's own limit, which sturdy is not told: it learns it from headers
  mock("POST", "/_mock/config", { rate_limit = { rpm = 2400, burst = 30 } })
end
print(("== sturdy demo: %d calls to %s through %s, behind a cache"):format(#calls,
  live and "the real APIs" or "the bundled mock API", tostring(chain):gsub("^sturdy%.fallback ", "the chain ")))

local results, next_call = {}, 0
local function worker()
  while next_call < #calls do
    next_call = next_call + 1
    local i, call = next_call, calls[next_call]
    local r, err = cached[call.method](cached, call.params, call.opts)
    results[i] = r or err
  end
end
local workers = {}
for w = 1, live and 2 or 48 do workers[w] = coroutine.create(worker) end
repeat
  local alive = 0
  for _, co in ipairs(workers) do
    if coroutine.status(co) ~= "dead" then
      assert(coroutine.resume(co))
      alive = alive + 1
    end
  end
  if alive > 0 then client:poll(0.005) end
until alive == 0
local batch_time = sturdy.monotime() - started

-- 429s that ended a target's call were not retried, so on_retry never heard
-- of them: the chain's story of each call that went upstream tells them
local final_429, told = 0, {}
local function count_429(fallbacks)
  if not fallbacks or told[fallbacks] then return end -- calls that shared one upstream call share its story
  told[fallbacks] = true
  for _, f in ipairs(fallbacks) do
    if f.status == 429 then final_429 = final_429 + 1 end
  end
end

local answered, degraded, failed_kinds, how = 0, 0, {}, { hit = 0, miss = 0, bypass = 0, stale = 0 }
for _, r in ipairs(results) do
  if sturdy.is_error(r) then
    failed_kinds[r.kind] = (failed_kinds[r.kind] or 0) + 1
    count_429(r.fallbacks)
  else
    if r.degraded then degraded = degraded + 1 else answered = answered + 1 end
    how[r.cache] = (how[r.cache] or 0) + 1
    if r.cache == "stale" then count_429(r.stale_error.fallbacks) end
    if r.cache ~= "hit" and r.cache ~= "stale" then count_429(r.fallbacks) end
  end
end

-- after the batch: a call every quarter second shows when the primary is back
local outage_over, direct_attempts = nil, 0
if not live then
  local t0 = sturdy.monotime()
  repeat
    local r, err = sonnet:messages({ max_tokens = 8, messages = { { role = "user", content = "up?" } } },
                                   { headers = steps(OUTAGE, "sonnet-outage"), attempts = 1 })
    local used = (r or err).attempts
    for _, a in ipairs(used) do
      if a.status then direct_attempts = direct_attempts + 1 end
    end
    if err and err.status == 429 then final_429 = final_429 + 1 end
    if r then outage_over = sturdy.monotime() - t0 else client:poll(0.25) end
  until outage_over or sturdy.monotime() - t0 > 10
end

-- one answer, streamed as it arrives; its first connection (a fresh one, so
-- libcurl cannot quietly retry it) drops before any byte
print("\n== streaming one answer (its first connection is dropped; sturdy retries it):")
io.write("   ")
local stream_client = sturdy.client { base_url = live and "https://api.anthropic.com" or mock_url,
                                      retry = { base = { transient = 0.05 } } }
local streamer = anthropic.new { client = stream_client, api_key = api_key,
                                 model = live and "claude-haiku-4-5" or "claude-sonnet-4-5" }
local stream = streamer:stream(
  { max_tokens = 64, messages = { { role = "user", content = "one sturdy sentence, streamed" } } },
  { headers = steps("drop|200;drip=40", "stream"),
    on_event = function(ev)
      if ev.type == "content_block_delta" and ev.data.delta.text then
        io.write(ev.data.delta.text)
        io.flush()
      end
    end })
local streamed, stream_err = stream:result()
print()
if streamed then
  print(("   (%d attempt(s), %d output tokens, stop: %s)"):format(#streamed.attempts, streamed.usage.output,
    tostring(streamed.stop_reason)))
else
  print("   stream failed: " .. tostring(stream_err))
end

---------------------------------------------------------------------------
-- Report
---------------------------------------------------------------------------

local stats = client:stats()
print(("\n== report (%.1f s for the batch)"):format(batch_time))
local failed = {}
for kind, count in pairs(failed_kinds) do failed[#failed + 1] = kind .. " " .. count end
table.sort(failed)
print(("calls:        %d of %d answered, %d marked degraded%s; %d from the cache"):format(answered, #calls, degraded,
  #failed > 0 and ("; failed: " .. table.concat(failed, ", ")) or "", how.hit + how.stale))
local cs = chain:stats()
print("chain:        target     calls  answered  fell back  skipped  attempts")
for _, name in ipairs(chain:targets()) do
  local t = cs.targets[name]
  print(("              %-9s %6d %9d %10d %8d %9d"):format(name, t.calls, t.successes, t.fallbacks, t.skipped,
    t.attempts))
end
print(("              %d calls reached the chain, %d waited for a cooldown"):format(cs.calls, cs.waits))
local c = cache:stats()
print(("cache:        %d hits (%d shared a call in flight), %d misses, %d passed through (temperature above 0)")
  :format(c.hits, c.coalesced, c.misses, c.bypass))
local by_class, total_retries = {}, 0
for class, count in pairs(retries) do
  by_class[#by_class + 1] = class .. " " .. count
  total_retries = total_retries + count
end
table.sort(by_class)
print(("retries:      %d (%s)"):format(total_retries, table.concat(by_class, ", ")))
local paced = 0
for _, key in ipairs(stats.keys) do paced = paced + (client:stats(key).paced or 0) end
print(("429s:         %d received (each paused its key until its reset); %d calls held back by learned limits"
  .. " instead of sent into a 429"):format(throttled_seen + final_429, paced))
print(("breaker:      %s"):format(#transitions > 0 and table.concat(transitions, "; ") or "no transitions"))
if outage_over and outage_over > 0.05 then
  print(("              claude-sonnet-4-5 answered again %.1f s after the batch"):format(outage_over))
end
print("latency:      key                                        calls     p50      p95      p99")
table.sort(stats.keys)
for _, key in ipairs(stats.keys) do
  local s = client:stats(key)
  if s.latency.count > 0 then
    print(("              %-42s %5d %7.0fms %7.0fms %7.0fms"):format(key, s.latency.count,
      s.latency.p50 * 1000, s.latency.p95 * 1000, s.latency.p99 * 1000))
  end
end
local u = stats.usage or { input = 0, output = 0, cost = 0, calls = 0 }
print(("tokens:       %d in, %d out over %d replies; cost $%.4f"):format(u.input, u.output, u.calls, u.cost))

if not live then
  local counters = mock("GET", "/_mock/counters")
  local sent = stats.attempts + stream_client:stats().attempts
  local outage = counters.scenarios["sonnet-outage"] or { count = 0 }
  local sonnet_sent = cs.targets.sonnet.attempts + direct_attempts
  local seen_429 = throttled_seen + final_429
  local agree = counters.requests == sent and counters.rate_limited == seen_429 and outage.count == sonnet_sent
    and answered + degraded == #calls
  print(("mock:         received %d requests (sturdy sent %d attempts), answered %d with 429 (sturdy saw %d),"
    .. " %d for sonnet (the chain sent %d, the probes after the batch %d): %s")
    :format(counters.requests, sent, counters.rate_limited, seen_429, outage.count, cs.targets.sonnet.attempts,
            direct_attempts, agree and "agree" or "DISAGREE"))
  mock("POST", "/_mock/config", { rate_limit = false })
  control:close()
  client:close()
  stream_client:close()
  os.exit(agree and 0 or 1)
end
client:close()
stream_client:close()
