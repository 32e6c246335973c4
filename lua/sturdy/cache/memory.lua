--- The memory backend of sturdy.cache: one process's entries in a hash table
-- threaded on a doubly linked list, most recently used first. get and set are
-- O(1): a lookup, an unlink and a push; eviction takes from the tail.
--
-- Stored values are strings (the cache's serialised entries). An entry is
-- kept until its `keep` time (the cache passes expiry + stale_if_error); past
-- it, get deletes it. Beyond max_entries or max_bytes (the bytes of keys and
-- values; Lua's own overhead per entry is not counted) the least recently
-- used entries go, and on_evict(key, label) hears of each one still live.
local memory = {}

local Memory = { __name = "sturdy.cache.memory" }
Memory.__index = Memory

local function unlink(n)
  n.prev.next = n.next
  n.next.prev = n.prev
end

local function push_front(head, n)
  local first = head.next
  n.prev, n.next = head, first
  first.prev = n
  head.next = n
end

--- opts: max_entries, max_bytes, on_evict(key, label) (all checked by the cache).
function memory.new(opts)
  local head = {}
  head.next, head.prev = head, head
  return setmetatable({
    map = {}, head = head, count = 0, bytes = 0,
    max_entries = opts.max_entries, max_bytes = opts.max_bytes, on_evict = opts.on_evict,
  }, Memory)
end

function Memory:_remove(n)
  unlink(n)
  self.map[n.key] = nil
  self.count = self.count - 1
  self.bytes = self.bytes - n.size
end

--- The value stored under key, or nil; a hit becomes the most recently used.
function Memory:get(key, now)
  local n = self.map[key]
  if n == nil then return nil end
  if now >= n.keep then
    self:_remove(n)
    return nil
  end
  local head = self.head
  if head.next ~= n then
    unlink(n)
    push_front(head, n)
  end
  return n.value
end

--- Stores value under key until keep (the cache's clock). An entry larger than
-- max_bytes by itself is not stored: nil, "too_large".
function Memory:set(key, value, now, keep, label)
  local size = #key + #value
  local n = self.map[key]
  if size > self.max_bytes then
    if n then self:_remove(n) end
    return nil, "too_large"
  end
  if n then
    unlink(n)
    self.bytes = self.bytes - n.size
  else
    n = { key = key }
    self.map[key] = n
    self.count = self.count + 1
  end
  n.value, n.size, n.keep, n.label = value, size, keep, label
  self.bytes = self.bytes + size
  push_front(self.head, n)
  while self.count > self.max_entries or self.bytes > self.max_bytes do
    local victim = self.head.prev
    self:_remove(victim)
    -- an entry past its keep time was dead already: that is expiry, not eviction
    if victim.keep > now and self.on_evict then self.on_evict(victim.key, victim.label) end
  end
  return true
end

function Memory:delete(key)
  local n = self.map[key]
  if n then self:_remove(n) end
  return true
end

--- Calls fn(key, value) for every entry (live or not yet collected).
function Memory:scan(fn)
  for key, n in pairs(self.map) do fn(key, n.value) end
  return true
end

function Memory:stats()
  return { entries = self.count, bytes = self.bytes }
end

return memory
