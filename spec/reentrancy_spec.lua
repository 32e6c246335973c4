-- Every hook and callback may call every public method: the call works or
-- raises a clear error, nothing is freed early, lost or counted twice. Run
-- under `make test-asan` this is also the memory-safety proof.
local sturdy = require "sturdy"
local anthropic = require "sturdy.anthropic"
local mock = require "spec.support.mock"

local steps = mock.steps
local FAST = { throttled = 0.001, overloaded = 0.001, transient = 0.001, timeout = 0.001 }
local KEY = "sk-ant-reentrancy-0123456789"

local function anthropic_body()
  return { model = "claude-sonnet-4-5", max_tokens = 16, messages = { { role = "user", content = "hi" } } }
end

describe("re-entrancy", function()
  local m

  setup(function() m = assert(mock.start()) end)
  teardown(function() m:stop() end)
  before_each(function() m:reset() end)

  -- A client whose hooks are set by the test; `calls` counts callbacks per handle.
  local function new_client(opts)
    local cfg = { base_url = m.http_url, retry = { base = FAST }, breaker = false }
    for k, v in pairs(opts or {}) do cfg[k] = v end
    return sturdy.client(cfg)
  end

  it("survives an on_retry hook that drives the client while many calls are pooled", function()
    local c
    local fired, nested = {}, 0
    c = new_client { retry = { base = FAST, budget = false }, on_retry = function()
      nested = nested + 1
      c:poll(0)                                   -- drives the engine from inside the hook
      local h = c:submit { path = "/echo" }
      assert(h:wait(5))                           -- and waits on a call of its own
    end }
    local handles = {}
    for i = 1, 80 do
      handles[i] = c:submit({ path = "/echo", headers = steps("pool" .. i, "503|200") },
                            function(res) fired[i] = (fired[i] or 0) + 1; assert(res) end)
    end
    assert.is_nil(c:run())
    for i = 1, 80 do
      assert.equal(1, fired[i])
      assert.equal(200, (handles[i]:result()).status)
      assert.equal(2, m:scenario("pool" .. i).count)
    end
    assert.equal(80, nested)
    c:close()
  end)

  it("does not retry a call a hook canceled while its retry was due", function()
    local c
    local victim
    c = new_client { on_retry = function(info)
      if info.key and victim and not victim:done() then victim:cancel() end
    end, retry = { base = { overloaded = 0.05 } } }
    local first = c:submit { path = "/echo", headers = steps("first", "503|200") }
    victim = c:submit { path = "/echo", headers = steps("victim", "503|200") }
    assert.is_nil(c:run())
    local _, err = victim:result()
    assert.equal("canceled", err.kind)
    assert.equal(1, m:scenario("victim").count)     -- the retry never went out
    assert(first:result())
    assert.equal(0, c:stats(c:key_for { path = "/echo" }).in_flight)
    c:close()
  end)

  it("refuses submits from callbacks that close() fires, and loses no call", function()
    local errors, fired = {}, 0
    local c
    c = new_client { on_error = function(e) errors[#errors + 1] = e end }
    local handles = {}
    for i = 1, 5 do
      handles[i] = c:submit({ path = "/echo", headers = steps("slow" .. i, "200;delay=2000") }, function(_, err)
        fired = fired + 1
        assert.equal("canceled", err.kind)
        c:submit { path = "/echo" } -- raises: the client is closing
      end)
    end
    c:close()
    assert.equal(5, fired)
    assert.equal(5, #errors)
    for _, e in ipairs(errors) do assert.matches("sturdy: the client is closed", e, 1, true) end
    for i = 1, 5 do assert.is_true(handles[i]:done()) end
    assert.has_error(function() c:submit { path = "/echo" } end, "sturdy: the client is closed")
  end)

  it("closes from a hook: every call ends once, nothing raises out of run", function()
    local fired = {}
    local c
    c = new_client { on_retry = function() c:close() end }
    local handles = {}
    for i = 1, 6 do
      handles[i] = c:submit({ path = "/echo", headers = steps("cl" .. i, i == 1 and "503|200" or "200;delay=1500") },
                            function() fired[i] = (fired[i] or 0) + 1 end)
    end
    assert.is_nil(c:run())
    for i = 1, 6 do
      assert.equal(1, fired[i])
      assert.is_true(handles[i]:done())
    end
    assert.has_error(function() c:stats() end, "sturdy: the client is closed")
  end)

  it("returns nil, canceled to a coroutine waiting in request when the client closes", function()
    local c = new_client { yield = coroutine.yield }
    local co = coroutine.create(function()
      return c:request { path = "/echo", headers = steps("co", "200;delay=2000") }
    end)
    assert(coroutine.resume(co))                 -- submitted, now waiting
    c:close()
    local ok, res, err = coroutine.resume(co)
    assert.is_true(ok)
    assert.is_nil(res)
    assert.equal("canceled", err.kind)
  end)

  it("keeps the rest of a stream when its on_event raises", function()
    local seen, errors = {}, {}
    local claude = anthropic.new { api_key = KEY, base_url = m.http_url, model = "claude-sonnet-4-5",
                                   client_options = { on_error = function(e) errors[#errors + 1] = e end } }
    local s = claude:stream({ max_tokens = 16, messages = { { role = "user", content = "hello there" } } }, {
      on_event = function(ev)
        seen[#seen + 1] = ev.type
        if ev.type == "content_block_delta" then error("boom in on_event") end
      end,
    })
    assert(s:result())
    assert.equal("message_stop", seen[#seen])
    assert.is_true(#errors >= 1)
    assert.matches("boom in on_event", errors[1], 1, true)
    claude.client:close()
  end)

  it("keeps a stream whole when its on_event drives the client", function()
    local c = new_client()
    local claude = anthropic.new { api_key = KEY, client = c, model = "claude-sonnet-4-5" }
    local seen = {}
    local s = claude:stream({ max_tokens = 16, messages = { { role = "user", content = "hi there" } } }, {
      on_event = function(ev)
        seen[#seen + 1] = ev.type
        if ev.type == "message_start" then c:poll(0.2) end -- the stream's end is ready meanwhile
      end,
    })
    assert.is_nil(c:run())
    assert(s:result())
    assert.equal("message_stop", seen[#seen])
    for _, t in ipairs(seen) do assert.not_equal("error", t) end
    c:close()
  end)

  -- The matrix: each hook calls each public method once.
  local HOOKS = { "on_retry", "on_event", "callback", "on_error", "on_progress", "stream_event" }
  local METHODS = { "request", "submit", "poll", "run", "wait", "cancel", "close", "stats" }

  for _, hook in ipairs(HOOKS) do
    for _, method in ipairs(METHODS) do
      it(("lets %s call %s"):format(hook, method), function()
        local c, other
        local done_count = {}
        local raised = {}
        local called = false
        local function count(name) return function() done_count[name] = (done_count[name] or 0) + 1 end end

        local function act()
          if called then return end
          called = true
          local ok, e = pcall(function()
            if method == "request" then
              local res = assert(c:request { path = "/echo" })
              assert.equal(200, res.status)
            elseif method == "submit" then
              c:submit({ path = "/echo" }, count("inner"))
            elseif method == "poll" then
              c:poll(0)
            elseif method == "run" then
              c:run()
            elseif method == "wait" then
              other:wait(5)
            elseif method == "cancel" then
              other:cancel()
            elseif method == "close" then
              c:close()
            elseif method == "stats" then
              assert(c:stats())
              for _, k in ipairs(c:stats().keys) do assert(c:stats(k)) end
            end
          end)
          if not ok then raised[#raised + 1] = tostring(e) end
        end

        local opts = {}
        if hook == "on_retry" then opts.on_retry = act end
        if hook == "on_event" then opts.on_event = act end
        if hook == "on_error" then opts.on_error = act end
        c = new_client(opts)
        other = c:submit({ path = "/echo", headers = steps("other", "200;delay=300") }, count("other"))

        if hook == "on_retry" then
          c:submit({ path = "/echo", headers = steps("h", "503|200") }, count("main"))
        elseif hook == "on_event" then
          -- a reply of the Anthropic path teaches limits: a limit_learned event
          c:submit({ path = "/v1/messages", json = anthropic_body(), headers = { ["x-api-key"] = KEY } },
                   count("main"))
        elseif hook == "callback" then
          c:submit({ path = "/echo" }, function() count("main")(); act() end)
        elseif hook == "on_error" then
          c:submit({ path = "/echo" }, function() count("main")(); error("raised by a callback") end)
        elseif hook == "on_progress" then
          local results = c:batch({ { path = "/echo" }, { path = "/echo" } }, { on_progress = act })
          assert.equal(2, #results)
        elseif hook == "stream_event" then
          local claude = anthropic.new { api_key = KEY, client = c, model = "claude-sonnet-4-5" }
          local s = claude:stream({ max_tokens = 16, messages = { { role = "user", content = "hi" } } },
                                  { on_event = function() act() end })
          while not s.done and not c._closing do c:poll(0.05) end
        end
        if not c._closing then c:run() end

        assert.is_true(called, hook .. " never fired")
        for name, n in pairs(done_count) do assert.equal(1, n, name .. " completed " .. n .. " times") end
        assert.is_true(other:done())
        for _, e in ipairs(raised) do
          -- the only error allowed is the clear one a closed client gives
          assert.matches("sturdy: the client is closed", e, 1, true)
        end
        if method == "close" then
          assert.has_error(function() c:poll(0) end, "sturdy: the client is closed")
        else
          c:close()
        end
      end)
    end
  end
end)
