-- Loads sturdy as installed by LuaRocks and checks where it came from; run by
-- scripts/check-rock.sh from / with the tree's LUA_PATH and LUA_CPATH.
--
--   lua rock-load.lua TREE [VERSION [LIBCURL_DIR]]
--
-- TREE: the rocks tree sturdy, sturdy.core and sturdy.policy must load from.
-- VERSION: the sturdy._VERSION expected ("-" for any). LIBCURL_DIR: the
-- directory the libcurl in use must come from (read from /proc/self/maps).
-- Prints one line; raises on any mismatch.

local tree, want_version, want_curl = arg[1], arg[2], arg[3]
if not tree then
  error("usage: rock-load.lua TREE [VERSION [LIBCURL_DIR]]", 0)
end

-- package.searchpath is 5.2+; LuaJIT and 5.1 need this.
local function search(name, path)
  local file = name:gsub("%.", "/")
  for template in path:gmatch("[^;]+") do
    local candidate = template:gsub("%?", file)
    local f = io.open(candidate, "rb")
    if f then
      f:close()
      return candidate
    end
  end
  return nil
end

local function starts(s, prefix)
  return s ~= nil and s:sub(1, #prefix) == prefix
end

local function check(cond, fmt, ...)
  if not cond then
    error("rock-load: " .. string.format(fmt, ...), 0)
  end
end

local function loaded_libcurl()
  local f = io.open("/proc/self/maps", "r")
  if not f then
    return nil
  end
  local maps = f:read("*a")
  f:close()
  return maps:match("(/%S*libcurl%.so[%w%.]*)")
end

local sturdy = require "sturdy"
local policy = require "sturdy.policy"

local files = {
  sturdy = search("sturdy", package.path),
  ["sturdy.core"] = search("sturdy.core", package.cpath),
  ["sturdy.policy"] = search("sturdy.policy", package.cpath),
}
for name, file in pairs(files) do
  check(starts(file, tree .. "/"), "%s loads from %s, not from the tree %s", name, tostring(file), tree)
end
check(type(sturdy.client) == "function" and type(sturdy.Error) == "table", "sturdy lacks client or Error")
check(type(policy.monotime) == "function" and policy.monotime() > 0, "sturdy.policy.monotime does not work")
if want_version and want_version ~= "-" then
  check(sturdy._VERSION == want_version, "sturdy._VERSION is %s, the rock is %s", sturdy._VERSION, want_version)
end

-- A call through libcurl: nothing listens on port 9 of loopback, so the
-- outcome is a connection error, quickly, and never a crash.
local client = sturdy.client { base_url = "http://127.0.0.1:9", retry = { attempts = 1 } }
local res, err = client:request { path = "/" }
check(res == nil and err and err.kind == "connection", "a call to a closed port gave %s",
      tostring(res and res.status or err and err.kind))
client:close()

local curl = loaded_libcurl()
if want_curl then
  check(starts(curl, want_curl .. "/"), "libcurl loads from %s, not from %s", tostring(curl), want_curl)
end
print(string.format("rock ok: sturdy %s on %s%s from %s, libcurl %s", sturdy._VERSION, _VERSION,
                    rawget(_G, "jit") and (" (" .. jit.version .. ")") or "", files["sturdy.core"],
                    tostring(curl)))
