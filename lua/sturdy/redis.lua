--- Redis connection settings shared by the parts of sturdy that keep state in
-- Redis (the cache's redis backend; the shared limiter later): one small
-- table, checked once, and a connect function over lua-redis (Debian package
-- lua-redis, `require "redis"`, luasocket underneath: blocking, so for
-- scripts, not for OpenResty, where resty.redis is the client).
--
--   { host = "127.0.0.1", port = 6379, db = 0, password = nil, timeout = 1, prefix = "sturdy:" }
--
-- The password is kept out of the returned table, so printing or dumping the
-- settings (or anything holding them) never shows it.
local M = {}

local format = string.format

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
-- or nil and an error message.
function M.connect(s)
  local redis, err = load_driver()
  if not redis then return nil, err end
  local ok, client = pcall(redis.connect, { host = s.host, port = s.port, timeout = s.timeout })
  if not ok then return nil, message(client) end
  local password = passwords[s]
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

M.message = message

return M
