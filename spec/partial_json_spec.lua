-- The partial JSON reader for tool inputs cut by max_tokens: the complete part,
-- as the official SDKs' partial mode gives it (the cases of jiter's own tests,
-- which the Python SDK uses), whole texts exactly as lua-cjson reads them, and
-- clear errors for text that is not the start of JSON.
local partial_json = require "sturdy.partial_json"
local cjson = require "cjson.safe"

local decode = partial_json.decode
local null = cjson.null

-- Equal values, with numbers of the same subtype where Lua has subtypes.
local function same_exactly(a, b)
  if type(a) ~= type(b) then return false end
  if type(a) == "table" then
    for k, v in pairs(a) do if not same_exactly(v, b[k]) then return false end end
    for k in pairs(b) do if a[k] == nil then return false end end
    return true
  end
  if type(a) == "number" and math.type and math.type(a) ~= math.type(b) then return false end
  return a == b or (a ~= a and b ~= b)
end

-- part holds nothing whole that is not in whole (a number cut at the end may
-- differ: "12" of "123").
local function within(part, whole)
  if type(part) == "table" then
    if type(whole) ~= "table" then return false end
    for k, v in pairs(part) do
      if not within(v, whole[k]) then return false end
    end
    return true
  end
  if type(part) == "number" then return type(whole) == "number" end
  return part == whole
end

describe("partial_json.decode", function()
  it("keeps the complete part of cut arrays, objects and nested values, as the SDKs do", function()
    local cases = {
      { '["string", true, null, 1, "foo', { "string", true, null, 1 } },
      { "[", {} },
      { '{"a": 1, "b": 2, "c', { a = 1, b = 2 } },
      { '{"a": 1, "b": 2, "c": "foo', { a = 1, b = 2 } },
      { '{"title": "Pride and Prejudice", "author": "Jane A', { title = "Pride and Prejudice" } },
      { '{"a": 1, "b": 2, "c": [1, 2, {"d": 1, ', { a = 1, b = 2, c = { 1, 2, { d = 1 } } } },
      { '{"a":', {} },
      { '{"a"', {} },
      { '{"a": tr', {} },
      { '{"a": [1, 2.', { a = { 1 } } },
      { '{"a": -', {} },
      { '{"a": 1e', {} },
      { '{"a": "x\\', {} },
      { '{"a": "\\u00', {} },
      { '{"k": "v", "e": "\\ud83d\\ude0', { k = "v" } },
      { '{"filename": "taxes.txt", "lines_of_text": [\n"# GUIDE",\n"",\n"## INTRODUCTION",\n"",\n"Filing taxes',
        { filename = "taxes.txt", lines_of_text = { "# GUIDE", "", "## INTRODUCTION", "" } } },
    }
    for _, case in ipairs(cases) do
      local v, whole = decode(case[1])
      assert.same(case[2], v)
      assert.is_false(whole)
    end
  end)

  it("keeps a number that reaches the end whole, as the SDKs do", function()
    assert.same({ a = 12 }, (decode('{"a": 12')))
    assert.same({ 1, 2 }, (decode("[1, 2")))
  end)

  it("decodes every prefix of a document to a part of it", function()
    local text = '{"id": "toolu_1", "tags": ["a", "b\\"c", "\\u00e9\\ud83d\\ude00"], "n": -12.5e1, '
      .. '"deep": {"x": [true, false, null, {"y": []}], "z": {}}, "last": "end"}'
    local whole = assert(cjson.decode(text))
    for cut = 1, #text - 1 do
      local v, complete = decode(text:sub(1, cut))
      assert(v ~= nil, "prefix " .. cut .. " gave nothing")
      assert.is_false(complete)
      assert(within(v, whole), "prefix " .. cut .. " is not a part of the document")
    end
    local v, complete = decode(text)
    assert.is_true(complete)
    assert.is_true(same_exactly(whole, v))
  end)

  it("reads whole texts exactly as lua-cjson does", function()
    local texts = {
      '{"a": [1, 2.5, -0, 1E3, 2e-2, 12345678901234567890], "b": null, "c": false}',
      '"\\"\\\\\\/\\b\\f\\n\\r\\t\\u0041\\u00e9\\u20ac\\ud83d\\ude00"',
      '[[], {}, [[[]]], {"": ""}]',
      '  {"dup": 1, "dup": 2}  ',
      '"a\\u0000b"',
      "-0",
      "true",
    }
    for _, text in ipairs(texts) do
      local want = cjson.decode(text)
      local v, complete = decode(text)
      assert.is_true(complete)
      assert(same_exactly(want, v), "differs from lua-cjson for " .. text)
    end
    if math.type then assert.equal("float", math.type((decode("12")))) end
    assert.equal(-math.huge, 1 / decode("-0"))   -- negative zero stays negative
  end)

  it("keeps raw control characters inside strings, as lua-cjson does", function()
    assert.equal("a\1b\127", (decode('"a\1b\127"')))
  end)

  it("says why a text is not the start of JSON, naming the byte", function()
    local cases = {
      ["[1,]"] = "byte 4", ["{,}"] = "expected a string key at byte 2", ['{"a" 1}'] = "expected ':' at byte 6",
      ["[1 2]"] = "expected ',' or ']' at byte 4", ['{"a": 1 "b"'] = "expected ',' or '}' at byte 9",
      ["[trx"] = "unexpected character at byte 2", ["[01]"] = "byte 3", ["[.5]"] = "byte 2",
      ['"\\q"'] = "bad escape at byte 2", ['"\\u12G4"'] = "bad \\u escape", ['"\\ude00"'] = "lone low surrogate",
      ['"\\ud83d\\u0041"'] = "without its low half", ['"\\ud83dx"'] = "without its low half",
      ["[1] x"] = "more after the value at byte 5", ["nan"] = "unexpected character at byte 1",
      ["{'a': 1}"] = "expected a string key",
    }
    for text, why in pairs(cases) do
      local v, err = decode(text)
      assert.is_nil(v)
      assert.matches("^not JSON: ", err)
      assert.matches(why, err, 1, true)
    end
  end)

  it("says so when nothing is complete yet", function()
    for _, text in ipairs { "", "   \n", '"abc', "-", "tru", "1.", '"\\ud83d' } do
      local v, err = decode(text)
      assert.is_nil(v)
      assert.equal("no complete value", err)
    end
  end)

  it("refuses nesting deeper than lua-cjson's limit without exhausting the stack", function()
    assert.is_table((decode(string.rep("[", 1000) .. string.rep("]", 1000))))
    local v, err = decode(string.rep("[", 1001))
    assert.is_nil(v)
    assert.matches("nested too deeply at byte 1001", err)
    v, err = decode(string.rep('{"a":', 100000))
    assert.is_nil(v)
    assert.matches("nested too deeply", err)
  end)

  it("reads a long cut input in one pass", function()
    local item = '"' .. string.rep("x", 64) .. '", '
    local text = '{"lines": [' .. string.rep(item, 20000) .. '"cut'
    local v = assert(decode(text))
    assert.equal(20000, #v.lines)
  end)

  it("raises for a non-string argument, naming it", function()
    assert.has_error(function() decode(42) end, "sturdy: partial_json.decode takes a string, got number")
    assert.has_error(function() decode(nil) end, "sturdy: partial_json.decode takes a string, got nil")
  end)
end)
