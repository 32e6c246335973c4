--- sturdy.ngx: the OpenResty transport. The engine the client facade drives
-- inside nginx, with the curl engine's methods (submit, step, take, ...), on
-- cosockets (sturdy.cosocket), so a call never blocks the worker.
--
-- Each submitted call runs in a light thread (ngx.thread.spawn): admission,
-- the attempt, the report, the retry decision and the retry wait (ngx.sleep);
-- a call the key's queue holds waits on a semaphore until a pump decides it.
-- Every decision is the C decision core's (sturdy.policy's decider); nothing
-- here recomputes one. What a call produces (streamed body pieces, retry and
-- event notices, its result) goes into the box of the request context that
-- submitted it (one per ngx.ctx), whose semaphore wakes that context's
-- step(); take() hands it out in the 4-slot items of the curl engine.
--
-- Shared state. Per upstream key, the breaker, rate limiter, retry budget and
-- slow-start flag live in the lua_shared_dict named by the client option
-- `shared_dict` (default "sturdy") as the blob of src/policy/upstream.h. Each
-- decision loads it, decides and saves it under a lock made with dict:add
-- (held for microseconds: nothing yields inside), so the workers of one nginx
-- share one breaker and one rate per key. In-flight counts, queues and latency
-- windows stay per worker; stats merge what can be merged across workers.
--
-- Spend caps (option `budget`) are shared the same way: the spend of each
-- scope that caps calls (the client's, each capped key's and tag's) is a blob
-- in the dict (src/policy/spend.h), and every spend operation (a call's
-- reservation before its first admission, its end, settle, charge) loads them
-- all, acts and saves them under one lock of their own, so every worker of the
-- nginx reserves against one cap. That lock is never taken while a key's is
-- held. The holds of a call that ended with a 2xx stay with the worker that
-- made it, which settles them (record_usage) or charges them in full when due.
-- luacheck: read globals ngx

local policy = require "sturdy.policy"
local http = require "sturdy.cosocket"
local cjson = require "cjson.safe"

local M = {}

local type, pairs, ipairs, tostring, tonumber = type, pairs, ipairs, tostring, tonumber
local error, pcall, xpcall, setmetatable = error, pcall, xpcall, setmetatable
local format, find, concat = string.format, string.find, table.concat
local max, min = math.max, math.min
local monotime = policy.monotime
local traceback = debug.traceback

-- The phases where nginx lets a call use cosockets.
local COSOCKET_PHASES = {
  rewrite = true, access = true, content = true, timer = true,
  ssl_cert = true, ssl_session_fetch = true, ssl_client_hello = true,
}

local LOCK_TTL = 0.1         -- seconds a lock outlives a worker that died holding it
local LOCK_SPINS = 200       -- tries before a yielding caller sleeps a millisecond
local LOCK_SLEEPS = 50       -- then it proceeds unlocked (counted in stats)
local LOCK_SPINS_NO_YIELD = 4000 -- tries of a caller that cannot sleep
local QUEUE_WAIT_MAX = 3600  -- seconds a queued call waits per wake-up when it has no deadline
local PUBLISH_EVERY = 1      -- seconds between a worker's published summaries of a key
local PUBLISHED_TTL = 120    -- seconds a summary outlives a worker that stopped publishing
local KEY_INDEX_MAX = 65536  -- bytes of the shared list of keys

-- The kinds a body may report through fail_attempt (as the curl engine).
local BODY_KINDS = {
  overloaded = true, rate_limited = true, server = true, bad_request = true, auth = true,
  permission = true, not_found = true, too_large = true, stream_error = true, bad_response = true,
}
local CLASSES = { throttled = true, overloaded = true, transient = true, timeout = true, fatal = true,
                  canceled = true }

-- Transport failures that keep the response status, as the curl engine keeps it.
local KEEPS_STATUS = {
  response_too_large = true, bad_response = true, idle_timeout = true, total_timeout = true,
  first_byte_timeout = true,
}

local function fail(msg, ...)
  error("sturdy: " .. format(msg, ...), 0)
end

local function one_line(s, n)
  s = tostring(s):gsub("[%c]+", " ")
  if #s > n then s = s:sub(1, n) .. "..." end
  return s
end

local semaphore_new
local function new_semaphore()
  if not semaphore_new then semaphore_new = require("ngx.semaphore").new end
  return semaphore_new()
end

---------------------------------------------------------------------------
-- The engine
---------------------------------------------------------------------------

local Engine = {}
Engine.__index = Engine

local Request = {}
Request.__index = Request

-- TLS settings nginx owns: a client cannot set them per call.
local NGINX_TLS = { "ca_file", "ca_path", "client_cert", "client_key", "client_key_password" }

--- ngx.engine(compiled) -> engine. compiled: options.client's configuration.
-- Raises outside nginx, for TLS options nginx owns, and when the shared dict
-- is not declared.
function M.engine(compiled)
  if type(ngx) ~= "table" or type(ngx.socket) ~= "table" or type(ngx.shared) ~= "table" then
    fail("the ngx transport needs OpenResty (nginx with its Lua module); use transport = \"curl\" elsewhere")
  end
  local transport = compiled.transport or {}
  for _, name in ipairs(NGINX_TLS) do
    if transport[name] ~= nil then
      fail("option 'tls.%s' is not available with the ngx transport: nginx verifies TLS against "
           .. "lua_ssl_trusted_certificate (set it in nginx.conf)", name)
    end
  end
  local dict_name = transport.shared_dict or "sturdy"
  local dict = ngx.shared[dict_name]
  if not dict then
    fail("the ngx transport keeps breaker and limiter state in lua_shared_dict '%s', which nginx.conf "
         .. "does not declare: add `lua_shared_dict %s 10m;` or set option shared_dict", dict_name, dict_name)
  end
  local decider = policy.decider(compiled)
  local concurrency = compiled.upstream and compiled.upstream.limits and compiled.upstream.limits.concurrency or 16
  -- the client's timeouts are the cosocket client's own: requests that keep
  -- them pass none (the call's deadline bounds every attempt: no total)
  local ms = compiled.client and compiled.client.timeout_ms or {}
  local timeouts = {}
  for _, name in ipairs { "connect", "first_byte", "idle" } do
    timeouts[name] = (ms[name] or 0) > 0 and ms[name] / 1000 or false
  end
  local client = http.new { proxy = transport.proxy, no_proxy = transport.no_proxy,
                            pool_size = min(max(64, concurrency), 4096),
                            timeout = { connect = timeouts.connect, first_byte = timeouts.first_byte,
                                        idle = timeouts.idle, total = false } }
  local notices = compiled.notices or {}
  local prefix = "sturdy|" .. decider:fingerprint() .. "|"
  return setmetatable({
    decider = decider, http = client, timeouts = timeouts, dict = dict, prefix = prefix,
    key_index = prefix .. "keys",
    upstreams = {}, boxes = setmetatable({}, { __mode = "k" }), live = {}, nlive = 0, pending = 0,
    heads = {}, want_retries = notices.retries, want_events = notices.events,
    n_requests = 0, n_attempts = 0, n_retries = 0, n_connections = 0,
    lock_timeouts = 0, state_refused = 0, state_unsaved = 0,
    -- spend caps: one lock, and the dict names of each scope's spend (nil: no caps)
    spend_lock = compiled.budget and { lock = prefix .. "$lock" } or nil, spend_scopes = {},
    spend_store = { load = function(_, scope, blob) return decider:spend_load(scope, blob) end },
  }, Engine)
end

local function open_engine(self)
  if self.closed then fail("the client is closed") end
  return self
end

---------------------------------------------------------------------------
-- Shared state: a lock on dict:add, the blob loaded and saved around each decision
---------------------------------------------------------------------------

-- Takes the key's lock. A holder never yields, so the spin is short; a caller
-- that may yield sleeps a millisecond between rounds. Returns whether it holds it.
local function lock(self, ks, can_yield)
  local dict, name = self.dict, ks.lock
  local spins = can_yield and LOCK_SPINS or LOCK_SPINS_NO_YIELD
  for round = 0, can_yield and LOCK_SLEEPS or 0 do
    if round > 0 then ngx.sleep(0.001) end
    for _ = 1, spins do
      if dict:add(name, true, LOCK_TTL) then return true end
    end
  end
  self.lock_timeouts = self.lock_timeouts + 1
  return false
end

local function unlock(self, ks, held)
  if held then self.dict:delete(ks.lock) end
end

local function loaded(self, ok, why)
  if not ok then
    -- another build's or other settings' state: ours replaces it on save
    self.state_refused = self.state_refused + 1
    if self.state_refused == 1 then
      ngx.log(ngx.WARN, "sturdy: shared state refused (", why, "); this worker's replaces it")
    end
  end
end

-- Brings the key's shared state into obj (a call; or the decider, with key),
-- unless the dict still holds what this engine saved last: every save bumps
-- the key's version, so a worker that made the last decision skips the load.
local function sync_in(self, ks, obj, key)
  local dict = self.dict
  local version = dict:get(ks.version_key)
  if version ~= nil and version == ks.version then return end
  local blob = dict:get(ks.state)
  if key then
    loaded(self, obj:load(key, blob))
  else
    loaded(self, obj:load(blob))
  end
  ks.version = version
end

local function sync_out(self, ks, blob)
  if not blob then return end
  local dict = self.dict
  local ok, err = dict:set(ks.state, blob)
  if not ok then
    self.state_unsaved = self.state_unsaved + 1
    if self.state_unsaved == 1 then
      ngx.log(ngx.ERR, "sturdy: cannot save shared state in lua_shared_dict: ", err)
    end
    return
  end
  ks.version = dict:incr(ks.version_key, 1, 0)
end

-- Adds key to the list of keys every worker has seen (once per worker and key).
local function index_key(self, key)
  local dict, name = self.dict, self.key_index
  local list = dict:get(name) or "\n"
  if find(list, "\n" .. key .. "\n", 1, true) then return end
  local ks = { lock = name .. "|lock" }
  local held = lock(self, ks, false)
  list = dict:get(name) or "\n"
  if not find(list, "\n" .. key .. "\n", 1, true) and #list + #key + 1 <= KEY_INDEX_MAX then
    dict:set(name, list .. key .. "\n")
  end
  unlock(self, ks, held)
end

-- The engine's record of an upstream key: dict names, its waker, its summaries.
local function key_state(self, key)
  local ks = self.upstreams[key]
  if ks then return ks end
  local prefix = self.prefix
  ks = { key = key, state = prefix .. "s|" .. key, version_key = prefix .. "v|" .. key,
         lock = prefix .. "l|" .. key, workers = prefix .. "w|" .. key .. "|", published = 0 }
  self.upstreams[key] = ks
  index_key(self, key)
  return ks
end

---------------------------------------------------------------------------
-- Boxes: what each request context has to take, and its semaphore
---------------------------------------------------------------------------

local function current_box(self)
  local ctx = ngx.ctx
  local box = self.boxes[ctx]
  if not box then
    box = { items = {}, head = 1, n = 0, pending = 0, live = 0, sema = new_semaphore() }
    self.boxes[ctx] = box
  end
  return box
end

-- Wakes every coroutine of the context waiting in step() (posting may be
-- refused in a phase such as log, where close may run: they then wake on their timeout).
local function wake_box(box)
  local waiting = -box.sema:count()
  if waiting > 0 then pcall(box.sema.post, box.sema, waiting) end
end

-- Queues an item { what, a, b, c, request, box } for the box's take().
local function push(self, box, what, a, b, c, r)
  local item = { what, a, b, c, r, box }
  local n = box.n + 1
  box.items[n], box.n = item, n
  box.pending, self.pending = box.pending + 1, self.pending + 1
  wake_box(box)
  return item
end

-- Takes an item out, handed out or not (a failed attempt's body, a re-judged end).
local function drop_item(self, item)
  if item and not item.gone then
    item.gone = true
    local box = item[6]
    box.pending, self.pending = box.pending - 1, self.pending - 1
  end
end

-- Hands the core's events to the on_event hook of the context whose call caused
-- them (none: dropped, as nobody of this worker is listening).
local function emit_events(self, box)
  if not self.want_events then return end
  local events = self.decider:events()
  if not events or not box then return end
  for _, ev in ipairs(events) do push(self, box, "event", ev) end
end

---------------------------------------------------------------------------
-- Spend caps: every scope's spend loaded and saved under one lock
---------------------------------------------------------------------------

-- The dict names of a spend scope's state (a scope name of d:spend_scopes).
local function spend_state(self, scope)
  local ss = self.spend_scopes[scope]
  if not ss then
    ss = { state = self.prefix .. "$s|" .. scope, version_key = self.prefix .. "$v|" .. scope }
    self.spend_scopes[scope] = ss
  end
  return ss
end

-- fn(...) with every spend of the client's caps brought in from the dict and
-- saved back after, under the spend lock (can_yield: as lock's); key and tag
-- (may be nil): a charge's, whose spends must be among those loaded. Returns
-- what fn returns (4 at most).
local function with_spends(self, can_yield, key, tag, fn, ...)
  local d = self.decider
  local scopes = d:spend_scopes(key, tag) or {}
  local held = lock(self, self.spend_lock, can_yield)
  for i = 1, #scopes do sync_in(self, spend_state(self, scopes[i]), self.spend_store, scopes[i]) end
  local ok, a, b, c, e = pcall(fn, ...)
  for i = 1, #scopes do sync_out(self, spend_state(self, scopes[i]), d:spend_save(scopes[i])) end
  unlock(self, self.spend_lock, held)
  if not ok then error(a, 0) end
  return a, b, c, e
end

-- The call is over: its reservation parks (its last attempt got a 2xx; r.hold
-- says which hold to settle) or goes back. Before the call is released under
-- its key's lock, which must not touch the spends.
local function end_spend(self, r)
  local call = r.call
  if self.spend_lock and call:spend_wanted() then
    r.hold = with_spends(self, false, nil, nil, call.spend_end, call, r.status)
    emit_events(self, r.box)
  end
end

---------------------------------------------------------------------------
-- Finishing a call: its result in the shape of the curl engine's
---------------------------------------------------------------------------

local function give_head(self, r)
  local head = r.head
  if head then
    r.head = nil
    local heads = self.heads
    heads[#heads + 1] = head
  end
end

local function drop_data(self, r)
  local data = r.data
  if data then
    for i = 1, #data do drop_item(self, data[i]) end
    r.data = nil
  end
end

local function retire(self, r)
  r.done, r.state = true, "done"
  if self.live[r] then
    self.live[r] = nil
    self.nlive = self.nlive - 1
    r.box.live = r.box.live - 1
  end
end

-- Ends the call with `failure` ({ kind, class, detail, retryable, stop,
-- from_status }) or success (nil), and queues its "done" item.
local function finish(self, r, failure)
  if r.done then return end
  end_spend(self, r)
  retire(self, r)
  local call = r.call
  local _, committed, retry_after = call:info()
  local res = {
    body = r.body or "", raw_headers = r.block or "", attempts = r.log,
    timings = r.timings or { dns = 0, connect = 0, tls = 0, ttfb = 0, total = 0 },
    http_version = r.http_version, request_id = r.request_id,
  }
  if r.status and r.status > 0 then res.status = r.status end
  res.hold = r.hold
  if failure then
    res.kind, res.class = failure.kind, failure.class
    res.detail = call:scrub(failure.detail or "")
    res.body, res.raw_headers = call:scrub(res.body), call:scrub(res.raw_headers)
    res.retry_after = retry_after
    res.committed = committed
    res.retryable = failure.retryable or false
    res.from_status = failure.from_status or false
    res.stopped = failure.stop
  end
  r.res, r.sema = nil, nil
  r.done_item = push(self, r.box, "done", r.handle, res, nil, r)
end

local function log_attempt(r, status, kind)
  local log = r.log
  log[#log + 1] = { status = status and status > 0 and status or nil, kind = kind, delay = 0 }
end

---------------------------------------------------------------------------
-- Admission and pumping
---------------------------------------------------------------------------

local pump_key

local function waker(premature, self, ks, at)
  if premature or self.closed or ks.wake_at ~= at then return end
  ks.wake_at = nil
  pump_key(self, ks)
end

-- The key's limiter opens again in ms: a timer pumps its queue then.
local function schedule_wake(self, ks, ms)
  local at = monotime() + ms / 1000
  if ks.wake_at and ks.wake_at <= at then return end
  ks.wake_at = at
  local ok, err = ngx.timer.at(ms / 1000, waker, self, ks, at)
  if not ok then
    ks.wake_at = nil
    ngx.log(ngx.ERR, "sturdy: cannot schedule the wake-up of a paced key: ", err)
  end
end

-- Wakes the owners (requests) of calls a pump decided, and arms the next wake.
local function after_pump(self, ks, owners, wake_ms)
  if owners then
    for i = 1, #owners do
      local o = owners[i]
      o.woken = true
      if o.sema then o.sema:post(1) end
    end
  end
  if wake_ms then schedule_wake(self, ks, wake_ms) end
end

function pump_key(self, ks)
  if self.closing then return end
  local d, key = self.decider, ks.key
  local held = lock(self, ks, true)
  sync_in(self, ks, d, key)
  local owners, wake_ms = d:pump(key)
  sync_out(self, ks, d:save(key))
  unlock(self, ks, held)
  emit_events(self, owners and owners[1].box)
  after_pump(self, ks, owners, wake_ms)
end

-- Asks the core whether the call may start. Returns true to start an attempt,
-- false when the call is over (refused, its deadline passed, canceled).
local function admit(self, r)
  local call, ks = r.call, r.ks
  if self.spend_lock and not r.reserved then
    -- the spend caps first, under their own lock: all or nothing, once per call
    r.reserved = true
    local verdict, kind, class, detail = with_spends(self, true, nil, nil, call.reserve, call)
    emit_events(self, r.box)
    if r.done then return false end
    if verdict == "refused" then
      log_attempt(r, 0, kind)
      finish(self, r, { kind = kind, class = class, detail = detail })
      return false
    end
  end
  local held = lock(self, ks, true)
  if r.done then
    unlock(self, ks, held)
    return false
  end
  sync_in(self, ks, call)
  local verdict, a, b, c = call:admit(r)
  sync_out(self, ks, call:save())
  unlock(self, ks, held)
  emit_events(self, r.box)
  while true do
    if verdict == "start" then
      r.state = "running"
      return true
    end
    if verdict == "refused" then
      log_attempt(r, 0, a)
      finish(self, r, { kind = a, class = b, detail = c })
      return false
    end
    r.state = "queued"
    if a then schedule_wake(self, ks, a) end
    local _, _, _, deadline = call:info()
    local wait = deadline and deadline - monotime() or QUEUE_WAIT_MAX
    if wait <= 0 then
      call:unqueue()
      log_attempt(r, 0, "total_timeout")
      finish(self, r, { kind = "total_timeout", class = "timeout", detail = "the deadline passed while queued" })
      return false
    end
    r.sema = r.sema or new_semaphore()
    if not r.woken then r.sema:wait(min(wait, QUEUE_WAIT_MAX)) end
    if r.done then return false end
    if r.woken then
      r.woken = false
      verdict, a, b, c = call:verdict()
    else
      verdict, a = "queued", nil
    end
  end
end

---------------------------------------------------------------------------
-- Attempts
---------------------------------------------------------------------------

local function take_head(self)
  local heads = self.heads
  local n = #heads
  if n == 0 then return policy.head() end
  local head = heads[n]
  heads[n] = nil
  return head
end

-- The end of an attempt: report it, pump the key, decide. Returns the retry
-- delay in ms, or nil when the call is over.
local function end_attempt(self, r, status, kind, class, detail, cannot_yield)
  local call, ks, d = r.call, r.ks, self.decider
  local head = status and status > 0 and r.head or nil
  local tm = r.timings
  local held = lock(self, ks, not cannot_yield)
  sync_in(self, ks, call)
  local okind, oclass, request_id = call:report(status, head, kind, class, tm.ttfb, tm.total)
  local owners, wake_ms
  if not self.closing then owners, wake_ms = d:pump(ks.key) end
  local retry, delay, hinted, retryable, stop = call:decide(status, head, kind, class)
  sync_out(self, ks, call:save())
  unlock(self, ks, held)
  emit_events(self, r.box)
  after_pump(self, ks, owners, wake_ms)
  r.block = head and head:block() or ""
  r.request_id = request_id or r.request_id
  r.status = status
  log_attempt(r, status, okind)
  if monotime() - ks.published >= PUBLISH_EVERY then M.publish(self, ks) end
  if not okind then
    finish(self, r, nil)
    return nil
  end
  r.outcome = { kind = okind, class = oclass, detail = detail or "", from_status = kind == nil }
  if not retry then
    r.outcome.retryable, r.outcome.stop = retryable, stop
    finish(self, r, r.outcome)
    return nil
  end
  drop_data(self, r)
  r.log[#r.log].delay = delay / 1000
  r.state, r.retried = "waiting", r.attempt
  self.n_retries = self.n_retries + 1
  if self.want_retries then
    local attempts = call:info()
    push(self, r.box, "retry", { key = ks.key, attempt = attempts, class = oclass, kind = okind,
                                 status = status and status > 0 and status or nil, delay = delay / 1000,
                                 hinted = hinted })
  end
  return delay
end

-- What a transport failure keeps of the status, as the curl engine does.
local function failure_status(err)
  return KEEPS_STATUS[err.kind] and err.status or 0
end

-- One attempt over a cosocket. Returns the retry delay in ms, or nil when the call is over.
local function attempt(self, r)
  local spec = r.spec
  r.attempt = r.attempt + 1
  self.n_attempts = self.n_attempts + 1
  r.head = r.head or take_head(self)
  r.attempt_started = monotime()
  local req = r.http_req
  if not req then
    local timeout, own = spec.timeout, self.timeouts
    if timeout.connect == own.connect and timeout.first_byte == own.first_byte and timeout.idle == own.idle then
      timeout = nil
    else
      timeout.total = false -- the call's deadline bounds every attempt
    end
    req = { url = spec.url, method = spec.method, headers = spec.headers, body = spec.body, timeout = timeout,
            max_response = spec.max_response, head = r.head }
    r.http_req = req
  end
  req.head = r.head
  local _, _, _, deadline = r.call:info()
  req.deadline = deadline
  r.body, r.fail = nil, nil
  local res, err = self.http:open(req)
  if r.done then
    if res then res:close() end
    return nil
  end
  if not res then
    r.timings, r.http_version = err.timings or { dns = 0, connect = 0, tls = 0, ttfb = 0, total = 0 }, nil
    return end_attempt(self, r, failure_status(err), err.kind, err.class, err.detail)
  end
  if not res.reused then self.n_connections = self.n_connections + 1 end
  r.res, r.timings, r.http_version = res, res.timings, res.http_version
  local status = res.status
  r.status = status
  -- a failed attempt's bytes are never handed out: only a 2xx body streams
  local streaming = r.stream and status >= 200 and status < 300
  local parts, n = {}, 0
  while true do
    local piece, rerr = res:read()
    if r.done then
      res:close()
      return nil
    end
    local failed = r.fail
    if failed then
      -- the body said this attempt failed (fail_attempt while running)
      res:close()
      r.res = nil
      return end_attempt(self, r, status, failed.kind, failed.class, failed.detail)
    end
    if not piece then
      r.res = nil
      if rerr then
        if not streaming then r.body = concat(parts) end
        return end_attempt(self, r, failure_status(rerr), rerr.kind, rerr.class, rerr.detail)
      end
      break
    end
    if streaming then
      local item = push(self, r.box, "data", r.handle, piece, r.attempt, r)
      local data = r.data or {}
      data[#data + 1] = item
      r.data = data
    else
      n = n + 1
      parts[n] = piece
    end
  end
  r.body = streaming and "" or (n == 1 and parts[1] or concat(parts))
  return end_attempt(self, r, status, nil, nil, nil)
end

-- The call's life in its light thread; wait_ms: a retry wait to sit out first.
local function drive(self, r, wait_ms)
  if wait_ms then
    ngx.sleep(wait_ms / 1000)
    if r.done then return end
  end
  while true do
    if not admit(self, r) then return end
    local delay = attempt(self, r)
    if not delay or r.done then return end
    ngx.sleep(delay / 1000)
    if r.done then return end
  end
end

-- A call's thread never lets an error escape: the call ends as a transport
-- failure (its slot given back) rather than hang its waiter.
local function run(self, r, wait_ms)
  local ok, err = xpcall(drive, traceback, self, r, wait_ms)
  if not ok and not r.done then
    ngx.log(ngx.ERR, "sturdy: a call failed inside the ngx transport: ", err)
    pcall(function()
      end_spend(self, r)
      local held = lock(self, r.ks, false)
      sync_in(self, r.ks, r.call)
      r.call:release()
      sync_out(self, r.ks, r.call:save())
      unlock(self, r.ks, held)
    end)
    log_attempt(r, 0, "transport")
    finish(self, r, { kind = "transport", class = "fatal", detail = "internal error: " .. one_line(err, 300) })
  end
end

local function spawn(self, r, wait_ms)
  local ok, thread = pcall(ngx.thread.spawn, run, self, r, wait_ms)
  if ok and thread then
    r.thread = thread
    return
  end
  -- no thread: the call ends at once, its slot, place and reservation given back
  end_spend(self, r)
  local held = lock(self, r.ks, false)
  sync_in(self, r.ks, r.call)
  r.call:release()
  sync_out(self, r.ks, r.call:save())
  unlock(self, r.ks, held)
  log_attempt(r, 0, "transport")
  finish(self, r, { kind = "transport", class = "fatal",
                    detail = "cannot start a light thread: " .. one_line(thread, 200) })
end

---------------------------------------------------------------------------
-- The engine's methods (those of the curl engine)
---------------------------------------------------------------------------

local function check_phase(what)
  local phase = ngx.get_phase()
  if not COSOCKET_PHASES[phase] then
    fail("%s: the ngx transport cannot make calls in nginx's %s phase (cosockets work in rewrite, access, "
         .. "content and timer); call from one of those, or from ngx.timer.at", what, phase)
  end
end

--- engine:submit(handle, request, json_body, held) -> request object with
-- cancel, commit, fail_attempt, gate and admission. Checks the request as the
-- curl engine does. A held request waits for request:gate (its place in a
-- shared limit) before its thread starts.
function Engine:submit(handle, req, json_body, held)
  open_engine(self)
  if self.closing then fail("the client is closed") end
  check_phase("submit")
  local call, spec = self.decider:call(req, json_body)
  local box = current_box(self)
  local r = setmetatable({
    engine = self, handle = handle, call = call, spec = spec, box = box, ks = key_state(self, spec.key),
    stream = spec.stream, state = "new", log = {}, attempt = 0,
  }, Request)
  self.live[r], self.nlive = true, self.nlive + 1
  box.live = box.live + 1
  self.n_requests = self.n_requests + 1
  if held then
    r.state = "held"
    return r
  end
  spawn(self, r, nil)
  return r
end

--- engine:check(request, json_body): raises as submit would; sends nothing.
function Engine:check(req, json_body)
  open_engine(self).decider:check(req, json_body)
end

function Engine:key_for(req)
  return open_engine(self).decider:key_for(req)
end

--- engine:step(max_wait_ms) -> active, ready: waits (yielding) at most
-- max_wait_ms for something to take in this request context.
function Engine:step(max_wait_ms)
  open_engine(self)
  local box = current_box(self)
  if box.pending > 0 then return self.nlive, true end
  -- always yield: a loop around step() must never keep the calls' threads
  -- (or anything else of this worker) from running
  check_phase("waiting")
  if max_wait_ms and max_wait_ms > 0 then
    box.sema:wait(max_wait_ms / 1000)
  else
    ngx.sleep(0.001) -- not 0: without OpenResty's patch, nginx warns on every sleep(0)
  end
  return self.nlive, box.pending > 0
end

-- Moves the items of box into list; stops before a "done" when streamed bytes
-- are in this take (a reader may still judge the attempt by them).
local function take_box(self, box, list, n)
  local items, i = box.items, box.head
  local saw_data = false
  while i <= box.n do
    local item = items[i]
    local what = item[1]
    if what == "done" and saw_data and not item.gone then break end
    items[i] = nil
    i = i + 1
    if not item.gone then
      drop_item(self, item)
      list[n + 1], list[n + 2], list[n + 3], list[n + 4] = what, item[2], item[3] or false, item[4] or false
      n = n + 4
      local r = item[5]
      if what == "data" then
        saw_data = true
        -- the first bytes handed out commit a call that commits on delivery
        if r.stream == "auto" then r.call:commit() end
      elseif what == "done" then
        -- taken: nothing can judge this call again, its head parser goes back
        r.done_item = nil
        give_head(self, r)
      end
    end
  end
  if i > box.n then
    box.items, box.head, box.n = {}, 1, 0
  else
    box.head = i
  end
  return n, box.pending > 0
end

--- engine:take(list, n) -> n, more: appends what is ready for this request
-- context to list[n+1 ...], in order, four slots each ("retry", info | "event", event | "data", handle,
-- chunk, attempt | "done", handle, result). After cancel_all, every context's.
function Engine:take(list, n)
  local more = false
  if self.pending == 0 then return n, false end
  if self.closing then
    for _, box in pairs(self.boxes) do
      local box_more = true
      while box_more do n, box_more = take_box(self, box, list, n) end
    end
    return n, false
  end
  local box = self.boxes[ngx.ctx]
  if box then n, more = take_box(self, box, list, n) end
  return n, more
end

local function cancel(self, r, detail)
  if r.done then return false end
  local state = r.state
  -- stop the thread where it waits (only its parent may kill it; else it sees r.done when it wakes)
  if r.thread and r.thread ~= coroutine.running() then pcall(ngx.thread.kill, r.thread) end
  if r.res then pcall(r.res.close, r.res) end
  r.res = nil
  drop_data(self, r)
  end_spend(self, r)
  local ks = r.ks
  local held = lock(self, ks, false)
  sync_in(self, ks, r.call)
  r.call:release()
  local owners, wake_ms
  if state == "running" and not self.closing then owners, wake_ms = self.decider:pump(ks.key) end
  sync_out(self, ks, r.call:save())
  unlock(self, ks, held)
  emit_events(self, r.box)
  after_pump(self, ks, owners, wake_ms)
  log_attempt(r, 0, "canceled")
  local sema = r.sema
  finish(self, r, { kind = "canceled", class = "canceled", detail = detail })
  if sema then pcall(sema.post, sema, 1) end
  return true
end

--- engine:cancel_all(): every unfinished call ends as canceled; take() then
-- hands out every context's items.
function Engine:cancel_all()
  if self.closed then return end
  self.closing = true
  -- queued ones first, so canceling a running one starts none of them
  for _, state in ipairs { "queued", "new", "waiting", "running" } do
    local list = {}
    for r in pairs(self.live) do
      if r.state == state then list[#list + 1] = r end
    end
    for _, r in ipairs(list) do cancel(self, r, "canceled by the caller") end
  end
  for r in pairs(self.live) do cancel(self, r, "canceled by the caller") end
end

function Engine:close()
  if self.closed then return end
  self:cancel_all()
  if self.spend_lock then
    -- the holds of replies nobody settled: charged in full now, not left reserved in the dict
    local d = self.decider
    with_spends(self, false, nil, nil, d.spend_close, d)
  end
  self.closed = true
  self.decider:close()
  self.boxes, self.live, self.heads = setmetatable({}, { __mode = "k" }), {}, {}
end

function Engine:active()
  return open_engine(self).nlive
end

function Engine.fds()
  fail("fds() is not available with the ngx transport: nginx drives the calls")
end

function Engine.timeout()
  fail("timeout() is not available with the ngx transport: nginx drives the calls")
end

function Engine:stats()
  open_engine(self)
  local running, waiting, queued, done = 0, 0, 0, 0
  for r in pairs(self.live) do
    local s = r.state
    if s == "running" or s == "new" then
      running = running + 1
    elseif s == "waiting" then
      waiting = waiting + 1
    elseif s == "queued" then
      queued = queued + 1
    end
  end
  for _, box in pairs(self.boxes) do
    for i = box.head, box.n do
      local item = box.items[i]
      if item[1] == "done" and not item.gone then done = done + 1 end
    end
  end
  return {
    requests = self.n_requests, attempts = self.n_attempts, retries = self.n_retries,
    connections = self.n_connections, running = running, waiting = waiting, queued = queued, done = done,
    lock_timeouts = self.lock_timeouts, state_refused = self.state_refused, state_unsaved = self.state_unsaved,
  }
end

---------------------------------------------------------------------------
-- Spend caps: the curl engine's methods, over the spends every worker shares
---------------------------------------------------------------------------

--- engine:settle(hold, usd, tokens) -> settled, events: the actual cost of a
-- call whose result carried `hold`, charged against the caps every worker shares.
function Engine:settle(hold, usd, tokens)
  local d = open_engine(self).decider
  if not self.spend_lock then return d:settle(hold, usd, tokens) end
  return with_spends(self, false, nil, nil, d.settle, d, hold, usd, tokens)
end

--- engine:charge(key, tag, usd, tokens) -> events: spend without a reservation.
function Engine:charge(key, tag, usd, tokens)
  local d = open_engine(self).decider
  if not self.spend_lock then return d:charge(key, tag, usd, tokens) end
  return with_spends(self, false, key, tag, d.charge, d, key, tag, usd, tokens)
end

--- engine:budget() -> the spend caps' state as every worker shares it, or nil.
function Engine:budget()
  local d = open_engine(self).decider
  if not self.spend_lock then return nil end
  return with_spends(self, false, nil, nil, d.budget, d)
end

---------------------------------------------------------------------------
-- Per-upstream stats across workers
---------------------------------------------------------------------------

local COUNTERS = { "in_flight", "queued", "throttled", "circuit_open", "queue_full", "paced" }

local function window_summary(w)
  if not w or w.count == 0 then return { count = 0 } end
  return { count = w.count, min = w.min, max = w.max, mean = w.mean, p50 = w.p50, p90 = w.p90, p99 = w.p99 }
end

local function worker_summary(s)
  local out = { worker = ngx.worker.id(), pid = ngx.worker.pid(), at = ngx.now(),
                latency = window_summary(s.latency), ttfb = window_summary(s.ttfb) }
  for _, k in ipairs(COUNTERS) do out[k] = s[k] end
  return out
end

--- Publishes this worker's summary of a key (counters, latency windows) for
-- the other workers' stats. The engine does it at most once a second per key.
function M.publish(self, ks)
  ks.published = monotime()
  local id = ngx.worker.id()
  local s = id and self.decider:upstream_stats(ks.key)
  if not s then return end
  local body = cjson.encode(worker_summary(s))
  if body then self.dict:set(ks.workers .. id, body, PUBLISHED_TTL) end
end

local function merge_windows(list, field)
  local count, sum, lo, hi = 0, 0, nil, nil
  for _, w in ipairs(list) do
    local x = w[field]
    if x and x.count and x.count > 0 then
      count = count + x.count
      sum = sum + x.mean * x.count
      lo = lo and min(lo, x.min) or x.min
      hi = hi and max(hi, x.max) or x.max
    end
  end
  if count == 0 then return { count = 0 } end
  return { count = count, min = lo, max = hi, mean = sum / count }
end

--- engine:upstream_stats(key) -> table, or nil when no worker named the key.
-- Breaker, limits and budget are the shared state; latency, ttfb, in_flight,
-- queued and the counters are this worker's; `workers` lists every worker's
-- last published summary and `all` merges them (sums; count, min, max and mean
-- of the windows: percentiles do not merge, see each worker's).
function Engine:upstream_stats(key)
  open_engine(self)
  if type(key) ~= "string" then fail("stats takes a key string, got %s", type(key)) end
  local d = self.decider
  local ks = self.upstreams[key]
  if not ks and not self.dict:get(self.prefix .. "s|" .. key) then return nil end
  ks = ks or key_state(self, key)
  sync_in(self, ks, d, key)
  -- a key with a spend cap shows it as every worker shares it
  local s = self.spend_lock and with_spends(self, false, key, nil, d.upstream_stats, d, key) or d:upstream_stats(key)
  if not s then return nil end
  local me = ngx.worker.id()
  local workers = {}
  for id = 0, ngx.worker.count() - 1 do
    local w
    if id == me then
      w = worker_summary(s)
    else
      w = cjson.decode(self.dict:get(ks.workers .. id) or "null")
    end
    if type(w) == "table" then workers[#workers + 1] = w end
  end
  local all = { workers = #workers, latency = merge_windows(workers, "latency"), ttfb = merge_windows(workers, "ttfb") }
  for _, k in ipairs(COUNTERS) do
    local sum = 0
    for _, w in ipairs(workers) do sum = sum + (tonumber(w[k]) or 0) end
    all[k] = sum
  end
  s.workers, s.all = workers, all
  return s
end

--- engine:keys() -> the upstream keys this worker or any other has named.
function Engine:keys()
  open_engine(self)
  local seen, out = {}, {}
  for _, k in ipairs(self.decider:keys()) do
    seen[k] = true
    out[#out + 1] = k
  end
  for k in (self.dict:get(self.key_index) or ""):gmatch("[^\n]+") do
    if not seen[k] then
      seen[k] = true
      out[#out + 1] = k
    end
  end
  return out
end

--- engine:correct(key, dimension, delta): real usage corrects the shared token buckets.
function Engine:correct(key, dim, delta)
  open_engine(self)
  local d = self.decider
  local ks = self.upstreams[key]
  if not ks then return d:correct(key, dim, delta) end -- raises on bad arguments; no such key
  local held = lock(self, ks, false)
  sync_in(self, ks, d, key)
  local ok, err = pcall(d.correct, d, key, dim, delta)
  sync_out(self, ks, d:save(key))
  unlock(self, ks, held)
  if not ok then error(err, 0) end
end

---------------------------------------------------------------------------
-- The fleet scope (sturdy.shared): what Redis answered, handed to the core
-- under the key's lock, as every decision is
---------------------------------------------------------------------------

-- The resty.redis link: a cosocket never blocks the worker.
Engine.redis_driver = "resty"

local function with_key(self, key, fn, ...)
  open_engine(self)
  if type(key) ~= "string" then fail("bad argument #1 (key string expected, got %s)", type(key)) end
  local d, ks = self.decider, key_state(self, key)
  local held = lock(self, ks, false)
  sync_in(self, ks, d, key)
  local ok, a, b, c, e, f = pcall(fn, self, d, ks, ...)
  sync_out(self, ks, d:save(key))
  unlock(self, ks, held)
  if not ok then error(a, 0) end
  emit_events(self, current_box(self))
  return a, b, c, e, f
end

local function open_until(_, d, ks, ms) return d:open_until(ks.key, ms) end
local function fleet_window(_, d, ks, calls, failures, slow) return d:fleet_window(ks.key, calls, failures, slow) end
local function share(_, d, ks, n) return d:share(ks.key, n) end
local function fleet_counts(_, d, ks) return d:fleet_counts(ks.key) end

-- The breaker's counts are this nginx's (its workers share one breaker), so
-- what was added to the fleet is kept beside them: a worker adds only what no
-- other worker of this nginx added.
local function fleet_unsent(self, d, ks)
  local calls, failures, slow = d:fleet_counts(ks.key)
  if not calls then return 0, 0, 0 end
  local name = self.prefix .. "f|" .. ks.key
  local c0, f0, s0 = (self.dict:get(name) or ""):match("^(%d+) (%d+) (%d+)$")
  c0, f0, s0 = tonumber(c0) or 0, tonumber(f0) or 0, tonumber(s0) or 0
  self.dict:set(name, format("%d %d %d", calls, failures, slow))
  -- counts below what was sent: the state was replaced (refused, evicted), all of it is new
  if calls < c0 or failures < f0 or slow < s0 then return calls, failures, slow end
  return calls - c0, failures - f0, slow - s0
end

--- engine:open_until(key, ms): the fleet's breaker for key is open for ms more.
function Engine:open_until(key, ms)
  with_key(self, key, open_until, ms)
end

--- engine:fleet_window(key, calls, failures, slow) -> opened: the fleet's window.
function Engine:fleet_window(key, calls, failures, slow)
  return with_key(self, key, fleet_window, calls, failures, slow)
end

--- engine:share(key, n): this nginx paces key's limits at limit / n (its
-- workers share one limiter); queued calls may go at once with a larger share.
function Engine:share(key, n)
  with_key(self, key, share, n)
  if not self.closing then pump_key(self, self.upstreams[key]) end
end

--- engine:fleet_counts(key) -> calls, failures, slow, state, open_in: see the curl engine's.
function Engine:fleet_counts(key)
  return with_key(self, key, fleet_counts)
end

--- engine:fleet_unsent(key) -> calls, failures, slow: the key's breaker samples
-- no worker of this nginx has added to the fleet's window yet, now taken.
function Engine:fleet_unsent(key)
  return with_key(self, key, fleet_unsent)
end

function Engine:__tostring()
  return format("sturdy.ngx engine (%s)", self.closed and "closed" or "open")
end

---------------------------------------------------------------------------
-- Requests: cancel, commit, fail_attempt
---------------------------------------------------------------------------

--- request:cancel() -> true when it ended the call, false when its end stands.
function Request:cancel()
  return cancel(self.engine, self, "canceled by the caller")
end

--- request:current(attempt) -> whether bytes of that attempt, taken earlier,
-- may still reach the caller: it is the last one, it runs or the call ended
-- with it, and no retry of it was decided since.
function Request:current(n)
  return n == self.attempt and n ~= self.retried and (self.state == "running" or self.done)
end

-- The caller has seen part of the reply: the call is never retried now (also
-- when its end is in but not yet taken: fail_attempt then does not retry it).
function Request:commit()
  self.call:commit()
end

--- The body says this attempt failed (an error event in a 200 stream): it is
-- judged again with this class and kind and retried by the usual rules unless
-- committed. For a call running or finished but not yet taken.
function Request:fail_attempt(class, kind, detail)
  if type(class) ~= "string" or not CLASSES[class] then
    fail("unknown failure class '%s'", tostring(class))
  end
  if type(kind) ~= "string" or not BODY_KINDS[kind] then
    fail("bad argument #3 to 'fail_attempt' (invalid option '%s')", tostring(kind))
  end
  detail = detail ~= nil and tostring(detail) or ""
  local self_engine = self.engine
  if self.done then
    local item = self.done_item
    if not item or item.gone or (item[3] and item[3].kind) then return end
    -- the transfer ended well but its body says otherwise: judge the attempt again
    drop_item(self_engine, item)
    self.done_item = nil
    self.done, self.state = false, "running"
    self_engine.live[self], self_engine.nlive = true, self_engine.nlive + 1
    self.box.live = self.box.live + 1
    self.head = self.head or take_head(self_engine)
    self.log[#self.log] = nil
    local ks, call = self.ks, self.call
    local held = lock(self_engine, ks, false)
    sync_in(self_engine, ks, call)
    local retry, delay, hinted, retryable, stop = call:decide(self.status, self.head, kind, class)
    sync_out(self_engine, ks, call:save())
    unlock(self_engine, ks, held)
    log_attempt(self, self.status, kind)
    self.outcome = { kind = kind, class = class, detail = detail, from_status = false }
    if not retry then
      self.outcome.retryable, self.outcome.stop = retryable, stop
      finish(self_engine, self, self.outcome)
      return
    end
    self.log[#self.log].delay = delay / 1000
    self.state, self.retried = "waiting", self.attempt
    self_engine.n_retries = self_engine.n_retries + 1
    if self_engine.want_retries then
      local attempts = call:info()
      push(self_engine, self.box, "retry", { key = ks.key, attempt = attempts, class = class, kind = kind,
                                             status = self.status and self.status > 0 and self.status or nil,
                                             delay = delay / 1000, hinted = hinted })
    end
    spawn(self_engine, self, delay)
    return
  end
  if self.state ~= "running" then return end
  local killed = false
  if self.res and self.thread then
    local ok, stopped = pcall(ngx.thread.kill, self.thread)
    killed = ok and stopped
  end
  if killed then
    -- the thread is stopped where it read: end the attempt here, retry in a new one
    pcall(self.res.close, self.res)
    self.res = nil
    local tm = self.timings
    tm.total = max(tm.total, monotime() - self.attempt_started)
    local delay = end_attempt(self_engine, self, self.status or 0, kind, class, detail, true)
    if delay and not self.done then spawn(self_engine, self, delay) end
    return
  end
  -- the thread will see it after its next read
  self.fail = { kind = kind, class = class, detail = detail }
end

--- request:gate(wait_ms) -> true, or false when it no longer waits: its next
-- attempt starts no earlier than wait_ms from now (its place in a shared
-- limit); a held request starts its thread, a queued one stays queued until then.
function Request:gate(wait_ms)
  local e = self.engine
  if self.done or e.closed or self.state == "running" then return false end
  if type(wait_ms) ~= "number" then fail("bad argument #1 to 'gate' (number expected, got %s)", type(wait_ms)) end
  self.call:not_before(wait_ms)
  if self.state == "held" then
    self.state = "new"
    spawn(e, self, nil)
  elseif self.state == "queued" then
    pump_key(e, self.ks)
  end
  return true
end

local ADMISSION_STATES = { held = "held", new = "waiting", waiting = "waiting", queued = "queued",
                           running = "running" }

--- request:admission(at_ms) -> key, max_wait_ms, requests, input_tokens,
-- output_tokens, tokens, state: as the curl engine's; nothing once it is over.
function Request:admission(at_ms)
  if self.done or self.engine.closed then return end
  local max_wait, c1, c2, c3, c4 = self.call:admission(at_ms)
  return self.ks.key, max_wait, c1, c2, c3, c4, ADMISSION_STATES[self.state] or "done"
end

M.Engine, M.Request = Engine, Request
return M
