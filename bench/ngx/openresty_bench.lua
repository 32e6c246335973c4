-- The locations of bench/openresty.lua inside nginx: /chat (one sturdy call
-- to the mock's 200 ms endpoint per request), /relay (one sturdy call to the
-- mock's fast endpoint, its reply passed on, as proxy_pass does), /ping, and
-- an open-loop driver that makes calls at a fixed rate in every worker.
-- luacheck: globals ngx

local sturdy = require "sturdy"
local cjson = require "cjson.safe"

local M = {}

local clients = {}

-- One client per worker and setting, made on first use.
local function client(name, opts)
  local c = clients[name]
  if not c then
    local cfg = { transport = "ngx", shared_dict = "sturdy" }
    for k, v in pairs(opts) do cfg[k] = v end
    c = sturdy.client(cfg)
    clients[name] = c
  end
  return c
end

local function pass_on(res, err)
  if not res then
    ngx.status = 502
    ngx.header["content-type"] = "application/json"
    return ngx.print(cjson.encode { error = err.kind, message = tostring(err) })
  end
  ngx.status = res.status
  ngx.header["content-type"] = res.headers["content-type"]
  return ngx.print(res.body)
end

--- /chat: a sturdy call to the mock's 200 ms endpoint (its /echo advertises
-- no rate limit; the Messages path advertises 4000/min, which sturdy would pace to).
function M.slow(base_url)
  local c = client("slow", { base_url = base_url, limits = { concurrency = 1000, queue = 10000 } })
  return pass_on(c:request { path = "/echo", headers = { ["x-mock-steps"] = "200;delay=200" } })
end

--- /relay: the request's body to the mock's /echo through sturdy, the reply passed on.
function M.relay(base_url)
  local c = client("relay", { base_url = base_url, limits = { concurrency = 1000, queue = 10000 } })
  ngx.req.read_body()
  return pass_on(c:request { method = "POST", path = "/echo", body = ngx.req.get_body_data() })
end

---------------------------------------------------------------------------
-- The open-loop driver: GET /drive?run=ID&rate=R&seconds=S&scenario=... starts,
-- in the worker that answers, a timer that submits R calls a second for S
-- seconds (whatever the replies do), then waits for them; each worker starts
-- once per run. GET /result?run=ID gives every worker's outcome counts.

local function count(results, res, err)
  local k = res and tostring(res.status) or err.kind
  results[k] = (results[k] or 0) + 1
end

local function drive(premature, cfg)
  if premature then return end
  local dict = ngx.shared.sturdy
  local c = client("drive-" .. cfg.run, cfg.client)
  local results = {}
  local interval = 1 / cfg.rate
  local started = ngx.now()
  local next_at, stop_at = sturdy.monotime(), sturdy.monotime() + cfg.seconds
  local n = 0
  while sturdy.monotime() < stop_at do
    n = n + 1
    c:submit({ method = "POST", path = cfg.path, body = cfg.body, headers = cfg.headers },
             function(res, err) count(results, res, err) end)
    next_at = next_at + interval
    repeat
      local wait = next_at - sturdy.monotime()
      c:poll(wait > 0 and wait or 0)
    until sturdy.monotime() >= next_at
  end
  local grace = sturdy.monotime() + (cfg.grace or 30)
  while c:pending() > 0 and sturdy.monotime() < grace do c:poll(0.1) end
  local key = c:key_for { method = "POST", path = cfg.path, body = cfg.body }
  local s = c:stats(key)
  dict:set("drive:" .. cfg.run .. ":" .. ngx.worker.id(), cjson.encode {
    worker = ngx.worker.id(), submitted = n, results = results, took = ngx.now() - started,
    stats = { breaker = s.breaker, limits = s.limits, paced = s.paced, throttled = s.throttled,
              circuit_open = s.circuit_open, all = s.all, engine = c:stats() },
  })
end

function M.drive()
  local args = ngx.req.get_uri_args()
  local run = assert(args.run)
  local dict = ngx.shared.sturdy
  local me = ngx.worker.id()
  local started = false
  if dict:add("drive-started:" .. run .. ":" .. me, true) then
    local cfg = cjson.decode(ngx.decode_base64(args.cfg))
    cfg.run = run
    started = assert(ngx.timer.at(0, drive, cfg))
  end
  ngx.say(cjson.encode { worker = me, started = started })
end

function M.result()
  local run = ngx.var.arg_run
  local dict = ngx.shared.sturdy
  local out = {}
  for id = 0, ngx.worker.count() - 1 do
    local v = dict:get("drive:" .. run .. ":" .. id)
    if v then out[#out + 1] = cjson.decode(v) end
  end
  ngx.say(cjson.encode(out))
end

---------------------------------------------------------------------------
-- Calls in a row inside nginx, each timed alone, alternating: sturdy's client,
-- sturdy.cosocket alone, and a bare exchange on one cosocket (no timeouts,
-- limits, parser or errors). Medians in microseconds, steadier than wrk's p50.

local function median_us(t)
  table.sort(t)
  return t[math.floor(#t / 2) + 1] * 1e6
end

local function bare_echo(host, port)
  local sock = ngx.socket.tcp()
  assert(sock:connect(host, port))
  sock:send("GET /echo HTTP/1.1\r\nHost: " .. host .. "\r\n\r\n")
  local length
  while true do
    local line = assert(sock:receive("*l"))
    if line == "" then break end
    length = tonumber(line:match("^[Cc]ontent%-[Ll]ength:%s*(%d+)")) or length
  end
  assert(sock:receive(length))
  sock:setkeepalive(60000)
end

M.sequential = function(ctx)
  local now = sturdy.monotime
  local http = require("sturdy.cosocket").new()
  local c = client("sequential", { base_url = ctx.mock.http_url })
  local url = ctx.mock.http_url .. "/echo"
  local with_client, with_cosocket, bare = {}, {}, {}
  for i = 1, ctx.args.n do
    local t0 = now()
    assert(c:request { path = "/echo" })
    local t1 = now()
    assert(http:request { url = url })
    local t2 = now()
    bare_echo("127.0.0.1", ctx.mock.port)
    with_client[i], with_cosocket[i], bare[i] = t1 - t0, t2 - t1, now() - t2
  end
  return { client = median_us(with_client), cosocket = median_us(with_cosocket), bare = median_us(bare) }
end

return M
