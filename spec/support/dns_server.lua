-- A tiny DNS server for nginx's `resolver` in the specs: A records of
-- 127.0.0.1 for "localhost" and every name under ".test", an empty answer for
-- other record types of those names, NXDOMAIN for anything else. UDP only.
--
--   lua dns_server.lua PORT_FILE OWNER_PID
--
-- Binds 127.0.0.1:0 (UDP), writes its port to PORT_FILE and serves until
-- OWNER_PID is gone.

local socket = require "socket"

local port_file, owner = arg[1], tonumber(arg[2])

local function owner_alive()
  if not owner or owner == 0 then return true end
  local f = io.open("/proc/" .. owner .. "/stat", "r")
  if not f then return false end
  local state = (f:read("*a") or ""):match("%) (%a)")
  f:close()
  return state ~= "Z" and state ~= "X"
end

local function u16(n)
  return string.char(math.floor(n / 256) % 256, n % 256)
end

local function read_u16(s, i)
  local a, b = s:byte(i, i + 1)
  return a * 256 + b
end

-- The question's name (lowercase, dotted), type, and where it ends; nil if malformed.
local function question(q)
  local labels, i = {}, 13
  while true do
    local len = q:byte(i)
    if not len or len >= 64 then return nil end
    if len == 0 then break end
    labels[#labels + 1] = q:sub(i + 1, i + len):lower()
    i = i + len + 1
  end
  if #q < i + 4 then return nil end
  return table.concat(labels, "."), read_u16(q, i + 1), i + 4
end

local function answer(q)
  if #q < 17 then return nil end
  local name, qtype, stop = question(q)
  if not name then return nil end
  local known = name == "localhost" or name:sub(-5) == ".test"
  local rd = q:byte(3) % 2    -- the RD bit, echoed
  local flags = 0x8000 + 0x0400 + rd * 0x0100 + 0x0080 + (known and 0 or 3)
  local with_a = known and qtype == 1
  local out = { q:sub(1, 2), u16(flags), u16(1), u16(with_a and 1 or 0), u16(0), u16(0), q:sub(13, stop) }
  if with_a then
    out[#out + 1] = "\192\012" .. u16(1) .. u16(1) .. u16(0) .. u16(60) .. u16(4) .. "\127\0\0\1"
  end
  return table.concat(out)
end

local function main()
  local udp = assert(socket.udp())
  assert(udp:setsockname("127.0.0.1", 0))
  udp:settimeout(0.5)
  local _, port = udp:getsockname()
  local tmp = port_file .. ".tmp"
  local f = assert(io.open(tmp, "w"))
  f:write(port, "\n")
  f:close()
  assert(os.rename(tmp, port_file))
  local last_check = socket.gettime()
  while true do
    local q, ip, from = udp:receivefrom()
    if q then
      local reply = answer(q)
      if reply then udp:sendto(reply, ip, from) end
    end
    if socket.gettime() - last_check > 1 then
      last_check = socket.gettime()
      if not owner_alive() then os.exit(0) end
    end
  end
end

main()
