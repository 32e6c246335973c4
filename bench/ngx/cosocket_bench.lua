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

-- The floor: the same exchange written by hand on one cosocket (no
-- timeouts, limits, parser or error kinds), to tell nginx's cosocket cost
-- from sturdy's own.
function M.bare(host, port, path)
  local sock = ngx.socket.tcp()
  local ok, err = sock:connect(host, port)
  if not ok then
    ngx.status = 502
    return ngx.say(err)
  end
  sock:send("GET " .. path .. " HTTP/1.1\r\nHost: " .. host .. "\r\n\r\n")
  local status = tonumber((sock:receive("*l") or ""):match("^HTTP/1%.1 (%d%d%d)"))
  local length, ctype
  while true do
    local line = sock:receive("*l")
    if not line or line == "" then break end
    local name, value = line:match("^([^:]+):%s*(.*)$")
    name = name and name:lower()
    if name == "content-length" then length = tonumber(value) end
    if name == "content-type" then ctype = value end
  end
  local body = length and sock:receive(length) or ""
  sock:setkeepalive(60000)
  ngx.status = status or 502
  ngx.header["content-type"] = ctype
  ngx.print(body)
end

local function median_us(t)
  table.sort(t)
  return t[math.floor(#t / 2) + 1] * 1e6
end

-- A case for the runner: n calls in a row inside nginx, sturdy and the bare
-- exchange alternating, each timed alone; medians in microseconds. Steadier
-- than wrk's p50 on a shared machine.
M["sequential medians"] = function(ctx)
  local policy = require "sturdy.policy"
  local now = policy.monotime
  local c = assert(http.new())
  local url = ctx.mock.http_url .. "/echo"
  local request = "GET /echo HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
  local sturdy, bare = {}, {}
  for i = 1, ctx.args.n do
    local t0 = now()
    assert(c:request { url = url })
    local t1 = now()
    local sock = ngx.socket.tcp()
    assert(sock:connect("127.0.0.1", ctx.mock.port))
    sock:send(request)
    local length
    while true do
      local line = assert(sock:receive("*l"))
      if line == "" then break end
      length = tonumber(line:match("^[Cc]ontent%-[Ll]ength:%s*(%d+)")) or length
    end
    assert(sock:receive(length))
    sock:setkeepalive(60000)
    sturdy[i], bare[i] = t1 - t0, now() - t1
  end
  return { sturdy = median_us(sturdy), bare = median_us(bare) }
end

return M
