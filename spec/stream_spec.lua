-- Streaming against the mock: events in order, the collected message equal to
-- the non-streamed one, error events inside 200 streams (retried before the
-- first delta, committed after), truncated streams; and the C SSE parser fed
-- the same stream split at every byte boundary.
local policy = require "sturdy.policy"
local anthropic = require "sturdy.anthropic"
local openai = require "sturdy.openai"
local mock = require "spec.support.mock"

local FAST = { overloaded = 0.01, transient = 0.01, throttled = 0.01 }

local function collect(iter)
  local types, events = {}, {}
  for ev in iter do
    types[#types + 1] = ev.type
    events[#events + 1] = ev
  end
  return types, events
end

describe("streaming", function()
  local m

  setup(function() m = assert(mock.start()) end)
  teardown(function() m:stop() end)
  before_each(function() m:reset() end)

  local function claude(steps)
    return anthropic.new { api_key = "sk-test", base_url = m.http_url, model = "claude-sonnet-4-5",
                           client_options = { retry = { base = FAST },
                                              headers = steps and { ["x-mock-steps"] = steps,
                                                                    ["x-mock-steps-sep"] = "|" } } }
  end

  local function gpt(steps)
    return openai.new { api_key = "sk-test", base_url = m.http_url, model = "gpt-4o-mini",
                        client_options = { retry = { base = FAST },
                                           headers = steps and { ["x-mock-steps"] = steps,
                                                                 ["x-mock-steps-sep"] = "|" } } }
  end

  local ASK = { max_tokens = 64, messages = { { role = "user", content = "tell me a streamed story" } } }

  describe("anthropic", function()
    it("yields the events in order and collects the same message as the non-streamed call", function()
      local c = claude()
      local iter, s = c:stream(ASK)
      local types = collect(iter)
      assert.equal("message_start", types[1])
      assert.equal("content_block_start", types[2])
      assert.equal("message_stop", types[#types])
      assert.equal("message_delta", types[#types - 1])
      local deltas = 0
      for _, t in ipairs(types) do if t == "content_block_delta" then deltas = deltas + 1 end end
      assert.is_true(deltas >= 2)
      local streamed = assert(s:result())
      local plain = assert(c:messages(ASK))
      assert.equal(plain.text, streamed.text)
      assert.equal(plain.stop_reason, streamed.stop_reason)
      assert.equal(plain.reply.role, streamed.reply.role)
      assert.equal(plain.reply.model, streamed.reply.model)
      assert.same(plain.reply.content, streamed.reply.content)
      assert.equal(plain.usage.output, streamed.usage.output)
      assert.equal(plain.usage.input, streamed.usage.input)
      assert.is_number(streamed.cost)
      c.client:close()
    end)

    it("retries an overloaded_error that comes before any delta, and succeeds", function()
      local c = claude("stream_error|200")
      local iter, s = c:stream(ASK)
      local types = collect(iter)
      assert.equal("message_start", types[1])
      assert.equal("message_stop", types[#types])
      for _, t in ipairs(types) do assert.are_not.equal("error", t) end
      local r = assert(s:result())
      assert.equal(2, #r.attempts)
      assert.equal("overloaded", r.attempts[1].kind)
      assert.equal(2, m:counters().requests)
      c.client:close()
    end)

    it("reports an overloaded_error after a delta as committed, without retrying", function()
      -- on_event hands each event over as it is parsed: the delta reaches the
      -- caller before the error event does, whatever the chunking
      local c = claude("stream_error;after_delta=1|200")
      local types, last = {}, nil
      local s = c:stream(ASK, { on_event = function(ev)
        types[#types + 1] = ev.type
        last = ev
      end })
      local _, err = s:result()
      assert.equal("error", types[#types])
      assert.equal(err, last.error)
      assert.is_true(#types >= 3) -- message_start, content_block_start, a delta, then the error
      assert.equal("overloaded", err.kind)
      assert.equal("overloaded_error", err.type)
      assert.is_true(err.committed)
      assert.equal(1, m:counters().requests)
      c.client:close()
    end)

    it("turns a stream cut before message_stop into an error", function()
      local c = claude("truncated")
      local iter = c:stream(ASK)
      local types, events = collect(iter)
      assert.equal("error", types[#types])
      assert.equal("stream_truncated", events[#events].error.kind)
      c.client:close()
    end)

    it("delivers events to on_event from poll, without blocking", function()
      local c = claude()
      local seen = {}
      local s = c:stream(ASK, { on_event = function(ev) seen[#seen + 1] = ev.type end })
      assert.equal(0, #seen)
      while c.client:poll(0.05) > 0 do end
      assert.equal("message_stop", seen[#seen])
      assert.matches("^Echo: ", assert(s:result()).text)
      c.client:close()
    end)

    it("refuses before sending when the input guard says so", function()
      local c = anthropic.new { api_key = "sk-test", base_url = m.http_url, model = "m", max_tokens_cap = 10 }
      local types, events = collect((c:stream(ASK)))
      assert.same({ "error" }, types)
      assert.equal("bad_request", events[1].error.kind)
      assert.equal(0, m:counters().requests)
      c.client:close()
    end)
  end)

  describe("openai", function()
    it("yields chunks ending with [DONE] and collects the same message as the non-streamed call", function()
      local g = gpt()
      local iter, s = g:stream { messages = ASK.messages }
      local types = collect(iter)
      assert.equal("done", types[#types])
      local streamed = assert(s:result())
      local plain = assert(g:chat { messages = ASK.messages })
      assert.equal(plain.text, streamed.text)
      assert.equal(plain.stop_reason, streamed.stop_reason)
      assert.equal(plain.usage.output, streamed.usage.output)
      assert.equal(plain.reply.choices[1].message.content, streamed.reply.choices[1].message.content)
      g.client:close()
    end)

    it("retries an error chunk before any content and succeeds", function()
      local g = gpt("stream_error|200")
      local r = assert(select(2, g:stream { messages = ASK.messages }):result())
      assert.equal(2, #r.attempts)
      assert.equal("server", r.attempts[1].kind)
      g.client:close()
    end)

    it("turns a stream without [DONE] into an error", function()
      local g = gpt("truncated")
      local _, err = select(2, g:stream { messages = ASK.messages }):result()
      assert.equal("stream_truncated", err.kind)
      g.client:close()
    end)
  end)
end)

describe("the SSE parser", function()
  local STREAMS = {
    anthropic = table.concat {
      "event: message_start\ndata: {\"type\":\"message_start\"}\n\n",
      ": a comment\n",
      "event: ping\ndata: {\"type\":\"ping\"}\n\n",
      "event: content_block_delta\ndata: {\"delta\":\"Hel\"}\n\n",
      "event: content_block_delta\ndata: {\"delta\":\"lo\"}\n\n",
      "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n",
    },
    crlf = "\239\187\191id: 7\r\nretry: 1500\r\ndata: line one\r\ndata: line two\r\n\r\nevent: x\rdata:tight\r\r",
    openai = "data: {\"a\":1}\n\ndata: {\"a\":2}\n\ndata: [DONE]\n\n",
  }

  local function parse(chunks)
    local p = policy.sse()
    local out = {}
    for _, chunk in ipairs(chunks) do
      for _, ev in ipairs(assert(p:feed(chunk))) do
        out[#out + 1] = ev.event .. "|" .. ev.data .. "|" .. (ev.id or "")
      end
    end
    return out, p:finish(), p:retry()
  end

  for name, text in pairs(STREAMS) do
    it("gives the same events for the " .. name .. " stream split at every byte boundary", function()
      local whole, truncated, retry = parse { text }
      assert.is_true(#whole >= 2)
      assert.is_false(truncated)
      for cut = 1, #text - 1 do
        local split = parse { text:sub(1, cut), text:sub(cut + 1) }
        assert.same(whole, split)
      end
      local bytes = {}
      for i = 1, #text do bytes[i] = text:sub(i, i) end
      local one, _, retry1 = parse(bytes)
      assert.same(whole, one)
      assert.equal(retry, retry1)
    end)
  end

  it("reads multi-line data, ids, retry and every line ending", function()
    local events, truncated, retry = parse { STREAMS.crlf }
    assert.same({ "message|line one\nline two|7", "x|tight|7" }, events)
    assert.is_false(truncated)
    assert.equal(1.5, retry)
  end)

  it("does not dispatch an event cut before its blank line, and says so", function()
    local events, truncated = parse { "data: whole\n\ndata: cut" }
    assert.same({ "message|whole|" }, events)
    assert.is_true(truncated)
  end)

  it("refuses an event larger than its limit", function()
    local p = policy.sse(64)
    local events, err = p:feed("data: " .. string.rep("x", 100))
    assert.is_nil(events)
    assert.matches("larger than the limit", err)
  end)
end)
