-- Spend caps shared by the workers of one nginx (spec/budget_ngx_spec.lua).
-- "start" makes an Anthropic provider on the ngx transport with args.budget in
-- a timer of this worker and returns at once; the timer waits for
-- args.start_at (wall clock), submits args.n calls at once and, when they have
-- all ended, waits for the other drivers' calls to end too (args.drivers, a
-- count in lua_shared_dict "results") before it settles any reply, so nothing
-- a reply frees can admit a call of the same round. What happened goes to
-- "results" under args.id, which "result" hands out (nil while it runs).
-- "raw" makes one raw call that reserves args.usd and keeps its client (and the
-- hold of its reply) under args.id; "settle" settles that hold, "drop" closes
-- the client without settling it; "state" reads the caps as a worker sees
-- them; "reset" empties the dict the caps live in.
-- luacheck: globals ngx
local anthropic = require "sturdy.anthropic"
local cjson = require "cjson.safe"

local C = {}

local PARAMS = { max_tokens = 1000, messages = { { role = "user", content = "What is the capital of France?" } } }

local kept = {} -- clients of "raw" calls, with the hold of their reply, by id

local function claude(args)
  return anthropic.new { api_key = "sk-test", base_url = args.url, model = "claude-sonnet-4-5",
                         client_options = { transport = "ngx", budget = args.budget,
                                            limits = { concurrency = 256 } } }
end

local function client_state(client)
  local b = client:stats().budget.client
  if not b then return {} end -- no cap of the client's own
  return { used = b.used.usd_per_hour, reserved = b.reserved.usd, passed = b.passed, refused = b.refused }
end

-- The caps as client sees them, from this worker; the client is closed.
local function last_state(client)
  local s = client_state(client)
  client:close()
  s.worker = ngx.worker.id()
  return s
end

local function drive(args)
  local results = ngx.shared.results
  local c = claude(args)
  ngx.update_time()
  local wait = args.start_at - ngx.now()
  if wait > 0 then ngx.sleep(wait) end
  local ended, raw = 0, {}
  local finishers = {}
  for i = 1, args.n do
    local req, finish = c:prepare(PARAMS)
    finishers[i] = finish
    c.client:submit(req, function(res, err)
      raw[i] = { res = res, err = err }
      ended = ended + 1
    end)
  end
  while ended < args.n do c.client:poll(0.01) end
  -- every driver's calls have reserved (or been refused) before any reply settles
  results:incr(args.round .. "|ended", 1, 0)
  while (results:get(args.round .. "|ended") or 0) < args.drivers do ngx.sleep(0.005) end
  local ok, spent, refusals = 0, 0, {}
  for i = 1, args.n do
    local r = raw[i]
    if r.res then
      local out, ferr = finishers[i](r.res)
      if out then
        ok = ok + 1
        spent = spent + out.cost
      else
        refusals[#refusals + 1] = { kind = ferr.kind }
      end
    else
      local e = r.err
      refusals[#refusals + 1] = { kind = e.kind, class = e.class, retryable = e.retryable, detail = e.detail,
                                  retry_after = e.retry_after, status = e.status }
    end
  end
  local out = { ok = ok, spent = spent, refusals = refusals, worker = ngx.worker.id() }
  c.client:close()
  return out
end

local timed = require("timer_driver")(drive)
C["start"], C["result"] = timed.start, timed.result

-- The caps as this worker sees them (a client of the same settings, made now).
C["state"] = function(ctx)
  return last_state(claude(ctx.args).client)
end

-- One raw call reserving args.usd (under args.key and args.tag, if given); a
-- 2xx keeps its client and hold for "settle".
C["raw"] = function(ctx)
  local args = ctx.args
  local c = claude(args)
  local body = cjson.encode { model = "claude-sonnet-4-5", max_tokens = 16,
                              messages = { { role = "user", content = "hi" } } }
  local res, err = c.client:request { method = "POST", path = "/v1/messages", body = body,
                                      headers = { ["x-api-key"] = "sk-test", ["anthropic-version"] = "2023-06-01" },
                                      reserve = { usd = args.usd }, key = args.key, tag = args.tag }
  local out = { worker = ngx.worker.id(), status = res and res.status, hold = res and res.hold ~= nil,
                state = client_state(c.client) }
  if args.key then
    local b = c.client:stats(args.key).budget
    out.key_reserved, out.key_used = b.reserved.usd, b.used.usd_per_hour
  end
  if err then
    out.kind, out.detail, out.retry_after, out.err_status = err.kind, err.detail, err.retry_after, err.status
  end
  if res and res.hold then
    kept[args.id] = { client = c.client, hold = res.hold }
  else
    c.client:close()
  end
  return out
end

-- Settles the hold of "raw" call args.id at args.usd, in the worker that made it.
C["settle"] = function(ctx)
  local k = assert(kept[ctx.args.id], "no call kept under this id in this worker")
  kept[ctx.args.id] = nil
  k.client:record_usage("settled", { input = 10, output = 6, cache_read = 0, cache_write = 0 }, nil, ctx.args.usd,
                        { hold = k.hold })
  return last_state(k.client)
end

-- Closes the client of "raw" call args.id without settling its hold.
C["drop"] = function(ctx)
  local k = assert(kept[ctx.args.id], "no call kept under this id in this worker")
  kept[ctx.args.id] = nil
  return last_state(k.client)
end

-- Spend without a reservation (another process's, say): fills args.usd of the cap.
C["charge"] = function(ctx)
  local c = claude(ctx.args)
  c.client:record_usage("charged", { input = 0, output = 1000, cache_read = 0, cache_write = 0 }, nil, ctx.args.usd)
  return last_state(c.client)
end

C["reset"] = function()
  ngx.shared.sturdy:flush_all()
  ngx.shared.results:flush_all()
  return { worker = ngx.worker.id() }
end

return C
