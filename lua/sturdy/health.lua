--- client:health(): each upstream key's reachability, with its breaker and
-- limiter state, from what the client already knows (no request is sent).
--
--   local h = client:health()
--   -- h.ok (no key down), h.status ("up", "degraded", "down" or "idle"), h.keys[key] = {
--   --   status, reason, breaker = { state, failure_rate, calls, retry_in },
--   --   limits = { paused_for, remaining = { requests = n, ... } },
--   --   in_flight, queued, latency = { p50, p99, count } }
--
-- A key is `down` while its breaker is open (forced or not), `degraded`
-- while it is half-open, paused by a 429, or failing more than half of the
-- calls in the breaker's window, `idle` with no call in its windows, else
-- `up`; `reason` says why in a few words. The client's status is the worst
-- of its keys' (`idle` when it has none). For the network path itself, see
-- sturdy.diagnose.
-- @module sturdy.health
local health = {}

local format = string.format

local RANK = { idle = 0, up = 1, degraded = 2, down = 3 }

local function key_health(s)
  local b = s.breaker
  local l = s.limits or {}
  local paused, remaining = tonumber(l.paused_for) or 0, {}
  for dim, d in pairs(l) do
    if type(d) == "table" then remaining[dim] = d.remaining end
  end
  local latency = s.latency or {}
  local h = {
    breaker = b and { state = b.state, mode = b.mode, failure_rate = b.failure_rate, calls = b.calls,
                      retry_in = b.retry_in } or nil,
    limits = { paused_for = paused, remaining = remaining },
    in_flight = s.in_flight, queued = s.queued,
    latency = { count = latency.count, p50 = latency.p50, p99 = latency.p99 },
  }
  if b and (b.state == "open" or b.state == "forced_open") then
    h.status = "down"
    h.reason = b.retry_in and format("breaker open, half-opens in %.1fs", b.retry_in) or "breaker open"
  elseif b and b.state == "half_open" then
    h.status, h.reason = "degraded", "breaker half-open: probing"
  elseif paused > 0 then
    h.status, h.reason = "degraded", format("paused by a 429 for %.1fs", paused)
  elseif b and b.calls and b.calls > 0 and b.failure_rate and b.failure_rate > 0.5 then
    h.status, h.reason = "degraded", format("%.0f%% of recent calls failed", b.failure_rate * 100)
  elseif (latency.count or 0) == 0 and (not b or (b.calls or 0) == 0) and (s.in_flight or 0) == 0 then
    h.status, h.reason = "idle", "no recent calls"
  else
    h.status, h.reason = "up", "answering"
  end
  return h
end

--- The health of client's keys (or of one key: its entry, nil when unknown).
function health.of(client, key)
  if key ~= nil then
    local s = client:stats(key)
    return s and key_health(s) or nil
  end
  local out = { keys = {}, status = "idle", ok = true }
  for _, k in ipairs(client:stats().keys or {}) do
    local s = client:stats(k)
    if s then
      local h = key_health(s)
      out.keys[k] = h
      if RANK[h.status] > RANK[out.status] then out.status = h.status end
      if h.status == "down" then out.ok = false end
    end
  end
  return out
end

return health
