-- sturdy.metrics inside nginx with two workers: counts kept in a
-- lua_shared_dict add up across workers, and a scrape of either worker sees
-- them all, gauges merged (spec/ngx/metrics_cases.lua has the cases).
local runner = require "spec.support.ngx_runner"

local function sample(text, name, labels)
  for line in text:gmatch("[^\n]+") do
    local n, l, v = line:match("^([%w_]+){(.*)} (%S+)$")
    if n == name and l == labels then return tonumber(v) end
  end
end

describe("metrics in nginx", function()
  local r

  setup(function()
    r = assert(runner.start { workers = 2, shared_dicts = { metrics = "1m" } })
  end)
  teardown(function() if r then r:stop() end end)

  it("adds every worker's counts into one scrape, and merges their gauges", function()
    -- the workers take turns feeding
    local fed = 0
    for i = 1, 10 do
      local w = i % 2
      assert.equal(w, r:run_on(w, "metrics_cases", "feed", { calls = 3 }).worker)
      fed = fed + 3
    end
    -- a scrape of either worker sees the whole nginx
    for w = 0, 1 do
      for _, fmt in ipairs { "prometheus", "openmetrics" } do
        local got = r:run_on(w, "metrics_cases", "render", { format = fmt })
        assert.equal(w, got.worker)
        local text = got.text
        assert.equal(fed, sample(text, "sturdy_calls_total", 'key="api.test/m",class="success",status="200"'))
        assert.equal(fed, sample(text, "sturdy_throttled_total", 'key="api.test/m"'))
        assert.equal(fed, sample(text, "sturdy_retries_total", 'key="api.test/m",class="throttled"'))
        assert.equal(fed, sample(text, "gen_ai_client_operation_duration_seconds_count", 'key="api.test/m"'))
        assert.equal(fed, sample(text, "gen_ai_client_operation_duration_seconds_bucket", 'key="api.test/m",le="0.32"'))
        assert.equal(0, sample(text, "gen_ai_client_operation_duration_seconds_bucket", 'key="api.test/m",le="0.16"'))
        assert.near(0.3 * fed, sample(text, "gen_ai_client_operation_duration_seconds_sum", 'key="api.test/m"'), 1e-9)
        -- gauges: summed over the two workers, or the smallest remaining
        assert.equal(4, sample(text, "sturdy_in_flight", 'key="api.test/m"'))
        assert.equal(6, sample(text, "sturdy_paced_total", 'key="api.test/m"'))
        assert.equal(3989, sample(text, "sturdy_ratelimit_remaining", 'key="api.test/m",dimension="requests"'))
        assert.equal(4000, sample(text, "sturdy_ratelimit_limit", 'key="api.test/m",dimension="requests"'))
        if fmt == "openmetrics" then assert.matches("# EOF\n$", text) end
      end
    end
  end)
end)
