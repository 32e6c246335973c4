-- The main job: a batch of Anthropic and OpenAI calls against an API that
-- misbehaves the way real ones do — rate limits with reset headers, a burst
-- of 529 overloads on one model, a slow tail, a dropped stream — then one
-- answer streamed to the terminal, and a report of what sturdy did about it.
--
--   make demo                                     against the bundled mock API
--   STURDY_LIVE=1 ANTHROPIC_API_KEY=... lua examples/demo.lua   against the real API
local sturdy = require "sturdy"
local anthropic = require "sturdy.anthropic"
local openai = require "sturdy.openai"
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

local claude = anthropic.new { client = client, api_key = live or "sk-mock-demo", model = "claude-sonnet-4-5" }
local gpt = openai.new { client = client, api_key = "sk-mock-demo", model = "gpt-4o-mini" }

---------------------------------------------------------------------------
-- The calls, and the trouble the mock injects into them
---------------------------------------------------------------------------

local function steps(script, scenario)
  if live then return {} end
  return { ["x-mock-steps"] = script, ["x-mock-steps-sep"] = "|", ["x-mock-scenario"] = scenario }
end

local prompts = { "a haiku about retries", "why jitter matters", "what a 529 means", "pacing under a rate limit",
                  "the cost of a slow tail", "circuit breakers in one line" }
local calls, finishers = {}, {}
local function add(p, params, opts)
  local req, finish = p:prepare(params, opts)
  if req then
    calls[#calls + 1] = req
    finishers[#calls] = finish
  end
end

local n = live and 6 or 200
for i = 1, n do
  local prompt = prompts[i % #prompts + 1] .. " #" .. i
  local ask = { max_tokens = 48, messages = { { role = "user", content = prompt } } }
  if live then
    add(claude, { model = "claude-haiku-4-5", max_tokens = 48, messages = ask.messages })
  elseif i % 10 == 0 then
    -- one model has an outage: its first 14 attempts are overloaded
    local outage = "529|529|529|529|529|529|529|529|529|529|200"
    local p = { model = "claude-opus-4-1", max_tokens = 48, messages = ask.messages }
    local req, finish = claude:prepare(p)
    req.headers["x-mock-steps"], req.headers["x-mock-steps-sep"] = outage, "|"
    req.headers["x-mock-scenario"] = "opus-outage"
    calls[#calls + 1], finishers[#calls + 1] = req, finish
  elseif i % 2 == 0 then
    local req, finish = gpt:prepare { max_tokens = 48, messages = ask.messages }
    if i % 7 == 0 then -- a server error, retried
      req.headers["x-mock-steps"], req.headers["x-mock-steps-sep"] = "500|200", "|"
      req.headers["x-mock-scenario"] = "g" .. i
    end
    calls[#calls + 1], finishers[#calls + 1] = req, finish
  else
    local req, finish = claude:prepare(ask)
    if i % 9 == 1 then -- the slow tail
      req.headers["x-mock-steps"] = "200;delay=" .. (600 + (i * 37) % 900)
      req.headers["x-mock-scenario"] = "slow" .. i
    end
    calls[#calls + 1], finishers[#calls + 1] = req, finish
  end
end

---------------------------------------------------------------------------
-- Run
---------------------------------------------------------------------------

local started = sturdy.monotime()
if not live then
  mock("POST", "/_mock/reset")
  -- the provider's own limit, which sturdy is not told: it learns it from headers
  mock("POST", "/_mock/config", { rate_limit = { rpm = 2400, burst = 30 } })
end
print(("== sturdy demo: %d calls to %s%s"):format(#calls, live and "the Anthropic API" or "the bundled mock API",
  live and "" or " (Anthropic and OpenAI shapes)"))
local results = client:batch(calls, { concurrency = 48, progress = true })
local batch_time = sturdy.monotime() - started

local ok, failed_kinds, final_429 = 0, {}, 0
for i, r in ipairs(results) do
  if sturdy.is_error(r) then
    failed_kinds[r.kind] = (failed_kinds[r.kind] or 0) + 1
    if r.status == 429 then final_429 = final_429 + 1 end
  else
    local out, err = finishers[i](r)
    if out then ok = ok + 1 else failed_kinds[err.kind] = (failed_kinds[err.kind] or 0) + 1 end
  end
end

-- the model with the outage: its breaker let only probes through; a call every
-- quarter second shows when it is back
local outage_over
if not live then
  local t0 = sturdy.monotime()
  repeat
    local r = claude:messages { model = "claude-opus-4-1", max_tokens = 8,
                                messages = { { role = "user", content = "up?" } } }
    if r then outage_over = sturdy.monotime() - t0 else client:poll(0.25) end
  until outage_over or sturdy.monotime() - t0 > 10
end

-- one answer, streamed as it arrives; its first connection (a fresh one, so
-- libcurl cannot quietly retry it) drops before any byte
print("\n== streaming one answer (its first connection is dropped; sturdy retries it):")
io.write("   ")
local stream_client = sturdy.client { base_url = live and "https://api.anthropic.com" or mock_url,
                                      retry = { base = { transient = 0.05 } } }
local streamer = anthropic.new { client = stream_client, api_key = live or "sk-mock-demo",
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
print(("calls:        %d of %d succeeded%s"):format(ok, #calls,
  #failed > 0 and ("; failed: " .. table.concat(failed, ", ")) or ""))
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
  print(("              claude-opus-4-1 answered again %.1f s after the batch"):format(outage_over))
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
  local seen_429 = throttled_seen + final_429
  local sent = stats.attempts + stream_client:stats().attempts
  local agree = counters.requests == sent and counters.rate_limited == seen_429
  print(("mock:         received %d requests (sturdy sent %d attempts), answered %d with 429 (sturdy saw %d): %s")
    :format(counters.requests, sent, counters.rate_limited, seen_429, agree and "agree" or "DISAGREE"))
  mock("POST", "/_mock/config", { rate_limit = false })
  control:close()
  client:close()
  stream_client:close()
  os.exit(agree and 0 or 1)
end
client:close()
stream_client:close()
