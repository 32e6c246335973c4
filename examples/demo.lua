-- The main job: a run of Anthropic- and OpenAI-style calls against an API
-- that misbehaves the way real ones do (overload, rate limits, dropped
-- connections, slow replies), and a report of what sturdy did about it.
--
-- Against the bundled mock:  make demo
-- The mock's address comes from STURDY_MOCK_URL (set by spec/support/with_mock.lua).
local sturdy = require "sturdy"
local cjson = require "cjson"

local base_url = os.getenv("STURDY_MOCK_URL")
if not base_url then
  io.stderr:write("demo: STURDY_MOCK_URL is not set; run it with `make demo`\n")
  os.exit(2)
end

local retries_by_class = {}
local client = sturdy.client {
  base_url = base_url,
  timeout = { connect = 2, first_byte = 5, total = 20 },
  retry = { attempts = 4, base = { overloaded = 0.2, throttled = 0.2, transient = 0.05, timeout = 0.05 } },
  on_retry = function(info)
    retries_by_class[info.class] = (retries_by_class[info.class] or 0) + 1
  end,
}

-- Trouble injected by the mock, one script per call: a status sequence
-- consumed across retries (the last step repeats).
local TROUBLE = {
  "200", "200", "529|529|200", "200", "429;retry-after=1|200", "200", "drop|200",
  "200;delay=300", "503|200", "200", "500;should-retry=false", "200", "401", "200",
}

local function anthropic(i, script)
  return {
    method = "POST", path = "/v1/messages",
    headers = { ["x-mock-scenario"] = "demo-a" .. i, ["x-mock-steps"] = script, ["x-mock-steps-sep"] = "|",
                ["anthropic-version"] = "2023-06-01", ["x-api-key"] = "sk-demo-not-a-real-key" },
    json = { model = "claude-sonnet-4-5", max_tokens = 64,
             messages = { { role = "user", content = "Say something sturdy #" .. i } } },
  }
end

local function openai(i, script)
  return {
    method = "POST", path = "/v1/chat/completions",
    headers = { ["x-mock-scenario"] = "demo-o" .. i, ["x-mock-steps"] = script, ["x-mock-steps-sep"] = "|",
                ["authorization"] = "Bearer sk-demo-not-a-real-key" },
    json = { model = "gpt-4o-mini", messages = { { role = "user", content = "Say something sturdy #" .. i } } },
  }
end

local ok, failed, latencies = 0, {}, {}
local calls = {}
for i, script in ipairs(TROUBLE) do
  calls[#calls + 1] = anthropic(i, script)
  calls[#calls + 1] = openai(i, script)
end

for i, req in ipairs(calls) do
  local res, err = client:request(req)
  if res then
    ok = ok + 1
    latencies[#latencies + 1] = res.timings.total
    local doc = cjson.decode(res.body)
    local text = doc.content and doc.content[1].text or doc.choices[1].message.content
    io.write(("[%2d/%d] %-22s %d after %d attempt(s): %s\n"):format(
      i, #calls, req.path, res.status, #res.attempts, text:sub(1, 40)))
  else
    failed[#failed + 1] = err
    io.write(("[%2d/%d] %-22s %s\n"):format(i, #calls, req.path, tostring(err)))
  end
end

table.sort(latencies)
local function pct(p)
  if #latencies == 0 then return 0 end
  return latencies[math.max(1, math.ceil(p / 100 * #latencies))]
end

local stats = client:stats()
print()
print(("calls: %d  succeeded: %d  failed: %d"):format(#calls, ok, #failed))
local classes = {}
for class, n in pairs(retries_by_class) do classes[#classes + 1] = class .. "=" .. n end
table.sort(classes)
print(("retries: %d (%s)"):format(stats.retries, table.concat(classes, ", ")))
print(("attempts sent: %d over %d connection(s)"):format(stats.attempts, stats.connections))
print(("latency of successful calls: p50 %.3fs  p95 %.3fs  max %.3fs"):format(pct(50), pct(95), pct(100)))
for _, err in ipairs(failed) do
  print(("  not retried: %s (%s, class %s)"):format(err.kind, err.status or "-", err.class))
end
client:close()
