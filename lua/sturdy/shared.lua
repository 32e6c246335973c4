--- Limits and breakers shared by many processes through Redis: the fleet
-- scope of a client (`sturdy.client{ shared = {...} }`).
--
-- A client's upstream keys normally keep their limiter and breaker in the
-- process. With `shared`, every process that names the same Redis and prefix
-- paces to one quota and sees one breaker:
--
-- - **Rate limits**: one GCRA per key and dimension in Redis, run by an
--   atomic script on one key (time from Redis's own clock, so hosts' clocks do
--   not matter). Each attempt reserves its place before it starts and waits
--   for it (reserve, then wait); a call whose place would come later than it
--   may wait (honor_retry_after, its deadline) is refused without taking one.
--   Token estimates (input + max_tokens) are reserved with it, and the real
--   usage charges or refunds the difference. Limits come from `limits` (the
--   fleet's quota) and from rate-limit headers: what one process learns is
--   written to Redis for all.
-- - **Breakers**: each process adds its calls, failures and slow calls to a
--   window in Redis and reads the fleet's totals back (at most `sync` seconds
--   apart); the core judges them as its own window. An open breaker is written
--   as a key with a time to live, so every process opens until the same end;
--   when it ends, one process probes (a claim with a time to live) while the
--   others wait for its verdict.
-- - **Redis away**: no call fails for it. Each key paces to limit / processes
--   in the process, an event `{ type = "shared", state = "local" }` says so,
--   and Redis is tried again with backoff; `state = "redis"` when it is back.
--   While Redis answers, only Redis decides a shared quota.
--
-- The decisions stay in the C core: this module asks Redis where a call's place
-- is and hands the answer (a wait, an open-until, the fleet's window, a share)
-- to the engine, which admits, queues or refuses as with its own limiter.
-- @module sturdy.shared
local redis = require "sturdy.redis"
local policy = require "sturdy.policy"

local shared = {}

--- The monotonic clock (seconds) every scope keeps time by (leases, breaker
-- syncs, the local share while Redis is away); specs put a virtual one here.
shared.clock = policy.monotime
local function monotime() return shared.clock() end
local floor, ceil, max, min, huge = math.floor, math.ceil, math.max, math.min, math.huge
local type, tonumber, tostring, pairs, ipairs = type, tonumber, tostring, pairs, ipairs
local format = string.format

local DIMS = { "requests", "input_tokens", "output_tokens", "tokens" }
local DIM_INDEX = { requests = 1, input_tokens = 2, output_tokens = 3, tokens = 4 }
local LIMIT_TTL_MS = 24 * 3600 * 1000 -- learned limits outlive any idle night
local STALE_PERMIT = 1                 -- s: a leased permit this far past its place is dropped

-- == Scripts (Redis runs them atomically, Lua 5.1 inside Redis) ==========

-- Shared by the limiter scripts: the effective limit of dimension d from the
-- configured one (ARGV) and the learned one (the hash), and its GCRA figures.
local GCRA_PRELUDE = [[
local function now_us(at)
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000000 + tonumber(t[2]) + (at or 0)
end
local function effective(conf, learned)
  conf, learned = tonumber(conf) or 0, tonumber(learned) or 0
  if conf > 0 and learned > 0 then return math.min(conf, learned) end
  return math.max(conf, learned, 0)
end
local function gcra(limit, burst_s)
  local T = 60e6 / limit
  local B = math.max(1, burst_s * limit / 60)
  return T, B, math.ceil(B * T)
end
-- A dimension Redis holds no TAT for (a new key, a restarted Redis) starts
-- with nothing left: nobody knows how much of the provider's bucket is.
local function tat_of(v, now, tau)
  return math.max(tonumber(v) or (now + tau), now)
end
]]

-- KEYS[1] the key's limiter hash: t1..t4 the TAT of each dimension (µs of
-- Redis time), l1..l4 the learned limits (per minute).
-- ARGV: max_wait_us, at_us (the attempt's start from now), burst_s, lease,
-- conf1..4, cost1..4, extra (requests sent before a limit was known, to charge;
-- < 0: leased permits not used, to give back), ttl_ms.
-- Reserve-then-wait: the place passes every limited dimension once its wait
-- is over; it is taken only when that wait is within max_wait_us.
-- Returns { limited, remaining, retry_after_us, reset_after_us, granted,
-- first_us, interval_us, limit1..4 }: remaining requests at the place, the
-- wait (when limited: the wait it would have been), the time until every
-- dimension is clear again, permits granted (a lease; 1 without), the first
-- permit's place and the interval between permits (µs, may be < 0: at once).
shared.LIMIT = redis.script(GCRA_PRELUDE .. [[
local key = KEYS[1]
local max_wait, at, burst_s, lease = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local now = now_us(at)
local f = redis.call('HMGET', key, 't1', 't2', 't3', 't4', 'l1', 'l2', 'l3', 'l4')
local limits, g = {}, {}
local wait, tokens = 0, false
for d = 1, 4 do
  local lim = effective(ARGV[4 + d], f[4 + d])
  limits[d] = tostring(lim)
  if lim > 0 then
    local T, B, tau = gcra(lim, burst_s)
    local base = tat_of(f[d], now, tau)
    local cost = tonumber(ARGV[8 + d]) or 0
    if d == 1 then
      -- requests sent before a limit was known are charged; unused leased
      -- permits are given back (never beyond a full bucket: no debt)
      local extra = tonumber(ARGV[13]) or 0
      if extra >= 0 then
        base = base + math.ceil(extra * T)
      else
        base = math.max(now, base - math.ceil(-extra * T))
      end
    elseif cost > 0 then
      tokens = true
    end
    g[d] = { T = T, B = B, tau = tau, base = base, cost = cost }
    local w = base + math.ceil(math.min(cost, B) * T) - tau - now
    if w > wait then wait = w end
  end
end
local r = g[1]
if tokens or not r then lease = 1 end
local granted = 1
if wait > max_wait then
  local remaining = r and math.max(0, math.floor((r.tau - (r.base - now)) / r.T)) or -1
  return { 1, remaining, math.ceil(wait), 0, 0, 0, '0', limits[1], limits[2], limits[3], limits[4] }
end
if r then
  while granted < lease and r.base + math.ceil((granted + 1) * r.T) - r.tau - now <= max_wait do
    granted = granted + 1
  end
end
local reset, remaining, first, interval = 0, -1, 0, '0'
for d = 1, 4 do
  local x = g[d]
  if x then
    local units = d == 1 and granted or x.cost
    local tat = x.base + math.ceil(units * x.T)
    redis.call('HSET', key, 't' .. d, string.format('%.0f', tat))
    if tat - now > reset then reset = tat - now end
  end
end
if r then
  local tat = r.base + math.ceil(granted * r.T)
  remaining = math.max(0, math.floor((r.tau - (tat - now)) / r.T))
  first, interval = r.base + math.ceil(r.T) - r.tau - now, tostring(r.T)
end
redis.call('PEXPIRE', key, ARGV[14])
return { 0, remaining, math.ceil(wait), math.ceil(reset), granted, math.floor(first), interval,
         limits[1], limits[2], limits[3], limits[4] }
]])

-- KEYS[1] the limiter hash. ARGV: dimension (1..4), learned limit, the
-- configured one, ttl_ms. The debt of the dimension is kept in units and
-- re-timed at the new effective limit. Returns { 1 } when the learned limit
-- changed, else { 0 }.
shared.LEARN = redis.script(GCRA_PRELUDE .. [[
local key, d = KEYS[1], tonumber(ARGV[1])
local learned, conf = tonumber(ARGV[2]), ARGV[3]
local f = redis.call('HMGET', key, 't' .. d, 'l' .. d)
if tonumber(f[2]) == learned then
  redis.call('PEXPIRE', key, ARGV[4])
  return { 0 }
end
local old, new = effective(conf, f[2]), effective(conf, learned)
local now, tat = now_us(), tonumber(f[1])
if tat and tat > now and old > 0 and new > 0 then
  redis.call('HSET', key, 't' .. d, string.format('%.0f', now + math.ceil((tat - now) * old / new)))
end
redis.call('HSET', key, 'l' .. d, tostring(learned))
redis.call('PEXPIRE', key, ARGV[4])
return { 1 }
]])

-- KEYS[1] the limiter hash. ARGV: conf1..4, delta1..4 (units used beyond the
-- reservation; < 0 gives back, never beyond a full bucket), pause_us (nothing
-- passes before it, from now), burst_s. Returns { 1 }.
shared.CORRECT = redis.script(GCRA_PRELUDE .. [[
local key = KEYS[1]
local now = now_us()
local f = redis.call('HMGET', key, 't1', 't2', 't3', 't4', 'l1', 'l2', 'l3', 'l4')
local pause, burst_s = tonumber(ARGV[9]) or 0, tonumber(ARGV[10])
for d = 1, 4 do
  local lim = effective(ARGV[d], f[4 + d])
  local delta = tonumber(ARGV[4 + d]) or 0
  if lim > 0 and (delta ~= 0 or (d == 1 and pause > 0)) then
    local T, B, tau = gcra(lim, burst_s)
    local base = tat_of(f[d], now, tau)
    local tat = base + (delta >= 0 and math.ceil(delta * T) or -math.ceil(-delta * T))
    if tat < now then tat = now end
    if d == 1 and pause > 0 then tat = math.max(tat, now + pause + tau - math.ceil(T)) end
    redis.call('HSET', key, 't' .. d, string.format('%.0f', tat))
  end
end
return { 1 }
]])

-- KEYS[1] the breaker window hash (c<bucket>, f<bucket>, s<bucket>),
-- KEYS[2] the open key, KEYS[3] the probe key. ARGV: bucket_ms, buckets,
-- calls, failures, slow (this process's since its last sync).
-- Returns { calls, failures, slow, open_ms_left, probe }.
shared.WINDOW = redis.script([[
local key = KEYS[1]
local bucket_ms, buckets = tonumber(ARGV[1]), tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local head = math.floor(now / bucket_ms)
local dc, df, ds = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
if dc > 0 then
  redis.call('HINCRBY', key, 'c' .. head, dc)
  if df > 0 then redis.call('HINCRBY', key, 'f' .. head, df) end
  if ds > 0 then redis.call('HINCRBY', key, 's' .. head, ds) end
  redis.call('PEXPIRE', key, bucket_ms * (buckets + 1))
end
local sums = { c = 0, f = 0, s = 0 }
local all = redis.call('HGETALL', key)
for i = 1, #all, 2 do
  local kind, b = all[i]:sub(1, 1), tonumber(all[i]:sub(2))
  if b and b > head - buckets then
    sums[kind] = (sums[kind] or 0) + tonumber(all[i + 1])
  else
    redis.call('HDEL', key, all[i])
  end
end
local probe = redis.call('GET', KEYS[3]) or ''
return { sums.c, sums.f, sums.s, redis.call('PTTL', KEYS[2]), probe }
]])

-- KEYS[1] open, KEYS[2] probe, KEYS[3] window. ARGV: "open", ms (open for ms
-- more, unless it already is for longer; a probe claim ends) or "closed", ms
-- (a probe closed it: the open key and the window go, and the probe key says
-- "closed" for ms). Returns { the open key's ms left }.
shared.OPEN = redis.script([[
local ms = tonumber(ARGV[2])
if ARGV[1] == 'open' then
  if redis.call('PTTL', KEYS[1]) < ms - 5 then redis.call('SET', KEYS[1], '1', 'PX', ms) end
  redis.call('DEL', KEYS[2])
else
  redis.call('DEL', KEYS[1], KEYS[3])
  redis.call('SET', KEYS[2], 'closed', 'PX', ms)
end
return { redis.call('PTTL', KEYS[1]) }
]])

-- KEYS[1] open, KEYS[2] probe. ARGV: id, ms. Who probes a key whose open time
-- is over: { "open", ms } still open; { "claimed", ms } the caller probes (for
-- at most ms); { "healthy", 0 } a probe closed it; { "busy", ms } another
-- process probes.
shared.CLAIM = redis.script([[
local open = redis.call('PTTL', KEYS[1])
if open > 0 then return { 'open', open } end
local v = redis.call('GET', KEYS[2])
if not v then
  redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
  return { 'claimed', tonumber(ARGV[2]) }
end
if v == 'closed' then return { 'healthy', 0 } end
if v == ARGV[1] then return { 'claimed', redis.call('PTTL', KEYS[2]) } end
return { 'busy', redis.call('PTTL', KEYS[2]) }
]])

-- == The scope ============================================================

--- The fleet scope of one client: its keys' places, leases and breaker sync.
-- @type Scope
local Scope = { __name = "sturdy.shared" }
Scope.__index = Scope

local function finite(v)
  return type(v) == "number" and v == v and v > -huge and v < huge
end

-- Counts over a sliding window of w seconds, in two windows of w, the older
-- one weighed by how much of it still overlaps the last w seconds.
local function counter()
  return { idx = 0, cur = 0, prev = 0 }
end

local function count_add(c, w)
  local idx = floor(monotime() / w)
  if idx == c.idx then
    c.cur = c.cur + 1
  else
    c.prev = idx == c.idx + 1 and c.cur or 0
    c.idx, c.cur = idx, 1
  end
end

local function count(c, w)
  local t = monotime() / w
  local idx = floor(t)
  if idx == c.idx then return c.cur + c.prev * (1 - (t - idx)) end
  if idx == c.idx + 1 then return c.cur * (1 - (t - idx)) end
  return 0
end

--- A scope for engine (sturdy.core's or a transport with the same methods).
-- `opts`: the checked `shared` option (redis settings, processes, lease,
-- sync); `compiled`: the client's compiled configuration (its limits, burst,
-- breaker); `emit(record)` hands an event to the client's observers.
function shared.new(engine, opts, compiled, emit)
  local up = compiled.upstream
  local conf = {}
  for i, d in ipairs(DIMS) do conf[i] = up.limits[d] or 0 end
  local b = up.breaker
  local settings = opts.redis or redis.settings(nil, "client options.shared.redis")
  local self = setmetatable({
    engine = engine, emit = emit,
    link = redis.link(settings, engine.redis_driver),
    prefix = settings.prefix,
    processes = opts.processes or 1,
    lease = opts.lease or 1,
    sync_s = opts.sync or 0.25,
    conf = conf,
    burst_s = up.limits.burst_s > 0 and up.limits.burst_s or 1,
    breaker = b ~= false and {
      bucket_ms = max(1, floor(b.window_ms / b.buckets)), buckets = b.buckets,
      window_s = b.window_ms / 1000, probe_ms = b.probe_timeout_ms,
    } or nil,
    id = format("%d-%.6f-%s", os.time(), monotime(), tostring({}):match("(%x+)$") or ""),
    keys = {},
    mode = "redis",
  }, Scope)
  return self
end

local function key_state(self, name)
  local K = self.keys[name]
  if K then return K end
  local base = self.prefix .. "{" .. name .. "}"
  K = {
    name = name, limit_key = base .. ":limit", window_key = base .. ":window",
    open_key = base .. ":open", probe_key = base .. ":probe",
    unpaced = counter(), hits = counter(), unused = 0, credit = 0, pending = {}, learned = {},
    unplaced = setmetatable({}, { __mode = "k" }),
    flushed = { 0, 0, 0 },
  }
  self.keys[name] = K
  if self.mode == "local" then self.engine:share(name, self.processes) end
  return K
end

-- Calls sent without a place in Redis (no limit known yet, or Redis away) are
-- charged to the fleet's limit once Redis can take them: those of the last
-- burst window, since the provider's bucket has refilled the rest.
local function unpaced_add(self, K)
  count_add(K.unpaced, self.burst_s)
end

local function unpaced(self, K)
  return count(K.unpaced, self.burst_s)
end

-- Admits r without a place in Redis (it is away): the process's share of
-- the limit paces it, and it is charged to Redis when it answers again.
local function unpaced_gate(self, K, r)
  unpaced_add(self, K)
  if self.mode == "local" then K.unplaced[r] = monotime() end
  r:gate(0)
end

-- Redis is away (err): every key paces to limit / processes in the process.
local function go_local(self, err)
  if self.mode == "local" then return end
  self.mode = "local"
  for name, K in pairs(self.keys) do
    self.engine:share(name, self.processes)
    K.lease = nil
    local pending = K.pending
    K.pending, K.scout = {}, nil
    for _, r in ipairs(pending) do unpaced_gate(self, K, r) end
  end
  self.emit { type = "shared", state = "local", processes = self.processes,
              detail = format("Redis is unreachable (%s); each process paces to limit / %d", tostring(err),
                              self.processes) }
end

-- Redis answers again. The keys keep their local share until recover() has
-- placed the calls still queued under it (right after the current call).
local function go_redis(self)
  if self.mode == "redis" then return end
  self.mode = "redis"
  self.recovering = true
  self.emit { type = "shared", state = "redis", processes = self.processes,
              detail = "Redis answers again; limits and breakers are shared" }
end

-- Runs a script; its reply (every script replies with a list), or nil (and
-- the scope goes local) when Redis fails or answers something else.
local function eval(self, script, keys, args)
  local res, err = self.link:eval(script, keys, args)
  if type(res) ~= "table" then
    go_local(self, res == nil and err or "Redis answered a script with a " .. type(res))
    return nil
  end
  go_redis(self)
  return res
end

local function known(limits)
  return limits and (limits[1] > 0 or limits[2] > 0 or limits[3] > 0 or limits[4] > 0)
end

local function clean(v)
  return finite(v) and v > 0 and min(v, 1e12) or 0
end

local function learn(self, K, d, learned)
  return eval(self, shared.LEARN, { K.limit_key }, { d, learned, self.conf[d], LIMIT_TTL_MS })
end

-- Limits this process learned that Redis does not hold (it restarted, or the
-- key expired) are written again. True when one was.
local function republish(self, K, limits)
  local any = false
  for d = 1, 4 do
    if K.learned[d] and self.conf[d] == 0 and limits[d] == 0 and learn(self, K, d, K.learned[d]) then
      any = true
    end
  end
  return any
end

-- Asks Redis for the place of one attempt of r starting at_ms from now.
-- Returns the wait (ms) from now, or nil when Redis failed.
local function place(self, K, r, at_ms, again)
  local key, max_wait, c1, c2, c3, c4 = r:admission(at_ms)
  if not key then return 0 end
  local now = monotime()
  local conf = self.conf
  -- a lease only for a hot key, and no larger than a second's worth of its calls
  local lease = 1
  if self.lease > 1 and at_ms == 0 and not K.lease then
    lease = max(1, min(self.lease, floor(count(K.hits, 1))))
  end
  local reply = eval(self, shared.LIMIT, { K.limit_key }, {
    max_wait * 1000, at_ms * 1000, self.burst_s, lease,
    conf[1], conf[2], conf[3], conf[4], clean(c1), clean(c2), clean(c3), clean(c4),
    max(0, floor(unpaced(self, K) - K.credit)) - K.unused, LIMIT_TTL_MS,
  })
  if not reply then return nil end
  local limits = { tonumber(reply[8]) or 0, tonumber(reply[9]) or 0, tonumber(reply[10]) or 0,
                   tonumber(reply[11]) or 0 }
  -- limits Redis lost are written again; a place taken without any limit
  -- (so nothing was reserved) is asked for again
  if not again and republish(self, K, limits) and not known(limits) then return place(self, K, r, at_ms, true) end
  K.limits = limits
  local wait_us = tonumber(reply[3]) or 0
  if reply[1] == 0 then
    if limits[1] > 0 then K.unpaced, K.unused, K.credit = counter(), 0, 0 end -- settled with this place
    local granted = tonumber(reply[5]) or 1
    if granted > 1 then
      K.lease = { t0 = now, first = tonumber(reply[6]) or 0, interval = tonumber(reply[7]) or 0,
                  n = granted, used = 1 }
    end
  end
  return at_ms + ceil(max(0, wait_us) / 1000)
end

-- The next permit of the key's lease: its wait (ms), or nil when none is left.
-- A permit still unused STALE_PERMIT after its place (or the grant, for one
-- placed at once) is dropped, and given back with the next reservation.
local function leased(K)
  local L = K.lease
  if not L then return nil end
  local now = monotime()
  while L.used < L.n do
    L.used = L.used + 1
    local at = L.t0 + (L.first + (L.used - 1) * L.interval) / 1e6
    if now - max(at, L.t0) <= STALE_PERMIT then
      if L.used >= L.n then K.lease = nil end
      return max(0, ceil((at - now) * 1000))
    end
    K.unused = K.unused + 1
  end
  K.lease = nil
  return nil
end

local function give_back_lease(self, K)
  local L = K.lease
  K.lease = nil
  local unused = K.unused + (L and L.n - L.used or 0)
  if unused > 0 then
    local c = self.conf
    K.unused = 0
    eval(self, shared.CORRECT, { K.limit_key }, { c[1], c[2], c[3], c[4], -unused, 0, 0, 0, 0, self.burst_s })
  end
end

local function publish_open(self, K)
  local _, _, _, state, open_in = self.engine:fleet_counts(K.name)
  if state == "open" and open_in and open_in > 0 then
    eval(self, shared.OPEN, { K.open_key, K.probe_key, K.window_key }, { "open", ceil(open_in) })
  end
end

-- Adds this process's breaker samples to the fleet's window and reads back
-- its totals, its open time and its probe claim; at most every sync seconds.
local function sync(self, K, force)
  local B = self.breaker
  if not B then return end
  local now = monotime()
  if not force and K.synced_at and now - K.synced_at < self.sync_s then return end
  local engine = self.engine
  local calls, failures, slow, dc, df, ds
  if engine.fleet_unsent then
    -- processes whose breaker more than one process shares (nginx workers) take what is unsent
    dc, df, ds = engine:fleet_unsent(K.name)
  else
    calls, failures, slow = engine:fleet_counts(K.name)
    if not calls then calls, failures, slow = 0, 0, 0 end
    local f = K.flushed
    dc, df, ds = calls - f[1], failures - f[2], slow - f[3]
  end
  if K.synced_at and now - K.synced_at > B.window_s then dc, df, ds = 0, 0, 0 end -- out of the window by now
  local reply = eval(self, shared.WINDOW, { K.window_key, K.open_key, K.probe_key },
                     { B.bucket_ms, B.buckets, dc, df, ds })
  if not reply then return end
  if calls then K.flushed = { calls, failures, slow } end
  K.synced_at = now
  local open_ms = tonumber(reply[4]) or -2
  if open_ms > 0 then self.engine:open_until(K.name, open_ms) end
  if self.engine:fleet_window(K.name, tonumber(reply[1]) or 0, tonumber(reply[2]) or 0, tonumber(reply[3]) or 0) then
    publish_open(self, K)
  end
end

-- The key's breaker would go half-open now: one process of the fleet probes.
-- Returns true when this one may go on.
local function may_probe(self, K)
  if K.probing then return true end
  local reply = eval(self, shared.CLAIM, { K.open_key, K.probe_key }, { self.id, self.breaker.probe_ms })
  if not reply then return true end -- Redis away: the process probes for itself
  local verdict, ms = reply[1], tonumber(reply[2]) or 0
  if verdict == "claimed" then
    K.probing = true
    return true
  end
  if verdict == "healthy" then return true end
  -- still open, or another process probes: wait for its verdict
  self.engine:open_until(K.name, verdict == "open" and ms or max(1, min(ms, self.sync_s * 1000)))
  return false
end

local function gate_pending(self, K)
  local pending = K.pending
  K.pending = {}
  for i, r in ipairs(pending) do
    local wait = self.mode == "redis" and (leased(K) or place(self, K, r, 0))
    if not wait then -- Redis is away: this and the rest go on local limits
      for j = i, #pending do unpaced_gate(self, K, pending[j]) end
      return
    end
    if not known(K.limits) then unpaced_add(self, K) end
    r:gate(wait)
  end
end

-- After Redis came back: the calls admitted under the local share that still
-- wait in their key's queue get places in Redis (those admitted within the
-- last burst window are not charged twice), then each key has its whole
-- limit again.
local function recover(self)
  self.recovering = nil
  for name, K in pairs(self.keys) do
    local queued, now = {}, monotime()
    for r, t in pairs(K.unplaced) do
      local state = select(7, r:admission())
      if state == "queued" then
        queued[#queued + 1] = r
        if now - t < self.burst_s then K.credit = K.credit + 1 end
      end
    end
    K.unplaced = setmetatable({}, { __mode = "k" })
    for _, r in ipairs(queued) do
      local wait = self.mode == "redis" and place(self, K, r, 0)
      if wait then r:gate(wait) end
    end
    if self.mode ~= "redis" then return end -- away again: go_local shared it out
    self.engine:share(name, 1)
  end
end

--- A held request (submitted with held = true) asks for its place; it is
-- then admitted by the engine with the wait Redis gave.
local function admit(self, h)
  local r = h._request
  if not r then return end
  local key = r:admission()
  if not key then return end
  local K = key_state(self, key)
  h._shared_key = key
  count_add(K.hits, 1)
  -- while Redis is away, it is tried again only once the link's backoff is over
  if self.mode == "local" and not self.link:ready() then return unpaced_gate(self, K, r) end
  sync(self, K)
  local _, _, _, state, open_in = self.engine:fleet_counts(key)
  if state == "open" and (open_in > 0 or not may_probe(self, K)) then
    return r:gate(0) -- the core refuses it: no place is taken
  end
  if self.mode == "local" and not self.link:ready() then return unpaced_gate(self, K, r) end
  if K.scout and not known(K.limits) then
    K.pending[#K.pending + 1] = r -- waits for the scout's reply to teach the limits
    return
  end
  local wait = leased(K)
  if wait == nil then wait = place(self, K, r, 0) end
  if wait == nil then return unpaced_gate(self, K, r) end
  if not known(K.limits) then
    -- no limit known anywhere yet: this call goes unpaced and teaches them;
    -- the others wait for its reply
    unpaced_add(self, K)
    if not K.scouted then K.scout = true end
  end
  r:gate(wait)
end

function Scope:admit(h)
  admit(self, h)
  if self.recovering then recover(self) end
end

--- A call waits to retry (a "retry" notice with its handle): its next attempt
-- reserves its place for when the wait ends.
function Scope:retry(info)
  local h = info.handle
  local r = h and h._request
  if not r or self.mode ~= "redis" or not h._shared_key then return end
  local K = key_state(self, h._shared_key)
  local delay = ceil((info.delay or 0) * 1000)
  local wait = place(self, K, r, delay)
  if wait and wait > delay then r:gate(wait) end
end

--- A call ended: a scout's reply has taught what it could.
function Scope:done(h)
  if self.recovering then recover(self) end
  local key = h._shared_key
  local K = key and self.keys[key]
  if not K or not K.scout then return end
  K.scout = nil
  if not known(K.limits) then
    -- the reply taught no limit (or it is not written yet): ask again, and
    -- without one the waiting calls go unpaced
    K.scouted = true
  end
  gate_pending(self, K)
end

--- An event of the engine: limits learned are written to Redis, breaker
-- changes published, pauses shared.
function Scope:event(ev)
  local K = ev.key and self.keys[ev.key]
  if not K or ev.type == "shared" then return end
  if ev.type == "limit_learned" then
    local d = DIM_INDEX[ev.dimension]
    local learned = clean(ev.learned)
    if d and learned > 0 then K.learned[d] = learned end
    if d and learned > 0 and self.mode == "redis" then
      learn(self, K, d, learned)
      K.limits = K.limits or { 0, 0, 0, 0 }
      K.limits[d] = K.limits[d] > 0 and min(K.limits[d], learned) or learned
      if #K.pending > 0 then
        K.scout = nil
        gate_pending(self, K)
      end
    end
  elseif ev.type == "breaker" and self.breaker and self.mode == "redis" then
    if ev.to == "open" then
      K.probing = nil
      publish_open(self, K)
    elseif ev.to == "closed" and K.probing then
      K.probing = nil
      eval(self, shared.OPEN, { K.open_key, K.probe_key, K.window_key },
           { "closed", max(1000, ceil(self.sync_s * 4000)) })
      if self.engine.fleet_unsent then
        self.engine:fleet_unsent(K.name) -- the probe's verdict starts the fleet's window anew
      else
        K.flushed = { self.engine:fleet_counts(K.name) }
      end
    end
  elseif ev.type == "paused" and self.mode == "redis" and finite(ev.pause) and ev.pause > 0 then
    local c = self.conf
    eval(self, shared.CORRECT, { K.limit_key },
         { c[1], c[2], c[3], c[4], 0, 0, 0, 0, ceil(min(ev.pause, 3600) * 1e6), self.burst_s })
  end
end

--- The real usage of a call under key: the difference to its reservation,
-- per dimension (`{ input_tokens = d, output_tokens = d, tokens = d }`),
-- moves the key's shared TATs (charged, or given back).
function Scope:correct(key, deltas)
  local K = self.keys[key]
  if not K or self.mode ~= "redis" or not known(K.limits) then return end
  local d = { 0, 0, 0, 0 }
  local any = false
  for name, v in pairs(deltas) do
    local i = DIM_INDEX[name]
    if i and i > 1 and finite(v) and v ~= 0 and K.limits[i] > 0 then
      d[i], any = max(-1e12, min(1e12, v)), true
    end
  end
  if not any then return end
  local c = self.conf
  eval(self, shared.CORRECT, { K.limit_key }, { c[1], c[2], c[3], c[4], d[1], d[2], d[3], d[4], 0, self.burst_s })
end

--- The scope's state: `mode` ("redis" or "local") and, per key, the last
-- limits Redis used (per minute) and the lease left.
function Scope:stats()
  local keys = {}
  for name, K in pairs(self.keys) do
    local limits
    if K.limits then
      limits = {}
      for i, d in ipairs(DIMS) do if K.limits[i] > 0 then limits[d] = K.limits[i] end end
    end
    keys[name] = { limits = limits, lease = K.lease and (K.lease.n - K.lease.used) or 0,
                   pending = #K.pending, probing = K.probing or false }
  end
  return { mode = self.mode, processes = self.processes, keys = keys }
end

--- Gives back unused leased permits and closes the link.
function Scope:close()
  if self.mode == "redis" then
    for _, K in pairs(self.keys) do give_back_lease(self, K) end
  end
  self.link:close()
end

return shared
