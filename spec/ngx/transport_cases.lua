-- The same calls on both transports: each case makes its calls with
-- ctx.args.transport ("curl" or "ngx") and returns what they gave, as plain
-- data. spec/transport_spec.lua runs each case inside nginx (ngx, through
-- spec/support/ngx_runner.lua) and in busted itself (curl), and asserts the
-- same things of both. Scenario ids come from ctx.args.id, so the outer spec
-- can read what reached the mock.
-- luacheck: globals ngx
local sturdy = require "sturdy"
local anthropic = require "sturdy.anthropic"
local openai = require "sturdy.openai"
local cjson = require "cjson.safe"

local C = {}

local FAST = { throttled = 0.01, overloaded = 0.01, transient = 0.01, timeout = 0.01 }
local KEY = "sk-ant-transport-0123456789abcdef"
local ASK = { max_tokens = 64, messages = { { role = "user", content = "tell me a streamed story" } } }

local function steps(id, list)
  return { ["x-mock-scenario"] = id, ["x-mock-steps"] = list, ["x-mock-steps-sep"] = "|" }
end

local function client(ctx, opts)
  local cfg = { base_url = ctx.mock.http_url, transport = ctx.args.transport, retry = { base = FAST } }
  for k, v in pairs(opts or {}) do cfg[k] = v end
  return sturdy.client(cfg)
end

-- A provider on its own client; opts go to the client (headers, retry, hooks).
local function provider(ctx, class, model, opts)
  local copts = { transport = ctx.args.transport, retry = { base = FAST } }
  for k, v in pairs(opts or {}) do copts[k] = v end
  return class.new { api_key = KEY, base_url = ctx.mock.http_url, model = model, client_options = copts }
end

-- An error as plain data.
local function E(err)
  if not err then return nil end
  return {
    kind = err.kind, class = err.class, status = err.status, retryable = err.retryable, stopped = err.stopped,
    retry_after = err.retry_after, committed = err.committed, type = err.type, detail = err.detail,
    text = tostring(err), attempts = err.attempts and #err.attempts, request_id = err.request_id,
    is_error = sturdy.is_error(err),
  }
end

local function kinds(attempts)
  local out = {}
  for i, a in ipairs(attempts or {}) do out[i] = { status = a.status, kind = a.kind, delay = a.delay } end
  return out
end

local function collect(iter)
  local types = {}
  for ev in iter do types[#types + 1] = ev.type end
  return types
end

---------------------------------------------------------------------------
-- Providers

C["anthropic messages"] = function(ctx)
  local c = provider(ctx, anthropic, "claude-sonnet-4-5")
  local r = assert(c:messages { max_tokens = 64, system = "Be brief.",
                                messages = { { role = "user", content = "Hello there" } } })
  local key = c.client:key_for(c:_request { messages = {} })
  local s = c.client:stats(key)
  local out = {
    text = r.text, stop_reason = r.stop_reason, model = r.model, request_id = r.request_id,
    input = r.usage.input, output = r.usage.output, cost = r.cost, attempts = #r.attempts,
    latency = r.latency, key = key, learned = s.limits.requests.learned, calls = s.usage.calls,
    status = r.status,
  }
  c.client:close()
  return out
end

C["openai chat"] = function(ctx)
  local g = provider(ctx, openai, "gpt-4o-mini")
  local r = assert(g:chat { messages = { { role = "user", content = "Hello" } } })
  local out = { text = r.text, input = r.usage.input, output = r.usage.output, cost = r.cost,
                stop_reason = r.stop_reason, attempts = #r.attempts }
  g.client:close()
  return out
end

C["provider retries"] = function(ctx)
  local c = provider(ctx, anthropic, "claude-sonnet-4-5", { headers = steps(ctx.args.id, "529|529|200") })
  local r = assert(c:messages { max_tokens = 5, messages = { { role = "user", content = "y" } } })
  c.client:close()
  return { attempts = kinds(r.attempts), text = r.text }
end

C["provider errors"] = function(ctx)
  local out = {}
  for _, s in ipairs { "400", "401", "404", "529;retry-after=3600" } do
    local c = provider(ctx, anthropic, "claude-sonnet-4-5", { headers = steps(ctx.args.id .. s, s) })
    local r, err = c:messages { max_tokens = 5, messages = { { role = "user", content = "x" } } }
    out[s] = E(err)
    out[s].got_reply = r ~= nil
    c.client:close()
  end
  return out
end

---------------------------------------------------------------------------
-- Streams

C["anthropic stream"] = function(ctx)
  local c = provider(ctx, anthropic, "claude-sonnet-4-5")
  local iter, s = c:stream(ASK)
  local types = collect(iter)
  local streamed = assert(s:result())
  local plain = assert(c:messages(ASK))
  c.client:close()
  return { types = types, text = streamed.text, plain = plain.text, output = streamed.usage.output,
           plain_output = plain.usage.output, attempts = #streamed.attempts }
end

C["stream error before a delta"] = function(ctx)
  local c = provider(ctx, anthropic, "claude-sonnet-4-5", { headers = steps(ctx.args.id, "stream_error|200") })
  local iter, s = c:stream(ASK)
  local types = collect(iter)
  local r = assert(s:result())
  c.client:close()
  return { types = types, attempts = kinds(r.attempts) }
end

C["stream error after a delta"] = function(ctx)
  local c = provider(ctx, anthropic, "claude-sonnet-4-5",
                     { headers = steps(ctx.args.id, "stream_error;after_delta=1|200") })
  local types = {}
  local s = c:stream(ASK, { on_event = function(ev) types[#types + 1] = ev.type end })
  local _, err = s:result()
  c.client:close()
  return { types = types, err = E(err) }
end

C["stream truncated"] = function(ctx)
  local c = provider(ctx, anthropic, "claude-sonnet-4-5", { headers = steps(ctx.args.id, "truncated") })
  local iter, s = c:stream(ASK)
  local types = collect(iter)
  local _, err = s:result()
  local g = provider(ctx, openai, "gpt-4o-mini", { headers = steps(ctx.args.id .. "o", "truncated") })
  local _, oerr = select(2, g:stream { messages = ASK.messages }):result()
  c.client:close()
  g.client:close()
  return { types = types, err = E(err), openai = E(oerr) }
end

C["openai stream"] = function(ctx)
  local g = provider(ctx, openai, "gpt-4o-mini")
  local iter, s = g:stream { messages = ASK.messages }
  local types = collect(iter)
  local streamed = assert(s:result())
  local plain = assert(g:chat { messages = ASK.messages })
  local g2 = provider(ctx, openai, "gpt-4o-mini", { headers = steps(ctx.args.id, "stream_error|200") })
  local r2 = assert(select(2, g2:stream { messages = ASK.messages }):result())
  g.client:close()
  g2.client:close()
  return { last = types[#types], text = streamed.text, plain = plain.text, retried = kinds(r2.attempts) }
end

C["stream on_event"] = function(ctx)
  local c = provider(ctx, anthropic, "claude-sonnet-4-5")
  local seen = {}
  local s = c:stream(ASK, { on_event = function(ev) seen[#seen + 1] = ev.type end })
  local before = #seen
  while c.client:poll(0.05) > 0 do end
  local r = assert(s:result())
  c.client:close()
  return { before = before, last = seen[#seen], text = r.text }
end

---------------------------------------------------------------------------
-- Retries

C["retry delays"] = function(ctx)
  local seen = {}
  local c = client(ctx, { retry = { base = { overloaded = 0.2, transient = 0.01 }, jitter = "none" },
                          on_retry = function(info) seen[#seen + 1] = info end })
  local res, err = c:request { path = "/v1/messages", body = "{}", headers = steps(ctx.args.id, "529|529|200") }
  c:close()
  return { status = res and res.status, err = E(err), attempts = kinds(res and res.attempts), retries = seen }
end

C["retry after"] = function(ctx)
  local c = client(ctx)
  local res = assert(c:request { path = "/v1/messages", body = "{}",
                                 headers = steps(ctx.args.id, "429;retry-after=1|200") })
  c:close()
  return { status = res.status, attempts = kinds(res.attempts) }
end

C["retry stops"] = function(ctx)
  local c = client(ctx)
  local out = {}
  local _, err = c:request { path = "/echo", key = ctx.args.id .. "h",
                             headers = steps(ctx.args.id .. "h", "529;retry-after=3600") }
  out.hint = E(err)
  _, err = c:request { path = "/echo", headers = steps(ctx.args.id .. "f", "400") }
  out.fatal = E(err)
  _, err = c:request { path = "/echo", headers = steps(ctx.args.id .. "a", "503"), attempts = 2 }
  out.attempts = E(err)
  local slow = client(ctx, { retry = { base = 5, jitter = "none" } })
  _, err = slow:request { path = "/echo", headers = steps(ctx.args.id .. "d", "503"), timeout = { total = 2 } }
  out.deadline = E(err)
  _, err = c:request { path = "/echo", headers = steps(ctx.args.id .. "t", "200;delay=2000"),
                       timeout = { total = 0.3 } }
  out.total = E(err)
  _, err = c:request { path = "/echo", headers = steps(ctx.args.id .. "n", "503;should-retry=false|200") }
  out.should_not = E(err)
  local res = c:request { path = "/echo", headers = steps(ctx.args.id .. "s", "400;should-retry=true|200") }
  out.should = res and #res.attempts
  c:close()
  slow:close()
  return out
end

C["retry budget"] = function(ctx)
  local c = client(ctx, { retry = { base = { overloaded = 0.001 }, attempts = 4 }, breaker = false })
  local exhausted = 0
  for _ = 1, 120 do
    local _, err = c:request { path = "/echo", headers = steps(ctx.args.id, "503") }
    if err.stopped == "budget_exhausted" then exhausted = exhausted + 1 end
  end
  c:close()
  return { exhausted = exhausted }
end

C["transport failures"] = function(ctx)
  local c = client(ctx, { retry = { base = FAST, attempts = 1 } })
  local out = {}
  local cases = {
    drop = { steps = "drop" },
    first_byte = { steps = "200;delay=1000", timeout = { first_byte = 0.2 } },
    idle = { steps = "stall_mid;stall=2000", timeout = { idle = 0.2 } },
    garbage = { steps = "garbage" },
    huge = { steps = "huge;size=200000", max_response = 1000 },
    refused = { url = "http://127.0.0.1:1/echo" },
  }
  for name, t in pairs(cases) do
    local _, err = c:request { url = t.url or (ctx.mock.http_url .. "/v1/messages"), method = "POST",
                               body = '{"model":"m","max_tokens":5,"messages":[]}',
                               headers = t.steps and steps(ctx.args.id .. name, t.steps) or nil,
                               timeout = t.timeout, max_response = t.max_response }
    out[name] = E(err)
  end
  c:close()
  return out
end

C["tls"] = function(ctx)
  local opts = { base_url = ctx.mock.https_url }
  if ctx.args.transport == "curl" then opts.tls = { ca_file = ctx.mock.ca_file } end
  local c = client(ctx, opts)
  local res, err = c:request { path = "/echo" }
  c:close()
  return { status = res and res.status, err = E(err), tls = res and res.timings.tls }
end

---------------------------------------------------------------------------
-- Policies per upstream key

C["breaker"] = function(ctx)
  local events = {}
  local c = client(ctx, {
    retry = { attempts = 1 },
    breaker = { window = 10, min_calls = 10, failure_rate = 0.5, open_for = 30, probes = 2 },
    on_event = function(ev) if ev.type == "breaker" then events[#events + 1] = ev.from .. ">" .. ev.to end end,
  })
  local refused, retry_after, kinds_seen = 0, nil, {}
  for _ = 1, 30 do
    local _, err = c:request { path = "/echo", key = ctx.args.id, headers = steps(ctx.args.id, "503") }
    kinds_seen[err.kind] = (kinds_seen[err.kind] or 0) + 1
    if err.kind == "circuit_open" then
      refused = refused + 1
      retry_after = err.retry_after
    end
  end
  local s = c:stats(ctx.args.id)
  c:close()
  return { refused = refused, retry_after = retry_after, kinds = kinds_seen, events = events,
           state = s.breaker.state, opens = s.breaker.opens, circuit_open = s.circuit_open }
end

C["paced"] = function(ctx)
  local c = client(ctx, { limits = { rpm = 600, burst = 0.1 } })
  local reqs = {}
  for i = 1, 6 do reqs[i] = { path = "/echo", key = ctx.args.id, headers = steps(ctx.args.id, "200") } end
  local results = c:batch(reqs, { concurrency = 6 })
  local s = c:stats(ctx.args.id)
  c:close()
  local ok = 0
  for _, r in ipairs(results) do if not sturdy.is_error(r) then ok = ok + 1 end end
  return { ok = ok, paced = s.paced, limit = s.limits.requests.limit }
end

C["429 pause"] = function(ctx)
  local events = {}
  local c = client(ctx, { on_event = function(ev) events[#events + 1] = ev end })
  local key = ctx.args.id
  assert(c:request { path = "/echo", key = key }) -- ends slow start
  local a = c:submit { path = "/echo", key = key, headers = steps(key .. "a", "429;retry-after=1|200") }
  local t0 = sturdy.monotime()
  while c:stats(key).limits.paused_for == nil and sturdy.monotime() - t0 < 5 do c:poll(0.01) end
  local b = c:submit { path = "/echo", key = key, headers = steps(key .. "b", "200") }
  assert(b:wait(5))
  assert(a:wait(5))
  local paused
  for _, ev in ipairs(events) do if ev.type == "paused" then paused = { key = ev.key, pause = ev.pause } end end
  c:close()
  return { paused = paused }
end

C["priority queue"] = function(ctx)
  local c = client(ctx, { limits = { concurrency = 1 } })
  local key = ctx.args.id
  assert(c:request { path = "/echo", key = key })
  local order = {}
  local function go(name, priority, delay)
    c:submit({ path = "/echo", key = key, priority = priority,
               headers = steps(key .. name, "200;delay=" .. (delay or 0)) },
             function() order[#order + 1] = name end)
  end
  go("first", "normal", 200)
  go("low1", "low"); go("norm1", "normal"); go("high1", "high"); go("low2", "low"); go("high2", "high")
  local s = c:stats(key)
  c:run()
  c:close()
  return { order = order, queued = s.queued, in_flight = s.in_flight }
end

C["queue bounds"] = function(ctx)
  local c = client(ctx, { limits = { concurrency = 1, queue = 2 } })
  local key = ctx.args.id
  assert(c:request { path = "/echo", key = key })
  local running = c:submit { path = "/echo", key = key, headers = steps(key .. "0", "200;delay=600") }
  local q1 = c:submit { path = "/echo", key = key, timeout = { total = 0.2 } }
  local q2 = c:submit { path = "/echo", key = key }
  local over = c:submit { path = "/echo", key = key }
  local _, over_err = over:wait(1)
  local _, q1_err = q1:wait(2)
  local q2_res = q2:wait(5)
  local r_res = running:wait(5)
  local s = c:stats(key)
  c:close()
  return { over = E(over_err), q1 = E(q1_err), q2 = q2_res and q2_res.status, running = r_res and r_res.status,
           queue_full = s.queue_full }
end

---------------------------------------------------------------------------
-- Handles, batches, cancel

C["batch"] = function(ctx)
  local c = client(ctx)
  local want = { "200", "404", "200", "529|200", "401", "200", "drop|200", "200", "400" }
  local reqs = {}
  for i, script in ipairs(want) do
    reqs[i] = { path = "/v1/messages", body = '{"model":"m","max_tokens":5,"messages":[]}',
                headers = steps(ctx.args.id .. i, script) }
  end
  local progress = 0
  local results = c:batch(reqs, { concurrency = 3, on_progress = function() progress = progress + 1 end })
  local out = { progress = progress, results = {} }
  for i, r in ipairs(results) do
    out.results[i] = sturdy.is_error(r) and r.kind or r.status
  end
  c:close()
  return out
end

C["cancel"] = function(ctx)
  local c = client(ctx, { limits = { concurrency = 1 } })
  local key = ctx.args.id
  assert(c:request { path = "/echo", key = key })
  local fired = {}
  local running = c:submit({ path = "/echo", key = key, headers = steps(key .. "r", "200;delay=2000") },
                           function(_, err) fired[#fired + 1] = "running:" .. (err and err.kind or "ok") end)
  local queued = c:submit({ path = "/echo", key = key },
                          function(_, err) fired[#fired + 1] = "queued:" .. (err and err.kind or "ok") end)
  c:poll(0.05)
  local queued_before = c:stats(key).queued
  queued:cancel()
  running:cancel()
  local t0 = sturdy.monotime()
  c:run()
  local took = sturdy.monotime() - t0
  local after = c:stats(key)
  -- the key is free again: a new call starts at once
  local res = c:request { path = "/echo", key = key }
  -- on_data returning false cancels a stream
  local _, stop_err = c:request { path = "/v1/messages",
                                  body = '{"model":"m","max_tokens":16,"stream":true,"messages":[]}',
                                  headers = steps(key .. "s", "200;drip=100"), on_data = function() return false end }
  c:close()
  return { fired = fired, queued_before = queued_before, took = took, in_flight = after.in_flight,
           queued_after = after.queued, next = res and res.status, stop = E(stop_err) }
end

C["close with calls in flight"] = function(ctx)
  local c = client(ctx)
  local fired = {}
  for i = 1, 3 do
    c:submit({ path = "/echo", headers = steps(ctx.args.id .. i, "200;delay=3000") },
             function(_, err) fired[#fired + 1] = err and err.kind or "ok" end)
  end
  c:poll(0.05)
  local t0 = sturdy.monotime()
  c:close()
  local ok = pcall(c.submit, c, { path = "/echo" })
  return { fired = fired, took = sturdy.monotime() - t0, submit_after_close = ok }
end

C["on_data"] = function(ctx)
  local c = client(ctx)
  local body = '{"model":"claude-test","max_tokens":16,"stream":true,'
    .. '"messages":[{"role":"user","content":"hello there"}]}'
  local chunks = {}
  local res = assert(c:request { path = "/v1/messages", body = body,
                                 on_data = function(chunk) chunks[#chunks + 1] = chunk end })
  local all = table.concat(chunks)
  -- each on a client of its own: libcurl quietly sends again a request whose
  -- reused connection dies before a reply, and the attempt would not show
  local got = 0
  local fresh = client(ctx)
  local _, err = fresh:request { path = "/v1/messages", body = body, timeout = { idle = 0.5 },
                                 headers = steps(ctx.args.id, "stall_mid;stall=2000|200"),
                                 on_data = function(chunk) got = got + #chunk end }
  fresh:close()
  local retried = {}
  fresh = client(ctx)
  local r2 = assert(fresh:request { path = "/v1/messages", body = body, headers = steps(ctx.args.id .. "d", "drop|200"),
                                    on_data = function(chunk) retried[#retried + 1] = chunk end })
  fresh:close()
  local raised = not pcall(c.request, c, { path = "/v1/messages", body = body,
                                           on_data = function() error("boom", 0) end })
  local after = c:request { path = "/echo" }
  c:close()
  return { body = res.body, has_start = all:find("event: message_start", 1, true) ~= nil,
           has_stop = all:find("event: message_stop", 1, true) ~= nil, stalled = E(err), got = got,
           retried_attempts = #r2.attempts, retried_stop = table.concat(retried):find("message_stop", 1, true) ~= nil,
           raised = raised, after = after and after.status }
end

---------------------------------------------------------------------------
-- Secrets: nothing emitted shows the key (a port of spec/support/secrets_run.lua)

C["secrets"] = function(ctx)
  local out, seen = {}, {}
  local function dump(v, depth)
    depth = depth or 0
    local t = type(v)
    if t == "table" then
      if seen[v] or depth > 12 then return end
      seen[v] = true
      local mt = getmetatable(v)
      if mt and mt.__tostring then out[#out + 1] = tostring(v) end
      for k, x in pairs(v) do
        dump(k, depth + 1)
        dump(x, depth + 1)
      end
    elseif t == "string" or t == "number" or t == "boolean" or t == "userdata" then
      out[#out + 1] = tostring(v)
    end
  end
  local events = {}
  local function hook(x) events[#events + 1] = x end
  local keep = {}
  local function k(...) for i = 1, select("#", ...) do keep[#keep + 1] = (select(i, ...)) end end
  local ask = { max_tokens = 16, messages = { { role = "user", content = "hello" } } }
  for _, s in ipairs { "401", "403", "429;retry-after=3600", "529|529|529", "500", "drop|drop|drop", "malformed",
                       "html", "400", "200" } do
    local c = provider(ctx, anthropic, "claude-sonnet-4-5", { headers = steps(ctx.args.id .. s, s),
                                                              retry = { base = 0.01, attempts = 3 },
                                                              on_retry = hook, on_event = hook })
    k(c:messages(ask))
    k(c.client:stats(), c.client:stats(c.client:stats().keys[1] or ""), c, c.client)
    local iter, st = c:stream(ask)
    for ev in iter do k(ev) end
    k(st, st:result())
    c.client:close()
  end
  local echo = provider(ctx, anthropic, "m")
  k(echo.client:request { path = "/echo", headers = steps(ctx.args.id .. "e", "400") })
  k(events)
  dump(keep)
  return { text = table.concat(out, "\n"), key = KEY, count = #out }
end

---------------------------------------------------------------------------
-- Only inside nginx

-- Calls of every kind, then: was the curl engine ever loaded in this worker?
C["no curl in the cosocket path"] = function(ctx)
  local before = package.loaded["sturdy.core"] ~= nil
  local c = provider(ctx, anthropic, "claude-sonnet-4-5")
  assert(c:messages(ASK))
  assert(select(2, c:stream(ASK)):result())
  c.client:batch({ { path = "/echo" }, { path = "/echo" } }, { concurrency = 2 })
  local h = c.client:submit { path = "/echo" }
  assert(h:wait(5))
  local engine = getmetatable(c.client._engine)
  c.client:close()
  return { before = before, after = package.loaded["sturdy.core"] ~= nil, ngx = package.loaded["sturdy.ngx"] ~= nil,
           engine = engine == require("sturdy.ngx").Engine }
end

-- The transport named for this phase, and a call made in it.
C["phase"] = function(ctx)
  local c = sturdy.client { base_url = ctx.mock.http_url }
  local res, err = c:request { path = "/echo" }
  local out = { phase = ngx.get_phase(), ngx = getmetatable(c._engine) == require("sturdy.ngx").Engine,
                status = res and res.status, err = E(err) }
  c:close()
  return out
end

-- Two clients of this worker with their own C state share the key's state
-- through the dict, as two workers do.
C["shared by two clients"] = function(ctx)
  local opts = { retry = { attempts = 1 }, breaker = { min_calls = 6, failure_rate = 0.5, open_for = 30, window = 10 } }
  local a, b = client(ctx, opts), client(ctx, opts)
  local key = ctx.args.id
  local sent_a, sent_b = 0, 0
  for i = 1, 20 do
    local c = i % 2 == 1 and a or b
    local _, err = c:request { path = "/echo", key = key, headers = steps(key, "503") }
    if err.kind ~= "circuit_open" then
      if c == a then sent_a = sent_a + 1 else sent_b = sent_b + 1 end
    end
  end
  local fresh = client(ctx, opts)
  local _, err = fresh:request { path = "/echo", key = key, headers = steps(key, "503") }
  local s = fresh:stats(key)
  a:close()
  b:close()
  fresh:close()
  return { sent_a = sent_a, sent_b = sent_b, fresh = E(err), state = s.breaker.state }
end

-- Two clients share a configured rate: together they pass what one would.
C["rate shared by two clients"] = function(ctx)
  local opts = { limits = { rpm = 600, burst = 0.1 } }
  local a, b = client(ctx, opts), client(ctx, opts)
  local key = ctx.args.id
  local t0 = sturdy.monotime()
  local ha, hb = {}, {}
  for i = 1, 5 do
    ha[i] = a:submit { path = "/echo", key = key, headers = steps(key, "200") }
    hb[i] = b:submit { path = "/echo", key = key, headers = steps(key, "200") }
  end
  for i = 1, 5 do
    assert(ha[i]:wait(10))
    assert(hb[i]:wait(10))
  end
  local took = sturdy.monotime() - t0
  a:close()
  b:close()
  return { took = took }
end

-- Which worker runs this, and a call there (for the two-worker spec).
C["worker call"] = function(ctx)
  local c = client(ctx, ctx.args.options and cjson.decode(ctx.args.options) or nil)
  local res, err = c:request { path = "/echo", key = ctx.args.key,
                               headers = steps(ctx.args.id, ctx.args.steps or "200") }
  local s = c:stats(ctx.args.key)
  c:close()
  return { worker = ngx.worker.id(), status = res and res.status, err = E(err), state = s.breaker.state,
           workers = #s.workers }
end

C["misconfigured"] = function(ctx)
  local out = {}
  local ok, err = pcall(sturdy.client, { base_url = ctx.mock.http_url, transport = "ngx", shared_dict = "nope" })
  out.dict = not ok and err
  ok, err = pcall(sturdy.client, { base_url = ctx.mock.https_url, transport = "ngx", tls = { ca_file = "/x.pem" } })
  out.ca = not ok and err
  local c = client(ctx)
  ok, err = pcall(c.fds, c)
  out.fds = not ok and err
  ok, err = pcall(c.request, c, { path = "/echo", bogus = 1 })
  out.bogus = not ok and err
  ok, err = pcall(c.request, c, { path = "/echo", headers = { ["Content-Length"] = "1" } })
  out.framing = not ok and err
  c:close()
  return out
end

-- Inside nginx every client with the same settings shares a key's breaker and
-- limiter through the dict, as the workers do: each case starts from an empty dict.
for name, fn in pairs(C) do
  C[name] = function(ctx)
    if ctx.args.transport == "ngx" and not ctx.args.keep_state then ngx.shared.sturdy:flush_all() end
    return fn(ctx)
  end
end

return C
