-- Any JSON-over-HTTPS API gets the same retries, breaker, limits and errors:
-- a small provider is a client plus a function that shapes requests and replies.
--   STURDY_MOCK_URL=http://127.0.0.1:PORT lua examples/custom_provider.lua
local sturdy = require "sturdy"
local cjson = require "cjson"

local function new_echo_api(base_url, token)
  local client = sturdy.client {
    base_url = base_url,
    headers = { authorization = "Bearer " .. token },   -- never shown in errors or tostring
    retry = { attempts = 3, base = 0.2 },
    limits = { rpm = 600 },                               -- its documented limit
  }
  local api = {}
  function api.ask(question)
    local res, err = client:request { method = "POST", path = "/echo", json = { question = question },
                                      key = "echo-api" }
    if not res then return nil, err end
    local doc = cjson.decode(res.body)
    return doc.body, res
  end
  function api.close() client:close() end
  return api
end

local api = new_echo_api(os.getenv("STURDY_MOCK_URL") or "http://127.0.0.1:8080", "token-123")
local answer, res_or_err = api.ask("ping")
if not answer then
  io.stderr:write(tostring(res_or_err), "\n")
  os.exit(1)
end
print("echoed: " .. answer, ("(%d attempt, %.1f ms)"):format(#res_or_err.attempts, res_or_err.timings.total * 1000))
api.close()
