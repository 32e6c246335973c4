-- sturdy.metrics against the mock API: the output passes promtool and an
-- OpenMetrics parser, and after a run with retries, 429s and breaker
-- openings its counts equal what the mock received.
local sturdy = require "sturdy"
local metrics = require "sturdy.metrics"
local anthropic = require "sturdy.anthropic"
local sturdy_cache = require "sturdy.cache"
local mock = require "spec.support.mock"

local steps = mock.steps

local function tmpfile(text)
  local path = os.tmpname()
  local f = assert(io.open(path, "wb"))
  f:write(text)
  f:close()
  return path
end

-- Runs a shell command on the text; returns ok and what it printed. The
-- sanitizer runtime a test-asan run preloads is kept out of the checker.
local function check_with(cmd, text)
  local path = tmpfile(text)
  local clean = "env -u LD_PRELOAD -u ASAN_OPTIONS -u LSAN_OPTIONS -u UBSAN_OPTIONS "
  local p = io.popen(clean .. cmd:format(path) .. " 2>&1; echo \"exit=$?\"")
  local out = p:read("*a")
  p:close()
  os.remove(path)
  return out:match("exit=0%s*$") ~= nil, out
end

local function promtool(text)
  return check_with("promtool check metrics < %s", text)
end

local OPENMETRICS_CHECK = [[/usr/bin/python3 -c '
import sys
from prometheus_client.openmetrics.parser import text_string_to_metric_families
n = sum(len(f.samples) for f in text_string_to_metric_families(open(sys.argv[1]).read()))
print("samples", n)' %s]]

-- The value of a sample line: name{labels} value, with every label given.
local function sample(text, name, labels)
  local total, found = 0, false
  for line in text:gmatch("[^\n]+") do
    local n, l, v = line:match("^([%w_]+){(.*)} (%S+)$")
    if not n then n, v = line:match("^([%w_]+) (%S+)$") end
    if n == name then
      local all = true
      for k, want in pairs(labels or {}) do
        if not (l or ""):find(k .. '="' .. want .. '"', 1, true) then all = false end
      end
      if all then total, found = total + tonumber(v), true end
    end
  end
  return found and total or nil
end

describe("metrics", function()
  local m

  setup(function() m = assert(mock.start()) end)
  teardown(function() m:stop() end)
  before_each(function() m:reset() end)

  it("counts what the mock received after retries, 429s and breaker openings; promtool passes", function()
    local c = sturdy.client { base_url = m.http_url, retry = { base = 0.01, cap = 0.02, attempts = 3 },
                              breaker = { min_calls = 4, window = 30, failure_rate = 0.5, open_for = 30 } }
    local registry = metrics.for_client(c)
    local claude = anthropic.new { client = c, api_key = "sk-ant-metrics", model = "claude-sonnet-4-5" }
    local ask = { max_tokens = 16, messages = { { role = "user", content = "hello" } } }
    -- successes, one after a 429 and a 529, one after two 429s
    assert(claude:messages(ask))
    assert(claude:messages(ask, { headers = steps("a", "429;retry-after=0|529|200") }))
    assert(claude:messages(ask, { headers = steps("b", "429;retry-after=0|429;retry-after=0|200") }))
    -- a stream
    local events, st = claude:stream(ask)
    for _ in events do end
    assert(st:result())
    -- another key whose breaker opens: 500s until it refuses calls
    local sick_retries, sick_refused = 0, 1 -- and the call after these
    for i = 1, 4 do
      local _, err = c:request { method = "POST", path = "/echo", key = "sick", headers = steps("sick" .. i, "500") }
      sick_retries = sick_retries + #err.attempts - 1
      if err.kind == "circuit_open" then sick_refused = sick_refused + 1 end
    end
    local refused = c:request { method = "POST", path = "/echo", key = "sick" }
    assert.is_nil(refused)
    local text = registry:render()
    local ok, out = promtool(text)
    assert.is_true(ok, out)

    local counters = m:counters()
    local statuses = {}
    for _, sc in pairs(counters.scenarios) do
      for _, s in ipairs(sc.statuses) do statuses[s] = (statuses[s] or 0) + 1 end
    end
    -- every attempt that reached the mock, by status
    local attempts = sample(text, "http_client_attempts_total")
    assert.equal(counters.requests, attempts)
    assert.equal(statuses[429], sample(text, "sturdy_throttled_total"))
    assert.equal(statuses[429], sample(text, "http_client_attempts_total", { http_response_status_code = "429" }))
    assert.equal(statuses[529], sample(text, "http_client_attempts_total", { http_response_status_code = "529" }))
    assert.equal(statuses[500], sample(text, "http_client_attempts_total", { http_response_status_code = "500" }))
    -- retries: the attempts beyond the first of each call the mock saw
    assert.equal(counters.scenarios.a.count - 1 + counters.scenarios.b.count - 1 + sick_retries,
                 sample(text, "sturdy_retries_total"))
    -- the breaker opened after min_calls (4) failed attempts: no more reached the mock
    local sick_sent = 0
    for i = 1, 4 do sick_sent = sick_sent + (counters.scenarios["sick" .. i] or { count = 0 }).count end
    assert.equal(4, sick_sent)
    assert.equal(4, sample(text, "http_client_attempts_total", { key = "sick" }))
    assert.equal(3, sample(text, "sturdy_retries_total", { class = "throttled" }))
    -- the breaker opened once, and its state shows it; the refused call never reached the mock
    assert.equal(1, sample(text, "sturdy_breaker_transitions_total", { key = "sick", from = "closed", to = "open" }))
    assert.equal(2, sample(text, "sturdy_breaker_state", { key = "sick" }))
    assert.equal(c:stats("sick").breaker.opens, 1)
    assert.equal(5, sample(text, "sturdy_calls_total", { key = "sick" }))
    assert.is_true(sick_refused >= 2)
    assert.equal(sick_refused, sample(text, "sturdy_calls_total", { key = "sick", error_type = "circuit_open" }))
    -- calls and tokens of the provider key; the stream's time to first chunk
    local key = claude.client:key_for { path = "/v1/messages", json = { model = "claude-sonnet-4-5" } }
    assert.equal(4, sample(text, "sturdy_calls_total", { key = key, class = "success" }))
    assert.equal(4, sample(text, "gen_ai_client_operation_duration_seconds_count",
                           { key = key, gen_ai_provider_name = "anthropic",
                             gen_ai_request_model = "claude-sonnet-4-5" }))
    assert.equal(1, sample(text, "gen_ai_client_operation_time_to_first_chunk_seconds_count", { key = key }))
    local usage = c:stats(key).usage
    assert.equal(usage.input, sample(text, "gen_ai_client_token_usage_total", { gen_ai_token_type = "input" }))
    assert.equal(usage.output, sample(text, "gen_ai_client_token_usage_total", { gen_ai_token_type = "output" }))
    assert.near(usage.cost, sample(text, "sturdy_cost_usd_total", { key = key }), 1e-12)
    -- learned limits and the gauges
    assert.equal(4000, sample(text, "sturdy_ratelimit_limit", { key = key, dimension = "requests" }))
    assert.equal(0, sample(text, "sturdy_in_flight", { key = key }))
    -- buckets are cumulative and end with the count
    assert.equal(4, sample(text, "gen_ai_client_operation_duration_seconds_bucket", { key = key, le = "+Inf" }))
    c:close()
  end)

  it("renders OpenMetrics that a strict parser reads, ending in # EOF", function()
    local c = sturdy.client { base_url = m.http_url, retry = { base = 0.01 } }
    local registry = metrics.for_client(c)
    assert(c:request { path = "/echo", headers = steps("om", "503|200") })
    local text = registry:render("openmetrics")
    assert.matches("# EOF\n$", text)
    assert.matches("# TYPE sturdy_calls counter\n", text, 1, true)
    assert.matches("\nsturdy_calls_total{", text, 1, true)
    local ok, out = check_with(OPENMETRICS_CHECK, text)
    assert.is_true(ok, out)
    assert.matches("samples %d+", out)
    assert.equal("application/openmetrics-text; version=1.0.0; charset=utf-8", registry:content_type("openmetrics"))
    c:close()
  end)

  it("bounds label values: keys past max_keys fold into other; odd bytes are escaped or replaced", function()
    local c = sturdy.client { base_url = m.http_url, retry = { attempts = 1 } }
    local registry = metrics.for_client(c, { max_keys = 3 })
    for i = 1, 6 do assert(c:request { path = "/echo", key = "key-" .. i }) end
    assert(c:request { path = "/echo", key = 'a"b\\c/\195\169' })
    local text = registry:render()
    assert.is_true((promtool(text)))
    for i = 1, 3 do assert.equal(1, sample(text, "sturdy_calls_total", { key = "key-" .. i })) end
    assert.is_nil(sample(text, "sturdy_calls_total", { key = "key-4" }))
    assert.equal(4, sample(text, "sturdy_calls_total", { key = "other" }))
    -- three keys and other, however many keys the client has
    local keys = {}
    for k in text:gmatch('sturdy_in_flight{key="(.-)"}') do keys[#keys + 1] = k end
    assert.equal(4, #keys)
    assert.equal('a\\"b\\\\c/__', metrics.label_value('a"b\\c/\195\169'))
    assert.equal(128, #metrics.label_value(string.rep("x", 1000)))
    c:close()
  end)

  it("reads caches and fallback chains through their stats()", function()
    local c = sturdy.client { base_url = m.http_url }
    local claude = anthropic.new { client = c, api_key = "sk-ant-metrics", model = "claude-sonnet-4-5" }
    local cache = sturdy_cache { backend = "memory" }
    local cached = cache:wrap(claude)
    local ask = { temperature = 0, max_tokens = 16, messages = { { role = "user", content = "same" } } }
    assert(cached:messages(ask))
    assert(cached:messages(ask))
    assert(cached:messages(ask))
    -- a chain's stats() as sturdy.fallback gives them
    local chain = { name = "main", stats = function()
      return { calls = 5, answered = 4, failed = 1, degraded = 0, waits = 0, probes = 0,
               targets = { primary = { calls = 5, successes = 2, failures = 3, fallbacks = 3, skipped = 0 },
                           backup = { calls = 3, successes = 2, failures = 1, fallbacks = 1, skipped = 2 } } }
    end }
    local registry = metrics.registry():observe(c):add_source(cache, { name = "answers" }):add_source(chain)
    local text = registry:render()
    assert.is_true((promtool(text)))
    local s = cache:stats()
    assert.equal(2, s.hits)
    assert.equal(s.hits, sample(text, "sturdy_cache_requests_total", { cache = "answers", result = "hit" }))
    assert.equal(s.misses, sample(text, "sturdy_cache_requests_total", { cache = "answers", result = "miss" }))
    assert.equal(s.entries, sample(text, "sturdy_cache_entries", { cache = "answers" }))
    assert.equal(3, sample(text, "sturdy_fallbacks_total", { chain = "main", target = "primary" }))
    assert.equal(2, sample(text, "sturdy_fallback_target_calls_total",
                           { chain = "main", target = "backup", outcome = "skipped" }))
    assert.equal(1, sample(text, "sturdy_fallback_calls_total", { chain = "main", outcome = "failed" }))
    -- one upstream call for three answers
    assert.equal(1, m:counters().requests)
    c:close()
  end)

  it("renders again what changed since the last render, in either format, and keeps the rest", function()
    local c = sturdy.client { base_url = m.http_url, retry = { attempts = 1 } }
    local stats = { hits = 1, misses = 0, stale = 0, bypass = 0, entries = 1 }
    local cache = { stats = function() return stats end }
    local registry = metrics.for_client(c):add_source(cache, { name = "answers" })
    assert(c:request { path = "/echo", key = "a" })
    assert(c:request { path = "/echo", key = "b" })
    local text = registry:render()
    local om = registry:render("openmetrics")
    assert.equal(text, registry:render())
    assert.equal(om, registry:render("openmetrics"))
    local function lines_of(t, key)
      local out = {}
      for line in t:gmatch("[^\n]+") do
        if line:find('key="' .. key .. '"', 1, true) then out[#out + 1] = line end
      end
      return out
    end
    local b_lines = lines_of(text, "b")
    assert.is_true(#b_lines > 10)
    assert.equal(1, sample(text, "sturdy_calls_total", { key = "a" }))
    -- one more call on a: its series show it in both formats, b's lines stay as they were
    assert(c:request { path = "/echo", key = "a" })
    text = registry:render()
    assert.equal(2, sample(text, "sturdy_calls_total", { key = "a" }))
    assert.equal(2, sample(text, "gen_ai_client_operation_duration_seconds_count", { key = "a" }))
    assert.equal(2, sample(text, "gen_ai_client_operation_duration_seconds_bucket", { key = "a", le = "+Inf" }))
    assert.equal(2, sample(text, "http_client_attempts_total", { key = "a" }))
    assert.same(b_lines, lines_of(text, "b"))
    om = registry:render("openmetrics")
    assert.equal(2, sample(om, "sturdy_calls_total", { key = "a" }))
    assert.equal(2, sample(om, "gen_ai_client_operation_duration_seconds_count", { key = "a" }))
    assert.same(b_lines, lines_of(om, "b"))
    assert.is_true((promtool(text)))
    -- a gauge read at render time: the new value in both formats
    stats = { hits = 5, misses = 2, stale = 0, bypass = 0, entries = 3 }
    text, om = registry:render(), registry:render("openmetrics")
    for _, t in ipairs { text, om } do
      assert.equal(5, sample(t, "sturdy_cache_requests_total", { cache = "answers", result = "hit" }))
      assert.equal(3, sample(t, "sturdy_cache_entries", { cache = "answers" }))
    end
    -- a closed client's gauges go, in both formats
    assert.equal(0, sample(text, "sturdy_in_flight", { key = "b" }))
    c:close()
    text, om = registry:render(), registry:render("openmetrics")
    assert.is_nil(sample(text, "sturdy_in_flight"))
    assert.is_nil(sample(om, "sturdy_in_flight"))
    assert.equal(2, sample(om, "sturdy_calls_total", { key = "a" }))
  end)

  it("gives a key's gauges alone with stats(key, \"gauges\"), as stats(key) has them", function()
    local c = sturdy.client { base_url = m.http_url, retry = { attempts = 1 } }
    local claude = anthropic.new { client = c, api_key = "sk-ant-metrics", model = "claude-sonnet-4-5" }
    assert(claude:messages { max_tokens = 16, messages = { { role = "user", content = "hello" } } })
    local key = c:stats().keys[1]
    local full, gauges = c:stats(key), c:stats(key, "gauges")
    for _, field in ipairs { "in_flight", "queued", "paced" } do assert.equal(full[field], gauges[field]) end
    assert.equal(full.breaker.state, gauges.breaker.state)
    for dim, l in pairs(full.limits) do
      if type(l) == "table" then
        assert.equal(l.limit, gauges.limits[dim].limit)
        assert.equal(l.remaining, gauges.limits[dim].remaining)
      end
    end
    assert.equal(4000, gauges.limits.requests.limit)
    assert.is_nil(gauges.latency)
    assert.is_nil(c:stats("nobody", "gauges"))
    assert.has_error(function() c:stats(key, "all") end, 'sturdy: stats takes part "gauges" or none, got all')
    c:close()
  end)

  it("drops a closed client and refuses bad options, naming them", function()
    local c = sturdy.client { base_url = m.http_url }
    local registry = metrics.for_client(c)
    assert(c:request { path = "/echo" })
    c:close()
    local text = registry:render()
    assert.is_nil(text:find("sturdy_in_flight", 1, true))
    assert.equal(1, sample(text, "sturdy_calls_total"))
    assert.has_error(function() metrics.registry { max_keys = 0 } end,
                     "sturdy: option 'max_keys' in metrics.registry must be a whole number from 1 to 1000000, got 0")
    assert.has_error(function() metrics.registry { colour = 1 } end,
                     "sturdy: unknown option 'colour' in metrics.registry")
    assert.has_error(function() metrics.registry { shared = "nope" } end,
                     'sturdy: option \'shared\' in metrics.registry: no lua_shared_dict named "nope"')
    assert.has_error(function() registry:render("json") end,
                     'sturdy: registry:render takes "prometheus" or "openmetrics", got json')
    assert.has_error(function() registry:observe({}) end, "sturdy: registry:observe takes a sturdy client, got table")
    assert.has_error(function() registry:add_source(42) end,
                     "sturdy: registry:add_source takes an object with a stats method, got number")
  end)
end)
