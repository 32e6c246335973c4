--- Alerts: thresholds per upstream key over sliding windows, with
-- hysteresis, on a clock you may replace.
--
--   local alerts = require "sturdy.alerts"
--   local a = alerts.new {
--     rules = {
--       { metric = "success_rate", below = 0.95, clear = 0.98, min_calls = 20 },
--       { metric = "p99", above = 8, clear = 5 },                   -- seconds
--       { metric = "rate_429", above = 0.05, clear = 0.01 },
--       { metric = "retry_rate", above = 0.2, clear = 0.1 },
--       { metric = "cost_per_hour", above = 20, clear = 15 },       -- dollars
--       { metric = "cost_per_day", above = 300, clear = 250, key = "api.anthropic.com/claude-opus-4-1" },
--     },
--     on_alert = function(alert) print(alert.state, alert.rule, alert.key, alert.value) end,
--   }
--   a:watch(client)          -- or the client options alerts = { ...rules }, on_alert = fn
--
-- Metrics, each over the last `window` seconds of a key (60 unless said;
-- an hour and a day for the costs):
--
-- - `success_rate`: calls that succeeded / calls;
-- - `p99`: the 99th percentile of call latency, seconds (sturdy.policy's
--   latency window: within 0.1%);
-- - `rate_429`: attempts answered 429 / attempts;
-- - `retry_rate`: attempts that were retries / attempts;
-- - `cost_per_hour`, `cost_per_day`: dollars of provider calls.
--
-- A rule has `above` or `below` (the threshold) and `clear` (where the
-- alert clears: at most `above`, at least `below`). Between them is the
-- band: a value in it changes nothing, so noise around the threshold fires
-- once and clears once. `min_calls` (10; 0 for costs): with fewer calls (or
-- attempts) in the window there is no value, and a firing alert clears.
-- `key` limits a rule to one key; `name` names it (default the metric).
--
-- `on_alert(alert)` fires once when a threshold is crossed (`state =
-- "firing"`) and once when it clears (`"cleared"`): `rule`, `metric`,
-- `key`, `value` (nil when cleared for lack of calls), `threshold`,
-- `clear`, `at` (the clock's time). Rules are judged at each call's end for
-- its key; `a:check()` judges every key now (call it from a timer so an
-- alert clears when traffic stops). The windows are C (sturdy.policy):
-- sliding sums and a latency window per key, on the clock of the `clock`
-- option (a function returning seconds; default sturdy's monotonic clock).
-- @module sturdy.alerts
local policy = require "sturdy.policy"
local telemetry = require "sturdy.telemetry"

local alerts = {}

local type, pairs, ipairs, tostring = type, pairs, ipairs, tostring
local format = string.format

local function fail(msg, ...)
  error("sturdy: " .. format(msg, ...), 0)
end

-- Per metric: default window (seconds), default min_calls, and which sums it reads.
local METRICS = {
  success_rate = { window = 60, min_calls = 10 },
  p99 = { window = 60, min_calls = 10 },
  rate_429 = { window = 60, min_calls = 10 },
  retry_rate = { window = 60, min_calls = 10 },
  cost_per_hour = { window = 3600, min_calls = 0 },
  cost_per_day = { window = 86400, min_calls = 0 },
}
alerts.METRICS = METRICS

-- The sliding sums kept per key and window
local CALLS, SUCCESSES, ATTEMPTS, THROTTLED, RETRIES, COST = 1, 2, 3, 4, 5, 6
local SLOTS = 60          -- slots of a sums window: a value leaves it within window/60
local LATENCY_SLOTS = 6   -- of a latency window (each slot is a 48 KiB histogram)

local RULE_FIELDS = { metric = "string", above = "number", below = "number", clear = "number", window = "number",
                      min_calls = "number", key = "string", name = "string" }

local function check_rule(r, i)
  local where = format("alert rule #%d", i)
  if type(r) ~= "table" then fail("%s must be a table, got %s", where, type(r)) end
  for k, v in pairs(r) do
    local want = RULE_FIELDS[k]
    if not want then fail("unknown field '%s' in %s", tostring(k), where) end
    if type(v) ~= want then fail("field '%s' in %s must be a %s, got %s", k, where, want, type(v)) end
    if want == "number" and not (v == v and v > -math.huge and v < math.huge) then
      fail("field '%s' in %s must be a finite number, got %s", k, where, tostring(v))
    end
  end
  local m = METRICS[r.metric]
  if not m then
    fail("%s: metric must be success_rate, p99, rate_429, retry_rate, cost_per_hour or cost_per_day, got %s",
         where, tostring(r.metric))
  end
  if (r.above == nil) == (r.below == nil) then fail("%s (%s) needs one of above or below", where, r.metric) end
  if r.clear == nil then fail("%s (%s) needs clear: the value where the alert clears", where, r.metric) end
  if r.above and r.clear > r.above then
    fail("%s (%s): clear (%g) must be at most above (%g)", where, r.metric, r.clear, r.above)
  end
  if r.below and r.clear < r.below then
    fail("%s (%s): clear (%g) must be at least below (%g)", where, r.metric, r.clear, r.below)
  end
  local window = r.window or m.window
  if not (window >= 1 and window <= 366 * 86400) then
    fail("%s (%s): window must be seconds from 1 to 31622400, got %g", where, r.metric, window)
  end
  local min_calls = r.min_calls or m.min_calls
  if min_calls < 0 or min_calls ~= math.floor(min_calls) then
    fail("%s (%s): min_calls must be a whole number >= 0, got %g", where, r.metric, min_calls)
  end
  return { name = r.name or r.metric, metric = r.metric, above = r.above, below = r.below, clear = r.clear,
           window = window, min_calls = min_calls, key = r.key }
end

--- A set of alert rules with its windows.
-- @type Alerts
local Alerts = {}
Alerts.__index = Alerts
alerts.Alerts = Alerts

--- Makes the alerts. opts: `rules` (a list, see above), `on_alert`
-- (function(alert)), `clock` (function returning seconds).
function alerts.new(opts)
  if type(opts) ~= "table" then fail("alerts.new takes a table of options, got %s", type(opts)) end
  for k in pairs(opts) do
    if k ~= "rules" and k ~= "on_alert" and k ~= "clock" then
      fail("unknown option '%s' in alerts.new", tostring(k))
    end
  end
  if type(opts.rules) ~= "table" or #opts.rules == 0 then fail("alerts.new needs rules: a list of alert rules") end
  if opts.on_alert ~= nil and type(opts.on_alert) ~= "function" then
    fail("option 'on_alert' must be a function, got %s", type(opts.on_alert))
  end
  if opts.clock ~= nil and type(opts.clock) ~= "function" then
    fail("option 'clock' must be a function, got %s", type(opts.clock))
  end
  local rules = {}
  for i, r in ipairs(opts.rules) do rules[i] = check_rule(r, i) end
  return setmetatable({
    rules = rules, on_alert = opts.on_alert, clock = opts.clock or policy.monotime,
    keys = {}, -- key -> { sums, latency (windows by length), firing (alerts by rule) }
  }, Alerts)
end

function Alerts:_now()
  local t = self.clock()
  if type(t) ~= "number" or t ~= t then fail("the alerts' clock must return a number, got %s", tostring(t)) end
  return t
end

-- A key's windows, made on first use (only those its rules need).
function Alerts:_key(key)
  local k = self.keys[key]
  if k then return k end
  k = { sums = {}, latency = {}, firing = {} }
  local now = self:_now()
  for _, r in ipairs(self.rules) do
    if r.key == nil or r.key == key then
      if r.metric == "p99" then
        k.latency[r.window] = k.latency[r.window] or policy.latency(LATENCY_SLOTS, r.window / LATENCY_SLOTS, now)
      end
      k.sums[r.window] = k.sums[r.window] or policy.counts(SLOTS, r.window / SLOTS, 6, now)
    end
  end
  self.keys[key] = k
  return k
end

-- The value of rule r for key state k now, or nil when there are too few calls.
local function value_of(r, k, now)
  local calls, successes, attempts, throttled, retries, cost = k.sums[r.window]:sums(now)
  local m = r.metric
  if m == "cost_per_hour" or m == "cost_per_day" then
    if calls < r.min_calls then return nil end
    return cost
  elseif m == "success_rate" then
    if calls < r.min_calls or calls == 0 then return nil end
    return successes / calls
  elseif m == "rate_429" then
    if attempts < r.min_calls or attempts == 0 then return nil end
    return throttled / attempts
  elseif m == "retry_rate" then
    if attempts < r.min_calls or attempts == 0 then return nil end
    return retries / attempts
  end
  local count, p99 = k.latency[r.window]:query(now, 0.99)
  if count < r.min_calls or count == 0 then return nil end
  return p99
end

-- Judges the rules of one key; fires on_alert for each change.
function Alerts:_judge(key, k, now)
  for i, r in ipairs(self.rules) do
    if r.key == nil or r.key == key then
      local v = value_of(r, k, now)
      local firing = k.firing[i]
      local change
      if not firing then
        if v and ((r.above and v > r.above) or (r.below and v < r.below)) then change = "firing" end
      elseif v == nil or (r.above and v < r.clear) or (r.below and v > r.clear) then
        change = "cleared"
      end
      if change then
        local alert = { rule = r.name, metric = r.metric, key = key, state = change, value = v,
                        threshold = r.above or r.below, clear = r.clear, at = now }
        k.firing[i] = change == "firing" and alert or nil
        if self.on_alert then
          local ok, e = pcall(self.on_alert, alert)
          if not ok then io.stderr:write(format("sturdy: on_alert failed: %s\n", tostring(e))) end
        end
      end
    end
  end
end

--- Adds what a finished call says to its key's windows and judges its rules.
-- call: a call view of sturdy.telemetry (key, ok, attempts, latency, cost).
function Alerts:record(call)
  local key = call.key or "none"
  local k = self:_key(key)
  local now = self:_now()
  local attempts = call.attempts or {}
  local n, throttled = #attempts, 0
  for i = 1, n do
    if attempts[i].status == 429 then throttled = throttled + 1 end
  end
  for _, sums in pairs(k.sums) do
    sums:add(now, CALLS, 1)
    if call.ok then sums:add(now, SUCCESSES, 1) end
    sums:add(now, ATTEMPTS, n)
    sums:add(now, THROTTLED, throttled)
    sums:add(now, RETRIES, n > 1 and n - 1 or 0)
    if type(call.cost) == "number" then sums:add(now, COST, call.cost) end
  end
  if call.latency then
    for _, window in pairs(k.latency) do window:record(now, call.latency) end
  end
  self:_judge(key, k, now)
end

--- Judges every key's rules now (alerts clear when their window empties).
function Alerts:check()
  local now = self:_now()
  for key, k in pairs(self.keys) do self:_judge(key, k, now) end
end

--- The alerts firing now: a list of the alert tables on_alert got.
function Alerts:firing()
  local list = {}
  for _, k in pairs(self.keys) do
    for _, alert in pairs(k.firing) do list[#list + 1] = alert end
  end
  table.sort(list, function(a, b) return a.at < b.at end)
  return list
end

-- A budget_warning event (the spend caps, see the client's `budget` option)
-- as an alert: rule "budget", metric the cap's name (usd_per_day, ...), value
-- the spend in its window, threshold the cap, share of it, scope and name.
-- It fires once per crossing; the cap re-arms it when spend falls back.
local function budget_alert(ev, now)
  return { rule = "budget", metric = ev.cap, key = ev.key, scope = ev.scope, name = ev.name, state = "firing",
           value = ev.used, threshold = ev.limit, share = ev.share, at = now }
end

local function call_on_alert(on_alert, alert)
  local ok, e = pcall(on_alert, alert)
  if not ok then io.stderr:write(format("sturdy: on_alert failed: %s\n", tostring(e))) end
end

--- The observer of budget warnings alone: on_alert(alert) for each (see
-- budget_alert above). The client options use it for `on_alert` with `budget`
-- and no `alerts`.
function alerts.budget_observer(on_alert, clock)
  clock = clock or policy.monotime
  return telemetry.calls { on_event = function(ev)
    if ev.type == "budget_warning" then call_on_alert(on_alert, budget_alert(ev, clock())) end
  end }
end

--- The observer that feeds a client's calls to the alerts (watch adds it);
-- budget warnings reach on_alert too.
function Alerts:observer()
  return telemetry.calls {
    on_end = function(call) self:record(call) end,
    on_event = function(ev)
      if ev.type == "budget_warning" and self.on_alert then
        call_on_alert(self.on_alert, budget_alert(ev, self:_now()))
      end
    end,
  }
end

--- Watches client's calls; returns the alerts.
function Alerts:watch(client)
  client:observe(self:observer())
  return self
end

return alerts
