-- The examples and the demo run against the mock, as a user would run them.
local mock = require "spec.support.mock"

local function shell_quote(s)
  return "'" .. tostring(s):gsub("'", "'\\''") .. "'"
end

describe("examples", function()
  local m
  local lua = arg and arg[-1] or "lua"

  setup(function() m = assert(mock.start()) end)
  teardown(function() m:stop() end)

  local function run(script, env)
    local cmd = ("%s STURDY_MOCK_URL=%s LUA_PATH=%s LUA_CPATH=%s %s %s 2>&1; echo \"exit=$?\""):format(
      env or "", shell_quote(m.http_url), shell_quote(package.path), shell_quote(package.cpath), lua, script)
    local p = io.popen(cmd)
    local out = p:read("*a")
    p:close()
    local code = tonumber(out:match("exit=(%d+)%s*$"))
    return code, out
  end

  it("event_loop_luv.lua runs inside luv's loop", function()
    local ok = pcall(require, "luv")
    if not ok then
      pending("luv is not installed for this Lua")
      return
    end
    local code, out = run("examples/event_loop_luv.lua")
    assert.equal(0, code, out)
    local ticks = tonumber(out:match("done: 20 ok, 0 failed, the loop ticked (%d+) times"))
    assert.is_true(ticks and ticks > 5, out) -- the loop kept running while calls were in flight
  end)

  it("cache.lua answers from the cache, then serves stale while the provider fails", function()
    local code, out = run("examples/cache.lua")
    assert.equal(0, code, out)
    assert.matches("first: miss (Echo: Name a prime.), second: hit (Echo: Name a prime., cost 0)", out, 1, true)
    assert.matches("the provider down: stale (Echo: Name a prime.) because overloaded", out, 1, true)
    assert.matches("hits 1, misses 1, stale 1", out, 1, true)
  end)

  it("single_call.lua prints a reply", function()
    local code, out = run("examples/single_call.lua")
    assert.equal(0, code, out)
    assert.matches("200\treq_", out)
  end)

  it("batch.lua keeps every result", function()
    local code, out = run("examples/batch.lua")
    assert.equal(0, code, out)
    assert.matches("50 of 50 succeeded, 5 retries", out, 1, true)
  end)

  it("game_loop.lua never waits on the server inside a frame", function()
    local code, out = run("examples/game_loop.lua")
    assert.equal(0, code, out)
    local replies, frames, slowest = out:match("(%d+) replies over (%d+) frames; the slowest poll took ([%d.]+) ms")
    assert.equal("8", replies, out)
    assert.is_true(tonumber(frames) >= 15, out)
    assert.is_true(tonumber(slowest) < 100, out)
  end)

  it("coroutines.lua finishes the quickest task first", function()
    local code, out = run("examples/coroutines.lua")
    assert.equal(0, code, out)
    local first = out:match("task (%d)")
    assert.equal("2", first, out)
  end)

  it("demo.lua runs the main job through a chain behind a cache; its report agrees with the mock", function()
    local code, out = run("examples/demo.lua")
    assert.equal(0, code, out)
    -- every call answered or marked degraded
    local answered, degraded, cached =
      out:match("calls: +(%d+) of 200 answered, (%d+) marked degraded; (%d+) from the cache")
    assert.truthy(answered, out)
    assert.equal(200, tonumber(answered) + tonumber(degraded), out)
    assert.is_nil(out:find("failed:", 1, true), out)
    -- the chain's counts by target: the primary's outage moved calls on, and its open breaker was skipped
    local rows = {}
    for name, calls, ok, fell, skipped, attempts in out:gmatch("\n +(%a+) +(%d+) +(%d+) +(%d+) +(%d+) +(%d+)") do
      rows[name] = { calls = tonumber(calls), ok = tonumber(ok), fell = tonumber(fell), skipped = tonumber(skipped),
                     attempts = tonumber(attempts) }
    end
    assert.truthy(rows.sonnet and rows.haiku and rows.gpt, out)
    assert.is_true(rows.sonnet.fell > 0 and rows.sonnet.skipped > 0, out)
    local chain_calls = tonumber(out:match("(%d+) calls reached the chain"))
    assert.equal(chain_calls, rows.sonnet.ok + rows.haiku.ok + rows.gpt.ok + tonumber(degraded), out)
    -- what the chain did not answer came from the cache
    local hits = tonumber(out:match("cache: +(%d+) hits"))
    assert.is_true(hits > 0, out)
    assert.equal(200, chain_calls + hits, out)
    assert.equal(hits, tonumber(cached), out)
    assert.matches("breaker: +[^\n]*claude%-sonnet%-4%-5 closed %-> open", out)
    assert.matches("%(2 attempt%(s%)", out) -- the dropped stream, retried
    -- the mock counted what the report says was sent, the primary's requests included
    local req, sent, got429, saw429, for_sonnet, by_chain, probes = out:match(
      "received (%d+) requests %(sturdy sent (%d+) attempts%), answered (%d+) with 429 %(sturdy saw (%d+)%), "
      .. "(%d+) for sonnet %(the chain sent (%d+), the probes after the batch (%d+)%): agree")
    assert.truthy(req, out)
    assert.equal(req, sent)
    assert.equal(got429, saw429)
    assert.equal(tonumber(for_sonnet), tonumber(by_chain) + tonumber(probes))
    assert.equal(rows.sonnet.attempts, tonumber(by_chain))
  end)

  it("streaming.lua prints an answer as it arrives", function()
    local code, out = run("examples/streaming.lua")
    assert.equal(0, code, out)
    assert.matches("Echo: Tell me something sturdy", out, 1, true)
    assert.matches("stop_reason: end_turn", out, 1, true)
  end)

  it("openresty/demo.lua runs the nginx example: two workers share one breaker and one limiter", function()
    local code, out = run("examples/openresty/demo.lua", "DEMO_SECONDS=1 DEMO_CONNECTIONS=8")
    assert.equal(0, code, out)
    assert.matches("GET /chat?q=Hello -> 200 {", out, 1, true)
    assert.matches('"text":"Echo: Hello"', out, 1, true)
    -- each part shows both workers, and the state they share is the same in both (the
    -- window's counts as near as two reads a moment apart allow: calls may still end between)
    for _, part in ipairs { "the API limited to 1200/min", "the API well", "the API down" } do
      local block = out:match(part .. "[^\n]*\n(.-)\n[^ ]")
      assert.truthy(block, part .. " is missing:\n" .. out)
      local seen = {}
      for id, state, opens, calls, limit in block:gmatch("worker (%d), %S+: breaker (%a+) %(opens (%d+), (%d+) calls "
                                                         .. "[^)]*%), requests limit ([^,]+),") do
        seen[id] = { state = state, opens = opens, limit = limit, calls = tonumber(calls) }
      end
      assert.truthy(seen["0"] and seen["1"], block)
      local a, b = seen["0"], seen["1"]
      assert.same({ a.state, a.opens, a.limit }, { b.state, b.opens, b.limit })
      assert.is_true(math.abs(a.calls - b.calls) <= 3 + a.calls / 10, block)
    end
    assert.matches("requests limit 1200/min", out, 1, true)
    assert.matches("requests limit 4000/min", out, 1, true)
  end)

  it("custom_provider.lua wraps another JSON API", function()
    local code, out = run("examples/custom_provider.lua")
    assert.equal(0, code, out)
    assert.matches("echoed: {\"question\":\"ping\"}", out, 1, true)
  end)
end)
