-- The memory backend of sturdy.cache: what a hit costs, and whether a lookup
-- stays flat from 1e3 to 1e6 entries. Every figure is a median over rounds and
-- is printed beside its anchor, a bare Lua table lookup measured in the same
-- run on a table of the same size with the same keys in the same order.
--
--   STURDY_MOCK_URL=... lua bench/cache.lua      (make bench-cache starts the mock)
--
-- BENCH_ROUNDS (default 7) rounds; BENCH_CACHE_MAX (default 1e6) largest size.
local policy = require "sturdy.policy"
local memory = require "sturdy.cache.memory"
local sturdy_cache = require "sturdy.cache"
local anthropic = require "sturdy.anthropic"

local ROUNDS = tonumber(os.getenv("BENCH_ROUNDS")) or 7
local MAX = tonumber(os.getenv("BENCH_CACHE_MAX")) or 1e6
local LOOKUPS = 200000 -- per round
local clock = os.clock  -- CPU seconds: the cost, whatever else shares the core

local function median(xs)
  table.sort(xs)
  local n = #xs
  if n % 2 == 1 then return xs[(n + 1) / 2] end
  return (xs[n / 2] + xs[n / 2 + 1]) / 2
end

-- Median seconds per operation of fn(n) doing n operations.
local function measure(fn, n)
  local per = {}
  for r = 1, ROUNDS do
    collectgarbage("collect")
    local t0 = clock()
    fn(n)
    per[r] = (clock() - t0) / n
  end
  return median(per)
end

-- A fixed pseudo-random order of existing keys (xorshift; the same every run).
local function lookup_order(keys, count)
  local order, x = {}, 2463534242
  local n = #keys
  for i = 1, count do
    x = (x * 1103515245 + 12345) % 2147483648
    order[i] = keys[x % n + 1]
  end
  return order
end

local VALUE = string.rep("v", 700) -- about one stored reply

local function lookups_at(size)
  local keys, bare = {}, {}
  local backend = memory.new { max_entries = size, max_bytes = 1e12 }
  for i = 1, size do
    local k = policy.sha256(tostring(i))
    keys[i] = k
    bare[k] = VALUE
    backend:set(k, VALUE, 0, 1e18)
  end
  local order = lookup_order(keys, LOOKUPS)
  local sink
  local anchor = measure(function(n)
    for i = 1, n do sink = bare[order[i]] end
  end, LOOKUPS)
  local got = measure(function(n)
    for i = 1, n do sink = backend:get(order[i], 1) end
  end, LOOKUPS)
  assert(sink == VALUE)
  return anchor, got
end

local function main()
  print(("sturdy.cache memory backend: %s, %d rounds, medians"):format(_VERSION .. (jit and " / " .. jit.version or ""),
                                                                       ROUNDS))
  print("")
  print("lookup (backend:get: hash lookup + move to the front of the LRU list) against entry count")
  print(("%10s %14s %14s %10s %12s"):format("entries", "bare t[k] ns", "get ns", "get/bare", "get/get@1e3"))
  local first
  local size = 1e3
  while size <= MAX do
    local anchor, got = lookups_at(size)
    first = first or got
    print(("%10d %14.1f %14.1f %10.2f %12.2f"):format(size, anchor * 1e9, got * 1e9, got / anchor, got / first))
    size = size * 10
    collectgarbage("collect")
  end

  -- a whole hit through cache:wrap: canonical key, SHA-256, backend get,
  -- decoding the stored reply into the caller's own tables
  local url = assert(os.getenv("STURDY_MOCK_URL"), "run under spec/support/with_mock.lua (make bench-cache)")
  local claude = anthropic.new { api_key = "sk-bench", base_url = url, model = "claude-sonnet-4-5" }
  local cache = sturdy_cache { max_entries = 1e5 }
  local cached = cache:wrap(claude)
  local params = { max_tokens = 256, temperature = 0, system = "You are terse.",
                   messages = { { role = "user", content = "What is the capital of France? Answer in one word." } } }
  assert(assert(cached:messages(params)).cache == "miss")
  local keys_table = { [policy.sha256("x")] = VALUE }
  local hk = policy.sha256("x")
  local sink
  local anchor = measure(function(n) for _ = 1, n do sink = keys_table[hk] end end, 1e6)
  local key_cost = measure(function(n)
    for _ = 1, n do sink = policy.sha256(sturdy_cache.canonical(params)) end
  end, 20000)
  local hit = measure(function(n)
    for _ = 1, n do sink = cached:messages(params) end
  end, 20000)
  assert(sink.cache == "hit")
  print("")
  print("a hit through cached:messages (a 700-byte stored reply)")
  print(("%-44s %10.3f us"):format("bare table lookup (anchor)", anchor * 1e6))
  print(("%-44s %10.2f us   %8.0f x anchor"):format("key: canonical request + SHA-256", key_cost * 1e6,
                                                     key_cost / anchor))
  print(("%-44s %10.2f us   %8.0f x anchor"):format("whole hit", hit * 1e6, hit / anchor))
  claude.client:close()
end

main()
