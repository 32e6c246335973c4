--- Redis connection settings shared by the parts of sturdy that keep state in
-- Redis (the cache's redis backend, the shared limits and breakers of
-- sturdy.shared): one small table, checked once, and a connect function over
-- lua-redis (Debian package lua-redis, `require "redis"`, luasocket
-- underneath: blocking, so for scripts), or, inside OpenResty, over
-- resty.redis (Debian package lua-nginx-redis; cosockets: a call never blocks
-- the worker).
--
--   { host = "127.0.0.1", port = 6379, db = 0, password = nil, timeout = 1, prefix = "sturdy:" }
--
-- The password is kept out of the returned table, so printing or dumping the
-- settings (or anything holding them) never shows it.
--
-- `M.link(settings)` is a connection to one Redis or to a Redis Cluster that
-- runs server-side scripts (EVALSHA, EVAL on NOSCRIPT) and follows the
-- cluster's MOVED and ASK redirections (lua-redis knows nothing of clusters):
-- the settings name any node; each hash tag is sent where the cluster last
-- said it lives. A link that fails waits before it tries again, with a backoff
-- that doubles from 0.1 s to 2 s. `M.link(settings, "resty")` runs the same
-- over resty.redis: each script takes its connections from nginx's pool and
-- puts them back (a cosocket belongs to the request that made it).
-- luacheck: read globals ngx
local monotime = require("sturdy.policy").monotime

local M = {}

local format = string.format
local unpack = table.unpack or unpack

M.DEFAULTS = { host = "127.0.0.1", port = 6379, db = 0, timeout = 1, prefix = "sturdy:" }

local SCHEMA = {
  host = "string", port = "number", db = "number", password = "string", timeout = "number", prefix = "string",
}

local passwords = setmetatable({}, { __mode = "k" })

local function fail(msg, ...)
  error("sturdy: " .. format(msg, ...), 0)
end

--- Checks t (nil = all defaults) and returns the settings with defaults
-- filled in; `where` names the table in errors.
function M.settings(t, where)
  where = where or "redis settings"
  if t == nil then t = {} end
  if type(t) ~= "table" then fail("%s must be a table, got %s", where, type(t)) end
  local s = {}
  for k, v in pairs(M.DEFAULTS) do s[k] = v end
  for k, v in pairs(t) do
    local want = SCHEMA[k]
    if want == nil then fail("unknown option '%s' in %s", tostring(k), where) end
    if type(v) ~= want then fail("option '%s' in %s must be a %s, got %s", k, where, want, type(v)) end
    if k ~= "password" then s[k] = v end
  end
  if s.port ~= s.port or s.port < 1 or s.port > 65535 or s.port % 1 ~= 0 then
    fail("option 'port' in %s must be a whole number from 1 to 65535", where)
  end
  if s.db ~= s.db or s.db < 0 or s.db > 1e6 or s.db % 1 ~= 0 then
    fail("option 'db' in %s must be a whole number >= 0", where)
  end
  if not (s.timeout > 0 and s.timeout < 1e6) then
    fail("option 'timeout' in %s must be a positive number of seconds", where)
  end
  s.port, s.db = math.floor(s.port), math.floor(s.db) -- integers, also when decoded from JSON as floats
  if s.host == "" or s.host:find("[%s%c]") then fail("option 'host' in %s is not a host name", where) end
  if s.prefix:find("[%s%c]") then fail("option 'prefix' in %s holds spaces or control characters", where) end
  passwords[s] = t.password
  return s
end

-- Debian's lua-redis installs one pure-Lua file for Lua 5.1 to 5.3; on a newer
-- Lua the same file is loaded from there.
local driver, driver_err
local function load_driver()
  if driver or driver_err then return driver, driver_err end
  local ok, mod = pcall(require, "redis")
  if ok then
    driver = mod
    return driver
  end
  for _, v in ipairs { "5.3", "5.2", "5.1" } do
    local chunk = loadfile("/usr/share/lua/" .. v .. "/redis.lua")
    if chunk then
      local loaded, m = pcall(chunk)
      if loaded and type(m) == "table" then
        package.loaded.redis = m
        driver = m
        return driver
      end
    end
  end
  driver_err = "Redis needs lua-redis (Debian package lua-redis, require \"redis\")"
  return nil, driver_err
end

-- lua-redis raises; its messages name the host and the failure, never the password.
local function message(e)
  return (tostring(e):gsub("^[^:]*redis%.lua:%d+: ", ""))
end

--- A connected lua-redis client for settings s (authenticated, db selected),
-- or nil and an error message. `secrets` are the settings whose password to
-- use, when s is a copy of them for another node.
function M.connect(s, secrets)
  local redis, err = load_driver()
  if not redis then return nil, err end
  local ok, client = pcall(redis.connect, { host = s.host, port = s.port, timeout = s.timeout })
  if not ok then return nil, message(client) end
  local password = passwords[secrets or s]
  local done, e = pcall(function()
    if password then client:auth(password) end
    if s.db ~= 0 then client:select(s.db) end
  end)
  if not done then
    pcall(client.quit, client)
    return nil, message(e)
  end
  return client
end

-- resty.redis: Debian installs it as nginx.redis, OpenResty as resty.redis.
local resty_driver, resty_err
local function load_resty()
  if resty_driver or resty_err then return resty_driver, resty_err end
  for _, name in ipairs { "resty.redis", "nginx.redis" } do
    local ok, mod = pcall(require, name)
    if ok and type(mod) == "table" then
      resty_driver = mod
      return mod
    end
  end
  resty_err = "Redis inside nginx needs resty.redis (Debian package lua-nginx-redis)"
  return nil, resty_err
end

-- A resty.redis connection with lua-redis's manners, so one link serves both:
-- a command raises "redis error: <reply>" for the server's error reply and
-- the failure for a broken connection. release() puts it back in nginx's pool.
local Resty = {}
local function resty_cmd(self, cmd, ...)
  local red = self.red
  local res, err = red[cmd](red, ...)
  if res == nil and err ~= nil then
    self.broken = true
    error(tostring(err), 0)
  end
  if res == false then error("redis error: " .. tostring(err), 0) end
  return res
end
Resty.__index = function(_, cmd)
  return function(self, ...) return resty_cmd(self, cmd, ...) end
end
local resty_methods = {
  raw_cmd = function(self, cmd, ...) return resty_cmd(self, cmd:lower(), ...) end,
  quit = function(self) self.red:close() end,
  release = function(self)
    if self.broken or not self.red:set_keepalive(60000, 64) then self.red:close() end
  end,
}

local function resty_connect(s, secrets)
  local mod, err = load_resty()
  if not mod then return nil, err end
  local red = mod:new()
  red:set_timeout(s.timeout * 1000)
  -- one pool per node, database and password: a pooled connection is ready as it is
  local password = passwords[secrets or s]
  local pool = format("sturdy:%s:%d:%d:%s", s.host, s.port, s.db, password and ngx.md5(password) or "")
  local ok, cerr = red:connect(s.host, s.port, { pool = pool })
  if not ok then return nil, format("%s:%d: %s", s.host, s.port, tostring(cerr)) end
  local conn = setmetatable({ red = red }, Resty)
  for k, f in pairs(resty_methods) do rawset(conn, k, f) end
  if (red:get_reused_times() or 0) == 0 then
    local done, e = pcall(function()
      if password then conn:auth(password) end
      if s.db ~= 0 then conn:select(s.db) end
    end)
    if not done then
      red:close()
      return nil, message(e)
    end
  end
  return conn
end

M.message = message

---------------------------------------------------------------------------
-- Links: scripts on one Redis or a Redis Cluster
---------------------------------------------------------------------------

--- A server-side script: its source, and its SHA-1 once a server told it.
function M.script(source)
  return { source = source }
end

local Link = { __name = "sturdy.redis.link" }
Link.__index = Link

M.BACKOFF_BASE, M.BACKOFF_CAP = 0.1, 2 -- seconds between tries while Redis fails
local MAX_REDIRECTS = 5

--- A link for settings s (checked by M.settings); driver "resty" for
-- resty.redis inside OpenResty (default: lua-redis).
function M.link(s, kind)
  if kind ~= nil and kind ~= "resty" then fail("unknown Redis driver '%s'", tostring(kind)) end
  return setmetatable({
    settings = s, seed = format("%s:%d", s.host, s.port), conns = {}, routes = {}, failures = 0,
    pooled = kind == "resty", connect = kind == "resty" and resty_connect or M.connect,
  }, Link)
end

-- "host:port" -> host, port (the last colon splits, for IPv6 literals)
local function split_addr(addr)
  local host, port = addr:match("^%[?(.-)%]?:(%d+)$")
  return host, tonumber(port)
end

--- True when the link may be used now: it is up, or its wait after a
-- failure is over.
function Link:ready()
  return self.down_until == nil or monotime() >= self.down_until
end

--- The error of the last failure, while the link waits after it.
function Link:down_error()
  return self.down_until and self.down_err
end

local function drop(self, addr, conns)
  local conn = conns[addr]
  conns[addr] = nil
  if conn then pcall(conn.quit, conn) end
  for tag, a in pairs(self.routes) do
    if a == addr then self.routes[tag] = nil end
  end
end

-- A failure of the link (not of one command): every connection goes, and the
-- next try waits a backoff with jitter (half fixed, half random).
local function failed(self, err, conns)
  for addr in pairs(conns) do drop(self, addr, conns) end
  self.failures = self.failures + 1
  local wait = math.min(M.BACKOFF_CAP, M.BACKOFF_BASE * 2 ^ math.min(self.failures - 1, 20))
  self.down_until = monotime() + wait / 2 + math.random() * wait / 2
  self.down_err = err
  return nil, err
end

local function conn_for(self, addr, conns)
  local conn = conns[addr]
  if conn then return conn end
  local host, port = split_addr(addr)
  if not host then return nil, "Redis named a node that is not host:port: " .. addr end
  local s = self.settings
  local node = s
  if addr ~= self.seed then
    node = setmetatable({ host = host, port = port }, { __index = s })
  end
  local c, err = self.connect(node, s)
  if not c then return nil, err end
  conns[addr] = c
  return c
end

-- lua-redis raises a server's error reply as "redis error: <reply>".
local function server_reply(e)
  return tostring(e):match("redis error: (.*)$")
end

local function encode(v)
  if type(v) == "number" then
    if v == math.floor(v) and v > -2 ^ 53 and v < 2 ^ 53 then return format("%d", v) end
    return format("%.17g", v)
  end
  return tostring(v)
end

-- What decides a key's cluster slot: the part between the first "{" and the
-- next "}" when it is not empty, else the whole key.
local function hash_tag(key)
  local tag = key:match("^[^{]*{([^}]+)}")
  return tag or key
end
M.hash_tag = hash_tag

local function run(self, conns, script, keys, args)
  local argv = { #keys }
  for i = 1, #keys do argv[#argv + 1] = keys[i] end
  for i = 1, #args do argv[#argv + 1] = encode(args[i]) end
  local tag = hash_tag(keys[1])
  local addr, asking = self.routes[tag] or self.seed, false
  for _ = 0, MAX_REDIRECTS do
    local conn, cerr = conn_for(self, addr, conns)
    if not conn then return failed(self, cerr, conns) end
    local ok, res = pcall(function()
      if asking then conn:raw_cmd("ASKING") end
      if not script.sha then script.sha = conn:script("load", script.source) end
      local done, r = pcall(conn.evalsha, conn, script.sha, unpack(argv))
      if done then return r end
      if not (server_reply(r) or ""):find("^NOSCRIPT") then error(r, 0) end
      if asking then conn:raw_cmd("ASKING") end
      return conn:eval(script.source, unpack(argv))
    end)
    if ok then
      self.failures, self.down_until, self.down_err = 0, nil, nil
      return res
    end
    local reply = server_reply(res)
    if not reply then
      drop(self, addr, conns)
      return failed(self, message(res), conns)
    end
    local kind, to = reply:match("^(%u+) %d+ (%S+)")
    if kind == "MOVED" then
      self.routes[tag], addr, asking = to, to, false
    elseif kind == "ASK" then
      addr, asking = to, true
    else
      return nil, "Redis: " .. reply
    end
  end
  return nil, "Redis: too many cluster redirections"
end

--- Runs script over keys (one slot: give them one hash tag) with args, on the
-- node that holds them. Returns the script's reply, or nil and an error: a
-- link failure (the link then waits) or the server's error reply.
function Link:eval(script, keys, args)
  if not self:ready() then return nil, self.down_err end
  if not self.pooled then return run(self, self.conns, script, keys, args) end
  -- pooled: this script's own connections (others may run at the same time), back to the pool after
  local conns = {}
  local res, err = run(self, conns, script, keys, args)
  for _, conn in pairs(conns) do conn:release() end
  return res, err
end

--- Closes every connection.
function Link:close()
  for addr in pairs(self.conns) do drop(self, addr, self.conns) end
end

return M
