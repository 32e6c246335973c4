-- Runs processes of spec/support/shared_peer.lua side by side (a fleet sharing
-- one Redis), for the shared specs and benchmark.
--
--   local fleet = require "spec.support.fleet"
--   local run = fleet.start({ cfg1, cfg2, ... })   -- peers start at once, in the background
--   ... (kill Redis, look at counters) ...
--   local outs = run:wait(120)   -- each peer's decoded JSON line (or { failed = text })
local cjson = require "cjson"
local socket = require "socket"
local mock = require "spec.support.mock"

local M = {}
local Run = {}
Run.__index = Run

local quote = mock.quote

local function read_file(path)
  local f = io.open(path, "rb")
  if not f then return nil end
  local s = f:read("*a")
  f:close()
  return s
end

--- Starts one peer per config; each gets start_at (now + lead seconds,
-- default 0.5) unless it has one, so they begin together.
function M.start(cfgs, lead)
  local p = io.popen("mktemp -d /tmp/sturdy-fleet.XXXXXX")
  local dir = p:read("*l")
  p:close()
  local lua = arg and arg[-1] or "lua"
  local start_at = socket.gettime() + (lead or 0.5)
  local cmds = {}
  for i, cfg in ipairs(cfgs) do
    cfg.start_at = cfg.start_at or start_at
    cmds[#cmds + 1] = ("%s spec/support/shared_peer.lua %s >%s 2>&1 &"):format(
      lua, quote(cjson.encode(cfg)), quote(dir .. "/peer" .. i))
  end
  local script = ("LUA_PATH=%s LUA_CPATH=%s; export LUA_PATH LUA_CPATH; %s wait; touch %s"):format(
    quote(package.path), quote(package.cpath), table.concat(cmds, " "), quote(dir .. "/done"))
  mock.execute("(" .. script .. ") >/dev/null 2>&1 &")
  return setmetatable({ dir = dir, n = #cfgs, start_at = start_at }, Run)
end

--- Waits (at most timeout seconds) for every peer; returns their outputs.
function Run:wait(timeout)
  local deadline = socket.gettime() + (timeout or 120)
  while not read_file(self.dir .. "/done") and socket.gettime() < deadline do socket.sleep(0.05) end
  local outs = {}
  for i = 1, self.n do
    local text = read_file(self.dir .. "/peer" .. i) or ""
    local line = text:match("({.*})%s*$")
    local ok, v = pcall(cjson.decode, line or "")
    outs[i] = ok and type(v) == "table" and v or { failed = text }
  end
  mock.execute("rm -rf " .. quote(self.dir))
  return outs
end

return M
