-- The inside of spec/support/ngx_runner.lua: runs one case of a case module
-- in the phase its location names and answers { ok, value | error } as JSON.
-- luacheck: globals ngx

local cjson = require "cjson.safe"

local M = {}

local settings = {}

local function decode_request()
  local body = ngx.req.get_body_data()
  if not body then
    local path = ngx.req.get_body_file()
    local f = path and io.open(path, "rb")
    if f then
      body = f:read("*a")
      f:close()
    end
  end
  local req = body and cjson.decode(body)
  if type(req) ~= "table" or type(req.module) ~= "string" or type(req.case) ~= "string" then
    return nil, "the runner expects {module, case, args} as JSON"
  end
  return req
end

-- Runs the case; returns { ok = true, value } or { ok = false, error }.
local function run_case(req, phase)
  local loaded, cases = pcall(require, req.module)
  if not loaded then return { ok = false, error = "cannot load " .. req.module .. ": " .. tostring(cases) } end
  local fn = type(cases) == "table" and cases[req.case]
  if type(fn) ~= "function" then
    return { ok = false, error = "no case '" .. req.case .. "' in " .. req.module }
  end
  local ctx = { args = req.args or {}, phase = phase, mock = req.mock, vars = req.vars or {} }
  local ok, value = xpcall(function() return fn(ctx) end, debug.traceback)
  if not ok then return { ok = false, error = tostring(value) } end
  return { ok = true, value = value }
end

local function send(out)
  local body, err = cjson.encode(out)
  if not body then
    body = cjson.encode({ ok = false, error = "the case returned a value JSON cannot carry: " .. tostring(err) })
  end
  ngx.status = 200
  ngx.header["content-type"] = "application/json"
  ngx.print(body)
  return ngx.exit(ngx.HTTP_OK)
end

function M.content()
  local req, err = decode_request()
  if not req then return send({ ok = false, error = err }) end
  return send(run_case(req, "content"))
end

-- access_by_lua / rewrite_by_lua: run there, reply from the content phase.
function M.in_phase(phase)
  local req, err = decode_request()
  ngx.ctx.runner_out = req and run_case(req, phase) or { ok = false, error = err }
end

function M.reply()
  return send(ngx.ctx.runner_out or { ok = false, error = "the case did not run" })
end

-- The case runs in an ngx.timer callback; the request waits for it.
function M.timer()
  local req, err = decode_request()
  if not req then return send({ ok = false, error = err }) end
  local semaphore = require "ngx.semaphore"
  local done = semaphore.new()
  local out
  local ok, terr = ngx.timer.at(0, function(premature)
    if premature then
      out = { ok = false, error = "nginx is exiting" }
    else
      out = run_case(req, "timer")
    end
    done:post(1)
  end)
  if not ok then return send({ ok = false, error = "ngx.timer.at: " .. tostring(terr) }) end
  local waited, werr = done:wait(tonumber(req.timeout) or 60)
  if not waited then return send({ ok = false, error = "the timer case did not finish: " .. tostring(werr) }) end
  return send(out)
end

-- This worker's id, with a length so the runner can keep the connection
-- and send its case to the same worker.
function M.worker()
  local id = tostring(ngx.worker.id())
  ngx.header["content-type"] = "text/plain"
  ngx.header["content-length"] = #id
  ngx.print(id)
end

---------------------------------------------------------------------------
-- Lifecycle: stop nginx when the busted process that started it is gone.

function M.init(opts)
  settings = opts or {}
  require "resty.core"
end

local function owner_alive()
  local f = io.open("/proc/" .. settings.owner_pid .. "/stat", "r")
  if not f then return false end
  local stat = f:read("*a") or ""
  f:close()
  local fields = {}
  for field in (stat:match("%) (.*)$") or ""):gmatch("%S+") do fields[#fields + 1] = field end
  if fields[1] == "Z" or fields[1] == "X" then return false end
  return settings.owner_start == nil or fields[20] == settings.owner_start
end

local function watchdog(premature)
  if premature or owner_alive() then return end
  ngx.log(ngx.WARN, "ngx_runner: owner process ", settings.owner_pid, " is gone; stopping")
  local prefix = settings.prefix or ""
  local f = io.open(prefix .. "/nginx.pid", "r")
  local master = f and f:read("*l")
  if f then f:close() end
  if prefix:match("/sturdy%-ngx%.[%w]+/?$") then os.execute("rm -rf '" .. prefix .. "'") end
  if master and master:match("^%d+$") then os.execute("kill -TERM " .. master) end
end

function M.init_worker()
  if settings.owner_pid and ngx.worker.id() == 0 then
    ngx.timer.every(1, watchdog)
  end
end

return M
