--- The Lua behind examples/openresty/nginx.conf: /chat asks Claude through
-- sturdy on the ngx transport (cosockets: a call never blocks the worker),
-- /stats shows what sturdy knows of each upstream across the workers.
-- luacheck: globals ngx
local anthropic = require "sturdy.anthropic"
local cjson = require "cjson.safe"

local M = {}

local claude -- one per worker, made by init

--- From init_worker_by_lua: the provider and its client for this worker.
-- opts (all optional): api_key (else ANTHROPIC_API_KEY), base_url (else
-- STURDY_BASE_URL, else Anthropic's), model, concurrency, headers.
function M.init(opts)
  opts = opts or {}
  claude = anthropic.new {
    api_key = opts.api_key or os.getenv("ANTHROPIC_API_KEY"),
    base_url = opts.base_url or os.getenv("STURDY_BASE_URL") or "https://api.anthropic.com",
    model = opts.model or "claude-sonnet-4-5",
    max_tokens_cap = 4096,
    client_options = {
      -- made in init_worker, a phase without cosockets: name the transport
      transport = "ngx",
      shared_dict = "sturdy",
      timeout = { connect = 5, first_byte = 60, idle = 30, total = 120 },
      retry = { attempts = 3 },
      -- per worker: how many calls may be in flight to one model, and wait
      limits = { concurrency = opts.concurrency or 256, queue = 4096 },
      headers = opts.headers,
    },
  }
end

local function reply(status, t)
  ngx.status = status
  ngx.header["content-type"] = "application/json"
  ngx.say(cjson.encode(t))
end

-- What the caller of /chat gets for each kind of failure.
local STATUS_OF = {
  rate_limited = 429, circuit_open = 503, overloaded = 503, queue_full = 503, budget_exhausted = 503,
  connect_timeout = 504, first_byte_timeout = 504, idle_timeout = 504, total_timeout = 504,
  bad_request = 400, too_large = 413,
}

--- /chat: the prompt is the body (or ?q=); the reply, or the error, as JSON.
function M.chat()
  local prompt = ngx.var.arg_q
  if not prompt then
    ngx.req.read_body()
    prompt = ngx.req.get_body_data()
  end
  if not prompt or prompt == "" then
    return reply(400, { error = "bad_request", message = "send a prompt: POST it, or GET /chat?q=..." })
  end
  local r, err = claude:messages { max_tokens = 256, messages = { { role = "user", content = prompt } } }
  if not r then
    -- the kind says what happened; the message never holds the key
    return reply(STATUS_OF[err.kind] or 502, { error = err.kind, message = tostring(err),
                                               retry_after = err.retry_after })
  end
  return reply(200, { text = r.text, model = r.model, usage = r.usage, cost = r.cost,
                      attempts = #r.attempts, request_id = r.request_id, latency = r.latency })
end

--- /stats: this worker's client, and per upstream key the breaker, limits and
-- budget every worker shares, with each worker's latency and counters.
function M.stats()
  local client = claude.client
  local out = { worker = ngx.worker.id(), client = client:stats(), upstreams = {} }
  for _, key in ipairs(out.client.keys) do out.upstreams[key] = client:stats(key) end
  return reply(200, out)
end

return M
