-- One call, with the error handling sturdy gives you.
--   STURDY_MOCK_URL=http://127.0.0.1:PORT lua examples/single_call.lua
local sturdy = require "sturdy"

local client = sturdy.client {
  base_url = os.getenv("STURDY_MOCK_URL") or "https://api.anthropic.com",
  headers = { ["x-api-key"] = os.getenv("ANTHROPIC_API_KEY") or "sk-mock", ["anthropic-version"] = "2023-06-01" },
  timeout = { connect = 5, first_byte = 30, total = 120 },
}

local res, err = client:request {
  method = "POST", path = "/v1/messages",
  json = { model = "claude-sonnet-4-5", max_tokens = 64, messages = { { role = "user", content = "Hello" } } },
}
if not res then
  -- one readable line; err.kind, err.retryable, err.retry_after say what to do next
  io.stderr:write(tostring(err), "\n")
  os.exit(1)
end
print(res.status, res.request_id, ("%.1f ms"):format(res.timings.total * 1000), #res.attempts .. " attempt(s)")
print(res.body)
client:close()
