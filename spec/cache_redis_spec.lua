-- The redis backend of sturdy.cache against a real redis-server on loopback
-- (started and stopped here) and the mock API: two processes share entries,
-- entries carry a TTL, the API key and the Redis password stay out of Redis,
-- and a Redis that is down never fails a call.
local anthropic = require "sturdy.anthropic"
local sturdy_cache = require "sturdy.cache"
local sturdy_redis = require "sturdy.redis"
local mock = require "spec.support.mock"
local redis_server = require "spec.support.redis"

local KEY = "sk-ant-redis-secret-0a1b2c3d4e"
local PASSWORD = "redis-pw-7f6e5d4c"

local function ask(text)
  return { max_tokens = 64, temperature = 0, messages = { { role = "user", content = text } } }
end

describe("sturdy.cache with the redis backend", function()
  local m, rs, claude

  setup(function()
    m = assert(mock.start())
    rs = assert(redis_server.start { password = PASSWORD })
  end)
  teardown(function()
    if rs then rs:stop() end
    m:stop()
  end)
  before_each(function()
    m:reset()
    claude = anthropic.new { api_key = KEY, base_url = m.http_url, model = "claude-sonnet-4-5" }
  end)
  after_each(function() claude.client:close() end)

  local function redis_cache(extra)
    local opts = { backend = "redis", ttl = 60, stale_if_error = 60,
                   redis = { port = rs.port, password = PASSWORD, prefix = "spec:" } }
    for k, v in pairs(extra or {}) do opts[k] = v end
    return sturdy_cache(opts)
  end

  -- runs spec/support/cache_peer.lua in another Lua process; returns its line
  local function peer(question)
    local lua = arg and arg[-1] or "lua"
    local cmd = ("STURDY_MOCK_URL=%s LUA_PATH=%q LUA_CPATH=%q %s spec/support/cache_peer.lua %d %s %s %q 2>&1"):format(
      m.http_url, package.path, package.cpath, lua, rs.port, PASSWORD, KEY, question)
    local p = io.popen(cmd)
    local out = p:read("*a")
    p:close()
    return (out:gsub("%s+$", ""))
  end

  it("shares entries between processes: one stores, the other hits", function()
    assert.equal("miss Echo: from the peer", peer("from the peer"))
    assert.equal(1, m:counters().requests)
    local cached = redis_cache():wrap(claude)
    local r = assert(cached:messages(ask("from the peer")))
    assert.equal("hit", r.cache)
    assert.equal("Echo: from the peer", r.text)
    assert.equal(1, m:counters().requests)
    -- and the other way round
    assert.equal("miss", assert(cached:messages(ask("from the spec"))).cache)
    assert.equal("hit Echo: from the spec", peer("from the spec"))
    assert.equal(2, m:counters().requests)
  end)

  it("stores each entry with a time to live that ends with its stale window", function()
    local cache = redis_cache { ttl = 30, stale_if_error = 15 }
    assert(cache:wrap(claude):messages(ask("with a ttl")))
    local conn = assert(sturdy_redis.connect(sturdy_redis.settings { port = rs.port, password = PASSWORD }))
    local keys = conn:keys("spec:cache:*")
    assert.is_true(#keys >= 1)
    local found = false
    for _, k in ipairs(keys) do
      local v = conn:get(k)
      if v:find("Echo: with a ttl", 1, true) then
        found = true
        local pttl = conn:pttl(k)
        assert.is_true(pttl > 44000 and pttl <= 45000, "pttl " .. pttl)
      end
    end
    assert.is_true(found)
    conn:quit()
  end)

  it("keeps the API key and the Redis password out of Redis and of the cache object", function()
    local cache = redis_cache()
    local cached = cache:wrap(claude)
    assert(cached:messages(ask("secret keeping")))
    for _ in cached:stream(ask("secret streaming")) do end
    local stored = {}
    assert(cache:scan(function(k, v) stored[#stored + 1] = k .. "\n" .. v end))
    local all = table.concat(stored, "\n")
    assert.matches("Echo: secret keeping", all, 1, true)
    assert.matches("Echo: secret streaming", all, 1, true)
    assert.is_nil(all:find(KEY, 1, true))
    assert.is_nil(all:find(KEY:sub(8), 1, true))
    assert.is_nil(all:find(PASSWORD, 1, true))
    -- nothing reachable from the cache object holds the password
    local seen = {}
    local function search(v)
      if type(v) == "string" then
        assert.is_nil(v:find(PASSWORD, 1, true))
      elseif type(v) == "table" and not seen[v] then
        seen[v] = true
        for k, x in pairs(v) do
          search(k)
          search(x)
        end
      end
    end
    search(cache)
    assert.is_nil(tostring(cache):find(PASSWORD, 1, true))
  end)

  it("serves a stale entry from Redis when the upstream fails", function()
    local t = 1e9
    local cache = redis_cache { ttl = 10, stale_if_error = 100, clock = function() return t end }
    local cached = cache:wrap(claude)
    assert(cached:messages(ask("stale from redis")))
    t = t + 30
    local r = assert(cached:messages(ask("stale from redis"), { headers = mock.steps("rs1", "400") }))
    assert.equal("stale", r.cache)
    assert.equal("bad_request", r.stale_error.kind)
  end)

  it("never fails a call when Redis is down or refuses the password", function()
    local closed = redis_server.start()
    local port = closed.port
    closed:stop()
    for _, settings in ipairs {
      { port = port, prefix = "spec:" },
      { port = rs.port, password = "wrong", prefix = "spec:" },
    } do
      m:reset()
      local cache = sturdy_cache { backend = "redis", redis = settings }
      local cached = cache:wrap(claude)
      assert.equal("miss", assert(cached:messages(ask("no redis"))).cache)
      assert.equal("miss", assert(cached:messages(ask("no redis"))).cache)
      assert.equal(2, m:counters().requests)
      assert.is_true(cache:stats().errors >= 2)
    end
  end)

  it("checks the connection settings", function()
    assert.has_error(function() sturdy_redis.settings { port = 0 } end,
      "sturdy: option 'port' in redis settings must be a whole number from 1 to 65535")
    assert.has_error(function() sturdy_redis.settings { db = -1 } end,
      "sturdy: option 'db' in redis settings must be a whole number >= 0")
    assert.has_error(function() sturdy_redis.settings { timeout = 0 / 0 } end,
      "sturdy: option 'timeout' in redis settings must be a positive number of seconds")
    assert.has_error(function() sturdy_redis.settings { host = "a b" } end,
      "sturdy: option 'host' in redis settings is not a host name")
    assert.has_error(function() sturdy_redis.settings { password = 5 } end,
      "sturdy: option 'password' in redis settings must be a string, got number")
    local s = sturdy_redis.settings { password = PASSWORD, db = 2 }
    assert.same({ host = "127.0.0.1", port = 6379, db = 2, timeout = 1, prefix = "sturdy:" }, s)
  end)
end)
