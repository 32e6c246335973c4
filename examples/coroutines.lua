-- Coroutines that call client:request without blocking each other: give the
-- client a `yield` function and resume the coroutines from your scheduler.
--   STURDY_MOCK_URL=http://127.0.0.1:PORT lua examples/coroutines.lua
local sturdy = require "sturdy"

local client = sturdy.client {
  base_url = os.getenv("STURDY_MOCK_URL") or "http://127.0.0.1:8080",
  yield = coroutine.yield, -- called while a request waits; the scheduler resumes later
}

local tasks = {}
for i, delay in ipairs { 400, 100, 250 } do
  tasks[#tasks + 1] = coroutine.create(function()
    local res, err = client:request { path = "/echo", headers = { ["x-mock-steps"] = "200;delay=" .. delay } }
    print(("task %d (server delay %d ms): %s"):format(i, delay, res and res.status or tostring(err)))
  end)
end

-- a minimal scheduler: resume every live task once per turn
repeat
  local alive = 0
  for _, co in ipairs(tasks) do
    if coroutine.status(co) ~= "dead" then
      assert(coroutine.resume(co))
      alive = alive + 1
    end
  end
until alive == 0
client:close()
