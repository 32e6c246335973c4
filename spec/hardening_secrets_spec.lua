-- Secrets (issue 11): userinfo in base_url, keys in client headers, and keys a
-- careless server echoes back never show in what sturdy hands out: tostring,
-- keys, stats, hooks, observers, errors (detail, body, headers, tostring).
local sturdy = require "sturdy"
local anthropic = require "sturdy.anthropic"
local openai = require "sturdy.openai"
local mock = require "spec.support.mock"

local steps = mock.steps
local FAST = { throttled = 0.001, overloaded = 0.001, transient = 0.001, timeout = 0.001, fatal = 0.001 }
local ASK = { max_tokens = 16, messages = { { role = "user", content = "hi" } } }

-- Every string reachable from v: table keys and values, metatables, tostring
-- of objects and, with `upvalues`, the upvalues of functions (not _ENV: the
-- whole process is reachable from there), each visited once. Returns the path
-- where needle shows.
local function find_reachable(v, needle, upvalues)
  local seen = { [_G] = true, [package] = true, [package.loaded] = true }
  local function visit(x, path, depth)
    local t = type(x)
    if t == "string" then
      if x:find(needle, 1, true) then return path end
      return nil
    end
    if (t ~= "table" and t ~= "function" and t ~= "userdata") or seen[x] or depth > 60 then return nil end
    seen[x] = true
    local found
    if t == "table" then
      for k, y in next, x do
        found = visit(k, path .. "[key]", depth + 1) or visit(y, path .. "." .. tostring(k), depth + 1)
        if found then return found end
      end
    elseif t == "function" then
      for i = 1, upvalues and 255 or 0 do
        local name, y = debug.getupvalue(x, i)
        if name == nil then break end
        if name ~= "_ENV" then
          found = visit(y, path .. "^" .. name, depth + 1)
          if found then return found end
        end
      end
    else
      local ok, s = pcall(tostring, x)
      if ok then found = visit(s, path .. "<tostring>", depth + 1) end
      if found then return found end
      if debug.getuservalue then
        found = visit(debug.getuservalue(x), path .. "<uservalue>", depth + 1)
        if found then return found end
      end
    end
    local mt = debug.getmetatable(x)
    if mt then
      local ok, s = pcall(tostring, x)
      found = (ok and visit(s, path .. "<tostring>", depth + 1)) or visit(mt, path .. "<mt>", depth + 1)
    end
    return found
  end
  return visit(v, "root", 0)
end

describe("secrets", function()
  local m

  setup(function() m = assert(mock.start()) end)
  teardown(function() m:stop() end)
  before_each(function() m:reset() end)

  describe("userinfo in base_url", function()
    -- "pa55w?rd", percent-encoded in the URL; libcurl sends Basic base64("alice:pa55w?rd"),
    -- whose "/" an echoing JSON server escapes
    local USERINFO = "alice:pa55w%3Frd"
    local BASIC = "YWxpY2U6cGE1NXc/cmQ="
    local NEEDLES = { "pa55w", "alice:", BASIC, "cGE1NXc", "cmQ=" }

    local function with_userinfo(url)
      return (url:gsub("://", "://" .. USERINFO:gsub("%%", "%%%%") .. "@"))
    end

    local function assert_clean(v, what)
      for _, needle in ipairs(NEEDLES) do
        local at = find_reachable(v, needle, true)
        assert.is_nil(at, what .. " shows " .. needle .. " at " .. tostring(at))
      end
    end

    it("is sent to the server as credentials", function()
      local c = sturdy.client { base_url = with_userinfo(m.http_url) }
      local echo = require("cjson").decode(assert(c:request { path = "/echo" }).body)
      assert.equal("Basic " .. BASIC, echo.headers.authorization)
      c:close()
    end)

    it("never shows in tostring, keys, stats, hooks, observers or errors", function()
      local hooks = {}
      local function keep(x) hooks[#hooks + 1] = x end
      local c = sturdy.client {
        base_url = with_userinfo(m.http_url),
        retry = { base = FAST, attempts = 2 }, on_retry = keep, on_event = keep, observe = keep,
      }
      assert.equal("sturdy.client (" .. m.http_url .. ")", tostring(c))
      assert.equal("127.0.0.1:" .. m.port, c.key)
      assert.equal(c.key, c:key_for { path = "/echo" })
      local outputs = { tostring(c), c.key, c.base_url }
      local res = assert(c:request { path = "/echo", headers = steps("u1", "503|shape") }) -- no echo
      outputs[#outputs + 1] = res
      for _, s in ipairs { "401;echo=1", "500;echo=1", "429;echo=1;retry-after=1", "drop", "garbage" } do
        local _, err = c:request { path = "/v1/anything", headers = steps(s, s) }
        outputs[#outputs + 1] = err
        outputs[#outputs + 1] = tostring(err)
        outputs[#outputs + 1] = err.headers
      end
      local _, echoed = c:request { path = "/v1/anything", headers = steps("e401", "401;echo=1") }
      assert.matches("received headers", echoed.detail, 1, true)     -- the server did echo them
      assert.matches("Basic ****", echoed.detail, 1, true)
      outputs[#outputs + 1] = c:stats()
      for _, k in ipairs(c:stats().keys) do outputs[#outputs + 1] = c:stats(k) end
      outputs[#outputs + 1] = hooks
      assert.is_true(#hooks > 5)
      assert_clean(outputs, "client")
      c:close()
    end)

    it("of an absolute url never shows in its key or its errors", function()
      local c = sturdy.client { retry = { attempts = 1 } }
      local url = with_userinfo(m.http_url) .. "/v1/anything"
      assert.equal("127.0.0.1:" .. m.port, c:key_for { url = url })
      local _, err = c:request { url = url, headers = steps("abs", "403;echo=1") }
      assert.equal("permission", err.kind)
      assert.matches("received headers", err.detail, 1, true)
      assert_clean({ err, tostring(err), err.headers, c:stats(), c:stats(c:stats().keys[1]) }, "absolute url")
      c:close()
    end)
  end)

  describe("a key in client headers", function()
    it("is not reachable from the client, its handles or results", function()
      local key = "sk-client-header-" .. tostring(os.time()) .. "-Zq81"
      local c = sturdy.client { base_url = m.http_url, headers = { ["x-api-key"] = key, ["x-other"] = "plain" } }
      local echo = require("cjson").decode(assert(c:request { path = "/echo" }).body)
      assert.equal(key, echo.headers["x-api-key"])               -- it is sent
      local waiting = c:submit { path = "/echo", headers = steps("slow", "200;delay=300") }
      local done = c:submit { path = "/echo", headers = steps("plain200", "shape") } -- no echo
      assert(done:wait(5))
      local _, err = c:request { path = "/echo", headers = steps("k401", "401;echo=1") }
      assert.matches("received headers", err.detail, 1, true)
      for name, root in pairs { client = c, waiting = waiting, done = done, error = err,
                                stats = c:stats(), result = done:result() } do
        local at = find_reachable(root, key, true)
        assert.is_nil(at, name .. " reaches the key at " .. tostring(at))
        at = find_reachable(root, key:sub(4, 20), true)
        assert.is_nil(at, name .. " reaches part of the key at " .. tostring(at))
      end
      -- the scan does find what is there
      assert.is_string(find_reachable(c, "127.0.0.1:" .. m.port, true))
      assert.is_string(find_reachable(err, "received headers", true))
      c:close()
    end)
  end)

  describe("a server that echoes the request's headers", function()
    local KEY = "sk-ant-echo-4c1f0e9d8b7a6"

    local function assert_scrubbed(err, key)
      assert.matches("received headers", err.detail, 1, true)   -- the server did echo them
      for _, where in ipairs { err.detail, err.body, tostring(err) } do
        assert.is_nil(where:find(key, 1, true))
        assert.is_nil(where:find(key:sub(1, 12), 1, true))
      end
      assert.is_nil(find_reachable(err, key))
      assert.is_nil(find_reachable(err.headers, key))
    end

    it("never puts a client header's key into the error", function()
      local c = sturdy.client { base_url = m.http_url, headers = { ["x-api-key"] = KEY } }
      for _, s in ipairs { "401;echo=1", "400;echo=1", "404;echo=1" } do
        local _, err = c:request { path = "/v1/anything", headers = steps(s, s) }
        assert_scrubbed(err, KEY)
      end
      c:close()
    end)

    it("never puts a request header's key into the error, nor a retried attempt's", function()
      local c = sturdy.client { base_url = m.http_url, retry = { base = FAST, attempts = 3 } }
      local _, err = c:request { path = "/v1/anything", headers = {
        authorization = "Bearer " .. KEY, ["x-mock-steps"] = "500;echo=1", ["x-mock-scenario"] = "retried" } }
      assert.equal(3, m:scenario("retried").count)
      assert_scrubbed(err, KEY)
      c:close()
    end)

    it("never puts the Anthropic provider's x-api-key into the error, called or streamed", function()
      local claude = anthropic.new { api_key = KEY, base_url = m.http_url, model = "claude-sonnet-4-5" }
      local _, err = claude:messages(ASK, { headers = steps("a401", "401;echo=1") })
      assert.equal("auth", err.kind)
      assert_scrubbed(err, KEY)
      local iter, s = claude:stream(ASK, { headers = steps("as401", "401;echo=1") })
      local last
      for ev in iter do last = ev end
      assert.equal("error", last.type)
      assert_scrubbed(last.error, KEY)
      assert_scrubbed(select(2, s:result()), KEY)
      claude.client:close()
    end)

    it("never puts the OpenAI provider's Bearer key into the error, called or streamed", function()
      local gpt = openai.new { api_key = KEY, base_url = m.http_url, model = "gpt-4o-mini" }
      local _, err = gpt:chat({ messages = ASK.messages }, { headers = steps("o401", "401;echo=1") })
      assert.equal("auth", err.kind)
      assert_scrubbed(err, KEY)
      local _, s = gpt:stream({ messages = ASK.messages }, { headers = steps("os403", "403;echo=1") })
      local _, serr = s:result()
      assert.equal("permission", serr.kind)
      assert_scrubbed(serr, KEY)
      gpt.client:close()
    end)

    it("never puts it into what observers and error hooks receive", function()
      local seen = {}
      local claude = anthropic.new { api_key = KEY, base_url = m.http_url, model = "claude-sonnet-4-5",
                                     client_options = { observe = function(r) seen[#seen + 1] = r end,
                                                        retry = { base = FAST } } }
      claude:messages(ASK, { headers = steps("obs", "529;echo=1|401;echo=1") })
      assert.is_true(#seen >= 2)
      assert.is_nil(find_reachable(seen, KEY))
      claude.client:close()
    end)
  end)
end)
