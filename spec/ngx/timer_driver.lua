-- The "start" and "result" cases of a driver that runs in a timer of one
-- worker (spec/ngx/shared_cases.lua, spec/ngx/budget_cases.lua): "start"
-- schedules drive(args) and returns { worker } at once; what drive returns (or
-- { failed = error }) goes to lua_shared_dict "results" under args.id, which
-- "result" hands out (nil while it runs).
-- luacheck: globals ngx
local cjson = require "cjson.safe"

return function(drive)
  local cases = {}

  cases.start = function(ctx)
    local args = ctx.args
    local results = assert(ngx.shared.results, "lua_shared_dict results is not declared")
    results:delete(args.id)
    local ok, err = ngx.timer.at(0, function(premature)
      if premature then return end
      local done, out = xpcall(drive, debug.traceback, args)
      results:set(args.id, cjson.encode(done and out or { failed = tostring(out) }))
    end)
    assert(ok, err)
    return { worker = ngx.worker.id() }
  end

  cases.result = function(ctx)
    local out = ngx.shared.results:get(ctx.args.id)
    return out and cjson.decode(out)
  end

  return cases
end
