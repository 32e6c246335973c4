-- sturdy inside someone else's event loop: luv (libuv) waits on the sockets
-- and the timeout sturdy reports, and calls client:poll(0) when one is due.
-- The loop stays free for its own work (here: a ticker) while calls run.
--
--   STURDY_MOCK_URL=http://127.0.0.1:PORT lua examples/event_loop_luv.lua
local uv = require "luv"
local sturdy = require "sturdy"

local base_url = os.getenv("STURDY_MOCK_URL") or "http://127.0.0.1:8080"
local client = sturdy.client { base_url = base_url }

local watchers = {} -- fd -> uv poll handle
local timer = uv.new_timer()

-- Brings luv's watchers in line with what sturdy waits on now.
local function sync()
  local wanted = {}
  for _, s in ipairs(client:fds()) do
    local events = (s.read and "r" or "") .. (s.write and "w" or "")
    wanted[s.fd] = true
    local w = watchers[s.fd]
    if not w then
      w = uv.new_socket_poll(s.fd)
      watchers[s.fd] = w
    end
    w:start(events, function() client:poll(0); sync() end)
  end
  for fd, w in pairs(watchers) do
    if not wanted[fd] then
      w:stop()
      w:close()
      watchers[fd] = nil
    end
  end
  local wait = client:timeout()
  timer:stop()
  if client:pending() > 0 then
    -- a retry wait or a timeout is due even when no socket stirs
    timer:start(math.ceil((wait or 1) * 1000), 0, function() client:poll(0); sync() end)
  else
    for fd, w in pairs(watchers) do w:stop(); w:close(); watchers[fd] = nil end
  end
end

local ok, failed, ticks = 0, 0, 0
for i = 1, 20 do
  client:submit({ path = "/echo", headers = { ["x-mock-steps"] = "200;delay=" .. (i * 10) } }, function(res, err)
    if res then ok = ok + 1 else failed = failed + 1; print(tostring(err)) end
  end)
end

local ticker = uv.new_timer()
ticker:start(10, 10, function()
  ticks = ticks + 1
  if client:pending() == 0 then ticker:stop(); ticker:close() end
end)

client:poll(0)
sync()
uv.run()
timer:close()
client:close()

print(("done: %d ok, %d failed, the loop ticked %d times meanwhile"):format(ok, failed, ticks))
os.exit(failed == 0 and ok == 20 and 0 or 1)
