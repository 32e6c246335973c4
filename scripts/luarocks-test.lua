-- `luarocks test`: runs the suite (`make test`: C tests, busted specs against
-- the mock API, luacheck) on the Lua interpreter LuaRocks runs this script
-- with, so `luarocks --lua-version 5.1 test` tests Lua 5.1. Arguments go to
-- busted: `luarocks test -- --filter=retries`.

local function quote(s)
  return "'" .. tostring(s):gsub("'", "'\\''") .. "'"
end

-- 5.1 and LuaJIT return a wait status, 5.2+ return ok, "exit"|"signal", code.
local function exit_code(a, how, code)
  if type(a) == "number" then
    return a > 255 and math.floor(a / 256) or a
  end
  if how == "signal" then
    return 128 + (code or 0)
  end
  return code or (a and 0 or 1)
end

local function main(args)
  local interpreter = args[-1]
  if not interpreter then
    io.stderr:write("luarocks-test: run it with a Lua interpreter (luarocks test does)\n")
    return 2
  end
  local name = interpreter:match("[^/]+$")
  local root = (args[0]:match("^(.*)/[^/]*$") or ".") .. "/.."
  local busted_args = {}
  for i = 1, #args do
    busted_args[i] = quote(args[i])
  end
  -- BUILD and LUA_PC come from the name, so a full path keeps its own build dir.
  local cmd = "make --no-print-directory -C " .. quote(root) .. " test"
    .. " LUA=" .. quote(interpreter) .. " BUILD=" .. quote("build/" .. name) .. " LUA_PC=" .. quote(name)
  if #busted_args > 0 then
    cmd = cmd .. " BUSTED_ARGS=" .. quote(table.concat(busted_args, " "))
  end
  print(cmd)
  return exit_code(os.execute(cmd))
end

os.exit(main(arg))
