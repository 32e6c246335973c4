--- The complete part of a JSON text cut short, as the official SDKs' partial
-- mode reads a tool's input cut by max_tokens:
--
--   partial_json.decode('{"a": [1, "b"], "c": "unfini')  --> { a = { 1, "b" } }, false
--
-- Containers cut by the end of the text are closed where it ends, keeping every
-- element (or key and value) that is whole. A string, number or literal cut by
-- the end is dropped, and so is a key whose value never started. A number that
-- reaches the end whole ("12") is kept. Whole texts decode as lua-cjson decodes
-- them: null is cjson.null, numbers are floats, \u escapes become UTF-8.
--
-- The grammar is RFC 8259's, except that raw control characters inside strings
-- are kept, as lua-cjson keeps them. A text that is not the beginning of some
-- JSON text (a wrong token, a comma before "]", a lone surrogate escape, more
-- after the value) is an error, whether or not it was cut.
local cjson = require "cjson.safe"

local partial_json = {}

local byte, sub, find, char, concat = string.byte, string.sub, string.find, string.char, table.concat
local floor = math.floor
local null = cjson.null

-- Nesting deeper than this is an error, as in lua-cjson.
local MAX_DEPTH = 1000

-- Returned in place of a value the end of the text cut off.
local CUT = setmetatable({}, { __tostring = function() return "cut" end })

local ESCAPES = {
  [34] = '"', [92] = "\\", [47] = "/", [98] = "\b", [102] = "\f", [110] = "\n", [114] = "\r", [116] = "\t",
}

local LITERALS = { [116] = { "true", true }, [102] = { "false", false }, [110] = { "null", null } }

local function fail(s, pos, what)
  local near = sub(s, pos, pos + 15):gsub("[%c]", " ")
  error({ message = string.format("%s at byte %d (near '%s')", what, pos, near) }, 0)
end

local function skip_space(s, pos)
  return find(s, "[^ \t\n\r]", pos) or #s + 1
end

local function utf8_char(cp)
  if cp < 0x80 then return char(cp) end
  if cp < 0x800 then return char(0xC0 + floor(cp / 0x40), 0x80 + cp % 0x40) end
  if cp < 0x10000 then
    return char(0xE0 + floor(cp / 0x1000), 0x80 + floor(cp / 0x40) % 0x40, 0x80 + cp % 0x40)
  end
  return char(0xF0 + floor(cp / 0x40000), 0x80 + floor(cp / 0x1000) % 0x40,
              0x80 + floor(cp / 0x40) % 0x40, 0x80 + cp % 0x40)
end

-- Four hex digits at pos: the code, or CUT when the text ends first.
local function hex4(s, pos)
  local digits = sub(s, pos, pos + 3)
  if not find(digits, "^%x*$") then fail(s, pos, "bad \\u escape") end
  if #digits < 4 then return CUT end
  return tonumber(digits, 16)
end

-- A \u escape whose "u" is at pos: the UTF-8 text and the position after it.
local function unicode_escape(s, pos)
  local cp = hex4(s, pos + 1)
  if cp == CUT then return CUT end
  if cp >= 0xDC00 and cp <= 0xDFFF then fail(s, pos - 1, "lone low surrogate escape") end
  if cp < 0xD800 or cp > 0xDBFF then return utf8_char(cp), pos + 5 end
  local rest = sub(s, pos + 5, pos + 6)
  if rest ~= sub("\\u", 1, #rest) then fail(s, pos - 1, "high surrogate escape without its low half") end
  if #rest < 2 then return CUT end
  local low = hex4(s, pos + 7)
  if low == CUT then return CUT end
  if low < 0xDC00 or low > 0xDFFF then fail(s, pos - 1, "high surrogate escape without its low half") end
  return utf8_char(0x10000 + (cp - 0xD800) * 0x400 + (low - 0xDC00)), pos + 11
end

-- The string whose opening quote is at pos, and the position after it.
local function read_string(s, pos)
  local parts, i = {}, pos + 1
  while true do
    local j = find(s, '["\\]', i)
    if not j then return CUT end
    parts[#parts + 1] = sub(s, i, j - 1)
    if byte(s, j) == 34 then return concat(parts), j + 1 end
    local e = byte(s, j + 1)
    if e == nil then return CUT end
    if e == 117 then
      local text, after = unicode_escape(s, j + 1)
      if text == CUT then return CUT end
      parts[#parts + 1], i = text, after
    elseif ESCAPES[e] then
      parts[#parts + 1], i = ESCAPES[e], j + 2
    else
      fail(s, j, "bad escape")
    end
  end
end

-- A number at pos, and the position after it. Cut when the text ends inside
-- it before it can be whole ("-", "1.", "2e+").
local function read_number(s, pos)
  local n, i = #s, pos
  if byte(s, i) == 45 then i = i + 1 end
  if i > n then return CUT end
  local c = byte(s, i)
  if c == 48 then
    i = i + 1
  elseif c and c >= 49 and c <= 57 then
    i = (find(s, "[^0-9]", i) or n + 1)
  else
    fail(s, pos, "bad number")
  end
  if byte(s, i) == 46 then
    if i + 1 > n then return CUT end
    if not find(s, "^[0-9]", i + 1) then fail(s, pos, "bad number") end
    i = find(s, "[^0-9]", i + 1) or n + 1
  end
  c = byte(s, i)
  if c == 101 or c == 69 then
    i = i + 1
    c = byte(s, i)
    if c == 43 or c == 45 then i = i + 1 end
    if i > n then return CUT end
    if not find(s, "^[0-9]", i) then fail(s, pos, "bad number") end
    i = find(s, "[^0-9]", i) or n + 1
  end
  local text = sub(s, pos, i - 1)
  -- a float, as lua-cjson gives (with "-0" staying negative)
  if not find(text, "[eE]") then text = text .. "e0" end
  return tonumber(text), i
end

local read_value

-- Returns value, position after it, and whether the end of the text cut it.
local function read_array(s, pos, depth)
  local arr = {}
  local n = #s
  pos = skip_space(s, pos + 1)
  if pos > n then return arr, pos, true end
  if byte(s, pos) == 93 then return arr, pos + 1, false end
  while true do
    local v, after, cut = read_value(s, pos, depth + 1)
    if v == CUT then return arr, n + 1, true end
    arr[#arr + 1] = v
    if cut then return arr, after, true end
    pos = skip_space(s, after)
    if pos > n then return arr, pos, true end
    local c = byte(s, pos)
    if c == 93 then return arr, pos + 1, false end
    if c ~= 44 then fail(s, pos, "expected ',' or ']'") end
    pos = skip_space(s, pos + 1)
    if pos > n then return arr, pos, true end
  end
end

local function read_object(s, pos, depth)
  local obj = {}
  local n = #s
  pos = skip_space(s, pos + 1)
  if pos > n then return obj, pos, true end
  if byte(s, pos) == 125 then return obj, pos + 1, false end
  while true do
    if byte(s, pos) ~= 34 then fail(s, pos, "expected a string key") end
    local key, after = read_string(s, pos)
    if key == CUT then return obj, n + 1, true end
    pos = skip_space(s, after)
    if pos > n then return obj, pos, true end
    if byte(s, pos) ~= 58 then fail(s, pos, "expected ':'") end
    local v, vafter, cut = read_value(s, pos + 1, depth + 1)
    if v == CUT then return obj, n + 1, true end
    obj[key] = v
    if cut then return obj, vafter, true end
    pos = skip_space(s, vafter)
    if pos > n then return obj, pos, true end
    local c = byte(s, pos)
    if c == 125 then return obj, pos + 1, false end
    if c ~= 44 then fail(s, pos, "expected ',' or '}'") end
    pos = skip_space(s, pos + 1)
    if pos > n then return obj, pos, true end
  end
end

function read_value(s, pos, depth)
  pos = skip_space(s, pos)
  local c = byte(s, pos)
  if c == nil then return CUT end
  if c == 123 or c == 91 then
    if depth > MAX_DEPTH then fail(s, pos, "nested too deeply") end
    if c == 123 then return read_object(s, pos, depth) end
    return read_array(s, pos, depth)
  end
  if c == 34 then
    local v, after = read_string(s, pos)
    return v, after, false
  end
  if c == 45 or (c >= 48 and c <= 57) then
    local v, after = read_number(s, pos)
    return v, after, false
  end
  local lit = LITERALS[c]
  if lit then
    local word, got = lit[1], sub(s, pos, pos + #lit[1] - 1)
    if got == word then return lit[2], pos + #word, false end
    if pos + #got - 1 == #s and got == sub(word, 1, #got) then return CUT end
  end
  fail(s, pos, "unexpected character")
end

--- Decodes the complete part of text. Returns the value and true when text was
-- whole, the value and false when it was cut; nil and a message when text
-- holds no complete value (empty, or a cut string or number alone) or is not
-- the beginning of a JSON text.
function partial_json.decode(text)
  if type(text) ~= "string" then
    error("sturdy: partial_json.decode takes a string, got " .. type(text), 2)
  end
  local ok, v, after, cut = pcall(read_value, text, 1, 1)
  if not ok then
    if type(v) == "table" then return nil, "not JSON: " .. v.message end
    error(v, 0)
  end
  if v == CUT then return nil, "no complete value" end
  if not cut then
    local rest = skip_space(text, after)
    if rest <= #text then return nil, "not JSON: more after the value at byte " .. rest end
  end
  return v, not cut
end

return partial_json
