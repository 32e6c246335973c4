-- Hedged first tokens against the mock: a call or stream whose first byte (a
-- stream: first content delta) is late starts one hedge on the same target;
-- the first to deliver wins and the other is cancelled, its input counted in
-- the cost; hedges are capped by max_ratio, the key's breaker, cap and limiter,
-- and the deadline.
local sturdy = require "sturdy"
local anthropic = require "sturdy.anthropic"
local fallback = require "sturdy.fallback"
local mock = require "spec.support.mock"

local now = sturdy.monotime
local PARAMS = { max_tokens = 64, messages = { { role = "user", content = "Tell me about hedging" } } }

local function percentile(list, q)
  local s = {}
  for i, v in ipairs(list) do s[i] = v end
  table.sort(s)
  return s[math.max(1, math.ceil(q * #s))]
end

describe("hedging", function()
  local m

  setup(function() m = assert(mock.start()) end)
  teardown(function() m:stop() end)
  before_each(function() m:reset() end)

  local function claude(opts, client_options)
    local o = { api_key = "sk-test", base_url = m.http_url, model = "claude-sonnet-4-5",
                client_options = client_options }
    for k, v in pairs(opts or {}) do o[k] = v end
    return anthropic.new(o)
  end

  -- Runs n blocking calls call(i) in `width` coroutines; returns each call's
  -- seconds and outcome.
  local function in_coroutines(client, n, width, call)
    local seconds, outcomes, next_i = {}, {}, 1
    local cos = {}
    for w = 1, width do
      cos[w] = coroutine.create(function()
        while next_i <= n do
          local i = next_i
          next_i = i + 1
          local t0 = now()
          local r, err = call(i)
          seconds[i], outcomes[i] = now() - t0, r or err
        end
      end)
    end
    local alive = width
    while alive > 0 do
      alive = 0
      for _, co in ipairs(cos) do
        if coroutine.status(co) ~= "dead" then
          assert(coroutine.resume(co))
          alive = alive + 1
        end
      end
      client:poll(0.002)
    end
    return seconds, outcomes
  end

  -- no rate-limit headers (limits=0): the limiter would otherwise pace 1000 calls.
  -- 4% slow, not 5%: with exactly 5% the p95 of the window sits on the edge between
  -- the two modes, and a window that drifts to 2 s leaves later slow calls unhedged.
  local SLOW_TAIL = { ["x-mock-steps"] = "200;delay=10;slow=2000;slow_share=0.04;limits=0" }

  local function tail_run(hedge, n)
    m:reset()
    local c = claude({ hedge = hedge }, { yield = coroutine.yield, headers = SLOW_TAIL,
                                          limits = { concurrency = 256 } })
    -- a scenario per call: one shared by all would grow with every request the mock records
    local seconds, outcomes = in_coroutines(c.client, n, 25, function(i)
      return c:messages(PARAMS, { headers = { ["x-mock-scenario"] = "tail-" .. i } })
    end)
    local hedged, ok = 0, 0
    for _, r in ipairs(outcomes) do
      if getmetatable(r) ~= sturdy.Error then
        ok = ok + 1
        if r.hedged then hedged = hedged + 1 end
      end
    end
    local key = c.client:key_for(c:_request(PARAMS))
    local usage = c.client:stats(key).usage
    c.client:close()
    return { p50 = percentile(seconds, 0.5), p99 = percentile(seconds, 0.99), hedged = hedged, ok = ok,
             slow = m:counters().slow, requests = m:counters().requests, lost = usage.hedges_lost,
             lost_cost = usage.hedge_cost }
  end

  it("cuts the p99 time to first byte of a slow tail by 5x or more, hedging at most max_ratio + 1%", function()
    local n, ratio = 1000, 0.1
    local plain = tail_run(false, n)
    local hedged = tail_run({ after = "p95", max_ratio = ratio }, n)
    print(string.format("\n    %d calls, 4%% slow (2 s): p99 %.3f s (p50 %.3f) unhedged, %.3f s (p50 %.3f) hedged "
                        .. "at p95; %d hedged (%.1f%%), %d cancelled in flight costing $%.6f; %d requests",
                        n, plain.p99, plain.p50, hedged.p99, hedged.p50, hedged.hedged, 100 * hedged.hedged / n,
                        hedged.lost, hedged.lost_cost, hedged.requests))
    assert.equal(n, plain.ok)
    assert.equal(n, hedged.ok)
    assert.is_true(plain.p99 >= 1.9)
    assert.is_true(hedged.p99 * 5 <= plain.p99)
    assert.is_true(hedged.hedged <= (ratio + 0.01) * n)
    -- every request past the n calls is a hedge; a hedge cancelled because its primary
    -- answered before the hedge's request was written never reaches the mock
    assert.is_true(hedged.requests > n and hedged.requests <= n + hedged.hedged,
                   hedged.requests .. " requests for " .. hedged.hedged .. " hedges")
    assert.is_true(hedged.lost >= 1 and hedged.lost_cost > 0)
  end)

  it("sends a hedge when the first byte is late, and the first reply wins", function()
    local c = claude({ hedge = { after = 0.05, max_ratio = 1 } },
                     { headers = { ["x-mock-scenario"] = "late", ["x-mock-steps"] = "200;delay=1000,200;delay=5" } })
    -- the hedge budget grows with calls: one call deposits, so a ratio of 1 allows one hedge
    local t0 = now()
    local r = assert(c:messages(PARAMS))
    local took = now() - t0
    assert.is_true(r.hedged)
    assert.is_true(r.hedge_won)
    assert.is_true(took < 0.5)
    assert.equal(2, m:counters().scenarios.late.count)
    local key = c.client:key_for(c:_request(PARAMS))
    local s = c.client:stats(key)
    -- the primary, cancelled in flight, cost its input: in the call's cost and the key's totals
    local p = require("sturdy.prices").lookup("claude-sonnet-4-5")
    local est = c:_request(PARAMS).tokens.input
    assert.near(est * p.input / 1e6, s.usage.hedge_cost, 1e-12)
    assert.near(r.usage.input * p.input / 1e6 + r.usage.output * p.output / 1e6 + s.usage.hedge_cost, r.cost, 1e-12)
    assert.equal(1, s.usage.hedges_lost)
    assert.equal(1, s.usage.calls)
    assert.equal(1, s.hedges.started)
    c.client:close()
  end)

  it("waits for the other leg when one fails, and does not hedge past a cap", function()
    -- the hedge fails at once: the primary's late reply is the call's
    local c = claude({ hedge = { after = 0.05, max_ratio = 1 } },
                     { headers = { ["x-mock-scenario"] = "fail", ["x-mock-steps"] = "200;delay=300,500" },
                       retry = { attempts = 1 } })
    local r = assert(c:messages(PARAMS))
    assert.is_true(r.hedged)
    assert.is_false(r.hedge_won)
    assert.equal(2, m:counters().scenarios.fail.count)
    c.client:close()
    -- max_ratio 0: the budget never has room
    local c2 = claude({ hedge = { after = 0.05, max_ratio = 0 } },
                      { headers = { ["x-mock-scenario"] = "nobudget", ["x-mock-steps"] = "200;delay=200" } })
    r = assert(c2:messages(PARAMS))
    assert.is_false(r.hedged)
    assert.equal(1, m:counters().scenarios.nobudget.count)
    local s = c2.client:stats(c2.client:key_for(c2:_request(PARAMS)))
    assert.equal(1, s.hedges.refused)
    c2.client:close()
    -- a deadline shorter than the wait: no hedge
    local c3 = claude({ hedge = { after = 0.3, max_ratio = 1 } },
                      { headers = { ["x-mock-scenario"] = "deadline", ["x-mock-steps"] = "200;delay=100" },
                        timeout = { total = 0.25 } })
    r = assert(c3:messages(PARAMS))
    assert.is_false(r.hedged)
    c3.client:close()
    -- hedging off for one call of a hedging provider
    local c4 = claude({ hedge = { after = 0.01, max_ratio = 1 } },
                      { headers = { ["x-mock-scenario"] = "off", ["x-mock-steps"] = "200;delay=100" } })
    r = assert(c4:messages(PARAMS, { hedge = false }))
    assert.is_nil(r.hedged)
    assert.equal(1, m:counters().scenarios.off.count)
    c4.client:close()
  end)

  it("hedges a stream whose first delta is late; its events come from one leg only", function()
    -- the primary sends its prelude at once, then drips: its first delta is ~160 ms out;
    -- the hedge starts at 50 ms and drips fast
    local c = claude({ hedge = { after = 0.05, max_ratio = 1 } },
                     { headers = { ["x-mock-scenario"] = "stream", ["x-mock-steps"] = "200;drip=40,200;drip=2" } })
    local iter, s = c:stream(PARAMS)
    local types, ids, text = {}, {}, {}
    for ev in iter do
      types[#types + 1] = ev.type
      if ev.type == "message_start" then ids[#ids + 1] = ev.data.message.id end
      if ev.type == "content_block_delta" then text[#text + 1] = ev.data.delta.text end
    end
    local r = assert(s:result())
    assert.is_true(r.hedged)
    assert.is_true(r.hedge_won)
    -- one message start to stop, in order, nothing twice
    assert.same({ "message_start", "content_block_start", "ping" }, { types[1], types[2], types[3] })
    assert.equal("message_stop", types[#types])
    assert.equal(1, #ids)
    assert.equal(r.reply.id, ids[1])
    assert.equal("Echo: Tell me about hedging", table.concat(text))
    local n = {}
    for _, t in ipairs(types) do n[t] = (n[t] or 0) + 1 end
    assert.equal(1, n.message_start)
    assert.equal(1, n.message_stop)
    assert.equal(1, n.content_block_start)
    -- the primary sent message_start (its input tokens) before it was cancelled: those count
    local key = c.client:key_for(c:_request(PARAMS))
    local usage = c.client:stats(key).usage
    assert.equal(1, usage.hedges_lost)
    local p = require("sturdy.prices").lookup("claude-sonnet-4-5")
    assert.near(r.usage.input * p.input / 1e6, usage.hedge_cost, 1e-12)
    assert.is_true(r.cost > usage.cost - usage.hedge_cost - 1e-12)
    c.client:close()
  end)

  it("keeps a stream on its first leg when its delta comes before the hedge would", function()
    local c = claude({ hedge = { after = 0.2, max_ratio = 1 } },
                     { headers = { ["x-mock-scenario"] = "quick", ["x-mock-steps"] = "200;drip=5" } })
    local events = {}
    local s = c:stream(PARAMS, { on_event = function(ev) events[#events + 1] = ev.type end })
    local r = assert(s:result())
    assert.is_nil(r.hedged)
    assert.equal("message_stop", events[#events])
    -- past the hedge time nothing more is sent
    local t = now() + 0.3
    while now() < t do c.client:poll(0.05) end
    assert.equal(1, m:counters().scenarios.quick.count)
    c.client:close()
  end)

  it("hedges concurrent streams without mixing any two", function()
    local c = claude({ hedge = { after = 0.05, max_ratio = 1 } },
                     { headers = { ["x-mock-steps"] = "200;drip=1;slow=1000;slow_share=0.5" },
                       limits = { concurrency = 64 } })
    local streams, seen = {}, {}
    for i = 1, 40 do
      local params = { max_tokens = 64, messages = { { role = "user", content = "stream " .. i } } }
      seen[i] = { text = {}, ids = {} }
      streams[i] = c:stream(params, { on_event = function(ev)
        if ev.type == "message_start" then table.insert(seen[i].ids, ev.data.message.id) end
        if ev.type == "content_block_delta" then table.insert(seen[i].text, ev.data.delta.text) end
      end })
    end
    c.client:run()
    local hedged = 0
    for i, s in ipairs(streams) do
      local r = assert(s:result())
      if r.hedged then hedged = hedged + 1 end
      assert.equal(1, #seen[i].ids)
      assert.equal(r.reply.id, seen[i].ids[1])
      assert.equal("Echo: stream " .. i, table.concat(seen[i].text))
    end
    assert.is_true(hedged >= 1)
    c.client:close()
  end)

  it("ends cleanly when the client is closed while a hedge is pending or running", function()
    -- closed by a timer of the caller's own while a hedged call waits
    local c = claude({ hedge = { after = 0.05, max_ratio = 1 } },
                     { headers = { ["x-mock-scenario"] = "close1", ["x-mock-steps"] = "200;delay=500" } })
    c.client:after(0.1, function() c.client:close() end)
    local r, err = c:messages(PARAMS)
    assert.is_nil(r)
    assert.equal("canceled", err.kind)
    -- closed from a stream's event while its hedge leg runs
    local c2 = claude({ hedge = { after = 0.02, max_ratio = 1 } },
                      { headers = { ["x-mock-scenario"] = "close2", ["x-mock-steps"] = "200;drip=30,200;drip=30" } })
    local ids = {}
    local s = c2:stream(PARAMS, { on_event = function(ev)
      if ev.type == "message_start" then ids[#ids + 1] = ev.data.message.id end
      c2.client:close()
    end })
    local t = now() + 1
    while not s.done and now() < t do pcall(c2.client.poll, c2.client, 0.02) end
    assert.is_true(s.done)
    assert.equal(1, #ids) -- what the piece in hand held, from one leg
    local _, serr = s:result()
    assert.equal("canceled", serr.kind)
  end)

  describe("in a fallback chain", function()
    local function chain_of(targets, h)
      return fallback { targets = targets, hedge = h or { after = 0.05, max_ratio = 1 } }
    end

    it("hedges a late first byte on the chain's next target; the first reply wins", function()
      local c = sturdy.client { base_url = m.http_url }
      local sonnet = anthropic.new { client = c, api_key = "sk-test", model = "claude-sonnet-4-5" }
      local haiku = anthropic.new { client = c, api_key = "sk-test", model = "claude-haiku-4-5" }
      local chain = chain_of {
        { provider = sonnet, name = "sonnet", headers = mock.steps("c-primary", "200;delay=800") },
        { provider = haiku, name = "haiku", headers = mock.steps("c-second", "200;delay=5") },
      }
      local t0 = now()
      local r = assert(chain:messages(PARAMS))
      assert.is_true(now() - t0 < 0.5)
      assert.equal("haiku", r.served_by)
      assert.is_true(r.hedged)
      assert.is_true(r.hedge_won)
      assert.equal("haiku", r.hedged_to)
      assert.equal(1, m:scenario("c-primary").count)
      assert.equal(1, m:scenario("c-second").count)
      -- the primary, cancelled in flight, cost its input: on its key, and in the call's cost
      local skey = c:key_for(sonnet:_request(PARAMS))
      local us = c:stats(skey).usage
      assert.equal(1, us.hedges_lost)
      local p = require("sturdy.prices").lookup("claude-haiku-4-5")
      assert.near(r.usage.input * p.input / 1e6 + r.usage.output * p.output / 1e6 + us.hedge_cost, r.cost, 1e-12)
      local st = chain:stats()
      assert.equal(1, st.targets.sonnet.calls)
      assert.equal(1, st.targets.haiku.calls)
      assert.equal(1, st.targets.haiku.successes)
      c:close()
    end)

    it("keeps the primary's reply when it comes first, and falls through past a failed hedge", function()
      local c = sturdy.client { base_url = m.http_url, retry = { attempts = 1 } }
      local sonnet = anthropic.new { client = c, api_key = "sk-test", model = "claude-sonnet-4-5" }
      local haiku = anthropic.new { client = c, api_key = "sk-test", model = "claude-haiku-4-5" }
      local chain = chain_of {
        { provider = sonnet, name = "sonnet", headers = mock.steps("k-primary", "200;delay=200") },
        { provider = haiku, name = "haiku", headers = mock.steps("k-second", "200;delay=900") },
      }
      local r = assert(chain:messages(PARAMS))
      assert.equal("sonnet", r.served_by)
      assert.is_true(r.hedged)
      assert.is_false(r.hedge_won)
      local hkey = c:key_for(haiku:_request(PARAMS))
      assert.equal(1, c:stats(hkey).usage.hedges_lost)
      -- the hedge fails at once; the primary fails later: the chain moves on to a third target
      local opus = anthropic.new { client = c, api_key = "sk-test", model = "claude-opus-4-1" }
      local chain2 = chain_of {
        { provider = sonnet, name = "sonnet", headers = mock.steps("f-primary", "529;delay=300") },
        { provider = haiku, name = "haiku", headers = mock.steps("f-second", "529") },
        { provider = opus, name = "opus", headers = mock.steps("f-third", "200") },
      }
      r = assert(chain2:messages(PARAMS))
      assert.equal("opus", r.served_by)
      assert.equal(2, #r.fallbacks)
      assert.equal(1, m:scenario("f-third").count)
      c:close()
    end)

    it("hedges on the same target when the next one is on another client", function()
      local c1 = sturdy.client { base_url = m.http_url }
      local c2 = sturdy.client { base_url = m.http_url }
      local sonnet = anthropic.new { client = c1, api_key = "sk-test", model = "claude-sonnet-4-5" }
      local haiku = anthropic.new { client = c2, api_key = "sk-test", model = "claude-haiku-4-5" }
      local chain = chain_of {
        { provider = sonnet, name = "sonnet", headers = mock.steps("o-primary", "200;delay=800|200;delay=5") },
        { provider = haiku, name = "haiku", headers = mock.steps("o-second", "200") },
      }
      local r = assert(chain:messages(PARAMS))
      assert.equal("sonnet", r.served_by)
      assert.is_true(r.hedge_won)
      assert.equal("sonnet", r.hedged_to)
      assert.equal(2, m:scenario("o-primary").count)
      assert.equal(0, (m:counters().scenarios["o-second"] or { count = 0 }).count)
      c1:close()
      c2:close()
    end)

    it("refuses a bad hedge option", function()
      local c = sturdy.client { base_url = m.http_url }
      assert.has_error(function()
        fallback { targets = { anthropic.new { client = c, api_key = "k", model = "m" } }, hedge = { after = "p1" } }
      end, 'sturdy: option \'after\' in sturdy.fallback.hedge must be seconds or a quantile from "p50" to "p99.9", '
           .. 'got "p1"')
      c:close()
    end)
  end)

  it("refuses bad hedge settings, naming them", function()
    assert.has_error(function() claude { hedge = { after = "p101" } } end,
      'sturdy: option \'after\' in anthropic.new.hedge must be seconds or a quantile from "p50" to "p99.9", got "p101"')
    assert.has_error(function() claude { hedge = { after = -1 } } end,
      "sturdy: option 'after' in anthropic.new.hedge must be seconds from 0 to 86400, or a quantile such as "
      .. '"p95"; got -1')
    assert.has_error(function() claude { hedge = { max_ratio = 2 } } end,
      "sturdy: option 'max_ratio' in anthropic.new.hedge must be a number from 0 to 1, got 2")
    assert.has_error(function() claude { hedge = { aftr = 1 } } end,
      "sturdy: unknown option 'aftr' in anthropic.new.hedge")
    assert.has_error(function() claude { hedge = "p95" } end,
      "sturdy: option 'hedge' in anthropic.new must be a table, true or false, got string")
    local c = claude()
    assert.has_error(function() c:messages(PARAMS, { hedge = { after = 0 / 0 } }) end)
    c.client:close()
  end)
end)
