-- Cases for spec/metrics_ngx_spec.lua: sturdy.metrics inside nginx with a
-- lua_shared_dict, each worker adding to the same counts. A worker's
-- registry observes a client stand-in (sturdy's ngx transport is built
-- elsewhere): records in the client's shape reach the registry's observer,
-- and its stats() gives each key's gauges.
-- luacheck: globals ngx
local metrics = require "sturdy.metrics"

local C = {}

local registry, observer

-- What the registry reads from a client: observe(fn) and stats([key]).
local stand_in = {
  observe = function(_, fn) observer = fn end,
  stats = function(_, key)
    if key == nil then return { keys = { "api.test/m" } } end
    return { in_flight = 2, queued = 1, paced = 3, breaker = { state = "closed" },
             limits = { requests = { limit = 4000, remaining = 3990 - ngx.worker.id() }, paused_for = 0 } }
  end,
}

local function ready()
  if not registry then
    -- gauges expire after three intervals: feed's publication must outlive the
    -- spec even when a loaded machine leaves a worker unscheduled for a while
    registry = metrics.registry { shared = "metrics", interval = 60 }
    registry:observe(stand_in)
  end
  return registry
end

-- Feeds ctx.args.calls call records (one 429 then a 200 each) and one retry each.
C["feed"] = function(ctx)
  ready()
  for _ = 1, ctx.args.calls do
    observer { type = "call", key = "api.test/m", ok = true, status = 200, class = "success", latency = 0.3,
               attempts = { { status = 429, kind = "rate_limited", latency = 0.01, delay = 0.1 },
                            { status = 200, latency = 0.2 } } }
    observer { type = "retry", key = "api.test/m", class = "throttled", attempt = 1 }
  end
  registry:publish()
  return { worker = ngx.worker.id(), pid = ngx.worker.pid() }
end

C["render"] = function(ctx)
  ready()
  return { text = registry:render(ctx.args.format), worker = ngx.worker.id() }
end

return C
