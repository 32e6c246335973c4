-- A full run with logs (JSON lines on stderr, and a function logger),
-- metrics, spans and alerts, with a known API key and a known prompt, for
-- spec/telemetry_spec.lua to search everything it emitted for either.
-- usage: STURDY_MOCK_URL=... lua spec/support/telemetry_run.lua KEY PROMPT [bodies]
local anthropic = require "sturdy.anthropic"
local openai = require "sturdy.openai"
local sturdy = require "sturdy"
local metrics = require "sturdy.metrics"
local cjson = require "cjson"

local key, prompt, bodies = assert(arg[1]), assert(arg[2]), arg[3] == "bodies"
local base_url = assert(os.getenv("STURDY_MOCK_URL"))

-- Writes any value, tables deeply, once each.
local seen = {}
local function dump(v, depth)
  depth = depth or 0
  if type(v) == "table" then
    if seen[v] or depth > 12 then return end
    seen[v] = true
    local mt = getmetatable(v)
    if mt and mt.__tostring then io.write(tostring(v), "\n") end
    for k, x in pairs(v) do
      dump(k, depth + 1)
      dump(x, depth + 1)
    end
  elseif type(v) ~= "function" then
    io.write(tostring(v), "\n")
  end
end

local events, spans, fired = {}, {}, {}
local registry = metrics.registry()
local function client(headers)
  local c = sturdy.client {
    base_url = base_url, retry = { base = 0.01, attempts = 3 }, headers = headers,
    logger = "json", log_level = "debug", log_bodies = bodies,
    on_span_start = function(s) spans[#spans + 1] = s end, on_span_end = function(s) spans[#spans + 1] = s end,
    alerts = { { metric = "success_rate", below = 0.99, clear = 1, min_calls = 1 } },
    on_alert = function(a) fired[#fired + 1] = a end,
  }
  require("sturdy.log").attach(c, { logger = function(ev) events[#events + 1] = ev end, level = "debug" })
  registry:observe(c)
  return c
end

local function steps(s) return { ["x-mock-steps"] = s, ["x-mock-steps-sep"] = "|" } end
local ask = { max_tokens = 16, messages = { { role = "user", content = prompt } } }
local outputs = {}
-- the errors only: replies carry the answer, which echoes the prompt
local function keep(...)
  for i = 1, select("#", ...) do
    local v = select(i, ...)
    if sturdy.is_error(v) then outputs[#outputs + 1] = v end
    if type(v) == "table" and v.type == "error" and v.error then outputs[#outputs + 1] = v.error end
  end
end

local c = client()
local claude = anthropic.new { client = c, api_key = key, model = "claude-sonnet-4-5" }
local gpt = openai.new { client = c, api_key = key, model = "gpt-4o-mini" }
keep(claude:messages(ask))
keep(gpt:chat { messages = ask.messages })
-- failures of many kinds, one whose body echoes the request headers (a careless server)
for _, s in ipairs { "401", "429;retry-after=0|529|200", "500|500|500", "drop|200", "malformed",
                     "400;echo=1", "stream_error", "truncated" } do
  keep(claude:messages(ask, { headers = steps(s) }))
  keep(gpt:chat({ messages = ask.messages }, { headers = steps(s) }))
end
for _, s in ipairs { "200", "stream_error;after_delta=1;drip=20", "truncated" } do
  local iter, st = claude:stream(ask, { headers = steps(s) })
  for ev in iter do keep(ev) end
  keep(st:result())
end
-- a client with the key in its own headers, plain requests
local raw = client { ["x-api-key"] = key, authorization = "Bearer " .. key }
keep(raw:request { method = "POST", path = "/v1/messages", json = { model = "m", messages = ask.messages,
                                                                    metadata = { careless = key } } })
keep(raw:request { method = "POST", path = "/v1/messages", json = { model = "m", messages = ask.messages },
                   headers = steps("403;echo=1") })
io.write("== metrics\n", registry:render(), registry:render("openmetrics"))
io.write("== events\n")
for _, ev in ipairs(events) do io.write(cjson.encode(ev), "\n") end
io.write("== spans\n")
for _, s in ipairs(spans) do io.write(cjson.encode(s), "\n") end
io.write("== alerts\n")
for _, a in ipairs(fired) do io.write(cjson.encode(a), "\n") end
io.write("== health\n", cjson.encode(c:health()), cjson.encode(raw:health()), "\n")
io.write("== errors\n")
dump(outputs)
io.write(string.format("telemetry_run done: %d events, %d spans, %d alerts, %d errors\n", #events, #spans, #fired,
                       #outputs))
