-- Another process using the same Redis-backed cache, for spec/cache_redis_spec.lua:
-- makes one cached call and prints "<cache> <text>".
-- usage: STURDY_MOCK_URL=... lua spec/support/cache_peer.lua REDIS_PORT REDIS_PASSWORD API_KEY QUESTION
local anthropic = require "sturdy.anthropic"
local sturdy_cache = require "sturdy.cache"

local port, password, key, question = tonumber(arg[1]), arg[2], arg[3], arg[4]
local claude = anthropic.new { api_key = key, base_url = assert(os.getenv("STURDY_MOCK_URL")),
                               model = "claude-sonnet-4-5" }
local cache = sturdy_cache { backend = "redis", ttl = 60, stale_if_error = 60,
                             redis = { port = port, password = password, prefix = "spec:" } }
local r, err = cache:wrap(claude):messages { max_tokens = 64, temperature = 0,
                                              messages = { { role = "user", content = question } } }
if not r then
  print("error " .. tostring(err))
  os.exit(1)
end
print(r.cache .. " " .. r.text)
claude.client:close()
