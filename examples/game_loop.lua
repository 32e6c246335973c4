-- A game loop: submit requests, call client:poll(0) once per frame, and the
-- frame never waits on the network. In LÖVE this is love.update:
--
--   function love.update(dt) client:poll(0) end
--
-- and in a Defold-style engine the same call goes in update(self, dt); the
-- request's callback is where the reply reaches the game.
--   STURDY_MOCK_URL=http://127.0.0.1:PORT lua examples/game_loop.lua
local sturdy = require "sturdy"

local client = sturdy.client { base_url = os.getenv("STURDY_MOCK_URL") or "http://127.0.0.1:8080" }

local replies = 0
for i = 1, 8 do
  -- the server takes 300 ms to answer each of these
  client:submit({ path = "/echo", headers = { ["x-mock-steps"] = "200;delay=300" } }, function(res, err)
    replies = replies + 1
    print(("frame reply %d: %s"):format(i, res and res.status or tostring(err)))
  end)
end

local frames, slowest = 0, 0
local frame = 1 / 60
while client:pending() > 0 do
  local start = sturdy.monotime()
  client:poll(0)                       -- the network's share of the frame
  local spent = sturdy.monotime() - start
  if spent > slowest then slowest = spent end
  frames = frames + 1
  while sturdy.monotime() - start < frame do end -- the game's share: update, draw
end
print(("%d replies over %d frames; the slowest poll took %.2f ms"):format(replies, frames, slowest * 1000))
client:close()
