-- A small forward proxy for the specs: CONNECT host:port tunnels, and
-- absolute-form requests (GET http://host:port/path HTTP/1.1) relayed to their
-- host, one select loop over luasocket. Loopback targets only.
--
--   lua connect_proxy.lua PORT_FILE OWNER_PID
--
-- Binds 127.0.0.1:0, writes its port to PORT_FILE and serves until OWNER_PID
-- is gone. GET /_proxy/counters (origin form) answers
-- {"connections":N,"tunnels":N,"forwarded":N,"refused":N,"auth":"..."}: client
-- connections accepted, CONNECT tunnels made, absolute-form connections relayed,
-- requests refused (502 when the target did not answer, 403 off loopback,
-- 400 otherwise), and the last Proxy-Authorization value seen.

local socket = require "socket"

local port_file, owner = arg[1], tonumber(arg[2])
local MAX_HEAD = 64 * 1024
local READ_SIZE = 16 * 1024

local counters = { connections = 0, tunnels = 0, forwarded = 0, refused = 0, auth = "" }
local peers = {}     -- socket -> { peer = socket, out = { pending strings }, head = string|nil, closing }
local listening = {}

local function owner_alive()
  if not owner or owner == 0 then return true end
  local f = io.open("/proc/" .. owner .. "/stat", "r")
  if not f then return false end
  local stat = f:read("*a") or ""
  f:close()
  local state = stat:match("%) (%a)")
  return state ~= "Z" and state ~= "X"
end

local function close(s)
  local st = peers[s]
  peers[s] = nil
  s:close()
  if st and st.peer and peers[st.peer] then
    -- the other side gets what is pending, then closes
    peers[st.peer].closing = true
    if #peers[st.peer].out == 0 then close(st.peer) end
  end
end

local function queue(s, data)
  local st = peers[s]
  if st then st.out[#st.out + 1] = data end
end

local function answer(s, status, body)
  queue(s, "HTTP/1.1 " .. status .. "\r\nContent-Type: application/json\r\nContent-Length: " .. #body
    .. "\r\nConnection: close\r\n\r\n" .. body)
  peers[s].closing = true
  peers[s].head = nil
end

local function json_counters()
  return string.format('{"connections":%d,"tunnels":%d,"forwarded":%d,"refused":%d,"auth":"%s"}',
    counters.connections, counters.tunnels, counters.forwarded, counters.refused,
    (counters.auth:gsub('[%c"\\]', "")))
end

local function refuse(s, status)
  counters.refused = counters.refused + 1
  answer(s, status, '{"error":"' .. status .. '"}')
end

local function open_upstream(host, port)
  if host ~= "127.0.0.1" and host ~= "localhost" then return nil, "403 Forbidden" end
  local up = socket.tcp()
  up:settimeout(2)
  local ok = up:connect("127.0.0.1", port)
  if not ok then
    up:close()
    return nil, "502 Bad Gateway"
  end
  up:settimeout(0)
  return up
end

local function pair(client, up)
  peers[up] = { peer = client, out = {} }
  peers[client].peer = up
  peers[client].head = nil
end

-- A complete head from a client: decide what the connection is.
local function on_head(s, head, rest)
  local method, target = head:match("^(%u+) (%S+) HTTP/1%.%d\r?\n")
  local auth = head:match("\n[Pp]roxy%-[Aa]uthorization:%s*([^\r\n]*)")
  if auth then counters.auth = auth end
  if not method then return refuse(s, "400 Bad Request") end
  if method == "CONNECT" then
    local host, port = target:match("^%[?([^%]]+)%]?:(%d+)$")
    if not host then return refuse(s, "400 Bad Request") end
    local up, err = open_upstream(host, tonumber(port))
    if not up then return refuse(s, err) end
    counters.tunnels = counters.tunnels + 1
    pair(s, up)
    queue(s, "HTTP/1.1 200 Connection established\r\n\r\n")
    if rest ~= "" then queue(up, rest) end
  elseif target == "/_proxy/counters" then
    answer(s, "200 OK", json_counters())
  else
    local host, port = target:match("^http://%[?([^/%]]+)%]?:(%d+)/")
    if not host then
      host, port = target:match("^http://([^/:]+)/"), "80"
    end
    if not host then return refuse(s, "400 Bad Request") end
    local up, err = open_upstream(host, tonumber(port))
    if not up then return refuse(s, err) end
    counters.forwarded = counters.forwarded + 1
    pair(s, up)
    queue(up, head .. rest)   -- the mock reads absolute-form request lines
  end
end

local function on_readable(s)
  local data, err, partial = s:receive(READ_SIZE)
  data = data or partial
  local st = peers[s]
  if data and data ~= "" then
    if st.head then
      st.head = st.head .. data
      local stop = st.head:find("\r\n\r\n", 1, true)
      if stop then
        local head, rest = st.head:sub(1, stop + 3), st.head:sub(stop + 4)
        on_head(s, head, rest)
      elseif #st.head > MAX_HEAD then
        refuse(s, "400 Bad Request")
      end
    elseif st.peer then
      queue(st.peer, data)
    end
  end
  if err == "closed" then close(s) end
end

local function on_writable(s)
  local st = peers[s]
  while st and #st.out > 0 do
    local data = st.out[1]
    local last, err, partial = s:send(data)
    last = last or partial or 0
    if last < #data then
      st.out[1] = data:sub(last + 1)
      if err == "closed" then close(s) end
      return
    end
    table.remove(st.out, 1)
  end
  if st and st.closing then close(s) end
end

local function main()
  local server = assert(socket.bind("127.0.0.1", 0))
  server:settimeout(0)
  local _, port = server:getsockname()
  local tmp = port_file .. ".tmp"
  local f = assert(io.open(tmp, "w"))
  f:write(port, "\n")
  f:close()
  assert(os.rename(tmp, port_file))
  listening[server] = true

  local last_check = socket.gettime()
  while true do
    local readers, writers = { server }, {}
    for s, st in pairs(peers) do
      readers[#readers + 1] = s
      if #st.out > 0 or st.closing then writers[#writers + 1] = s end
    end
    local readable, writable = socket.select(readers, writers, 0.5)
    for _, s in ipairs(readable) do
      if listening[s] then
        local c = server:accept()
        if c then
          c:settimeout(0)
          peers[c] = { out = {}, head = "" }
          counters.connections = counters.connections + 1
        end
      elseif peers[s] then
        on_readable(s)
      end
    end
    for _, s in ipairs(writable) do
      if peers[s] then on_writable(s) end
    end
    if socket.gettime() - last_check > 1 then
      last_check = socket.gettime()
      if not owner_alive() then os.exit(0) end
    end
  end
end

main()
