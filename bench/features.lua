-- What adaptive concurrency, spend caps and hedging cost per call: the CPU
-- (user + system, os.clock) of sequential provider calls against the mock,
-- with each feature off and on, as medians over rounds. The anchor is the
-- same call with every feature off, measured in the same rounds (each round
-- runs every configuration in turn), so the ratios compare like with like.
--
--   STURDY_MOCK_URL=... lua bench/features.lua      (make bench-features starts the mock)
--
-- BENCH_ROUNDS (default 7) rounds; BENCH_N (default 400) calls per round and
-- configuration (a tenth of that for the configurations whose calls wait on a
-- slow server).
local sturdy = require "sturdy"
local anthropic = require "sturdy.anthropic"

local ROUNDS = tonumber(os.getenv("BENCH_ROUNDS")) or 7
local N = tonumber(os.getenv("BENCH_N")) or 400
local URL = assert(os.getenv("STURDY_MOCK_URL"), "run under spec/support/with_mock.lua (make bench-features)")
local clock = os.clock

local PARAMS = { max_tokens = 256, system = "You are terse.",
                 messages = { { role = "user", content = "What is the capital of France? Answer in one word." } } }

-- limits=0: no rate-limit headers, so the learned limiter does not pace sequential calls
local FAST = "200;limits=0"
local SLOW = "200;delay=20;limits=0"

local function median(xs)
  local s = {}
  for i, v in ipairs(xs) do s[i] = v end
  table.sort(s)
  local n = #s
  if n % 2 == 1 then return s[(n + 1) / 2] end
  return (s[n / 2] + s[n / 2 + 1]) / 2
end

-- name, anchor (the configuration it is compared with), steps, provider and client options, call options
local CONFIGS = {
  { name = "off (anchor)", steps = FAST },
  { name = "adaptive concurrency", anchor = 1, steps = FAST, client = { limits = { concurrency = "adaptive" } } },
  { name = "spend caps: client", anchor = 1, steps = FAST, client = { budget = { usd_per_day = 1e6 } } },
  { name = "spend caps: client, key, tag", anchor = 1, steps = FAST,
    client = { budget = { usd_per_day = 1e6, tags = { ["*"] = { usd_per_hour = 1e5 } } } }, call = { tag = "acme" },
    key_cap = true },
  { name = "hedging on, not needed", anchor = 1, steps = FAST, provider = { hedge = { after = 10, max_ratio = 1 } } },
  { name = "off, slow server (anchor)", steps = SLOW, slow = true },
  { name = "hedging on, every call hedged", anchor = 6, steps = SLOW, slow = true,
    provider = { hedge = { after = 0.002, max_ratio = 1 } } },
}

local function reset()
  local c = sturdy.client { base_url = URL }
  assert(c:request { method = "POST", path = "/_mock/reset" })
  c:close()
end

local function setup(cfg)
  local copts = { headers = { ["x-mock-steps"] = cfg.steps } }
  for k, v in pairs(cfg.client or {}) do copts[k] = v end
  local popts = { api_key = "sk-bench", base_url = URL, model = "claude-sonnet-4-5", client_options = copts }
  for k, v in pairs(cfg.provider or {}) do popts[k] = v end
  local p = anthropic.new(popts)
  if cfg.key_cap then
    -- a key cap too: the provider's key gets one (budget keys are named up front)
    local key = p.client:key_for(p:_request(PARAMS))
    p.client:close()
    copts.budget.keys = { [key] = { usd_per_hour = 1e5 } }
    p = anthropic.new(popts)
  end
  assert(p:messages(PARAMS, cfg.call)) -- connection and first-use costs out of the way
  return p
end

local function main()
  print(("sturdy features: CPU per sequential provider call, %s, %d rounds x %d calls, medians")
        :format(_VERSION .. (jit and " / " .. jit.version or ""), ROUNDS, N))
  local providers, per, hedged = {}, {}, {}
  for i, cfg in ipairs(CONFIGS) do
    providers[i] = setup(cfg)
    per[i], hedged[i] = {}, 0
  end
  for r = 1, ROUNDS do
    for i, cfg in ipairs(CONFIGS) do
      reset()
      local p, n = providers[i], cfg.slow and math.max(1, math.floor(N / 10)) or N
      collectgarbage("collect")
      local c0 = clock()
      for _ = 1, n do
        local res = assert(p:messages(PARAMS, cfg.call))
        if res.hedged then hedged[i] = hedged[i] + 1 end
      end
      per[i][r] = (clock() - c0) / n
    end
  end
  print("")
  print(("%-34s %12s %10s %10s"):format("configuration", "CPU us/call", "x anchor", "hedged"))
  for i, cfg in ipairs(CONFIGS) do
    local m = median(per[i])
    local ratio = cfg.anchor and ("%10.2f"):format(m / median(per[cfg.anchor])) or ("%10s"):format("1.00")
    local calls = ROUNDS * (cfg.slow and math.max(1, math.floor(N / 10)) or N)
    print(("%-34s %12.1f %s %9.0f%%"):format(cfg.name, m * 1e6, ratio, 100 * hedged[i] / calls))
    providers[i].client:close()
  end
end

main()
