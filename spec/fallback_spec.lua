-- sturdy.fallback against the mock API, on its Anthropic and OpenAI paths:
-- falling through (and not), skipping cooling targets without a request, one
-- deadline and one attempt cap across the chain, every target cooling down,
-- translation between the shapes, context windows, content policy, adaptive
-- order, key rotation, streams before and after their first delta, the
-- degraded answer, counts, and the chain behind the cache.
local sturdy = require "sturdy"
local anthropic = require "sturdy.anthropic"
local openai = require "sturdy.openai"
local fallback = require "sturdy.fallback"
local sturdy_cache = require "sturdy.cache"
local mock = require "spec.support.mock"

local steps = mock.steps
local KEY = "sk-chain-secret-4f3e2d1c0b"
local FAST = { overloaded = 0.01, transient = 0.01, throttled = 0.01, timeout = 0.01 }

local function ask(text, extra)
  local p = { max_tokens = 32, messages = { { role = "user", content = text or "hi" } } }
  for k, v in pairs(extra or {}) do p[k] = v end
  return p
end

describe("sturdy.fallback", function()
  local m, clients

  setup(function() m = assert(mock.start()) end)
  teardown(function() m:stop() end)
  before_each(function()
    m:reset()
    clients = {}
  end)
  after_each(function()
    for _, c in ipairs(clients) do c:close() end
  end)

  local function client(opts)
    local o = { base_url = m.http_url, retry = { base = FAST } }
    for k, v in pairs(opts or {}) do o[k] = v end
    local c = sturdy.client(o)
    clients[#clients + 1] = c
    return c
  end

  local function claude(c, model, key)
    return anthropic.new { client = c, api_key = key or KEY, model = model or "claude-sonnet-4-5" }
  end

  local function gpt(c, model, key)
    return openai.new { client = c, api_key = key or KEY, model = model or "gpt-4o-mini" }
  end

  local function count(id) return m:scenario(id).count end

  describe("falling through", function()
    it("moves an overloaded primary's call to the fallback, which answers; served_by and fallbacks say so", function()
      local c = client()
      local chain = fallback {
        targets = { { provider = claude(c), name = "sonnet", headers = steps("primary", "529") },
                    { provider = claude(c, "claude-haiku-4-5"), name = "haiku", headers = steps("second", "200") } },
      }
      local r, err = chain:messages(ask("Hello"))
      assert.is_nil(err)
      assert.equal("Echo: Hello", r.text)
      assert.equal("haiku", r.served_by)
      assert.equal("claude-haiku-4-5", r.model)
      assert.is_false(r.degraded)
      assert.equal(1, #r.fallbacks)
      local f = r.fallbacks[1]
      assert.same({ "sonnet", "overloaded", "overloaded", 529, 4 }, { f.target, f.kind, f.class, f.status, f.attempts })
      -- the primary's own retries ran (4 attempts), the fallback was asked once
      assert.equal(4, count("primary"))
      assert.equal(1, count("second"))
      local s = chain:stats()
      assert.same({ calls = 1, successes = 0, failures = 1, fallbacks = 1, skipped = 0, probes = 0, attempts = 4 },
                  s.targets.sonnet)
      assert.same({ calls = 1, successes = 1, failures = 0, fallbacks = 0, skipped = 0, probes = 0, attempts = 1 },
                  s.targets.haiku)
      assert.equal(1, s.answered)
    end)

    it("skips a target whose breaker opened, without a request (the mock's counter)", function()
      local c = client { breaker = { window = 10, min_calls = 2, failure_rate = 0.5, open_for = 30 } }
      local chain = fallback {
        targets = { { provider = claude(c), name = "sonnet", attempts = 1, headers = steps("primary", "529") },
                    { provider = claude(c, "claude-haiku-4-5"), name = "haiku" } },
      }
      for _ = 1, 2 do assert.equal("haiku", assert(chain:messages(ask())).served_by) end
      assert.equal(2, count("primary"))
      assert.equal("open", c:stats(c:key_for { path = "/v1/messages", json = { model = "claude-sonnet-4-5" } })
                             .breaker.state)
      for _ = 1, 3 do
        local r = assert(chain:messages(ask()))
        assert.equal("haiku", r.served_by)
        local f = r.fallbacks[1]
        assert.equal("sonnet", f.target)
        assert.equal("circuit_open", f.kind)
        assert.is_true(f.skipped)
        assert.is_true(f.retry_after > 25 and f.retry_after <= 30, tostring(f.retry_after))
      end
      assert.equal(2, count("primary")) -- nothing more reached it
      assert.same({ calls = 2, successes = 0, failures = 2, fallbacks = 2, skipped = 3, probes = 0, attempts = 2 },
                  chain:stats("sonnet"))
    end)

    it("skips a target whose key a 429 paused, without a request", function()
      local c = client()
      local chain = fallback {
        targets = { { provider = claude(c), name = "sonnet", attempts = 1,
                      headers = steps("primary", "429;retry-after=5|200") },
                    { provider = gpt(c), name = "gpt" } },
      }
      local r1 = assert(chain:messages(ask()))
      assert.equal("gpt", r1.served_by)
      assert.equal("throttled", r1.fallbacks[1].class)
      local r2 = assert(chain:messages(ask()))
      assert.equal("gpt", r2.served_by)
      assert.equal("rate_limited", r2.fallbacks[1].kind)
      assert.is_true(r2.fallbacks[1].skipped)
      assert.is_true(r2.fallbacks[1].retry_after > 3 and r2.fallbacks[1].retry_after <= 5)
      assert.equal(1, count("primary"))
    end)

    it("does not fall through on a 400 (nor auth) unless the chain lists it", function()
      local c = client()
      local function chain_with(on)
        return fallback {
          on = on,
          targets = { { provider = claude(c), name = "sonnet", headers = steps("primary", "400") },
                      { provider = claude(c, "claude-haiku-4-5"), name = "haiku", headers = steps("second", "200") } },
        }
      end
      local r, err = chain_with(nil):messages(ask())
      assert.is_nil(r)
      assert.equal("bad_request", err.kind)
      assert.equal(400, err.status)
      assert.equal("stopped", err.chain_stopped)
      assert.equal("sonnet", err.fallbacks[1].target)
      assert.equal(1, count("primary"))
      assert.equal(0, count("second"))

      m:reset()
      local r401, err401 = fallback {
        targets = { { provider = claude(c), headers = steps("auth", "401") }, claude(c, "claude-haiku-4-5") },
      }:messages(ask())
      assert.is_nil(r401)
      assert.equal("auth", err401.kind)

      local r2 = assert(chain_with({ "overloaded", "bad_request" }):messages(ask()))
      assert.equal("haiku", r2.served_by)
      assert.equal("bad_request", r2.fallbacks[1].kind)
    end)

    it("falls through on budget_exhausted: the budget stopped the retries, the error keeps its kind", function()
      local c = client { retry = { base = FAST, budget = { ratio = 0, min_per_s = 0 } } }
      local chain = fallback {
        on = { "budget_exhausted" },
        targets = { { provider = claude(c), name = "sonnet", headers = steps("primary", "500") },
                    { provider = claude(c, "claude-haiku-4-5"), name = "haiku" } },
      }
      local r = assert(chain:messages(ask()))
      assert.equal("haiku", r.served_by)
      assert.equal("server", r.fallbacks[1].kind)
      assert.equal(1, count("primary"))
    end)
  end)

  describe("one budget for the whole chain", function()
    local function three(c, opts)
      opts = opts or {}
      opts.targets = {
        { provider = claude(c), name = "sonnet", headers = steps("a", "529") },
        { provider = claude(c, "claude-haiku-4-5"), name = "haiku", headers = steps("b", "529") },
        { provider = gpt(c), name = "gpt", headers = steps("c", "200") },
      }
      return fallback(opts)
    end

    it("caps the attempts across targets: each target's call gets at most what is left", function()
      local c = client() -- 4 attempts per call
      local r, err = three(c, { attempts = 3 }):messages(ask())
      assert.is_nil(r)
      assert.equal("overloaded", err.kind)
      assert.equal("attempts", err.chain_stopped)
      assert.same({ 3, 0, 0 }, { count("a"), count("b"), count("c") })

      m:reset()
      r, err = three(c, { attempts = 5 }):messages(ask())
      assert.is_nil(r)
      assert.equal("attempts", err.chain_stopped)
      assert.same({ 4, 1, 0 }, { count("a"), count("b"), count("c") }) -- never a restart of sonnet

      m:reset()
      r = assert(three(c, { attempts = 9 }):messages(ask()))
      assert.equal("gpt", r.served_by)
      assert.same({ 4, 4, 1 }, { count("a"), count("b"), count("c") })
      -- a call may lower the cap for itself
      m:reset()
      r = three(c):messages(ask(), { attempts = 2 })
      assert.is_nil(r)
      assert.same({ 2, 0, 0 }, { count("a"), count("b"), count("c") })
    end)

    it("holds one deadline across targets: the next target gets only the time left", function()
      local c = client()
      local chain = fallback {
        timeout = 0.6,
        targets = {
          { provider = claude(c), name = "sonnet", attempts = 1, headers = steps("slow529", "529;delay=300") },
          { provider = claude(c, "claude-haiku-4-5"), name = "haiku", headers = steps("slow", "200;delay=1500") },
          { provider = gpt(c), name = "gpt", headers = steps("never", "200") },
        },
      }
      local t0 = sturdy.monotime()
      local r, err = chain:messages(ask())
      local took = sturdy.monotime() - t0
      assert.is_nil(r)
      assert.equal("total_timeout", err.kind)
      assert.equal("deadline", err.chain_stopped)
      assert.is_true(took >= 0.55 and took < 0.9, ("took %.3f s"):format(took))
      assert.same({ 1, 1, 0 }, { count("slow529"), count("slow"), count("never") })

      -- the call's own timeout.total is the chain's deadline
      m:reset()
      t0 = sturdy.monotime()
      r, err = chain:messages(ask(), { timeout = { total = 0.2 } })
      took = sturdy.monotime() - t0
      assert.is_nil(r)
      assert.equal("total_timeout", err.kind)
      assert.is_true(took < 0.45, ("took %.3f s"):format(took))
    end)

    it("stops at max_targets", function()
      local c = client()
      local chain = fallback {
        max_targets = 2,
        targets = {
          { provider = claude(c), name = "sonnet", attempts = 1, headers = steps("a", "529") },
          { provider = claude(c, "claude-haiku-4-5"), name = "haiku", attempts = 1, headers = steps("b", "503") },
          { provider = gpt(c), name = "gpt", headers = steps("c", "200") },
        },
      }
      local r, err = chain:messages(ask())
      assert.is_nil(r)
      assert.equal("max_targets", err.chain_stopped)
      assert.same({ 1, 1, 0 }, { count("a"), count("b"), count("c") })
    end)
  end)

  describe("every target cooling down", function()
    local function cooling_chain(c, opts)
      opts = opts or {}
      opts.targets = {
        { provider = claude(c), name = "sonnet", attempts = 1, headers = steps("a", "529|200") },
        { provider = claude(c, "claude-haiku-4-5"), name = "haiku", attempts = 1, headers = steps("b", "529|200") },
      }
      return fallback(opts)
    end

    it("fails at once with retry_after set to the earliest recovery, sending nothing", function()
      local c = client { breaker = { min_calls = 1, window = 10, open_for = 5 } }
      local chain = cooling_chain(c)
      local r, err = chain:messages(ask())
      assert.is_nil(r)
      assert.equal("overloaded", err.kind) -- both failed and opened their breakers
      local t0 = sturdy.monotime()
      r, err = chain:messages(ask())
      assert.is_true(sturdy.monotime() - t0 < 0.1)
      assert.is_nil(r)
      assert.equal("cooling_down", err.kind)
      assert.is_true(err.retryable)
      assert.is_true(err.retry_after > 4 and err.retry_after <= 5, tostring(err.retry_after))
      assert.matches("retry after", tostring(err))
      assert.matches("sonnet circuit open", err.detail)
      assert.equal(2, #err.fallbacks)
      assert.same({ 1, 1 }, { count("a"), count("b") })
    end)

    it("gives the earliest recovery across breakers and 429 pauses", function()
      local c = client { breaker = { min_calls = 1, window = 10, open_for = 8 } }
      local chain = fallback {
        targets = { { provider = claude(c), name = "sonnet", attempts = 1, headers = steps("a", "529") },
                    { provider = gpt(c), name = "gpt", attempts = 1, headers = steps("b", "429;retry-after=3") } },
      }
      assert.is_nil((chain:messages(ask())))
      local _, err = chain:messages(ask())
      assert.equal("cooling_down", err.kind)
      assert.is_true(err.retry_after > 2 and err.retry_after <= 3, tostring(err.retry_after))
    end)

    it("with wait_for_cooldown, waits for the earliest recovery within the deadline", function()
      local c = client { breaker = { min_calls = 1, window = 10, open_for = 0.3, probes = 1 } }
      local chain = cooling_chain(c, { wait_for_cooldown = true, timeout = 5 })
      assert.is_nil((chain:messages(ask())))
      local t0, cpu0 = sturdy.monotime(), os.clock()
      local r = assert(chain:messages(ask()))
      local took, cpu = sturdy.monotime() - t0, os.clock() - cpu0
      assert.equal("sonnet", r.served_by) -- half-open: its probe answered
      assert.is_true(took >= 0.25 and took < 1, ("took %.3f s"):format(took))
      assert.is_true(cpu < 0.1, ("%.3f s of CPU while waiting"):format(cpu)) -- it slept, never spun
      assert.equal(1, chain:stats().waits)
      assert.same({ 2, 1 }, { count("a"), count("b") })
    end)

    it("does not wait past the deadline", function()
      local c = client { breaker = { min_calls = 1, window = 10, open_for = 5 } }
      local chain = cooling_chain(c, { wait_for_cooldown = true, timeout = 1 })
      assert.is_nil((chain:messages(ask())))
      local t0 = sturdy.monotime()
      local _, err = chain:messages(ask())
      assert.is_true(sturdy.monotime() - t0 < 0.1)
      assert.equal("cooling_down", err.kind)
      assert.equal(0, chain:stats().waits)
    end)
  end)

  describe("translation between the shapes", function()
    it("serves an Anthropic-shaped call from OpenAI, and answers in the Anthropic shape", function()
      local c = client()
      local chain = fallback {
        targets = { { provider = claude(c), name = "sonnet", headers = steps("a", "529") },
                    { provider = gpt(c), name = "gpt" } },
      }
      local r = assert(chain:messages(ask("Translate me", { system = "Be brief.", temperature = 0.2,
                                                          stop_sequences = { "END" } })))
      assert.equal("gpt", r.served_by)
      assert.equal("openai", r.translated_from)
      assert.equal("message", r.reply.type)
      assert.equal("Echo: Translate me", r.reply.content[1].text)
      assert.equal("end_turn", r.stop_reason)
      assert.equal("Echo: Translate me", r.text)
      assert.is_true(r.usage.input > 0 and r.usage.output > 0)
      assert.is_true(r.cost > 0)
      assert.equal(1, m:counters().paths["/v1/chat/completions"])
    end)

    it("serves an OpenAI-shaped call from Anthropic, and answers in the OpenAI shape", function()
      local c = client()
      local chain = fallback {
        targets = { { provider = gpt(c), name = "gpt", headers = steps("g", "503") },
                    { provider = claude(c), name = "sonnet" } },
      }
      local r = assert(chain:chat { messages = { { role = "system", content = "Be brief." },
                                                 { role = "user", content = "Bonjour" } } })
      assert.equal("sonnet", r.served_by)
      assert.equal("chat.completion", r.reply.object)
      assert.equal("Echo: Bonjour", r.reply.choices[1].message.content)
      assert.equal("stop", r.stop_reason)
    end)

    it("skips a target the request cannot be translated for, with the reason in fallbacks", function()
      local c = client()
      local chain = fallback {
        targets = { { provider = claude(c), name = "sonnet", headers = steps("a", "529") },
                    { provider = gpt(c), name = "gpt", headers = steps("g", "200") },
                    { provider = claude(c, "claude-haiku-4-5"), name = "haiku" } },
      }
      local r = assert(chain:messages(ask("x", { top_k = 5 })))
      assert.equal("haiku", r.served_by)
      assert.equal("untranslatable", r.fallbacks[2].kind)
      assert.equal("gpt", r.fallbacks[2].target)
      assert.matches("top_k", r.fallbacks[2].reason)
      assert.equal(0, count("g"))
      assert.equal(1, chain:stats("gpt").skipped)

      local only = fallback { targets = { gpt(c) } }
      local none, err = only:messages(ask("x", { top_k = 5 }))
      assert.is_nil(none)
      assert.equal("no_target", err.kind)
      assert.matches("top_k", err.detail)
    end)
  end)

  describe("context windows and content policy", function()
    it("moves a context-window error to a target with a larger declared context", function()
      local c = client()
      local chain = fallback {
        targets = { { provider = claude(c, "claude-haiku-4-5"), name = "haiku", context = 200000,
                      headers = steps("h", "context") },
                    { provider = gpt(c), name = "gpt", context = 128000 },
                    { provider = claude(c), name = "sonnet-1m" } },
        context = { ["sonnet-1m"] = 1000000 },
      }
      local r = assert(chain:messages(ask("a long prompt")))
      assert.equal("sonnet-1m", r.served_by)
      assert.equal("bad_request", r.fallbacks[1].kind)
      local f = r.fallbacks[2]
      assert.same({ "gpt", "context_window", true }, { f.target, f.kind, f.skipped })
      assert.equal(0, m:counters().paths["/v1/chat/completions"] or 0)

      -- OpenAI's context_length_exceeded too
      local chain2 = fallback {
        targets = { { provider = gpt(c), context = 128000, headers = steps("g", "context") },
                    { provider = claude(c), context = 200000 } },
      }
      assert.equal("anthropic/claude-sonnet-4-5", assert(chain2:messages(ask())).served_by)
      -- without declared contexts the 400 stands
      local chain3 = fallback { targets = { { provider = gpt(c), headers = steps("g2", "context") }, claude(c) } }
      local none, err = chain3:messages(ask())
      assert.is_nil(none)
      assert.is_true(fallback.is_context_error(err))
    end)

    it("read context-window and content-filter errors from the provider's code or words", function()
      local function err(fields) return sturdy.Error.new(fields) end
      assert.is_true(fallback.is_context_error(err { kind = "bad_request", status = 400,
        body = '{"error":{"message":"too long","type":"invalid_request_error","code":"context_length_exceeded"}}' }))
      assert.is_true(fallback.is_context_error(err { kind = "bad_request", detail = "prompt is too long: 5 > 4" }))
      assert.is_false(fallback.is_context_error(err { kind = "bad_request", detail = "max_tokens: too large" }))
      assert.is_false(fallback.is_context_error(err { kind = "overloaded", detail = "prompt is too long" }))
      assert.is_true(fallback.is_content_policy_error(err { kind = "bad_request",
        body = '{"error":{"message":"filtered","type":"invalid_request_error","code":"content_filter"}}' }))
      assert.is_false(fallback.is_content_policy_error(err { kind = "bad_request", body = "<html>" }))
    end)

    it("moves a declined answer on only when content_policy is listed", function()
      local c = client()
      local targets = { { provider = gpt(c), name = "gpt", headers = steps("g", "refusal") },
                        { provider = claude(c), name = "sonnet" } }
      local plain = assert(fallback({ targets = targets }):chat { messages = { { role = "user", content = "x" } } })
      assert.equal("gpt", plain.served_by)
      assert.equal("content_filter", plain.stop_reason)

      local on = { "overloaded", "content_policy" }
      local r = assert(fallback({ targets = targets, on = on })
        :chat { messages = { { role = "user", content = "x" } } })
      assert.equal("sonnet", r.served_by)
      assert.equal("content_policy", r.fallbacks[1].kind)
      assert.equal("Echo: x", r.reply.choices[1].message.content)

      -- nobody else answers: the declined answer is the answer
      local alone = fallback { targets = { { provider = claude(c), headers = steps("a", "refusal") } }, on = on }
      local d = assert(alone:messages(ask()))
      assert.equal("refusal", d.stop_reason)
      assert.equal("content_policy", d.fallbacks[1].kind)
    end)
  end)

  describe("adaptive order", function()
    it("moves traffic to the faster target, and back after the first recovers", function()
      local c = client()
      -- sonnet is slow for its first 6 requests, then as fast as haiku
      local slow = table.concat({ "200;delay=150", "200;delay=150", "200;delay=150", "200;delay=150",
                                  "200;delay=150", "200;delay=150", "200" }, "|")
      local chain = fallback {
        order = "adaptive", rerank_every = 0.001, probe = 0.2,
        targets = { { provider = claude(c), name = "sonnet", headers = steps("s", slow) },
                    { provider = claude(c, "claude-haiku-4-5"), name = "haiku" } },
      }
      local served = {}
      local recovered_at
      for i = 1, 150 do
        local r = assert(chain:messages(ask()))
        served[i] = r.served_by
        if not recovered_at and count("s") > 6 then recovered_at = i end
      end
      -- while sonnet was slow, haiku took the traffic; sonnet only saw probes
      local haiku_early = 0
      for i = 3, 22 do
        if served[i] == "haiku" then haiku_early = haiku_early + 1 end
      end
      assert.is_true(haiku_early >= 14, "haiku served " .. haiku_early .. " of calls 3-22")
      assert.truthy(recovered_at, "sonnet got probe traffic and recovered")
      -- after its recovery, sonnet leads again
      local sonnet_late = 0
      for i = 131, 150 do
        if served[i] == "sonnet" then sonnet_late = sonnet_late + 1 end
      end
      assert.is_true(sonnet_late >= 14, "sonnet served " .. sonnet_late .. " of the last 20 calls")
      assert.equal("sonnet", chain:stats().order[1])
      assert.is_true(chain:stats("sonnet").probes > 0)
    end)

    it("takes weights or a function as the score", function()
      local c = client()
      local seen
      local chain = fallback {
        order = "adaptive", rerank_every = 0.001, probe = 0,
        score = function(s)
          seen = s
          return s.name == "haiku" and 1 or 0
        end,
        targets = { { provider = claude(c), name = "sonnet" },
                    { provider = claude(c, "claude-haiku-4-5"), name = "haiku" } },
      }
      assert.equal("haiku", assert(chain:messages(ask())).served_by)
      local t0 = sturdy.monotime()
      repeat until sturdy.monotime() - t0 > 0.002 -- past rerank_every
      assert.equal("haiku", assert(chain:messages(ask())).served_by)
      assert.equal("haiku", seen.name) -- the last one scored, after its first call
      assert.equal(1, seen.calls)
      assert.is_number(seen.success)
      assert.is_number(seen.latency)
      assert.is_table(seen.stats)

      -- a score function may call the chain itself; a score that is not a number raises
      local inner
      local reentrant
      reentrant = fallback {
        order = "adaptive", rerank_every = 0.001, probe = 0,
        score = function(v)
          if not inner then
            inner = true
            assert(reentrant:messages(ask("from the score")))
          end
          return v.success
        end,
        targets = { claude(c), claude(c, "claude-haiku-4-5") },
      }
      assert(reentrant:messages(ask()))
      assert.equal(2, reentrant:stats().calls)
      local bad = fallback { order = "adaptive", score = function() return 0 / 0 end, targets = { claude(c) } }
      local ok, e = pcall(bad.messages, bad, ask())
      assert.is_false(ok)
      assert.matches("score function returned", e)

      -- latency weighted 0: a slow primary keeps its place
      local slow = fallback {
        order = "adaptive", rerank_every = 0.001, probe = 0, score = { latency = 0 },
        targets = { { provider = claude(c, "claude-opus-4-1"), name = "opus", headers = steps("o", "200;delay=100") },
                    { provider = claude(c, "claude-haiku-4-5"), name = "haiku2" } },
      }
      for _ = 1, 4 do assert.equal("opus", assert(slow:messages(ask())).served_by) end
    end)
  end)

  describe("key rotation", function()
    it("spreads calls over the keys by the remaining quota learned from the limits", function()
      assert(m:config { rate_limit = { rpm = 600, burst = 5 } })
      local c = client { retry = { base = FAST, attempts = 1 } }
      local group = fallback.keys { provider = "anthropic", api_keys = { "sk-a-0001", "sk-b-0002", "sk-c-0003" },
                                    model = "claude-sonnet-4-5", client = c, name = "sonnet" }
      local chain = fallback { targets = { group } }
      assert.same({ "sonnet#1", "sonnet#2", "sonnet#3" }, chain:targets())
      local by = {}
      for _ = 1, 12 do
        local r = assert(chain:messages(ask()))
        by[r.served_by] = (by[r.served_by] or 0) + 1
      end
      assert.same({ ["sonnet#1"] = 4, ["sonnet#2"] = 4, ["sonnet#3"] = 4 }, by)
      assert.equal(0, m:counters().rate_limited) -- one key would have met its limit of 5
      -- each key has its own upstream key, so its own learned limits
      local keys = c:stats().keys
      table.sort(keys)
      assert.equal(3, #keys)
      assert.matches("/claude%-sonnet%-4%-5#1$", keys[1])

      -- drain key b elsewhere: once the chain learns it is low, b is passed over
      local b = anthropic.new { client = client(), api_key = "sk-b-0002", model = "claude-sonnet-4-5" }
      for _ = 1, 3 do b:messages(ask()) end
      local next6 = {}
      for _ = 1, 6 do
        local r = assert(chain:messages(ask()))
        next6[#next6 + 1] = r.served_by
      end
      local b_calls = 0
      for _, name in ipairs(next6) do
        if name == "sonnet#2" then b_calls = b_calls + 1 end
      end
      assert.is_true(b_calls <= 1, table.concat(next6, " "))
      assert(m:config { rate_limit = false })
    end)

    it("moves a throttled call to the next key, and no further unless `on` says so", function()
      local function drain(key) -- empties the key's bucket behind the chain's back
        local p = anthropic.new { client = client(), api_key = key, model = "claude-sonnet-4-5" }
        assert(p:messages(ask()))
      end
      local function chain_with(on)
        local c = client { retry = { base = FAST, attempts = 1 } }
        return fallback {
          on = on,
          targets = { fallback.keys { provider = "anthropic", api_keys = { "sk-a-0001", "sk-b-0002" },
                                      model = "claude-sonnet-4-5", client = c, name = "sonnet" },
                      { provider = claude(c, "claude-haiku-4-5"), name = "haiku", headers = steps("h", "200") } },
        }
      end
      assert(m:config { rate_limit = { rpm = 60, burst = 1 } })
      drain("sk-a-0001")
      local r = assert(chain_with({ "overloaded" }):messages(ask()))
      assert.equal("sonnet#2", r.served_by)
      assert.same({ "sonnet#1", 429 }, { r.fallbacks[1].target, r.fallbacks[1].status })

      assert(m:reset())
      assert(m:config { rate_limit = { rpm = 60, burst = 1 } })
      drain("sk-a-0001")
      drain("sk-b-0002")
      -- both keys throttled and `on` does not list throttled: haiku is never asked
      local r2, err = chain_with({ "overloaded" }):messages(ask())
      assert.is_nil(r2)
      assert.equal("rate_limited", err.kind)
      assert.equal("stopped", err.chain_stopped)
      assert.same({ "sonnet#1", "sonnet#2" }, { err.fallbacks[1].target, err.fallbacks[2].target })
      assert.equal(0, count("h"))
      -- by default it is listed: haiku answers
      assert.equal("haiku", assert(chain_with(nil):messages(ask())).served_by)
      assert(m:config { rate_limit = false })
    end)

    it("gives targets of one model with different keys distinct upstream keys", function()
      local c = client()
      local chain = fallback { targets = { claude(c, nil, "sk-one-1111"), claude(c, nil, "sk-two-2222") } }
      assert.same({ "anthropic/claude-sonnet-4-5", "anthropic/claude-sonnet-4-5#2" }, chain:targets())
      assert(chain:messages(ask()))
      assert.equal(1, #c:stats().keys)
      local two = fallback { targets = { { provider = claude(c, nil, "sk-one-1111"), headers = steps("a", "429") },
                                         claude(c, nil, "sk-two-2222") } }
      local r = assert(two:messages(ask()))
      assert.equal("anthropic/claude-sonnet-4-5#2", r.served_by)
      local keys = c:stats().keys
      table.sort(keys)
      assert.equal(2, #keys)
      assert.matches("#2$", keys[2])
    end)
  end)

  describe("streams", function()
    it("fail over before the first delta: the caller sees only the fallback's answer", function()
      local c = client()
      local chain = fallback {
        targets = { { provider = claude(c), name = "sonnet", attempts = 1, headers = steps("a", "stream_error") },
                    { provider = gpt(c), name = "gpt" } },
      }
      local it, s = chain:stream(ask("streamed"))
      local types, text = {}, {}
      for ev in it do
        types[#types + 1] = ev.type
        if ev.type == "content_block_delta" then text[#text + 1] = ev.data.delta.text end
      end
      assert.equal("message_start", types[1]) -- Anthropic events, from OpenAI chunks
      assert.equal("message_stop", types[#types])
      assert.equal("Echo: streamed", table.concat(text))
      local r = assert(s:result())
      assert.equal("gpt", r.served_by)
      assert.equal("overloaded", r.fallbacks[1].kind)
      assert.equal("Echo: streamed", r.text)
      assert.equal("message", r.reply.type)
      assert.equal(1, count("a"))
    end)

    it("do not fail over after the first delta: the error keeps the partial text", function()
      local c = client()
      local chain = fallback {
        targets = { { provider = claude(c), name = "sonnet", headers = steps("a", "stream_error;after_delta=1") },
                    { provider = claude(c, "claude-haiku-4-5"), name = "haiku", headers = steps("b", "200") } },
      }
      local seen, last = {}, nil
      for ev in chain:stream(ask("a committed answer")) do
        if ev.type == "content_block_delta" then seen[#seen + 1] = ev.data.delta.text end
        last = ev
      end
      assert.equal("error", last.type)
      local err = last.error
      assert.equal("overloaded", err.kind)
      assert.is_true(err.committed)
      assert.equal("sonnet", err.served_by)
      assert.equal(table.concat(seen), err.partial_text)
      assert.is_true(#err.partial_text > 0)
      assert.equal(("Echo: a committed answer"):sub(1, #err.partial_text), err.partial_text)
      assert.equal("committed", err.chain_stopped)
      assert.equal(1, count("a"))
      assert.equal(0, count("b")) -- never another model mid-answer
    end)

    it("stream with on_event, translated, and hand the result to result()", function()
      local c = client()
      local chain = fallback { shape = "openai", targets = { claude(c) } }
      local chunks = {}
      local s = chain:stream({ messages = { { role = "user", content = "evented" } } },
                             { on_event = function(ev) chunks[#chunks + 1] = ev end })
      local r = assert(s:result())
      assert.equal("chunk", chunks[1].type)
      assert.equal("done", chunks[#chunks].type)
      assert.equal("chat.completion", r.reply.object)
      assert.equal("Echo: evented", r.reply.choices[1].message.content)
    end)

    it("wait for a cooldown in a stream too", function()
      local c = client { breaker = { min_calls = 1, window = 10, open_for = 0.3, probes = 1 } }
      local chain = fallback { wait_for_cooldown = true, timeout = 5,
                               targets = { { provider = claude(c), attempts = 1, headers = steps("a", "529|200") } } }
      assert.is_nil((chain:messages(ask())))
      local _, s = chain:stream(ask("later"))
      local cpu0 = os.clock()
      local r = assert(s:result())
      assert.is_true(os.clock() - cpu0 < 0.1, "it slept, never spun")
      assert.equal("Echo: later", r.text)
      assert.equal(1, chain:stats().waits)
    end)
  end)

  describe("the degraded answer", function()
    it("is the last resort, marked", function()
      local c = client()
      local chain = fallback {
        degraded = "The assistant is busy; try again in a minute.",
        targets = { { provider = claude(c), attempts = 1, headers = steps("a", "529") },
                    { provider = gpt(c), attempts = 1, headers = steps("b", "500") } },
      }
      local r = assert(chain:messages(ask()))
      assert.is_true(r.degraded)
      assert.is_nil(r.served_by)
      assert.equal("The assistant is busy; try again in a minute.", r.text)
      assert.equal(r.text, r.reply.content[1].text)
      assert.equal("server", r.error.kind)
      assert.equal(2, #r.fallbacks)
      assert.equal(0, r.cost)
      assert.equal(1, chain:stats().degraded)

      -- in the OpenAI shape, and from a function that sees the request and the error
      local fn = fallback {
        degraded = function(req, err) return "no answer to " .. req.messages[1].content .. " (" .. err.kind .. ")" end,
        targets = { { provider = gpt(c), attempts = 1, headers = steps("c", "529") } },
      }
      local r2 = assert(fn:chat { messages = { { role = "user", content = "q1" } } })
      assert.is_true(r2.degraded)
      assert.equal("no answer to q1 (overloaded)", r2.reply.choices[1].message.content)

      -- an error that does not fall through is not hidden behind it
      local bad = fallback { degraded = "sorry", targets = { { provider = claude(c), headers = steps("d", "400") } } }
      local none, err = bad:messages(ask())
      assert.is_nil(none)
      assert.equal("bad_request", err.kind)
    end)

    it("streams as events in the caller's shape", function()
      local c = client()
      local chain = fallback { degraded = "later, please",
                               targets = { { provider = claude(c), attempts = 1, headers = steps("a", "529") } } }
      local text = {}
      local it, s = chain:stream(ask())
      for ev in it do
        if ev.type == "content_block_delta" then text[#text + 1] = ev.data.delta.text end
      end
      assert.equal("later, please", table.concat(text))
      assert.is_true(assert(s:result()).degraded)
    end)
  end)

  describe("behind the cache", function()
    it("answers hits without a request, serves stale when every target fails, stores no degraded answer", function()
      local c = client()
      local now = 1000
      local cache = sturdy_cache { ttl = 60, stale_if_error = 3600, clock = function() return now end }
      local chain = fallback {
        degraded = "busy",
        targets = { { provider = claude(c), name = "sonnet", attempts = 1, headers = steps("a", "529|200|529") },
                    { provider = gpt(c), name = "gpt", attempts = 1, headers = steps("b", "200|529") } },
      }
      local cached = cache:wrap(chain)
      local q = ask("cache me", { temperature = 0 })
      local r1 = assert(cached:messages(q))
      assert.equal("miss", r1.cache)
      assert.equal("gpt", r1.served_by)
      local r2 = assert(cached:messages(q))
      assert.equal("hit", r2.cache)
      assert.equal("gpt", r2.served_by)
      assert.equal(2, m:counters().requests)
      assert.equal(1, cache:stats("gpt").hits)

      now = now + 120 -- expired: sonnet answers this time
      local r3 = assert(cached:messages(q))
      assert.same({ "miss", "sonnet" }, { r3.cache, r3.served_by })
      now = now + 120 -- expired again, and both targets fail: stale beats degraded
      local r4 = assert(cached:messages(q))
      assert.equal("stale", r4.cache)
      assert.equal("Echo: cache me", r4.text)
      assert.equal("overloaded", r4.stale_error.kind)

      -- no entry at all: the degraded answer, not stored
      local q2 = ask("never answered", { temperature = 0 })
      local d = assert(cached:messages(q2))
      assert.is_true(d.degraded)
      assert.equal("miss", d.cache)
      assert.is_true(assert(cached:messages(q2)).degraded)
      local st = cache:stats()
      assert.same({ 1, 2, 1 }, { st.hits, st.stores, st.stale }) -- the two answers stored, never "busy"
    end)

    it("replays a chain's stream on a hit", function()
      local c = client()
      local cached = sturdy_cache():wrap(fallback {
        targets = { { provider = claude(c), attempts = 1, headers = steps("a", "529") }, gpt(c) } })
      local function collect()
        local it, s = cached:stream(ask("replayed", { temperature = 0 }))
        local n = 0
        for ev in it do
          if ev.type == "content_block_delta" then n = n + 1 end
        end
        return n, assert(s:result())
      end
      local n1, r1 = collect()
      local n2, r2 = collect()
      assert.equal(n1, n2)
      assert.is_true(n1 > 0)
      assert.same({ "miss", "hit" }, { r1.cache, r2.cache })
      assert.equal("openai/gpt-4o-mini", r2.served_by)
      assert.equal(2, m:counters().requests) -- the 529 and gpt's stream
    end)
  end)

  describe("in coroutines", function()
    local function run_all(c, fns)
      local cos, order = {}, {}
      for i, fn in ipairs(fns) do
        cos[i] = coroutine.create(function()
          fn()
          order[#order + 1] = i
        end)
      end
      repeat
        local alive = 0
        for _, co in ipairs(cos) do
          if coroutine.status(co) ~= "dead" then
            assert(coroutine.resume(co))
            alive = alive + 1
          end
        end
        if alive > 0 then c:poll(0.002) end
      until alive == 0
      return order
    end

    it("20 identical calls through the cache make one trip down the chain", function()
      local c = client { yield = coroutine.yield }
      local chain = fallback {
        targets = { { provider = claude(c), name = "sonnet", attempts = 1, headers = steps("a", "529;delay=50") },
                    { provider = claude(c, "claude-haiku-4-5"), name = "haiku",
                      headers = steps("b", "200;delay=50") } },
      }
      local cached = sturdy_cache({ yield = coroutine.yield }):wrap(chain)
      local results, fns = {}, {}
      for i = 1, 20 do
        fns[i] = function() results[i] = assert(cached:messages(ask("same question", { temperature = 0 }))) end
      end
      run_all(c, fns)
      for i = 1, 20 do
        assert.equal("Echo: same question", results[i].text)
        assert.equal("haiku", results[i].served_by)
      end
      assert.same({ 1, 1 }, { count("a"), count("b") })
      assert.equal(1, chain:stats().calls)
    end)

    it("a call waiting for a cooldown yields: the other coroutines go on", function()
      local c = client { yield = coroutine.yield,
                         breaker = { min_calls = 1, window = 10, open_for = 0.4, probes = 1 } }
      local waiting = fallback { wait_for_cooldown = true, timeout = 5, yield = coroutine.yield,
                                 targets = { { provider = claude(c), attempts = 1, headers = steps("a", "529|200") } } }
      local other = fallback { targets = { claude(c, "claude-haiku-4-5") } }
      assert.is_nil((waiting:messages(ask()))) -- opens the breaker
      local t0, waited_for, other_done = sturdy.monotime(), nil, nil
      local order = run_all(c, {
        function()
          assert(waiting:messages(ask("patient")))
          waited_for = sturdy.monotime() - t0
        end,
        function()
          for _ = 1, 3 do assert(other:messages(ask("meanwhile"))) end
          other_done = sturdy.monotime() - t0
        end,
      })
      assert.same({ 2, 1 }, order)
      assert.is_true(waited_for >= 0.35, tostring(waited_for))
      assert.is_true(other_done < 0.25, tostring(other_done)) -- it did not sit behind the wait
      assert.equal(1, waiting:stats().waits)
    end)
  end)

  describe("sturdy.policy.sleep", function()
    it("blocks for the time asked without spending CPU, and refuses NaN and negatives", function()
      local policy = require "sturdy.policy"
      local t0, c0 = sturdy.monotime(), os.clock()
      policy.sleep(0.1)
      local took = sturdy.monotime() - t0
      assert.is_true(took >= 0.099 and took < 0.3, tostring(took))
      assert.is_true(os.clock() - c0 < 0.05)
      policy.sleep(0)
      for _, bad in ipairs { 0 / 0, -1, -math.huge } do
        local ok, e = pcall(policy.sleep, bad)
        assert.is_false(ok)
        assert.matches("sturdy: sleep takes seconds >= 0", e)
      end
      assert.is_false(pcall(policy.sleep, "soon"))
    end)
  end)

  describe("mistakes", function()
    it("raise naming the option", function()
      local c = client()
      local p = claude(c)
      local function raises(pattern, fn)
        local ok, e = pcall(fn)
        assert.is_false(ok)
        assert.matches(pattern, e)
      end
      raises("unknown option 'tagrets'", function() fallback { tagrets = { p } } end)
      raises("non%-empty list", function() fallback { targets = {} } end)
      raises("'on'.-%(overload%) is not an outcome class", function()
        fallback { targets = { p }, on = { "overload" } } end)
      raises("canceled call never falls through", function() fallback { targets = { p }, on = { "canceled" } } end)
      raises("'order' .-\"static\" or \"adaptive\"", function() fallback { targets = { p }, order = "fast" } end)
      raises("'max_targets' .-whole number", function() fallback { targets = { p }, max_targets = 0 } end)
      raises("'attempts' .-whole number", function() fallback { targets = { p }, attempts = 1 / 0 } end)
      raises("'timeout' .-positive", function() fallback { targets = { p }, timeout = -1 } end)
      raises("'timeout' .-up to 315360000", function() fallback { targets = { p }, timeout = 1e300 } end)
      raises("'probe' .-share", function() fallback { targets = { p }, probe = 2 } end)
      raises("unknown weight 'speed'", function() fallback { targets = { p }, score = { speed = 1 } } end)
      raises("targets%[1%].-provider on a sturdy client", function()
        fallback { targets = { { messages = print } } } end)
      raises("unknown option 'modle' in targets%[1%]", function()
        fallback { targets = { { provider = p, modle = "x" } } } end)
      raises("context' in sturdy.fallback names no target 'nope'", function()
        fallback { targets = { p }, context = { nope = 1000 } } end)
      raises("name 'x' is taken", function()
        fallback { targets = { { provider = p, name = "x" }, { provider = gpt(c), name = "x" } } } end)
      local chain = fallback { targets = { p } }
      raises("take no 'model'", function() chain:messages { model = "claude-x", max_tokens = 1, messages = {} } end)
      raises("unknown call option 'key'", function() chain:messages(ask(), { key = "k" }) end)
      raises("unknown call option 'on_event'", function() chain:messages(ask(), { on_event = print }) end)
      raises("'timeout.total' .-up to", function() chain:messages(ask(), { timeout = { total = 0 / 0 } }) end)
      raises("'api_keys' in fallback.keys", function() fallback.keys { provider = "anthropic", api_keys = {} } end)
      raises("'provider' in fallback.keys", function() fallback.keys { provider = "gemini", api_keys = { "k" } } end)
    end)

    it("keeps API keys out of the chain, its counts and its errors", function()
      local c = client()
      local chain = fallback { degraded = "x",
                               targets = { { provider = claude(c), attempts = 1, headers = steps("a", "401") } } }
      local _, err = chain:messages(ask())
      local seen = { tostring(chain), tostring(err), require("cjson").encode(chain:stats()), err.detail or "" }
      for _, s in ipairs(seen) do assert.is_nil(s:find(KEY, 1, true), s) end
    end)
  end)
end)
