-- Nothing sturdy emits — replies, errors of every kind, hooks, events,
-- stats, tostring of its objects, stderr — contains the API key, while the
-- key does reach the server.
local cjson = require "cjson"
local mock = require "spec.support.mock"
local anthropic = require "sturdy.anthropic"

describe("secrets", function()
  local m
  local KEY = "sk-ant-secret-9f8e7d6c5b4a3210"

  setup(function() m = assert(mock.start()) end)
  teardown(function() m:stop() end)

  it("sends the key to the server", function()
    local c = anthropic.new { api_key = KEY, base_url = m.http_url, model = "m" }
    local echo = assert(c.client:request { path = "/echo", headers = c:_request({ messages = {} }).headers })
    assert.equal(KEY, cjson.decode(echo.body).headers["x-api-key"])
    c.client:close()
  end)

  it("never shows it in anything emitted during a full run, failures included", function()
    local lua = arg and arg[-1] or "lua"
    local cmd = ("STURDY_MOCK_URL=%s LUA_PATH=%q LUA_CPATH=%q %s spec/support/secrets_run.lua %s 2>&1"):format(
      m.http_url, package.path, package.cpath, lua, KEY)
    local p = io.popen(cmd)
    local out = p:read("*a")
    p:close()
    assert.matches("secrets_run done", out, 1, true)
    -- the run did emit errors of many kinds, so the search covers them
    for _, kind in ipairs { "auth", "permission", "rate_limited", "overloaded", "server", "connection",
                            "bad_response", "stream_truncated", "too_large", "bad_request", "canceled" } do
      assert.matches("\n" .. kind .. "\n", out, 1, true)
    end
    assert.matches("on_retry hook failed", out, 1, true)
    assert.is_nil(out:find(KEY, 1, true))
    assert.is_nil(out:find(KEY:sub(8), 1, true)) -- nor a tail of it
  end)
end)
