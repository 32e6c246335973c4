-- Holds the rockspecs to what the Makefile builds (run by `make lint`):
--
--   lua check-rockspecs.lua 'sturdy.core=SRC...' 'sturdy.policy=SRC...' 'lua=FILE...' ROCKSPEC...
--
-- Each C module must list exactly the Makefile's sources, every lua/sturdy/*.lua
-- must be a module under its name, sturdy.policy must not link curl, a released
-- rockspec's version must be sturdy._VERSION, and the rockspecs must agree on
-- everything but version and source. Prints each problem; exits 1 if any.

local problems = {}

local function problem(fmt, ...)
  problems[#problems + 1] = string.format(fmt, ...)
end

local function read(path)
  local f, err = io.open(path, "rb")
  if not f then
    return nil, err
  end
  local data = f:read("*a")
  f:close()
  return data
end

-- A rockspec is Lua assignments; run it in an empty environment.
local function load_rockspec(path)
  local src, err = read(path)
  if not src then
    return nil, err
  end
  local env = {}
  local chunk
  if rawget(_G, "setfenv") then   -- 5.1, LuaJIT
    chunk, err = loadstring(src, "@" .. path)
    if chunk then
      setfenv(chunk, env)
    end
  else
    chunk, err = load(src, "@" .. path, "t", env)
  end
  if not chunk then
    return nil, err
  end
  local ok, perr = pcall(chunk)
  if not ok then
    return nil, perr
  end
  return env
end

local function words(s)
  local list = {}
  for w in s:gmatch("%S+") do
    list[#list + 1] = w
  end
  return list
end

local function set_of(list)
  local set = {}
  for _, v in ipairs(list) do
    set[v] = true
  end
  return set
end

local function sorted_keys(t)
  local keys = {}
  for k in pairs(t) do
    keys[#keys + 1] = k
  end
  table.sort(keys, function(a, b) return tostring(a) < tostring(b) end)
  return keys
end

-- A canonical string of a value, to compare tables.
local function dump(v)
  if type(v) ~= "table" then
    return type(v) == "string" and string.format("%q", v) or tostring(v)
  end
  local parts = {}
  for _, k in ipairs(sorted_keys(v)) do
    parts[#parts + 1] = "[" .. dump(k) .. "]=" .. dump(v[k])
  end
  return "{" .. table.concat(parts, ",") .. "}"
end

local function module_name(file)
  local name = file:match("^lua/(.-)%.lua$")
  return name and name:gsub("/init$", ""):gsub("/", ".")
end

local function check_sources(path, modname, module, want)
  if type(module) ~= "table" or type(module.sources) ~= "table" then
    problem("%s: %s has no sources list", path, modname)
    return
  end
  local have = set_of(module.sources)
  for _, src in ipairs(want) do
    if not have[src] then
      problem("%s: %s lacks %s (the Makefile builds it)", path, modname, src)
    end
  end
  local wanted = set_of(want)
  for _, src in ipairs(module.sources) do
    if not wanted[src] then
      problem("%s: %s lists %s, which the Makefile does not build into it", path, modname, src)
    end
  end
end

local function check_rockspec(path, spec, makefile, version)
  local modules = spec.build and spec.build.modules
  if type(modules) ~= "table" then
    problem("%s: no build.modules", path)
    return
  end
  for modname, want in pairs(makefile.c) do
    check_sources(path, modname, modules[modname], want)
  end
  local policy = modules["sturdy.policy"]
  for _, lib in ipairs(type(policy) == "table" and policy.libraries or {}) do
    if lib:match("curl") then
      problem("%s: sturdy.policy links %s; it must load without libcurl", path, lib)
    end
  end
  local lua_files = {}
  for _, file in ipairs(makefile.lua) do
    local name = module_name(file)
    lua_files[name] = file
    if modules[name] ~= file then
      problem("%s: module %s should be %s, is %s", path, name, file, tostring(modules[name]))
    end
  end
  for name in pairs(modules) do
    if not makefile.c[name] and not lua_files[name] then
      problem("%s: module %s is neither a C module nor a file in lua/", path, name)
    end
  end
  local released = spec.version and spec.version:match("^(%d[%w%.]*)%-%d+$")
  if released and released ~= version then
    problem("%s: version %s, but lua/sturdy/init.lua says _VERSION = %s", path, spec.version, tostring(version))
  end
end

local function main(args)
  local makefile = { c = {}, lua = {} }
  local paths = {}
  for _, a in ipairs(args) do
    local name, list = a:match("^([%w%._]+)=(.*)$")
    if name == "lua" then
      makefile.lua = words(list)
    elseif name then
      makefile.c[name] = words(list)
    else
      paths[#paths + 1] = a
    end
  end
  if #paths == 0 or not next(makefile.c) or #makefile.lua == 0 then
    io.stderr:write("usage: check-rockspecs.lua 'MODULE=SRC...' 'lua=FILE...' ROCKSPEC...\n")
    return 2
  end
  local init = read("lua/sturdy/init.lua") or ""
  local version = init:match('_VERSION%s*=%s*"([^"]+)"')

  local shared = {}
  for _, path in ipairs(paths) do
    local spec, err = load_rockspec(path)
    if not spec then
      problem("%s: %s", path, tostring(err))
    else
      check_rockspec(path, spec, makefile, version)
      spec.version, spec.source = nil, nil
      shared[#shared + 1] = { path = path, text = dump(spec) }
    end
  end
  for i = 2, #shared do
    if shared[i].text ~= shared[1].text then
      problem("%s and %s differ in more than version and source", shared[1].path, shared[i].path)
    end
  end
  for _, p in ipairs(problems) do
    io.stderr:write(p, "\n")
  end
  return #problems == 0 and 0 or 1
end

os.exit(main(arg))
