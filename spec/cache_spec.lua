-- sturdy.cache against the mock API: the key (key order, number spelling and
-- whitespace do not matter; temperature, system and model do), what is
-- stored, TTL and LRU under a virtual clock, stale-if-error, single flight
-- across coroutines, streams replayed, `similar`, and the API key kept out of
-- the store.
local cjson = require "cjson"
local anthropic = require "sturdy.anthropic"
local openai = require "sturdy.openai"
local sturdy_cache = require "sturdy.cache"
local policy = require "sturdy.policy"
local mock = require "spec.support.mock"

local steps = mock.steps

local KEY = "sk-ant-cache-secret-5e4d3c2b1a"
local FAST = { overloaded = 0.01, transient = 0.01, throttled = 0.01, timeout = 0.01 }

local function ask(text, extra)
  local p = { max_tokens = 64, temperature = 0, messages = { { role = "user", content = text } } }
  for k, v in pairs(extra or {}) do p[k] = v end
  return p
end

local function virtual_clock(start)
  local clock = { t = start or 1000 }
  function clock.now() return clock.t end
  return clock
end

describe("sturdy.cache", function()
  local m, providers

  setup(function() m = assert(mock.start()) end)
  teardown(function() m:stop() end)
  before_each(function()
    m:reset()
    providers = {}
  end)
  after_each(function()
    for _, p in ipairs(providers) do p.client:close() end
  end)

  local function claude(client_options)
    local opts = { retry = { base = FAST } }
    for k, v in pairs(client_options or {}) do opts[k] = v end
    local p = anthropic.new { api_key = KEY, base_url = m.http_url, model = "claude-sonnet-4-5", client_options = opts }
    providers[#providers + 1] = p
    return p
  end

  local function gpt()
    local p = openai.new { api_key = KEY, base_url = m.http_url, model = "gpt-4o-mini",
                           client_options = { retry = { base = FAST } } }
    providers[#providers + 1] = p
    return p
  end

  local function requests() return m:counters().requests end

  describe("the key", function()
    it("hits whatever the key order, number spelling and JSON whitespace", function()
      local cached = sturdy_cache():wrap(claude())
      local a = cjson.decode([[{"max_tokens":64,"temperature":0,"system":"Be brief.",
        "messages":[{"role":"user","content":"What is the capital of France?"}],
        "top_p":1,"stop_sequences":["\n\n"]}]])
      local b = cjson.decode([[ {
          "stop_sequences" : [ "\n\n" ],
          "messages" : [ { "content" : "What is the capital of France?", "role" : "user" } ],
          "top_p" : 1.0, "system" : "Be brief.", "temperature" : 0.0, "max_tokens" : 64.0 } ]])
      local r1 = assert(cached:messages(a))
      local r2 = assert(cached:messages(b))
      assert.equal("miss", r1.cache)
      assert.equal("hit", r2.cache)
      assert.equal("exact", r2.cache_match)
      assert.equal(r1.text, r2.text)
      assert.equal(r1.reply.id, r2.reply.id)
      assert.equal(0, r2.cost)
      assert.same({}, r2.attempts)
      assert.equal(1, requests())
      -- the model given in the request or by the provider is the same key
      local r3 = assert(cached:messages(ask("What is the capital of France?",
        { system = "Be brief.", top_p = 1, stop_sequences = { "\n\n" }, model = "claude-sonnet-4-5" })))
      assert.equal("hit", r3.cache)
      assert.equal(1, requests())
    end)

    it("misses on a different temperature, system, model, message or method", function()
      local c = claude()
      local cached = sturdy_cache():wrap(c)
      assert.equal("miss", assert(cached:messages(ask("hello"))).cache)
      assert.equal("hit", assert(cached:messages(ask("hello"))).cache)
      local variants = {
        { ask("hello", { temperature = 0.2 }), { cache = true } },
        { ask("hello", { system = "Be brief." }) },
        { ask("hello", { system = "Be very brief." }) },
        { ask("hello", { model = "claude-haiku-4-5" }) },
        { ask("hello", { max_tokens = 65 }) },
        { ask("Hello") },
        { ask("hello", { stop_sequences = { "." } }) },
      }
      for i, v in ipairs(variants) do
        local r = assert(cached:messages(v[1], v[2]))
        assert.equal("miss", r.cache, "variant " .. i)
      end
      assert.equal(1 + #variants, requests())
      -- the same request to another provider is another key
      local g = sturdy_cache():wrap(gpt())
      assert.equal("miss", assert(g:chat(ask("hello"))).cache)
      assert.equal(2 + #variants, requests())
    end)

    it("keeps delivery-only fields (metadata, stream options) out of the key", function()
      local cached = sturdy_cache():wrap(claude())
      assert(cached:messages(ask("hello")))
      local r = assert(cached:messages(ask("hello", { metadata = { user_id = "u-42" } })))
      assert.equal("hit", r.cache)
      assert.equal(1, requests())
    end)

    it("canonical text: sorted keys, 1.0 as 1, no whitespace; NaN, functions and cycles raise", function()
      assert.equal('{"a":[1,2.5,"x"],"b":{"c":true,"d":null}}',
        sturdy_cache.canonical { b = { d = cjson.null, c = true }, a = { 1.0, 2.5, "x" } })
      assert.equal(sturdy_cache.canonical { x = 0 }, sturdy_cache.canonical { x = -0.0 })
      assert.are_not.equal(sturdy_cache.canonical { x = 0.1 }, sturdy_cache.canonical { x = 0.10000000000000002 })
      local cached = sturdy_cache():wrap(claude())
      assert.has_error(function() cached:messages(ask("hi", { top_p = 0 / 0 })) end,
        "sturdy: the request cannot be a cache key: request.body.top_p is " .. tostring(0 / 0))
      assert.has_error(function() cached:messages(ask("hi", { top_k = math.huge })) end,
        "sturdy: the request cannot be a cache key: request.body.top_k is inf")
      assert.has_error(function() cached:messages(ask("hi", { tools = { print } })) end,
        "sturdy: the request cannot be a cache key: request.body.tools[1] is a function")
      local loop = {}
      loop.self = loop
      assert.has_error(function() cached:messages(ask("hi", { metadata2 = loop })) end,
        "sturdy: the request cannot be a cache key: it nests deeper than 100")
      assert.equal(0, requests())
    end)

    it("hashes with SHA-256", function()
      assert.equal("ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad", policy.sha256("abc"))
      assert.equal(64, #policy.sha256(string.rep("x", 100000)))
      assert.are_not.equal(policy.sha256("a\0b"), policy.sha256("a\0c"))
    end)
  end)

  describe("what is stored", function()
    it("only temperature 0 by default; cache = true in the call options stores the rest", function()
      local cached = sturdy_cache():wrap(claude())
      local p = { max_tokens = 64, messages = { { role = "user", content = "a warm answer" } } }
      assert.equal("bypass", assert(cached:messages(p)).cache)
      assert.equal("bypass", assert(cached:messages(p)).cache)
      assert.equal(2, requests())
      assert.equal("miss", assert(cached:messages(p, { cache = true })).cache)
      assert.equal("hit", assert(cached:messages(p, { cache = true })).cache)
      -- cache = false bypasses even a temperature-0 request
      assert.equal("bypass", assert(cached:messages(ask("cold"), { cache = false })).cache)
      assert.equal(4, requests())
      assert.equal(3, cached.cache:stats().bypass) -- the two warm calls and the cold one
    end)

    it("never sends the cache flag to the provider", function()
      -- the provider sends to the mock; what it was asked is recorded on the way
      local p = anthropic.new { api_key = KEY, base_url = m.http_url, model = "m" }
      providers[#providers + 1] = p
      local seen_params, seen_opts
      local target = setmetatable({
        messages = function(_, params, opts)
          seen_params, seen_opts = params, opts
          return p:messages(params, opts)
        end,
      }, { __index = p })
      local cached = sturdy_cache():wrap(target)
      assert(cached:messages({ max_tokens = 8, messages = { { role = "user", content = "x" } } },
                             { cache = true, headers = { ["x-trace"] = "t1" } }))
      assert.equal("x", seen_params.messages[1].content)
      assert.is_nil(seen_params.cache)
      assert.is_nil(seen_opts.cache)
      assert.equal("t1", seen_opts.headers["x-trace"]) -- the other call options still reach the provider
      assert.has_error(function() cached:messages { cache = true, messages = {} } end,
        "sturdy: 'cache' goes in the call options, not the request: cached:messages(params, { cache = true })")
      assert.has_error(function() cached:messages(ask("x"), { cache = "yes" }) end,
        "sturdy: call option 'cache' must be true or false, got string")
    end)

    it("does not store failures", function()
      local cached = sturdy_cache():wrap(claude())
      local _, err = cached:messages(ask("fails"), { headers = steps("f1", "400") })
      assert.equal("bad_request", err.kind)
      local r = assert(cached:messages(ask("fails")))
      assert.equal("miss", r.cache)
      assert.equal(2, requests())
    end)

    it("keeps the API key out of the store, while the answers are in it", function()
      local cache = sturdy_cache { stale_if_error = 60 }
      local cached = cache:wrap(claude())
      assert(cached:messages(ask("remember this")))
      local it = cached:stream(ask("and stream this"))
      for _ in it do end
      local bytes = {}
      cache:scan(function(k, v) bytes[#bytes + 1] = k .. "\n" .. v end)
      assert.equal(2, #bytes)
      local all = table.concat(bytes, "\n")
      assert.matches("Echo: remember this", all, 1, true)
      assert.matches("Echo: and stream this", all, 1, true)
      assert.is_nil(all:find(KEY, 1, true))
      assert.is_nil(all:find(KEY:sub(8), 1, true))
      -- nor in what the cache shows of itself
      assert.is_nil(tostring(cache):find(KEY, 1, true))
      assert.is_nil(cjson.encode(cache:stats()):find(KEY, 1, true))
    end)
  end)

  describe("expiry and eviction under a virtual clock", function()
    it("serves until ttl, then asks again", function()
      local clock = virtual_clock()
      local cache = sturdy_cache { ttl = 10, clock = clock.now }
      local cached = cache:wrap(claude())
      assert.equal("miss", assert(cached:messages(ask("t"))).cache)
      clock.t = clock.t + 9.999
      local r = assert(cached:messages(ask("t")))
      assert.equal("hit", r.cache)
      assert.near(9.999, r.age, 1e-9)
      clock.t = clock.t + 0.001
      assert.equal("miss", assert(cached:messages(ask("t"))).cache)
      assert.equal(2, requests())
      assert.equal(0, cache:stats().evictions)
    end)

    it("evicts the least recently used beyond max_entries", function()
      local clock = virtual_clock()
      local cache = sturdy_cache { ttl = 100, max_entries = 3, clock = clock.now }
      local cached = cache:wrap(claude())
      for _, q in ipairs { "a", "b", "c" } do assert(cached:messages(ask(q))) end
      assert.equal("hit", assert(cached:messages(ask("a"))).cache) -- a is now the most recent
      assert(cached:messages(ask("d")))                             -- b goes
      local s = cache:stats()
      assert.equal(3, s.entries)
      assert.equal(1, s.evictions)
      assert.equal(1, s.targets["anthropic/claude-sonnet-4-5"].evictions)
      assert.equal(4, requests())
      assert.equal("hit", assert(cached:messages(ask("a"))).cache)
      assert.equal("hit", assert(cached:messages(ask("c"))).cache)
      assert.equal("hit", assert(cached:messages(ask("d"))).cache)
      assert.equal("miss", assert(cached:messages(ask("b"))).cache)
      assert.equal(5, requests())
    end)

    it("evicts by bytes, and does not count an expired entry pushed out as an eviction", function()
      local clock = virtual_clock()
      local probe = sturdy_cache { clock = clock.now }
      assert(probe:wrap(claude()):messages(ask("x1")))
      local one = probe:stats().bytes
      assert.is_true(one > 200)
      m:reset()
      local cache = sturdy_cache { ttl = 10, max_bytes = math.floor(one * 2.5), clock = clock.now }
      local cached = cache:wrap(claude())
      assert(cached:messages(ask("x1")))
      assert(cached:messages(ask("x2")))
      assert.equal(2, cache:stats().entries)
      assert(cached:messages(ask("x3")))
      assert.equal(2, cache:stats().entries)
      assert.is_true(cache:stats().bytes <= one * 2.5)
      assert.equal(1, cache:stats().evictions)
      assert.equal("miss", assert(cached:messages(ask("x1"))).cache) -- x2 goes now
      assert.equal(2, cache:stats().evictions)
      clock.t = clock.t + 11 -- all expired
      assert(cached:messages(ask("x4")))
      assert.equal(2, cache:stats().evictions)
    end)

    it("does not store an entry larger than max_bytes", function()
      local cache = sturdy_cache { max_bytes = 100 }
      local cached = cache:wrap(claude())
      assert(cached:messages(ask("big")))
      assert.equal("miss", assert(cached:messages(ask("big"))).cache)
      assert.equal(0, cache:stats().entries)
      assert.equal(2, cache:stats().too_large)
    end)
  end)

  describe("stale_if_error", function()
    it("serves an expired answer, marked stale with the error, while the upstream fails", function()
      local clock = virtual_clock()
      local cache = sturdy_cache { ttl = 10, stale_if_error = 100, clock = clock.now }
      local cached = cache:wrap(claude())
      local fresh = assert(cached:messages(ask("weather?")))
      clock.t = clock.t + 50
      local r = assert(cached:messages(ask("weather?"), { headers = steps("s1", "529") }))
      assert.equal("stale", r.cache)
      assert.equal(fresh.text, r.text)
      assert.equal("overloaded", r.stale_error.kind)
      assert.equal(529, r.stale_error.status)
      assert.near(50, r.age, 1e-9)
      assert.is_true(m:scenario("s1").count >= 1) -- it did try the upstream first
      assert.equal(1, cache:stats().stale)
      assert.equal(1, cache:stats("anthropic/claude-sonnet-4-5").stale)
      -- past the stale window the error comes through
      clock.t = clock.t + 61
      local none, err = cached:messages(ask("weather?"), { headers = steps("s2", "529") })
      assert.is_nil(none)
      assert.equal("overloaded", err.kind)
      -- and a success refreshes the entry
      assert.equal("miss", assert(cached:messages(ask("weather?"))).cache)
      assert.equal("hit", assert(cached:messages(ask("weather?"))).cache)
    end)

    it("is off by default", function()
      local clock = virtual_clock()
      local cached = sturdy_cache({ ttl = 10, clock = clock.now }):wrap(claude())
      assert(cached:messages(ask("q")))
      clock.t = clock.t + 11
      local r, err = cached:messages(ask("q"), { headers = steps("s3", "500") })
      assert.is_nil(r)
      assert.equal("server", err.kind)
    end)

    it("replays a stale stream when the stream fails before its first delta", function()
      local clock = virtual_clock()
      local cache = sturdy_cache { ttl = 10, stale_if_error = 100, clock = clock.now }
      local c = claude { retry = { attempts = 1 } }
      local cached = cache:wrap(c)
      local live = {}
      for ev in cached:stream(ask("story")) do live[#live + 1] = ev.type end
      clock.t = clock.t + 20
      local replay = {}
      local iter, s = cached:stream(ask("story"), { headers = steps("s4", "stream_error") })
      for ev in iter do replay[#replay + 1] = ev.type end
      assert.same(live, replay)
      assert.equal("stale", s.cache)
      local r = assert(s:result())
      assert.equal("stale", r.cache)
      assert.equal("overloaded", r.stale_error.kind)
      assert.equal("Echo: story", r.text)
    end)
  end)

  describe("single flight", function()
    -- 50 coroutines on a round-robin scheduler; the client yields while it waits
    local function run_all(tasks)
      repeat
        local alive = 0
        for _, co in ipairs(tasks) do
          if coroutine.status(co) ~= "dead" then
            assert(coroutine.resume(co))
            alive = alive + 1
          end
        end
      until alive == 0
    end

    it("makes one upstream request for 50 identical concurrent misses", function()
      local c = claude { yield = coroutine.yield }
      local cache = sturdy_cache { yield = coroutine.yield }
      local cached = cache:wrap(c)
      local results, tasks = {}, {}
      for i = 1, 50 do
        tasks[i] = coroutine.create(function()
          results[i] = { cached:messages(ask("one for all"), { headers = steps("sf", "200;delay=300") }) }
        end)
      end
      run_all(tasks)
      assert.equal(1, requests())
      assert.equal(1, m:scenario("sf").count)
      local misses, hits = 0, 0
      for i = 1, 50 do
        local r = assert(results[i][1])
        assert.equal("Echo: one for all", r.text)
        if r.cache == "miss" then misses = misses + 1 elseif r.cache == "hit" then hits = hits + 1 end
      end
      assert.equal(1, misses)
      assert.equal(49, hits)
      assert.equal(49, cache:stats().coalesced)
      -- each caller owns its answer
      results[2][1].reply.content[1].text = "changed"
      assert.equal("Echo: one for all", results[3][1].reply.content[1].text)
    end)

    it("shares the error of the one upstream call", function()
      local c = claude { yield = coroutine.yield }
      local cached = sturdy_cache({ yield = coroutine.yield }):wrap(c)
      local errs, tasks = {}, {}
      for i = 1, 20 do
        tasks[i] = coroutine.create(function()
          local r, err = cached:messages(ask("doomed"), { headers = steps("se", "400;delay=200") })
          errs[i] = r == nil and err.kind
        end)
      end
      run_all(tasks)
      assert.equal(1, requests())
      for i = 1, 20 do assert.equal("bad_request", errs[i]) end
    end)

    it("without a way to yield, identical calls go upstream each (no waiting, no hang)", function()
      local c = claude { yield = coroutine.yield }
      local cached = sturdy_cache({ single_flight = true }):wrap(c) -- no yield given to the cache
      local tasks = {}
      for i = 1, 3 do
        tasks[i] = coroutine.create(function()
          assert(cached:messages(ask("each"), { headers = steps("ny", "200;delay=200") }))
        end)
      end
      run_all(tasks)
      assert.equal(3, requests())
    end)

    it("releases the flight when the leading call raises", function()
      local c = claude { yield = coroutine.yield }
      local cached = sturdy_cache({ yield = coroutine.yield }):wrap(c)
      assert.has_error(function() cached:messages(ask("raise"), { headers = { ["bad header"] = "x" } }) end)
      local r = assert(cached:messages(ask("raise")))
      assert.equal("miss", r.cache)
      assert.equal(1, requests())
    end)

    it("keeps a shared stream going for the others when one caller's on_event raises", function()
      local c = claude()
      local cached = sturdy_cache():wrap(c)
      local good = {}
      local bad = cached:stream(ask("robust"), { headers = steps("rb", "200;drip=20"),
                                                 on_event = function(ev)
                                                   if ev.type == "content_block_delta" then error("boom") end
                                                 end })
      local ok = cached:stream(ask("robust"), { on_event = function(ev) good[#good + 1] = ev.type end })
      local r = assert(ok:result())
      assert.equal("Echo: robust", r.text)
      assert.equal("message_stop", good[#good])
      local _, err = bad:result()
      assert.equal("callback", err.kind)
      assert.matches("boom", err.detail, 1, true)
      assert.equal(1, requests())
    end)

    it("shares one upstream stream between identical streams in flight", function()
      local c = claude()
      local cache = sturdy_cache()
      local cached = cache:wrap(c)
      local a, b = {}, {}
      local sa = cached:stream(ask("shared story"), { headers = steps("ss", "200;drip=30"),
                                                      on_event = function(ev) a[#a + 1] = ev.type end })
      -- b joins once a has started receiving
      while #a == 0 do c.client:poll(0.05) end
      local sb = cached:stream(ask("shared story"), { on_event = function(ev) b[#b + 1] = ev.type end })
      assert.same(a, b) -- the events so far, at once
      local ra, rb = assert(sa:result()), assert(sb:result())
      assert.same(a, b)
      assert.equal("message_stop", b[#b])
      assert.equal("miss", ra.cache)
      assert.equal("hit", rb.cache)
      assert.equal(ra.text, rb.text)
      assert.equal(1, requests())
    end)
  end)

  describe("streams", function()
    it("stores a stream after its terminal event and replays the same events on a hit", function()
      local cached = sturdy_cache():wrap(claude())
      local live, replay = {}, {}
      local iter, s1 = cached:stream(ask("replay me"))
      for ev in iter do live[#live + 1] = ev end
      local iter2, s2 = cached:stream(ask("replay me"))
      for ev in iter2 do replay[#replay + 1] = ev end
      assert.equal("miss", s1.cache)
      assert.equal("hit", s2.cache)
      assert.equal(#live, #replay)
      for i = 1, #live do
        assert.equal(live[i].type, replay[i].type)
        assert.same(live[i].data, replay[i].data)
      end
      assert.equal("message_stop", replay[#replay].type)
      assert.equal(assert(s1:result()).text, assert(s2:result()).text)
      assert.equal(1, requests())
      -- the non-streamed call is another key
      assert.equal("miss", assert(cached:messages(ask("replay me"))).cache)
    end)

    it("replays a hit through on_event before stream returns", function()
      local c = gpt()
      local cached = sturdy_cache():wrap(c)
      local live = {}
      local s1 = cached:stream(ask("on events"), { on_event = function(ev) live[#live + 1] = ev.type end })
      assert.equal(0, #live) -- a live stream's events come from poll
      assert(s1:result())
      local replay = {}
      local s2 = cached:stream(ask("on events"), { on_event = function(ev) replay[#replay + 1] = ev.type end })
      assert.is_true(s2.done)
      assert.same(live, replay)
      assert.equal("done", replay[#replay])
      assert.equal("hit", assert(s2:result()).cache)
      assert.equal(1, requests())
    end)

    it("does not store a truncated or failed stream", function()
      local cache = sturdy_cache()
      local cached = cache:wrap(claude { retry = { attempts = 1 } })
      local types = {}
      for ev in cached:stream(ask("cut"), { headers = steps("t1", "truncated") }) do types[#types + 1] = ev end
      assert.equal("error", types[#types].type)
      assert.equal("stream_truncated", types[#types].error.kind)
      local _, err = select(2, cached:stream(ask("cut"), { headers = steps("t2", "stream_error;after_delta=1") }))
        :result()
      assert.equal("overloaded", err.kind)
      assert.is_true(err.committed)
      assert.equal(0, cache:stats().entries)
      local iter, s = cached:stream(ask("cut"))
      for _ in iter do end
      assert.equal("miss", s.cache)
      assert.equal(3, requests())
    end)

    it("ends once when canceled at its terminal event, and stores the answer", function()
      local cache = sturdy_cache()
      local cached = cache:wrap(claude())
      local seen, canceled = {}, nil
      local s
      s = cached:stream(ask("whole"), { headers = steps("w", "200;linger=1000"), on_event = function(ev)
        seen[#seen + 1] = ev.type
        if ev.type == "message_stop" then canceled = s:cancel() end
      end })
      local r = assert(s:result())
      assert.equal("Echo: whole", r.text)
      assert.equal("message_stop", seen[#seen])
      assert.is_false(canceled)
      assert.equal(1, cache:stats().entries)
    end)

    it("cancels the upstream stream only when no caller is left", function()
      local c = claude()
      local cached = sturdy_cache():wrap(c)
      local a = cached:stream(ask("cancel me"), { headers = steps("cx", "200;drip=50"), on_event = function() end })
      local seen = 0
      local b = cached:stream(ask("cancel me"), { on_event = function() seen = seen + 1 end })
      a:cancel()
      local r = assert(b:result())
      assert.equal("Echo: cancel me", r.text)
      assert.is_true(seen > 3)
      local _, err = a:result()
      assert.equal("canceled", err.kind)
      -- the last listener leaving cancels it
      local d = cached:stream(ask("cancel me too"),
                              { headers = steps("cy", "200;drip=100"), on_event = function() end })
      d:cancel()
      while c.client:poll(0.05) > 0 do end
      local _, derr = d:result()
      assert.equal("canceled", derr.kind)
      assert.equal("miss", select(2, cached:stream(ask("cancel me too"))).cache)
    end)
  end)

  describe("similar", function()
    it("matches near-duplicates of the last user message", function()
      local cache = sturdy_cache { similar = true }
      local cached = cache:wrap(claude())
      local first = assert(cached:messages(ask("What is the capital of France?")))
      for _, q in ipairs { "what is the capital of france", "  What is   the capital of France ?",
                           "WHAT IS THE CAPITAL OF FRANCE!!", "\"What is the capital of France?\"" } do
        local r = assert(cached:messages(ask(q)))
        assert.equal("hit", r.cache, q)
        assert.equal("similar", r.cache_match, q)
        assert.equal(first.text, r.text)
      end
      assert.equal("exact", assert(cached:messages(ask("What is the capital of France?"))).cache_match)
      assert.equal(1, requests())
    end)

    it("never matches questions that differ by one meaningful word, number or operator", function()
      local pairs_ = {
        { "What is the capital of France?", "What is the capital of Spain?" },
        { "Is it safe to eat raw chicken?", "Is it not safe to eat raw chicken?" },
        { "Convert 10 miles to km", "Convert 100 miles to km" },
        { "What is 3.5 + 1?", "What is 35 + 1?" },
        { "What is 2 + 2?", "What is 2 - 2?" },
        { "Who was the first president?", "Who was the last president?" },
        { "dog bites man", "man bites dog" },
        { "Summarise this in one sentence.", "Summarise this in two sentences." },
      }
      for i, pair in ipairs(pairs_) do
        m:reset()
        local cached = sturdy_cache({ similar = true }):wrap(claude())
        local r1 = assert(cached:messages(ask(pair[1])))
        local r2 = assert(cached:messages(ask(pair[2])))
        assert.equal("miss", r2.cache, "pair " .. i)
        assert.are_not.equal(r1.text, r2.text)
        assert.equal(2, requests())
      end
    end)

    it("matches only within the same system, model, parameters and earlier turns", function()
      local cached = sturdy_cache({ similar = true }):wrap(claude())
      assert(cached:messages(ask("Hello there", { system = "Be brief." })))
      assert.equal("miss", assert(cached:messages(ask("hello there", { system = "Be long." }))).cache)
      assert.equal("miss", assert(cached:messages(ask("hello there", { system = "Be brief.", max_tokens = 9 }))).cache)
      local convo = ask("and then?")
      table.insert(convo.messages, 1, { role = "user", content = "Tell me about Rome" })
      table.insert(convo.messages, 2, { role = "assistant", content = "Rome is old." })
      assert(cached:messages(convo))
      local other = ask("And then")
      table.insert(other.messages, 1, { role = "user", content = "Tell me about Paris" })
      table.insert(other.messages, 2, { role = "assistant", content = "Rome is old." })
      assert.equal("miss", assert(cached:messages(other)).cache)
      other.messages[1].content = "Tell me about Rome"
      assert.equal("hit", assert(cached:messages(other)).cache)
    end)

    it("is off by default: a near-duplicate misses", function()
      local cached = sturdy_cache():wrap(claude())
      assert(cached:messages(ask("What is the capital of France?")))
      assert.equal("miss", assert(cached:messages(ask("what is the capital of france"))).cache)
    end)
  end)

  describe("options and misuse", function()
    it("raises on unknown options and bad values, naming them", function()
      assert.has_error(function() sturdy_cache { tll = 5 } end, "sturdy: unknown option 'tll' in sturdy.cache")
      assert.has_error(function() sturdy_cache { ttl = 0 / 0 } end,
        "sturdy: option 'ttl' in sturdy.cache must be a positive finite number, got " .. tostring(0 / 0))
      assert.has_error(function() sturdy_cache { ttl = math.huge } end,
        "sturdy: option 'ttl' in sturdy.cache must be a positive finite number, got inf")
      assert.has_error(function() sturdy_cache { max_entries = 1.5 } end,
        "sturdy: option 'max_entries' in sturdy.cache must be a whole number >= 1, got 1.5")
      assert.has_error(function() sturdy_cache { stale_if_error = -1 } end,
        "sturdy: option 'stale_if_error' in sturdy.cache must be a number >= 0, got -1")
      assert.has_error(function() sturdy_cache { backend = "memroy" } end,
        "sturdy: option 'backend' in sturdy.cache must be \"memory\", \"redis\", \"ngx\" or a backend table, "
        .. "got \"memroy\"")
      assert.has_error(function() sturdy_cache { clock = function() return 0 / 0 end } end)
      assert.has_error(function() sturdy_cache { redis = {} } end,
        "sturdy: option 'redis' in sturdy.cache needs backend = \"redis\"")
      assert.has_error(function() sturdy_cache { backend = "redis", redis = { prot = 1 } } end,
        "sturdy: unknown option 'prot' in sturdy.cache option 'redis'")
      assert.has_error(function() sturdy_cache { backend = "ngx" } end,
        "sturdy: the ngx backend runs inside OpenResty (ngx.shared is missing)")
      assert.has_error(function() sturdy_cache():wrap {} end)
      assert.has_error(function() sturdy_cache():wrap(claude()):chat(ask("x")) end,
        "sturdy: the wrapped anthropic has no method 'chat'")
    end)

    it("counts hits, misses and bypasses per target", function()
      local cache = sturdy_cache()
      local a, g = cache:wrap(claude()), cache:wrap(gpt())
      assert(a:messages(ask("q1")))
      assert(a:messages(ask("q1")))
      assert(g:chat(ask("q1")))
      assert(g:chat(ask("q1", { temperature = 1 })))
      local s = cache:stats()
      assert.equal(1, s.hits)
      assert.equal(2, s.misses)
      assert.equal(1, s.bypass)
      assert.same({ hits = 1, misses = 1, stale = 0, evictions = 0, bypass = 0 },
                  s.targets["anthropic/claude-sonnet-4-5"])
      assert.same({ hits = 0, misses = 1, stale = 0, evictions = 0, bypass = 1 }, cache:stats("openai/gpt-4o-mini"))
      assert.is_nil(cache:stats("nobody"))
    end)

    it("serves prepared requests: lookup skips the send, finish stores and falls back to stale", function()
      local clock = virtual_clock()
      local cache = sturdy_cache { ttl = 10, stale_if_error = 60, clock = clock.now }
      local c = claude()
      local cached = cache:wrap(c)
      assert.is_nil(cached:lookup(ask("batched")))
      local req, finish = cached:prepare(ask("batched"))
      local results = c.client:batch { req }
      local r = assert(finish(results[1]))
      assert.equal("miss", r.cache)
      assert.equal("hit", assert(cached:lookup(ask("batched"))).cache)
      assert.equal("hit", assert(cached:messages(ask("batched"))).cache) -- the same key as messages
      clock.t = clock.t + 20
      local req2, finish2 = cached:prepare(ask("batched"), { headers = steps("pb", "500") })
      local failed = c.client:batch({ req2 }, {})
      local s = assert(finish2(failed[1]))
      assert.equal("stale", s.cache)
      assert.equal("server", s.stale_error.kind)
    end)
  end)
end)
