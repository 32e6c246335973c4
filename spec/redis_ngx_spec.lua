-- sturdy.redis links over resty.redis inside nginx (spec/ngx/shared_cases.lua
-- "link"): scripts by EVALSHA and by EVAL after NOSCRIPT, a password, a Redis
-- away, a Redis Cluster's MOVED; the blocking lua-redis is never loaded.
local redis_server = require "spec.support.redis"
local runner = require "spec.support.ngx_runner"
local sturdy_redis = require "sturdy.redis"

describe("a Redis link over resty.redis in nginx", function()
  local r

  setup(function() r = assert(runner.start { shared_dicts = { sturdy = "1m" } }) end)
  teardown(function() if r then r:stop() end end)

  it("runs scripts over resty.redis: EVALSHA, EVAL after NOSCRIPT, a password, a Redis away", function()
    local pw = assert(redis_server.start { password = "ngx-secret" })
    local ok, err = pcall(function()
      local out = r:run("shared_cases", "link", { port = pw.port, password = "ngx-secret",
                                                           ports = { pw.port }, key = "ngx:{k}:n" })
      assert.same({ "ngx:{k}:n", "1.5", 1 }, out.first)
      assert.same({ "ngx:{k}:n", "2", 2 }, out.second)
      assert.matches("^%x+$", out.sha)
      assert.is_true(out.ready)
      assert.is_false(out.blocking)
      local away = r:run("shared_cases", "link", { port = pw.port, key = "ngx:{k}:n" }) -- no password
      assert.is_nil(away.first)
      assert.matches("NOAUTH", away.err1)
    end)
    pw:stop()
    assert(ok, err)
    local gone = r:run("shared_cases", "link", { port = pw.port, key = "ngx:{k}:n" })
    assert.is_nil(gone.first)
    assert.is_false(gone.ready) -- waits its backoff before it tries again
    assert.matches("refused", gone.down)
  end)

  it("follows a Redis Cluster's MOVED from a node that does not hold the key", function()
    local cl = assert(redis_server.cluster { nodes = 3 })
    local ok, err = pcall(function()
      local key = "ngx:{moved}:n"
      local seed
      for _, port in ipairs(cl.ports) do
        local n = assert(sturdy_redis.connect(sturdy_redis.settings { port = port }))
        if not pcall(n.get, n, key) then seed = seed or port end -- MOVED: not here
        n:quit()
      end
      assert.truthy(seed)
      local out = r:run("shared_cases", "link", { port = seed, ports = cl.ports, key = key })
      assert.same({ key, "1.5", 1 }, out.first, tostring(out.err1))
      assert.same({ key, "2", 2 }, out.second, tostring(out.err2))
    end)
    cl:stop()
    assert(ok, err)
  end)

end)
