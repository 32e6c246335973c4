-- Providers on one client, each with its own base_url (fallback chains need
-- several): each request reaches its own provider's endpoint, checked with the
-- counters of two separate mock APIs, and is kept under the upstream key of
-- the host it went to, with its own API key.
local sturdy = require "sturdy"
local anthropic = require "sturdy.anthropic"
local openai = require "sturdy.openai"
local mock = require "spec.support.mock"

local ASK = { max_tokens = 32, messages = { { role = "user", content = "which endpoint?" } } }
local CLAUDE, GPT = "claude-sonnet-4-5", "gpt-4o-mini"

local function host(url)
  return url:match("^https?://([^/]+)")
end

describe("providers sharing a client", function()
  local a, b   -- two mock APIs on their own ports

  setup(function()
    a = assert(mock.start())
    b = assert(mock.start())
  end)
  teardown(function()
    a:stop()
    b:stop()
  end)
  before_each(function()
    a:reset()
    b:reset()
  end)

  it("send each request to its provider's base_url, under that host's upstream key", function()
    local client = sturdy.client { base_url = a.http_url, tls = { ca_file = b.ca_file } }
    local here = anthropic.new { client = client, api_key = "sk-here", model = CLAUDE }
    local there = anthropic.new { client = client, api_key = "sk-there", model = CLAUDE, base_url = b.http_url .. "/" }
    local gpt = openai.new { client = client, api_key = "sk-gpt", model = GPT, base_url = b.https_url }

    assert(here:messages(ASK))
    assert(there:messages(ASK))
    assert(select(2, there:stream(ASK)):result())
    assert(gpt:chat { messages = ASK.messages })

    local ca, cb = a:counters(), b:counters()
    assert.equal(1, ca.requests)
    assert.equal(1, ca.paths["/v1/messages"])
    assert.equal(3, cb.requests)
    assert.equal(2, cb.paths["/v1/messages"])
    assert.equal(1, cb.paths["/v1/chat/completions"])

    -- usage and learned limits live under the key of the host each call went to
    local key_a, key_b, key_gpt = host(a.http_url) .. "/" .. CLAUDE, host(b.http_url) .. "/" .. CLAUDE,
                                  host(b.https_url) .. "/" .. GPT
    assert.equal(1, client:stats(key_a).usage.calls)
    assert.equal(2, client:stats(key_b).usage.calls)
    assert.equal(1, client:stats(key_gpt).usage.calls)
    assert.equal(4000, client:stats(key_b).limits.requests.learned)
    assert.is_number(client:stats(key_gpt).limits.tokens.limit)
    local keys = {}
    for _, k in ipairs(client:stats().keys) do keys[k] = true end
    assert.same({ [key_a] = true, [key_b] = true, [key_gpt] = true }, keys)
    client:close()
  end)

  it("prepare requests with the provider's URL, key and API key, for batches across providers", function()
    local client = sturdy.client { base_url = a.http_url }
    local here = anthropic.new { client = client, api_key = "sk-here", model = CLAUDE }
    local there = anthropic.new { client = client, api_key = "sk-there", model = CLAUDE, base_url = b.http_url }
    local req_here, finish_here = assert(here:prepare(ASK))
    local req_there, finish_there = assert(there:prepare(ASK))
    assert.is_nil(req_here.url)
    assert.equal("/v1/messages", req_here.path)
    assert.equal(host(a.http_url) .. "/" .. CLAUDE, req_here.key)
    assert.equal(b.http_url .. "/v1/messages", req_there.url)
    assert.equal(host(b.http_url) .. "/" .. CLAUDE, req_there.key)
    assert.equal("sk-here", req_here.headers["x-api-key"])
    assert.equal("sk-there", req_there.headers["x-api-key"])
    -- a call's own key still wins
    assert.equal("mine", (there:prepare(ASK, { key = "mine" })).key)

    local results = client:batch { req_here, req_there, req_there }
    assert(finish_here(results[1]))
    assert(finish_there(results[2]))
    assert.equal(1, a:counters().requests)
    assert.equal(2, b:counters().requests)
    client:close()
  end)

  it("use the provider's own default URL when neither names one", function()
    local client = sturdy.client {}
    local claude = anthropic.new { client = client, api_key = "sk-x", model = CLAUDE }
    local gpt = openai.new { client = client, api_key = "sk-y", model = GPT }
    local req = assert(claude:prepare(ASK))
    assert.equal("https://api.anthropic.com/v1/messages", req.url)
    assert.equal("api.anthropic.com/" .. CLAUDE, req.key)
    req = assert(gpt:prepare { messages = ASK.messages })
    assert.equal("https://api.openai.com/v1/chat/completions", req.url)
    assert.equal("api.openai.com/" .. GPT, req.key)
    client:close()
  end)

  it("keep the client's own key derivation when the provider names the client's URL", function()
    local client = sturdy.client { base_url = a.http_url, key = "primary" }
    local claude = anthropic.new { client = client, api_key = "sk-x", model = CLAUDE, base_url = a.http_url }
    local req = assert(claude:prepare(ASK))
    assert.equal("/v1/messages", req.path)
    assert.equal("primary/" .. CLAUDE, req.key)
    client:close()
  end)

  it("refuses a base_url that is not an http(s) URL, naming the option", function()
    local client = sturdy.client {}
    for _, bad in ipairs { "api.anthropic.com", "ftp://x", "https://", "https://a b" } do
      assert.has_error(function()
        anthropic.new { client = client, api_key = "sk-x", model = CLAUDE, base_url = bad }
      end, ("sturdy: option 'base_url' in anthropic.new must start with http:// or https:// and name a host, got %q")
        :format(bad))
    end
    client:close()
  end)
end)
