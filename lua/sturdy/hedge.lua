--- Hedged calls: a call whose first byte is late starts one hedge, a second
-- request of the same call, and the first to answer wins; the other is
-- cancelled. The decision core decides when (`after`: a fixed wait, or a
-- quantile of the key's time to first byte) and whether (the hedge budget of
-- `max_ratio`, the breaker, concurrency cap and limiter of the hedge's key, the
-- time left before the deadline); this module holds the two legs.
--
-- Providers use it for their blocking calls (`hedge = {...}` on new or on the
-- call); streams hedge in sturdy.stream, where the first leg to deliver a
-- content delta wins.
-- @module sturdy.hedge
local hedge = {}

local type, pairs, tostring = type, pairs, tostring
local format = string.format

local DEFAULT_RATIO = 0.05
local DEFAULT_AFTER = "p95"

local function fail(msg, ...)
  error("sturdy: " .. format(msg, ...), 0)
end

-- "p95" -> 0.95, "p99.9" -> 0.999; nil for anything else
local function quantile_of(s)
  local n = type(s) == "string" and s:match("^p(%d+%.?%d*)$")
  n = tonumber(n)
  if n and n >= 50 and n < 100 then return n / 100 end
end

--- Checks a `hedge` option and returns the policy the core reads ({ after =
-- ms or nil, quantile =, max_ratio = }), or false for `false` (no hedging).
-- true or {} take the defaults: after "p95", max_ratio 0.05.
function hedge.policy(h, where)
  if h == false or h == nil then return false end
  if h == true then h = {} end
  if type(h) ~= "table" then fail("option 'hedge' in %s must be a table, true or false, got %s", where, type(h)) end
  for k in pairs(h) do
    if k ~= "after" and k ~= "max_ratio" then fail("unknown option '%s' in %s.hedge", tostring(k), where) end
  end
  local after, ratio = h.after or DEFAULT_AFTER, h.max_ratio or DEFAULT_RATIO
  local p = { max_ratio = ratio }
  if type(after) == "number" then
    if not (after > 0 and after <= 86400) then
      fail("option 'after' in %s.hedge must be seconds from 0 to 86400, or a quantile such as \"p95\"; got %s",
           where, tostring(after))
    end
    p.after = math.ceil(after * 1000)
  else
    p.quantile = quantile_of(after)
    if not p.quantile then
      fail("option 'after' in %s.hedge must be seconds or a quantile from \"p50\" to \"p99.9\", got %s",
           where, type(after) == "string" and format("%q", after:sub(1, 40)) or type(after))
    end
  end
  if type(ratio) ~= "number" or not (ratio >= 0 and ratio <= 1) then
    fail("option 'max_ratio' in %s.hedge must be a number from 0 to 1, got %s", where, tostring(ratio))
  end
  return p
end

local function copy(t)
  local c = {}
  for k, v in pairs(t) do c[k] = v end
  return c
end

--- The hedge's request: the call's own, one attempt, no later than the call's
-- deadline (left_ms; nil none).
function hedge.request_for(req, left_ms)
  local h = copy(req)
  h.attempts = 1
  if left_ms then
    local timeout = copy(req.timeout or {})
    timeout.total = math.max(left_ms, 1) / 1000
    h.timeout = timeout
  end
  return h
end

--- Races two legs of one call on client. submit_first(cb) submits the first
-- leg (cb(res, err) when it ends) and returns its handle. When its first byte
-- is late (the core's st_hedge_plan), try_second(first_handle, cb) is asked
-- for the hedge: it asks first_handle:hedge_admit for the hedge's key and,
-- when admitted, submits the second leg and returns its handle (nil: no
-- hedge). The first leg to succeed wins and the other is cancelled
-- (handle:lose()); a failure waits for the other leg; when both fail, the
-- first leg's outcome is the call's. Waits as client:request does. Returns
-- the winner's index (1 or 2) and the legs ({ handle, res, err, done, lost =
-- true when cancelled in flight }).
function hedge.race(client, policy, submit_first, try_second)
  local legs, state = {}, { done = false }
  local timer

  local function ended(i, res, err)
    local leg = legs[i]
    leg.done, leg.res, leg.err = true, res, err
    if state.done then return end
    local other = legs[3 - i]
    if res then
      state.done, state.winner = true, i
      if other and not other.done then
        other.lost = true
        other.handle:lose()
      end
    elseif not other or other.done then
      -- the hedge never went, or failed too: the first leg's outcome is the call's
      if not other and timer then timer:cancel() end
      state.done, state.winner = true, 1
    end
  end

  legs[1] = {}
  legs[1].handle = submit_first(function(res, err) ended(1, res, err) end)
  local wait = legs[1].handle:hedge_plan(policy)
  if wait then
    timer = client:after(wait / 1000, function()
      if state.done or legs[1].done or legs[1].handle:received() > 0 then return end
      local leg = {}
      leg.handle = try_second(legs[1].handle, function(res, err) ended(2, res, err) end)
      if leg.handle then legs[2] = leg end
    end)
  end
  client:wait_for(function() return state.done end)
  if timer then timer:cancel() end
  return state.winner or 1, legs
end

--- Sends req on client, hedged by policy (from hedge.policy) on the same
-- target, and waits for the outcome as client:request does. request_for
-- (optional, default hedge.request_for) makes the hedge's request from req
-- and the ms left. Returns res, err and what happened: { hedged = true when
-- a hedge was sent, won = "primary" | "hedge", lost = true when the other
-- leg was cancelled in flight (its input is billed) }.
function hedge.call(client, req, policy, request_for)
  local winner, legs = hedge.race(client, policy, function(cb) return client:submit(req, cb) end,
    function(first, cb)
      local ok, left = first:hedge_admit(policy)
      if not ok then return nil end
      return client:submit((request_for or hedge.request_for)(req, left), cb)
    end)
  local w = legs[winner]
  local info = { hedged = legs[2] ~= nil, won = winner == 2 and "hedge" or "primary",
                 lost = (legs[1].lost or (legs[2] and legs[2].lost)) or false }
  return w.res, w.err, info
end

return hedge
