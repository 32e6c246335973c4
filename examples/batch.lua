-- Many calls at once: results come back in input order, each a response or
-- a sturdy.Error; one failure never throws away another's result.
--   STURDY_MOCK_URL=http://127.0.0.1:PORT lua examples/batch.lua
local sturdy = require "sturdy"

local client = sturdy.client { base_url = os.getenv("STURDY_MOCK_URL") or "http://127.0.0.1:8080" }
local run = tostring(os.time()) .. "-" .. tostring(math.random(1e9)) -- names this run's scenarios at the mock
local requests = {}
for i = 1, 50 do
  -- every tenth call meets an overloaded server first: it is retried
  local script = i % 10 == 0 and "529|200" or "200"
  requests[i] = { path = "/echo", json = { n = i },
                  headers = { ["x-mock-scenario"] = run .. "-" .. i, ["x-mock-steps"] = script,
                              ["x-mock-steps-sep"] = "|" } }
end

local results = client:batch(requests, { concurrency = 16, progress = true })
local ok = 0
for i, r in ipairs(results) do
  if sturdy.is_error(r) then print(i, tostring(r)) else ok = ok + 1 end
end
print(("%d of %d succeeded, %d retries"):format(ok, #results, client:stats().retries))
client:close()
