--- The redis backend of sturdy.cache, for scripts (lua-redis over luasocket):
-- entries shared by every process that uses the same Redis, each stored with
-- a time to live (SET key value PX ms) that ends with its stale window. Redis
-- owns eviction: give it a `maxmemory` and `maxmemory-policy allkeys-lru`
-- (or volatile-lru) and it drops the least recently used entries itself; the
-- cache's max_entries and max_bytes do not apply here.
--
-- A failing Redis never fails a call: an operation that fails returns nil and
-- the error (the cache then calls upstream), the connection is dropped, and
-- no new one is tried for a second.
local redis_settings = require "sturdy.redis"
local monotime = require("sturdy.policy").monotime

local backend = {}

local Redis = { __name = "sturdy.cache.redis" }
Redis.__index = Redis

local RECONNECT_AFTER = 1 -- seconds without trying after a failure
local MAX_PX = 2 ^ 50     -- far beyond any ttl, and exact as an integer

--- settings: checked by sturdy.redis.settings.
function backend.new(settings)
  return setmetatable({ settings = settings, prefix = settings.prefix .. "cache:" }, Redis)
end

-- Runs fn(conn) on a live connection: its result, or nil and an error.
function Redis:_with(fn)
  local conn = self.conn
  if not conn then
    if self.down_until and monotime() < self.down_until then return nil, self.down_err end
    local err
    conn, err = redis_settings.connect(self.settings)
    if not conn then
      self.down_until, self.down_err = monotime() + RECONNECT_AFTER, err
      return nil, err
    end
    self.conn = conn
  end
  local ok, res = pcall(fn, conn)
  if ok then return res end
  self.conn = nil
  pcall(conn.quit, conn)
  self.down_until, self.down_err = monotime() + RECONNECT_AFTER, redis_settings.message(res)
  return nil, self.down_err
end

function Redis:get(key)
  local value, err = self:_with(function(conn) return conn:get(self.prefix .. key) or false end)
  if value == nil then return nil, err end
  return value or nil
end

--- Stores value until keep (seconds on the cache's clock, which for this
-- backend is wall-clock time shared by every process).
function Redis:set(key, value, now, keep)
  local px = (keep - now) * 1000
  if px ~= px or px < 1 then return true end -- already past its keep time (or NaN)
  px = math.floor(math.min(px, MAX_PX))
  local ok, err = self:_with(function(conn) return conn:set(self.prefix .. key, value, "PX", px) end)
  if ok == nil then return nil, err end
  return true
end

function Redis:delete(key)
  local ok, err = self:_with(function(conn) return conn:del(self.prefix .. key) end)
  if ok == nil then return nil, err end
  return true
end

--- Calls fn(key, value) for every entry under this prefix (SCAN, then GET).
function Redis:scan(fn)
  local prefix = self.prefix
  local pattern = prefix:gsub("[%*%?%[%]\\]", "\\%0") .. "*"
  return self:_with(function(conn)
    local cursor = "0"
    repeat
      local reply = conn:scan(cursor, { match = pattern, count = 500 })
      cursor = reply[1]
      for _, k in ipairs(reply[2]) do
        local v = conn:get(k)
        if v then fn(k:sub(#prefix + 1), v) end
      end
    until cursor == "0"
    return true
  end)
end

function Redis:close()
  if self.conn then pcall(self.conn.quit, self.conn) end
  self.conn = nil
end

return backend
