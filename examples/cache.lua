-- A cache in front of a provider: the second identical call is answered
-- without a request, and when the provider fails after the entry expired,
-- the expired answer is served, marked stale.
--   STURDY_MOCK_URL=http://127.0.0.1:PORT lua examples/cache.lua
local anthropic = require "sturdy.anthropic"
local sturdy_cache = require "sturdy.cache"

local claude = anthropic.new {
  api_key = os.getenv("ANTHROPIC_API_KEY") or "sk-mock",
  base_url = os.getenv("STURDY_MOCK_URL") or "https://api.anthropic.com",
  model = "claude-sonnet-4-5",
  client_options = { retry = { attempts = 2, base = 0.05 } },
}

-- a clock we can move, to skip past the ttl without waiting for it
local now = 0
local cache = sturdy_cache { ttl = 3600, stale_if_error = 86400, clock = function() return now end }
local cached = cache:wrap(claude)

local question = { max_tokens = 64, temperature = 0, messages = { { role = "user", content = "Name a prime." } } }

local r1 = assert(cached:messages(question))
local r2 = assert(cached:messages(question))
print(("first: %s (%s), second: %s (%s, cost %g)"):format(r1.cache, r1.text, r2.cache, r2.text, r2.cost))

now = now + 2 * 3600 -- two hours on: expired, but within stale_if_error
-- the mock fails this call (529 overloaded) through its step header
local r3 = assert(cached:messages(question, { headers = { ["x-mock-steps"] = "529" } }))
print(("two hours later, the provider down: %s (%s) because %s"):format(r3.cache, r3.text, r3.stale_error.kind))

local s = cache:stats()
print(("hits %d, misses %d, stale %d"):format(s.hits, s.misses, s.stale))
claude.client:close()
