-- One process of a fleet sharing limits and breakers through Redis, for the
-- shared specs and benchmark: makes N calls against the mock and prints one
-- JSON line of what happened.
--
--   lua spec/support/shared_peer.lua '<json>'
--
-- json: url (the mock), redis ({ host, port, password, prefix }), n, start_at
-- (wall-clock seconds to start at, so peers start together), concurrency
-- (calls in flight, through client:batch), model, shared (extra `shared`
-- options: processes, lease, sync), client (extra client options: limits,
-- breaker, retry), steps (x-mock-steps), scenario (x-mock-scenario), every
-- (seconds between submits instead of a batch: a steady trickle), local
-- (true: no shared scope, for comparison), settle (seconds: after its n calls,
-- a scope still local makes one more call every 0.1 s until it is shared again
-- or this time has passed, so a peer that finished while Redis was away still
-- shows whether it comes back).
-- Prints: { ok, errors = { kind = n }, throttled (429 attempts), elapsed,
-- started, finished (wall clock), events = { "shared:local@<time>", ... },
-- mode (the scope's at the end), settled (calls made while settling), latencies (with `every`: each call's
-- seconds from submit to its end, sorted) }
local socket = require "socket"
local cjson = require "cjson"
local sturdy = require "sturdy"

local cfg = cjson.decode((assert(arg[1], "usage: shared_peer.lua JSON")))

local events, throttled = {}, 0
local opts = {
  base_url = cfg.url,
  on_event = function(e)
    if e.type == "shared" or e.type == "breaker" then
      events[#events + 1] = e.type .. ":" .. (e.state or e.to) .. "@" .. string.format("%.3f", socket.gettime())
    end
  end,
  on_retry = function(info) if info.status == 429 then throttled = throttled + 1 end end,
}
if not cfg["local"] then
  opts.shared = { redis = cfg.redis }
  for k, v in pairs(cfg.shared or {}) do opts.shared[k] = v end
end
for k, v in pairs(cfg.client or {}) do opts[k] = v end
local client = sturdy.client(opts)

local body = cjson.encode { model = cfg.model or "claude-fleet", max_tokens = 16,
                            messages = { { role = "user", content = "pace us" } } }
local headers = {}
if cfg.steps then headers["x-mock-steps"] = cfg.steps end
if cfg.scenario then headers["x-mock-scenario"] = cfg.scenario end
local function request()
  return { method = "POST", path = "/v1/messages", body = body, headers = headers }
end

local wait = (cfg.start_at or 0) - socket.gettime()
if wait > 0 then socket.sleep(wait) end
local started = socket.gettime()
local results, latencies = {}, {}
if cfg.every then
  -- a steady trickle: one submit every `every` seconds, driven by poll
  local n, next_at = cfg.n, started
  local submitted = 0
  while submitted < n or client:pending() > 0 do
    local t = socket.gettime()
    if submitted < n and t >= next_at then
      submitted = submitted + 1
      local i = submitted
      client:submit(request(), function(res, err)
        results[i] = res or err
        latencies[#latencies + 1] = socket.gettime() - t
      end)
      next_at = next_at + cfg.every
    end
    client:poll(math.max(0, math.min(0.005, next_at - socket.gettime())))
  end
else
  local reqs = {}
  for i = 1, cfg.n do reqs[i] = request() end
  results = client:batch(reqs, { concurrency = cfg.concurrency or 32 })
end
local finished = socket.gettime()

local settled = 0
if cfg.settle then
  local until_at = finished + cfg.settle
  while client:stats().shared.mode ~= "redis" and socket.gettime() < until_at do
    client:request(request())
    settled = settled + 1
    socket.sleep(0.1)
  end
end

local ok, errors = 0, {}
for i = 1, cfg.n do
  local r = results[i]
  if r and not sturdy.is_error(r) then
    ok = ok + 1
  else
    local kind = r and r.kind or "missing"
    errors[kind] = (errors[kind] or 0) + 1
  end
end
local stats = client:stats()
client:close()
table.sort(latencies)
print(cjson.encode {
  ok = ok, errors = errors, throttled = throttled, elapsed = finished - started,
  started = started, finished = finished, events = events, mode = stats.shared and stats.shared.mode,
  settled = settled,
  latencies = latencies,
})
