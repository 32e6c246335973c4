-- Spend caps against the mock: admission reserves a call's worst case (its
-- input estimate and max_tokens at the model's prices), the reply settles the
-- actual cost and frees the rest, failures without a charge give it back, and
-- a call that would cross a cap is refused before anything is sent.
local sturdy = require "sturdy"
local anthropic = require "sturdy.anthropic"
local provider = require "sturdy.provider"
local mock = require "spec.support.mock"

local PARAMS = { max_tokens = 1000, messages = { { role = "user", content = "What is the capital of France?" } } }

describe("spend caps", function()
  local m

  setup(function() m = assert(mock.start()) end)
  teardown(function() m:stop() end)
  before_each(function() m:reset() end)

  local function claude(client_options, opts)
    local o = { api_key = "sk-test", base_url = m.http_url, model = "claude-sonnet-4-5",
                client_options = client_options }
    for k, v in pairs(opts or {}) do o[k] = v end
    return anthropic.new(o)
  end

  -- The worst case the provider reserves for PARAMS.
  local function worst(c)
    local _, body, estimated = c:_request(PARAMS)
    return provider.reservation(c, body.model, estimated).usd
  end

  -- Submits n calls of c at once (nothing completes before all are in);
  -- returns the outcomes (results or errors) once every one has ended.
  local function concurrent(c, n, call_opts)
    local out, ended = {}, 0
    for i = 1, n do
      local req, finish = c:prepare(PARAMS, call_opts)
      c.client:submit(req, function(res, err)
        if res then
          out[i] = { finish(res) }
        else
          out[i] = { nil, err }
        end
        ended = ended + 1
      end)
    end
    while ended < n do c.client:poll(1) end
    return out
  end

  it("holds under 200 concurrent calls, refuses before sending, and frees what replies did not cost", function()
    local probe = claude()
    local per_call = worst(probe)
    probe.client:close()
    local cap = per_call * 50
    local c = claude { budget = { usd_per_hour = cap }, limits = { concurrency = 256 } }
    local out = concurrent(c, 200)
    local ok, refused, spent = 0, 0, 0
    for _, o in ipairs(out) do
      if o[1] then
        ok = ok + 1
        spent = spent + o[1].cost
      else
        refused = refused + 1
        assert.equal("budget_exceeded", o[2].kind)
        assert.equal("throttled", o[2].class)
        assert.is_false(o[2].retryable)
        assert.matches("client's spend cap usd_per_hour would be crossed; nothing was sent", o[2].detail, 1, true)
        assert.equal(0, o[2].status or 0)
      end
    end
    assert.equal(50, ok)
    assert.equal(150, refused)
    -- the refused calls never reached the server
    assert.equal(50, m:counters().requests)
    local b = c.client:stats().budget.client
    -- the actual spend, settled, never above the cap; nothing reserved any more
    assert.near(spent, b.used.usd_per_hour, 1e-4)
    assert.is_true(b.used.usd_per_hour <= cap)
    assert.equal(0, b.reserved.usd)
    assert.is_true(spent < cap / 10) -- replies cost a fraction of their worst case
    -- the freed part admits more: as many as its worst cases fit
    local free = cap - b.used.usd_per_hour
    local expect = math.floor(free / per_call + 1e-9)
    out = concurrent(c, 200)
    ok = 0
    for _, o in ipairs(out) do ok = ok + (o[1] and 1 or 0) end
    print(string.format("\n    cap $%.4f (50 worst cases of $%.6f): 50 of 200 sent, spent $%.6f; then %d more of 200",
                        cap, per_call, spent, ok))
    assert.equal(expect, ok)
    assert.is_true(ok >= 40)
    assert.equal(50 + ok, m:counters().requests)
    b = c.client:stats().budget.client
    assert.is_true(b.used.usd_per_hour <= cap)
    c.client:close()
  end)

  it("gives back the reservation of a failure the server did not bill", function()
    local c = claude { budget = { usd_per_day = 1 }, retry = { attempts = 1 },
                       headers = { ["x-mock-steps"] = "529" } }
    local r, err = c:messages(PARAMS)
    assert.is_nil(r)
    assert.equal("overloaded", err.kind)
    local b = c.client:stats().budget.client
    assert.equal(0, b.reserved.usd)
    assert.equal(0, b.used.usd_per_day)
    c.client:close()
  end)

  it("says when a window will have room again", function()
    -- the first call's worst case fits; once settled, the second's does not until the hour moves on
    local probe = claude()
    local per_call = worst(probe)
    probe.client:close()
    local c = claude { budget = { usd_per_hour = per_call * 1.5 } }
    local r = assert(c:messages(PARAMS))
    assert.near(r.cost, c.client:stats().budget.client.used.usd_per_hour, 1e-6)
    -- spend without a reservation (say, another process's) is charged as it is
    c.client:record_usage("k", { input = 0, output = 1000, cache_read = 0, cache_write = 0 }, nil, per_call)
    local r2, err = c:messages(PARAMS)
    assert.is_nil(r2)
    assert.equal("budget_exceeded", err.kind)
    assert.is_true(err.retry_after > 3500 and err.retry_after <= 3600)
    assert.matches("retry after", tostring(err))
    assert.equal(1, m:counters().requests)
    c.client:close()
  end)

  it("caps tags each on their own, and keys by name", function()
    local probe = claude()
    local per_call = worst(probe)
    local key = probe.client:key_for(probe:_request(PARAMS))
    probe.client:close()
    local c = claude { budget = { tags = { ["*"] = { usd_per_day = per_call * 2.5 } },
                                  keys = { [key] = { usd_per_day = per_call * 100 } } },
                       limits = { concurrency = 64 } }
    local acme = concurrent(c, 5, { tag = "acme" })
    local globex = concurrent(c, 5, { tag = "globex" })
    local untagged = concurrent(c, 5)
    local function sent(out)
      local n = 0
      for _, o in ipairs(out) do n = n + (o[1] and 1 or 0) end
      return n
    end
    assert.equal(2, sent(acme))
    assert.equal(2, sent(globex))
    assert.equal(5, sent(untagged))
    local s = c.client:stats()
    assert.is_table(s.budget.tags.acme)
    assert.is_true(s.budget.tags.acme.used.usd_per_day > 0)
    assert.equal(3, s.budget.tags.acme.refused)
    assert.is_nil(s.budget.client)
    local ks = c.client:stats(key)
    assert.near(per_call * 100, ks.budget.caps.usd_per_day, 1e-9)
    -- the key's cap let every call through; six of them a tag's cap then refused
    assert.equal(15, ks.budget.passed)
    assert.equal(0, ks.budget.refused)
    c.client:close()
  end)

  it("warns observers and on_event once spend reaches the warn share", function()
    local probe = claude()
    local r0 = assert(probe:messages(PARAMS))
    probe.client:close()
    local heard, observed = {}, {}
    local c = claude { budget = { usd_per_day = r0.cost * 4.5, warn = 0.5 },
                       on_event = function(ev) if ev.type == "budget_warning" then heard[#heard + 1] = ev end end,
                       observe = function(rec)
                         if rec.type == "budget_warning" then observed[#observed + 1] = rec end
                       end }
    for _ = 1, 4 do
      local r, err = c:messages { max_tokens = 1, messages = PARAMS.messages }
      assert(r, err)
    end
    assert.equal(1, #heard)
    assert.equal(1, #observed)
    local ev = heard[1]
    assert.equal("client", ev.scope)
    assert.equal("usd_per_day", ev.cap)
    assert.is_true(ev.share >= 0.5)
    assert.near(r0.cost * 4.5, ev.limit, 1e-6)
    c.client:close()
    -- on_alert hears them too, with budget alone or beside alert rules
    for _, extra in ipairs { {}, { alerts = { { metric = "success_rate", below = 0.5, clear = 0.6 } } } } do
      local alerted = {}
      local o = { budget = { usd_per_day = r0.cost * 4.5, warn = 0.5 },
                  on_alert = function(a) alerted[#alerted + 1] = a end }
      for k, v in pairs(extra) do o[k] = v end
      local c2 = claude(o)
      for _ = 1, 4 do assert(c2:messages { max_tokens = 1, messages = PARAMS.messages }) end
      assert.equal(1, #alerted)
      assert.equal("budget", alerted[1].rule)
      assert.equal("usd_per_day", alerted[1].metric)
      assert.equal("firing", alerted[1].state)
      assert.equal("client", alerted[1].scope)
      assert.near(r0.cost * 4.5, alerted[1].threshold, 1e-6)
      c2.client:close()
    end
  end)

  it("survives a warning hook that closes the client", function()
    local closed
    local c
    c = claude { budget = { usd_per_day = 1, warn = 0.000001 },
                 on_event = function(ev) if ev.type == "budget_warning" then c.client:close(); closed = true end end }
    local r = assert(c:messages(PARAMS))
    assert.is_true(closed)
    assert.is_number(r.cost)
    assert.has_error(function() c:messages(PARAMS) end, "sturdy: the client is closed")
  end)

  it("charges a raw call's reservation in full when nobody settles it in time", function()
    local client = sturdy.client { base_url = m.http_url, budget = { usd_per_hour = 1, settle_within = 0.3 } }
    local res = assert(client:request { path = "/echo", reserve = { usd = 0.25, tokens = 100 } })
    assert.is_number(res.hold)
    assert.near(0.25, client:stats().budget.client.reserved.usd, 1e-9)
    local t = sturdy.monotime() + 0.35
    while sturdy.monotime() < t do client:poll(0.05) end
    -- the next reservation expires it: charged at its worst case
    local r2 = assert(client:request { path = "/echo", reserve = { usd = 0.3 } })
    assert.near(0.25, client:stats().budget.client.used.usd_per_hour, 1e-9)
    assert.equal(1, client:stats().budget.expired)
    -- settled in time: the actual cost counts, the rest is free again
    client:record_usage("x", { input = 1, output = 1, cache_read = 0, cache_write = 0 }, nil, 0.01, { hold = r2.hold })
    local b = client:stats().budget.client
    assert.near(0, b.reserved.usd, 1e-9)
    assert.near(0.26, b.used.usd_per_hour, 1e-9)
    -- settling twice changes nothing
    client:record_usage("x", { input = 1, output = 1, cache_read = 0, cache_write = 0 }, nil, 0.01, { hold = r2.hold })
    assert.near(0.26, client:stats().budget.client.used.usd_per_hour, 1e-9)
    -- a failure the server did not bill carries no hold
    local _, err = client:request { path = "/echo", reserve = { usd = 0.3 }, headers = { ["x-mock-steps"] = "400" } }
    assert.equal("bad_request", err.kind)
    assert.is_nil(err.hold)
    assert.near(0, client:stats().budget.client.reserved.usd, 1e-9)
    client:close()
  end)

  it("refuses bad settings and bad request fields, naming them", function()
    assert.has_error(function() sturdy.client { budget = { usd_per_day = 0 } } end,
      "sturdy: option 'usd_per_day' in client options.budget must be a number from 1e-06 to 1e+09, got number")
    assert.has_error(function() sturdy.client { budget = { usd_per_dya = 1 } } end,
      "sturdy: unknown option 'usd_per_dya' in client options.budget")
    assert.has_error(function() sturdy.client { budget = { tags = { acme = 5 } } } end,
      'sturdy: client options.budget.tags["acme"] must be a table of caps, got number')
    assert.has_error(function() sturdy.client { budget = { warn = 2 } } end,
      "sturdy: option 'warn' in client options.budget must be a number from 0 to 1, got number")
    local client = sturdy.client { base_url = m.http_url, budget = { usd_per_day = 1 } }
    assert.has_error(function() client:submit { path = "/echo", reserve = { usd = 0 / 0 } } end,
      "sturdy: option 'reserve.usd' in request must be a number from 0 to 1e9, got number")
    assert.has_error(function() client:submit { path = "/echo", reserve = { usd = -1 } } end,
      "sturdy: option 'reserve.usd' in request must be a number from 0 to 1e9, got number")
    assert.has_error(function() client:submit { path = "/echo", reserve = { dollars = 1 } } end,
      "sturdy: unknown option 'dollars' in request.reserve")
    assert.has_error(function() client:submit { path = "/echo", tag = "a\nb" } end,
      'sturdy: request \'tag\' must be 1 to 256 bytes without control characters or NUL, got "a b"')
    assert.has_error(function() client:submit { path = "/echo", tag = 5 } end,
      "sturdy: option 'tag' in request must be a string, got number")
    assert.equal(0, m:counters().requests)
    client:close()
  end)
end)
