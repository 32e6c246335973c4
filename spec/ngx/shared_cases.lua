-- Drivers of a fleet of nginx workers sharing limits and breakers through
-- Redis (spec/shared_ngx_spec.lua; "link" is spec/redis_ngx_spec.lua's): "start" makes a client with `shared` on
-- the ngx transport in a timer of this worker and returns at once; the timer
-- waits for args.start_at (wall clock), makes args.n calls and leaves what happened in lua_shared_dict "results" under
-- args.id, which "result" hands out (nil while it runs).
-- luacheck: globals ngx
local sturdy = require "sturdy"
local sturdy_redis = require "sturdy.redis"
local cjson = require "cjson.safe"

local C = {}

-- args: url, redis_port, prefix, processes, n, start_at; concurrency (a batch)
-- or every (seconds between submits: a steady trickle); steps and scenario
-- (x-mock-steps, x-mock-scenario); client (more client options).
local function drive(args)
  local events, throttled = {}, 0
  local opts = {
    base_url = args.url, transport = "ngx",
    shared = { redis = { port = args.redis_port, prefix = args.prefix }, processes = args.processes },
    on_event = function(e)
      if e.type == "shared" then events[#events + 1] = e.state end
      if e.type == "breaker" then events[#events + 1] = "breaker:" .. e.to end
    end,
    on_retry = function(info) if info.status == 429 then throttled = throttled + 1 end end,
  }
  for k, v in pairs(args.client or {}) do opts[k] = v end
  local client = sturdy.client(opts)
  local body = cjson.encode { model = "claude-fleet", max_tokens = 16,
                              messages = { { role = "user", content = "pace us" } } }
  local headers = { ["x-mock-steps"] = args.steps, ["x-mock-scenario"] = args.scenario }
  local function request()
    return { method = "POST", path = "/v1/messages", body = body, headers = headers }
  end
  ngx.update_time()
  local wait = args.start_at - ngx.now()
  if wait > 0 then ngx.sleep(wait) end
  ngx.update_time()
  local started = ngx.now()
  local results = {}
  if args.every then
    local submitted, next_at = 0, started
    while submitted < args.n or client:pending() > 0 do
      ngx.update_time()
      if submitted < args.n and ngx.now() >= next_at then
        submitted = submitted + 1
        local i = submitted
        client:submit(request(), function(res, err) results[i] = res or err end)
        next_at = next_at + args.every
      end
      ngx.update_time()
      client:poll(math.max(0.001, math.min(0.005, next_at - ngx.now())))
    end
  else
    local reqs = {}
    for i = 1, args.n do reqs[i] = request() end
    results = client:batch(reqs, { concurrency = args.concurrency })
  end
  ngx.update_time()
  local finished = ngx.now()
  local ok, errors = 0, {}
  for i = 1, args.n do
    local res = results[i]
    if res and res.status == 200 and not res.kind then
      ok = ok + 1
    else
      local kind = res and (res.kind or tostring(res.status)) or "none"
      errors[kind] = (errors[kind] or 0) + 1
    end
  end
  local stats = client:stats()
  client:close()
  return { ok = ok, errors = errors, throttled = throttled, started = started, finished = finished,
           events = events, mode = stats.shared and stats.shared.mode, worker = ngx.worker.id(),
           -- the cosocket driver, and never the blocking one
           resty = (package.loaded["resty.redis"] or package.loaded["nginx.redis"]) ~= nil,
           blocking = package.loaded.redis ~= nil }
end

local timed = require("timer_driver")(drive)
C["start"], C["result"] = timed.start, timed.result

-- The resty.redis link alone: a script on the node args.port names (a
-- cluster node that may not hold args.key), run twice with every node's
-- scripts flushed between (args.ports), so the second goes by NOSCRIPT.
C["link"] = function(ctx)
  local args = ctx.args
  local link = sturdy_redis.link(sturdy_redis.settings { port = args.port, password = args.password }, "resty")
  local script = sturdy_redis.script("return { KEYS[1], ARGV[1], redis.call('INCR', KEYS[1]) }")
  local first, err1 = link:eval(script, { args.key }, { 1.5 })
  local sha = script.sha
  for _, port in ipairs(args.ports or {}) do
    local red = (package.loaded["resty.redis"] or package.loaded["nginx.redis"]):new()
    assert(red:connect("127.0.0.1", port))
    if args.password then assert(red:auth(args.password)) end
    assert(red:script("flush"))
    red:close()
  end
  local second, err2 = link:eval(script, { args.key }, { 2 })
  link:close()
  return { first = first, err1 = err1, second = second, err2 = err2, sha = sha, ready = link:ready(),
           down = link:down_error() or nil, blocking = package.loaded.redis ~= nil }
end

return C
