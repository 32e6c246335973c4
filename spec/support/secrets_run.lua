-- A full run of everything sturdy can emit (replies, errors of every kind,
-- hooks, events, stats, tostring of each object), written to stdout as text,
-- for spec/secrets_spec.lua to search for the API key.
-- usage: STURDY_MOCK_URL=... lua spec/support/secrets_run.lua KEY
local anthropic = require "sturdy.anthropic"
local openai = require "sturdy.openai"

local key = assert(arg[1], "usage: secrets_run.lua KEY")
local base_url = assert(os.getenv("STURDY_MOCK_URL"))

-- Writes any value, tables deeply (metatables' __tostring too), once each.
local seen = {}
local function dump(v, depth)
  depth = depth or 0
  local t = type(v)
  if t == "table" then
    if seen[v] or depth > 12 then return end
    seen[v] = true
    local mt = getmetatable(v)
    if mt and mt.__tostring then io.write(tostring(v), "\n") end
    for k, x in pairs(v) do
      dump(k, depth + 1)
      dump(x, depth + 1)
    end
  elseif t == "string" or t == "number" or t == "boolean" then
    io.write(tostring(v), "\n")
  elseif t == "userdata" then
    io.write(tostring(v), "\n")
  end
end

local events = {}
local function hook(x) events[#events + 1] = x end
local options = {
  retry = { base = 0.01, attempts = 3 }, on_retry = hook, on_event = hook,
  on_error = function(e) hook(e) end,
}
local function steps(s) return { ["x-mock-steps"] = s, ["x-mock-steps-sep"] = "|" } end

local claude = anthropic.new { api_key = key, base_url = base_url, model = "claude-sonnet-4-5",
                               client_options = options, max_tokens_cap = 1000, max_input_chars = 10000 }
local gpt = openai.new { api_key = key, base_url = base_url, model = "gpt-4o-mini", client_options = options }
local ask = { max_tokens = 16, messages = { { role = "user", content = "hello" } } }

local outputs = { claude, gpt, claude.client, gpt.client }
local function keep(...) for i = 1, select("#", ...) do outputs[#outputs + 1] = (select(i, ...)) end end

keep(claude:messages(ask))
keep(gpt:chat { messages = ask.messages })
for _, s in ipairs { "401", "403", "429;retry-after=3600", "529|529|529", "500", "drop|drop|drop", "malformed",
                     "html", "400" } do
  local c = anthropic.new { api_key = key, base_url = base_url, model = "claude-sonnet-4-5",
                            client_options = { retry = { base = 0.01, attempts = 3 }, headers = steps(s),
                                               on_retry = hook, on_event = hook } }
  keep(c:messages(ask))
  local o = openai.new { api_key = key, base_url = base_url, model = "gpt-4o-mini",
                         client_options = { retry = { base = 0.01, attempts = 3 }, headers = steps(s) } }
  keep(o:chat { messages = ask.messages })
  keep(c.client:stats(), c.client:stats(c.client:stats().keys[1] or ""))
end
for _, s in ipairs { "stream_error", "stream_error;after_delta=1;drip=50", "truncated", "200" } do
  local c = anthropic.new { api_key = key, base_url = base_url, model = "claude-sonnet-4-5",
                            client_options = { retry = { base = 0.01 }, headers = steps(s) } }
  local iter, st = c:stream(ask)
  for ev in iter do keep(ev) end
  keep(st, st:result())
  local o = openai.new { api_key = key, base_url = base_url, model = "gpt-4o-mini",
                         client_options = { retry = { base = 0.01 }, headers = steps(s) } }
  local _, ost = o:stream { messages = ask.messages }
  keep(ost:result())
end
keep(claude:messages { max_tokens = 5000, messages = ask.messages })            -- the input guard
keep(claude:messages { max_tokens = 5, messages = { { role = "user", content = string.rep("x", 20000) } } })
local h = claude.client:submit({ path = "/echo", headers = steps("200;delay=200") }, function() error("boom") end)
keep(h)
h:cancel()
keep(claude.client:run(), h:result())
local b = claude.client:batch({ { path = "/echo" }, { path = "/echo", headers = steps("404") } })
keep(b)
keep(claude.client:stats(), gpt.client:stats())
for _, k in ipairs(claude.client:stats().keys) do keep(claude.client:stats(k)) end
-- a failing hook's message goes to stderr
local bad = anthropic.new { api_key = key, base_url = base_url, model = "m",
                            client_options = { retry = { base = 0.01 }, headers = steps("529|200"),
                                               on_retry = function() error("hook failed") end } }
keep(bad:messages(ask))
keep(events)
dump(outputs)
io.write("secrets_run done\n")
