--- The ngx backend of sturdy.cache, for OpenResty: a per-worker L1
-- (lua-resty-lrucache) in front of an ngx.shared dictionary (L2, one per
-- nginx, shared by its workers), and a lock in that dictionary so that of
-- the workers missing the same key at once, one calls upstream while the
-- others wait and then read its answer (lua-resty-mlcache's scheme).
--
--   lua_shared_dict sturdy_cache 64m;     -- nginx.conf; `dict` names it
--   sturdy.cache { backend = "ngx", ngx = { dict = "sturdy_cache" } }
--
-- The dictionary evicts by LRU itself when full; L1 holds at most
-- max_entries per worker. The cache's clock for this backend is ngx.now().
local backend = {}

local Ngx = { __name = "sturdy.cache.ngx" }
Ngx.__index = Ngx

local LOCK_PREFIX = "lock:"
local LOCK_STEP = 0.005 -- seconds between tries for a held lock

--- opts: dict (name of the lua_shared_dict), max_entries (L1 size per
-- worker), lock_timeout (seconds a worker waits for another's upstream call;
-- also how long a lock outlives a worker that died holding it).
function backend.new(opts)
  local ngx = rawget(_G, "ngx")
  if not (ngx and ngx.shared) then
    return nil, "the ngx backend runs inside OpenResty (ngx.shared is missing)"
  end
  local dict = ngx.shared[opts.dict]
  if not dict then
    return nil, ("no lua_shared_dict named '%s' (declare it in nginx.conf)"):format(opts.dict)
  end
  local l1, err = require("resty.lrucache").new(opts.max_entries)
  if not l1 then return nil, "lrucache: " .. tostring(err) end
  return setmetatable({ ngx = ngx, dict = dict, l1 = l1, lock_timeout = opts.lock_timeout }, Ngx)
end

function Ngx:get(key, now)
  local held = self.l1:get(key)
  if held and held[2] > now then return held[1] end
  local value, err = self.dict:get(key)
  if value == nil then
    if err then return nil, err end
    return nil
  end
  -- L2 does not say how long the entry has left; L1 keeps it briefly
  self.l1:set(key, { value, now + 1 }, 1)
  return value
end

function Ngx:set(key, value, now, keep, _)
  local ttl = keep - now
  if ttl ~= ttl or ttl <= 0 then return true end
  local ok, err, forcible = self.dict:set(key, value, ttl)
  if not ok then return nil, err end
  self.l1:set(key, { value, keep }, ttl)
  return true, nil, forcible
end

function Ngx:delete(key)
  self.l1:delete(key)
  self.dict:delete(key)
  return true
end

--- Takes the cross-worker lock for key, waiting up to lock_timeout while
-- another worker holds it. Returns true when it had to wait (the holder has
-- likely stored the answer: read again), false when it got the lock at once,
-- or nil and an error (timed out: go on without it).
function Ngx:lock(key)
  local dict, ngx = self.dict, self.ngx
  local lock_key = LOCK_PREFIX .. key
  local ok, err = dict:add(lock_key, true, self.lock_timeout)
  if ok then return false end
  if err ~= "exists" then return nil, err end
  local waited = 0
  while waited < self.lock_timeout do
    ngx.sleep(LOCK_STEP)
    waited = waited + LOCK_STEP
    ok, err = dict:add(lock_key, true, self.lock_timeout)
    if ok then return true end
    if err ~= "exists" then return nil, err end
  end
  return nil, "timeout"
end

function Ngx:unlock(key)
  self.dict:delete(LOCK_PREFIX .. key)
end

--- Calls fn(key, value) for the entries of the dictionary (at most 1024
-- keys, as ngx.shared's get_keys does by default), locks excepted.
function Ngx:scan(fn)
  for _, k in ipairs(self.dict:get_keys()) do
    if k:sub(1, #LOCK_PREFIX) ~= LOCK_PREFIX then
      local v = self.dict:get(k)
      if v then fn(k, v) end
    end
  end
  return true
end

function Ngx:stats()
  return { free_bytes = self.dict.free_space and self.dict:free_space() or nil }
end

return backend
