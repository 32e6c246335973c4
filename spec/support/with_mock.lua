-- Run a command with the mock API up:
--
--   lua5.4 spec/support/with_mock.lua CMD [ARGS...]
--
-- Starts the mock, runs CMD with STURDY_MOCK_URL (http), STURDY_MOCK_TLS_URL
-- (https, HTTP/2), STURDY_MOCK_CA (CA file for the https URL) and
-- STURDY_MOCK_DIR set, stops the mock (whatever CMD did) and exits with
-- CMD's exit status (128+N if it died of signal N).

-- Find the repository root from this script's path so that
-- require "spec.support.mock" works from any working directory.
local function repo_root()
  local script = arg and arg[0] or ""
  local dir = script:match("^(.*)/[^/]*$") or "."
  return dir .. "/../.."
end

local root = repo_root()
package.path = root .. "/?.lua;" .. root .. "/lua/?.lua;" .. root .. "/lua/?/init.lua;" .. package.path

local mock = require "spec.support.mock"

local quote, run = mock.quote, mock.execute

local function main()
  if not arg or #arg == 0 then
    io.stderr:write("usage: lua spec/support/with_mock.lua CMD [ARGS...]\n")
    return 2
  end
  local m, err = mock.start()
  if not m then
    io.stderr:write("with_mock: ", tostring(err), "\n")
    return 1
  end
  local words = {
    "env",
    "STURDY_MOCK_URL=" .. quote(m.http_url),
    "STURDY_MOCK_TLS_URL=" .. quote(m.https_url),
    "STURDY_MOCK_CA=" .. quote(m.ca_file),
    "STURDY_MOCK_DIR=" .. quote(m.dir),
  }
  for i = 1, #arg do
    words[#words + 1] = quote(arg[i])
  end
  -- pcall so the mock is stopped even if running the command raises.
  local ok, code = pcall(run, table.concat(words, " "))
  m:stop()
  if not ok then
    io.stderr:write("with_mock: ", tostring(code), "\n")
    return 1
  end
  return code
end

os.exit(main())
