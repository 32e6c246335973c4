-- What a fallback chain costs on top of a provider call: client CPU per call
-- (os.clock: this process only; the mock runs in nginx) for the same
-- sequential calls made directly on the provider (the anchor, measured in the
-- same run), through a chain of three healthy targets, through the same chain
-- in the OpenAI shape (request and reply translated), and through an adaptive
-- chain re-ranking on every call. Medians over rounds.
--
--   STURDY_MOCK_URL=... lua bench/fallback.lua      (make bench-fallback starts the mock)
--
-- BENCH_ROUNDS (default 7) rounds of BENCH_N (default 2000) calls each.
local sturdy = require "sturdy"
local anthropic = require "sturdy.anthropic"
local openai = require "sturdy.openai"
local fallback = require "sturdy.fallback"

local ROUNDS = tonumber(os.getenv("BENCH_ROUNDS")) or 7
local N = tonumber(os.getenv("BENCH_N")) or 2000
local url = assert(os.getenv("STURDY_MOCK_URL"), "run it under the mock: make bench-fallback")

local function median(xs)
  table.sort(xs)
  local n = #xs
  if n % 2 == 1 then return xs[(n + 1) / 2] end
  return (xs[n / 2] + xs[n / 2 + 1]) / 2
end

local client = sturdy.client { base_url = url }
local sonnet = anthropic.new { client = client, api_key = "sk-bench", model = "claude-sonnet-4-5" }
local haiku = anthropic.new { client = client, api_key = "sk-bench", model = "claude-haiku-4-5" }
local gpt = openai.new { client = client, api_key = "sk-bench", model = "gpt-4o-mini" }
local chain = fallback { targets = { sonnet, haiku, gpt } }
local adaptive = fallback { targets = { sonnet, haiku, gpt }, order = "adaptive", rerank_every = 1e-9 }

local ask = { max_tokens = 32, system = "Be brief.", messages = { { role = "user", content = "How are you today?" } } }
local ask_openai = { max_completion_tokens = 32, messages = { { role = "system", content = "Be brief." },
                                                             { role = "user", content = "How are you today?" } } }

local variants = {
  { "provider:messages (anchor)", function() return sonnet:messages(ask) end },
  { "chain:messages", function() return chain:messages(ask) end },
  { "chain:chat (translated)", function() return chain:chat(ask_openai) end },
  { "adaptive, ranked every call", function() return adaptive:messages(ask) end },
}

local function round(fn)
  collectgarbage("collect")
  local c0, w0 = os.clock(), sturdy.monotime()
  for _ = 1, N do assert(fn()) end
  return (os.clock() - c0) / N, (sturdy.monotime() - w0) / N
end

print(("sturdy.fallback: %s, %d rounds of %d sequential calls, medians"):format(
  _VERSION .. (rawget(_G, "jit") and " / " .. jit.version or ""), ROUNDS, N))
for _, v in ipairs(variants) do round(v[2]) end -- warm: connections, learned limits, JIT
local cpu, wall = {}, {}
for r = 1, ROUNDS do
  for i, v in ipairs(variants) do -- interleaved, so drift hits every variant alike
    cpu[i], wall[i] = cpu[i] or {}, wall[i] or {}
    cpu[i][r], wall[i][r] = round(v[2])
  end
end
print(("%-30s %14s %10s %14s %10s"):format("", "CPU us/call", "ratio", "wall us/call", "ratio"))
local c1, w1 = median(cpu[1]), median(wall[1])
for i, v in ipairs(variants) do
  local c, w = median(cpu[i]), median(wall[i])
  print(("%-30s %14.1f %10.2f %14.1f %10.2f"):format(v[1], c * 1e6, c / c1, w * 1e6, w / w1))
end
client:close()
