-- The /cosocket location of bench/cosocket.lua: one sturdy.cosocket request
-- to the mock per request, its status and body passed on.
-- luacheck: globals ngx

local http = require "sturdy.cosocket"

local M = {}

local client

function M.handle(url)
  client = client or assert(http.new())
  local res, err = client:request { url = url }
  if not res then
    ngx.status = 502
    ngx.say(err.kind, ": ", err.detail)
    return
  end
  ngx.status = res.status
  ngx.header["content-type"] = res.headers["content-type"]
  ngx.print(res.body)
end

return M
