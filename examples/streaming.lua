-- A streamed answer, printed as it arrives, then the whole reply collected.
--   STURDY_MOCK_URL=http://127.0.0.1:PORT lua examples/streaming.lua
local anthropic = require "sturdy.anthropic"

local claude = anthropic.new {
  api_key = os.getenv("ANTHROPIC_API_KEY") or "sk-mock",
  base_url = os.getenv("STURDY_MOCK_URL"),   -- nil: the real API
  model = "claude-sonnet-4-5",
}

local events, stream = claude:stream { max_tokens = 128,
                                       messages = { { role = "user", content = "Tell me something sturdy" } } }
for ev in events do
  if ev.type == "content_block_delta" and ev.data.delta.text then
    io.write(ev.data.delta.text)
    io.flush()
  elseif ev.type == "error" then
    -- committed: part of the answer was already shown, so it was not retried
    io.stderr:write("\nstream failed: ", tostring(ev.error), "\n")
    os.exit(1)
  end
end
local reply = assert(stream:result())
print(("\nstop_reason: %s, %d tokens out, $%.6f"):format(reply.stop_reason, reply.usage.output, reply.cost or 0))
claude.client:close()
