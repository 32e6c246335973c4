-- Request handling for the sturdy mock API. Runs inside nginx (ngx_http_lua,
-- worker_processes 1); sturdy.mock (init.lua beside it) writes the nginx.conf that loads it.
--
-- spec/support/README.md describes the endpoints, the fault steps and the
-- counters.
--
-- State lives in the lua_shared_dict "mock". With a single worker and no yield
-- between a read and the matching write, read-modify-write on it is atomic.
--
-- luacheck: globals ngx

local cjson = require "cjson.safe"

local floor, ceil, min, max = math.floor, math.ceil, math.min, math.max
local unpack = table.unpack or unpack

local M = {}

local DICT_NAME = "mock"
local DEFAULT_STALL_MS = 30000
local DEFAULT_HUGE_SIZE = 70 * 1024 * 1024
local DEFAULT_DRIP_PIECES = 5
local DEFAULT_BIG_HEAD = 1024 * 1024
local GARBAGE_REPLY = "HTTP/1.1 2OO OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}"
local HUGE_CHUNK = 64 * 1024

-- lua-cjson 2.1.0 encodes an empty table as {}; this sentinel becomes [].
local EMPTY_ARRAY = "@@mock_empty_array@@"

local settings = {}   -- from init(): owner_pid, owner_start, prefix

---------------------------------------------------------------------------
-- Small helpers

local function dict()
  return ngx.shared[DICT_NAME]
end

local function now()
  ngx.update_time()
  return ngx.now()
end

local function encode(value)
  local s = assert(cjson.encode(value))
  return (s:gsub('"' .. EMPTY_ARRAY .. '"', "[]"))
end

local function trim(s)
  return (s:gsub("^%s+", ""):gsub("%s+$", ""))
end

-- Plain (non-pattern) split; keeps empty fields.
local function split(s, sep)
  local out, pos = {}, 1
  while true do
    local i, j = s:find(sep, pos, true)
    if not i then
      out[#out + 1] = s:sub(pos)
      return out
    end
    out[#out + 1] = s:sub(pos, i - 1)
    pos = j + 1
  end
end

local ID_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"

local function random_id(n)
  local t = {}
  for i = 1, n do
    local k = math.random(1, #ID_CHARS)
    t[i] = ID_CHARS:sub(k, k)
  end
  return table.concat(t)
end

local function rfc3339(epoch)
  return os.date("!%Y-%m-%dT%H:%M:%SZ", ceil(epoch))
end

-- "%.3f" without trailing zeros: 1.500 -> "1.5", 2.000 -> "2".
local function short_number(x)
  local s = string.format("%.3f", x):gsub("0+$", ""):gsub("%.$", "")
  return s
end

-- Go's time.Duration.String() as used by OpenAI's x-ratelimit-reset-*:
-- "6m0s", "1s", "12ms", "1.5s", "1h2m3s".
-- Below 1 ms this gives "0.4ms" where Go says "400µs": ASCII only, and
-- time.ParseDuration reads both.
local function go_duration(seconds)
  local us = floor(seconds * 1e6 + 0.5)
  if us <= 0 then
    return "0s"
  elseif us < 1e6 then
    return short_number(us / 1000) .. "ms"
  end
  seconds = floor(seconds * 1000 + 0.5) / 1000
  local h = floor(seconds / 3600)
  local m = floor((seconds - h * 3600) / 60)
  local s = short_number(seconds - h * 3600 - m * 60)
  if h > 0 then
    return h .. "h" .. m .. "m" .. s .. "s"
  elseif m > 0 then
    return m .. "m" .. s .. "s"
  end
  return s .. "s"
end

-- Cut text into at most n non-empty pieces of similar length.
local function pieces(text, n)
  local out = {}
  if #text == 0 then
    return { "" }
  end
  n = max(1, min(n, #text))
  local size = ceil(#text / n)
  for i = 1, #text, size do
    out[#out + 1] = text:sub(i, i + size - 1)
  end
  return out
end

local function read_body()
  local body = ngx.req.get_body_data()
  if body then
    return body
  end
  -- Bodies above client_body_buffer_size are spooled to a file.
  local path = ngx.req.get_body_file()
  if path then
    local f = io.open(path, "rb")
    if f then
      body = f:read("*a")
      f:close()
      return body
    end
  end
  return ""
end

---------------------------------------------------------------------------
-- Providers: error shapes

local ANTHROPIC_ERRORS = {
  [400] = { "invalid_request_error", "Invalid request" },
  [401] = { "authentication_error", "invalid x-api-key" },
  [402] = { "billing_error", "Your credit balance is too low" },
  [403] = { "permission_error", "Your API key does not have permission to use the specified resource." },
  [404] = { "not_found_error", "Not found" },
  [408] = { "timeout_error", "Request timed out" },
  [413] = { "request_too_large", "Request exceeds the maximum allowed number of bytes." },
  [429] = { "rate_limit_error", "Number of requests has exceeded your rate limit. Please try again later." },
  [500] = { "api_error", "Internal server error" },
  [503] = { "overloaded_error", "Overloaded" },
  [504] = { "timeout_error", "Request timed out" },
  [529] = { "overloaded_error", "Overloaded" },
}

local OPENAI_ERRORS = {
  [400] = { "invalid_request_error", "invalid_request", "Invalid request." },
  [401] = { "invalid_request_error", "invalid_api_key", "Incorrect API key provided." },
  [403] = { "invalid_request_error", "unsupported_country_region_territory",
            "Country, region, or territory not supported" },
  [404] = { "invalid_request_error", "model_not_found",
            "The model does not exist or you do not have access to it." },
  [409] = { "invalid_request_error", "conflict", "Conflict." },
  [413] = { "invalid_request_error", "request_too_large", "Request too large." },
  [429] = { "requests", "rate_limit_exceeded", "Rate limit reached for requests. Please try again later." },
  [500] = { "server_error", "server_error",
            "The server had an error while processing your request. Sorry about that!" },
  [502] = { "server_error", "bad_gateway", "Bad gateway." },
  [503] = { "server_error", "overloaded", "The engine is currently overloaded, please try again later" },
  [529] = { "server_error", "overloaded", "The engine is currently overloaded, please try again later" },
}

local function anthropic_error(status, request_id, message)
  local e = ANTHROPIC_ERRORS[status]
    or (status >= 500 and { "api_error", "Internal server error" })
    or { "invalid_request_error", "Invalid request" }
  return encode({
    type = "error",
    error = { type = e[1], message = message or e[2] },
    request_id = request_id,
  })
end

local function openai_error(status, message, code)
  local e = OPENAI_ERRORS[status]
    or (status >= 500 and { "server_error", "server_error", "The server had an error." })
    or { "invalid_request_error", "invalid_request", "Invalid request." }
  return encode({
    error = { message = message or e[3], type = e[1], param = cjson.null, code = code or e[2] },
  })
end

-- The providers' own words for a prompt above the model's context window.
local CONTEXT_ERRORS = {
  anthropic = { message = "prompt is too long: 210345 tokens > 200000 maximum" },
  openai = { message = "This model's maximum context length is 128000 tokens. However, your messages resulted "
                       .. "in 130412 tokens. Please reduce the length of the messages.",
             code = "context_length_exceeded" },
}

local function provider_for(uri)
  if uri:find("/chat/completions$") then
    return "openai"
  elseif uri:find("/v1/messages$") then
    return "anthropic"
  end
  return "generic"   -- echo-like replies, Anthropic-shaped errors
end

---------------------------------------------------------------------------
-- Rate limiter: a continuously refilling token bucket over /v1/* requests.
-- The configuration is stored as JSON under "rl" ({ rpm, burst, tokens, last });
-- each model's bucket under "rl:<configuration time>:<model>".

local function limiter_get()
  local raw = dict():get("rl")
  return raw and cjson.decode(raw) or nil
end

local function limiter_refill(rl, t)
  local rate = rl.rpm / 60
  rl.tokens = min(rl.burst, rl.tokens + (t - rl.last) * rate)
  rl.last = t
  return rate
end

-- Returns allowed, view where view = { limit, remaining, reset (s until full),
-- retry_after (s until one token, only when refused) }; nil view when off.
-- One bucket per API key and model named in the request, as providers limit
-- per organisation and model; each starts full under the configuration in force.
local function limiter_take(t, model, api_key)
  local cfg = limiter_get()
  if not cfg then
    return true, nil
  end
  local key = "rl:" .. tostring(cfg.last) .. ":" .. ngx.md5(api_key or "") .. ":" .. (model or "")
  local raw = dict():get(key)
  local rl = raw and cjson.decode(raw) or { rpm = cfg.rpm, burst = cfg.burst, tokens = cfg.burst, last = t }
  local rate = limiter_refill(rl, t)
  local allowed = rl.tokens >= 1
  if allowed then
    rl.tokens = rl.tokens - 1
  end
  dict():set(key, encode(rl))
  local view = {
    limit = rl.rpm,
    remaining = floor(rl.tokens),
    reset = (rl.burst - rl.tokens) / rate,
  }
  if not allowed then
    view.retry_after = max(1, ceil((1 - rl.tokens) / rate))
  end
  return allowed, view
end

local function set_ratelimit_headers(provider, view, t, usage, step)
  if step and step.params.limits == 0 then return end -- the step asked for none
  local h = ngx.header
  local input = usage and usage.input or 0
  local output = usage and usage.output or 0
  if provider == "anthropic" or provider == "generic" then
    local req_limit = view and view.limit or 4000
    local req_remaining = view and view.remaining or 3999
    local req_reset = view and view.reset or 0.015
    h["anthropic-ratelimit-requests-limit"] = req_limit
    h["anthropic-ratelimit-requests-remaining"] = req_remaining
    h["anthropic-ratelimit-requests-reset"] = rfc3339(t + req_reset)
    h["anthropic-ratelimit-input-tokens-limit"] = 2000000
    h["anthropic-ratelimit-input-tokens-remaining"] = 2000000 - input
    h["anthropic-ratelimit-input-tokens-reset"] = rfc3339(t + 1)
    h["anthropic-ratelimit-output-tokens-limit"] = 400000
    h["anthropic-ratelimit-output-tokens-remaining"] = 400000 - output
    h["anthropic-ratelimit-output-tokens-reset"] = rfc3339(t + 1)
    h["anthropic-ratelimit-tokens-limit"] = 2400000
    h["anthropic-ratelimit-tokens-remaining"] = 2400000 - input - output
    h["anthropic-ratelimit-tokens-reset"] = rfc3339(t + 1)
  else
    h["x-ratelimit-limit-requests"] = view and view.limit or 10000
    h["x-ratelimit-remaining-requests"] = view and view.remaining or 9999
    h["x-ratelimit-reset-requests"] = go_duration(view and view.reset or 0.006)
    h["x-ratelimit-limit-tokens"] = 30000000
    h["x-ratelimit-remaining-tokens"] = 30000000 - input - output
    h["x-ratelimit-reset-tokens"] = go_duration(0.002)
  end
end

---------------------------------------------------------------------------
-- Capacity: an upstream with a knee and a cliff (off until configured), for
-- /v1/* requests. Stored as JSON under "cap" ({ knee, cliff, work, power }); the
-- calls in service are counted under "cap:in". A call that would make more than
-- `cliff` in service is answered 529 after 5 ms. The others are served by
-- processor sharing: each needs `work` ms of service, and with n in service
-- each gets (knee / n)^power of full speed when n > knee (full speed up to it),
-- re-read every tick of 5 ms; then the step's reply goes out.

local CAPACITY_TICK = 5

local function capacity_get()
  local raw = dict():get("cap")
  return raw and cjson.decode(raw) or nil
end

-- Takes the call into service, or turns it away (false: the caller answers
-- 529). No yield here, so the count is exact with one worker.
local function capacity_admit(cap)
  local d = dict()
  local n = d:incr("cap:in", 1, 0)
  if n > cap.cliff then
    d:incr("cap:in", -1, 0)
    d:incr("cap:rejected", 1, 0)
    return false
  end
  if n > (d:get("cap:max_in") or 0) then d:set("cap:max_in", n) end
  return true
end

-- The call's work, at the speed the calls in service leave it.
local function capacity_work(cap)
  local d = dict()
  local left = cap.work
  while left > 0 do
    local n = max(1, d:get("cap:in") or 1)
    local rate = n <= cap.knee and 1 or (cap.knee / n) ^ cap.power
    -- a tick, or the time the rest takes at this rate; at least a millisecond
    local tick = max(1, min(CAPACITY_TICK, left / rate))
    ngx.sleep(tick / 1000)
    left = left - tick * rate
  end
  d:incr("cap:in", -1, 0)
  d:incr("cap:served", 1, 0)
end

---------------------------------------------------------------------------
-- Counters

local function count_request(uri)
  local d = dict()
  d:incr("requests", 1, 0)
  d:incr("path:" .. uri, 1, 0)
  -- Distinct connection serials, so HTTP/2 streams and keep-alive reuse
  -- count once per TCP connection.
  if d:add("conn:" .. ngx.var.connection, true) then
    d:incr("connections", 1, 0)
  end
end

-- Returns the 1-based position of this request in the scenario.
local function scenario_next(id)
  local raw = dict():get("sc:" .. id)
  local sc = raw and cjson.decode(raw) or { count = 0, times = {}, statuses = {}, steps = {} }
  return sc.count + 1, sc
end

-- The lists keep the first SCENARIO_LIST_MAX requests, so a long benchmark
-- run in one scenario costs each request the same; count stays exact.
local SCENARIO_LIST_MAX = 256

local function scenario_record(id, sc, t, step_text, status)
  sc.count = sc.count + 1
  if #sc.times >= SCENARIO_LIST_MAX then
    dict():set("sc:" .. id, encode(sc))
    return
  end
  sc.times[#sc.times + 1] = t
  sc.statuses[#sc.statuses + 1] = status
  sc.steps[#sc.steps + 1] = step_text
  dict():set("sc:" .. id, encode(sc))
end

local function counters()
  local d = dict()
  local out = {
    requests = d:get("requests") or 0,
    connections = d:get("connections") or 0,
    rate_limited = d:get("rate_limited") or 0,
    slow = d:get("slow") or 0,
    capacity = { served = d:get("cap:served") or 0, rejected = d:get("cap:rejected") or 0,
                 in_service = d:get("cap:in") or 0, max_in_service = d:get("cap:max_in") or 0 },
    scenarios = {},
    paths = {},
  }
  for _, key in ipairs(d:get_keys(0)) do
    local id = key:match("^sc:(.*)$")
    if id then
      out.scenarios[id] = cjson.decode(d:get(key))
    end
    local path = key:match("^path:(.*)$")
    if path then
      out.paths[path] = d:get(key)
    end
  end
  return out
end

---------------------------------------------------------------------------
-- Step language: "WHAT;param=value;..." separated by "," (or x-mock-steps-sep).

local KEYWORDS = {
  drop = true, drop_mid = true, stall_mid = true, malformed = true, html = true, context = true, refusal = true,
  huge = true, truncated = true, stream_error = true, replay = true, garbage = true, big_head = true,
  shape = true,
}

local NUMERIC_PARAMS = {
  delay = true, ["retry-after-ms"] = true, drip = true, stall = true, size = true,
  pieces = true, chunked = true, after_delta = true, status = true, line = true, slow = true, slow_share = true,
  limits = true, linger = true,
}

local TEXT_PARAMS = { ["retry-after"] = true, ["should-retry"] = true, file = true, code = true, json = true,
                      echo = true }

local function parse_step(text)
  local parts = split(text, ";")
  local what = trim(parts[1]):lower()
  local step = { text = text, params = {} }
  if what:match("^%d%d%d$") then
    step.status = tonumber(what)
  elseif KEYWORDS[what] then
    step.keyword = what
  else
    return nil, "unknown step '" .. what .. "'"
  end
  for i = 2, #parts do
    local k, v = parts[i]:match("^%s*([^=]-)%s*=%s*(.-)%s*$")
    if not k then
      k, v = trim(parts[i]), "1"
    end
    k = k:lower()
    if NUMERIC_PARAMS[k] then
      local n = tonumber(v)
      if not n or n < 0 then
        return nil, "step param '" .. k .. "' needs a number, got '" .. v .. "'"
      end
      step.params[k] = n
    elseif TEXT_PARAMS[k] then
      step.params[k] = v
    elseif k ~= "" then
      return nil, "unknown step param '" .. k .. "'"
    end
  end
  if step.params.slow_share and step.params.slow_share > 1 then
    return nil, "step param 'slow_share' is a share from 0 to 1, got '" .. step.params.slow_share .. "'"
  end
  if step.keyword == "replay" then
    local file = step.params.file
    -- a bare name inside the fixtures directory, never a path
    if not (file and file:match("^[%w][%w_.-]*$")) or file:find("..", 1, true) then
      return nil, "step 'replay' needs file=NAME, a file name in spec/fixtures/streams"
    end
  end
  return step
end

local function parse_steps(spec, sep)
  local steps = {}
  for _, raw in ipairs(split(spec, sep)) do
    raw = trim(raw)
    if raw ~= "" then
      local step, err = parse_step(raw)
      if not step then
        return nil, err
      end
      steps[#steps + 1] = step
    end
  end
  if #steps == 0 then
    return nil, "empty x-mock-steps"
  end
  return steps
end

local function header_value(headers, name)
  local v = headers[name]
  if type(v) == "table" then
    v = table.concat(v, ",")
  end
  return v
end

---------------------------------------------------------------------------
-- Reply bodies

local function content_text(content)
  if type(content) == "string" then
    return content
  elseif type(content) == "table" then
    local t = {}
    for _, part in ipairs(content) do
      if type(part) == "table" and type(part.text) == "string" then
        t[#t + 1] = part.text
      end
    end
    return table.concat(t, " ")
  end
  return ""
end

-- Reply text and a rough token count (chars / 4) of the prompt.
local function digest_prompt(req)
  local chars, last = 0, ""
  if type(req.system) == "string" then
    chars = chars + #req.system
  end
  if type(req.messages) == "table" then
    for _, msg in ipairs(req.messages) do
      if type(msg) == "table" then
        local text = content_text(msg.content)
        chars = chars + #text
        if msg.role == "user" then
          last = text
        end
      end
    end
  end
  local reply = "Echo: " .. last
  return reply, max(1, ceil(chars / 4)), max(1, ceil(#reply / 4))
end

local function anthropic_bodies(req, request_id)
  local text, input_tokens, output_tokens = digest_prompt(req)
  local id = "msg_" .. random_id(24)
  local model = type(req.model) == "string" and req.model or "claude-mock"
  local usage = {
    input_tokens = input_tokens, output_tokens = output_tokens,
    cache_creation_input_tokens = 0, cache_read_input_tokens = 0,
  }
  local r = { usage = { input = input_tokens, output = output_tokens }, request_id = request_id }

  r.json = encode({
    id = id, type = "message", role = "assistant", model = model,
    content = { { type = "text", text = text } },
    stop_reason = "end_turn", stop_sequence = cjson.null, usage = usage,
  })
  -- declined by the safety classifiers: no content, stop_reason "refusal"
  r.refusal_json = encode({
    id = id, type = "message", role = "assistant", model = model, content = EMPTY_ARRAY,
    stop_reason = "refusal", stop_sequence = cjson.null, usage = usage,
  })

  local function ev(name, data)
    return "event: " .. name .. "\ndata: " .. encode(data) .. "\n\n"
  end
  local start_usage = {
    input_tokens = input_tokens, output_tokens = 1,
    cache_creation_input_tokens = 0, cache_read_input_tokens = 0,
  }
  local head = {
    ev("message_start", { type = "message_start", message = {
      id = id, type = "message", role = "assistant", model = model, content = EMPTY_ARRAY,
      stop_reason = cjson.null, stop_sequence = cjson.null, usage = start_usage } }),
    ev("content_block_start", { type = "content_block_start", index = 0,
                                content_block = { type = "text", text = "" } }),
    ev("ping", { type = "ping" }),
  }
  local deltas = {}
  for _, piece in ipairs(pieces(text, 4)) do
    deltas[#deltas + 1] = ev("content_block_delta", { type = "content_block_delta", index = 0,
                                                      delta = { type = "text_delta", text = piece } })
  end
  local tail = {
    ev("content_block_stop", { type = "content_block_stop", index = 0 }),
    ev("message_delta", { type = "message_delta",
                          delta = { stop_reason = "end_turn", stop_sequence = cjson.null },
                          usage = { output_tokens = output_tokens } }),
  }
  r.stream = { head = head, deltas = deltas, tail = tail,
               terminal = { ev("message_stop", { type = "message_stop" }) } }
  r.stream_error = ev("error", { type = "error",
                                 error = { type = "overloaded_error", message = "Overloaded" } })
  return r
end

local function openai_bodies(req, request_id)
  local text, prompt_tokens, completion_tokens = digest_prompt(req)
  local id = "chatcmpl-" .. random_id(29)
  local model = type(req.model) == "string" and req.model or "gpt-mock"
  local created = floor(ngx.time())
  local usage = {
    prompt_tokens = prompt_tokens, completion_tokens = completion_tokens,
    total_tokens = prompt_tokens + completion_tokens,
    prompt_tokens_details = { cached_tokens = 0, audio_tokens = 0 },
    completion_tokens_details = { reasoning_tokens = 0, audio_tokens = 0,
                                  accepted_prediction_tokens = 0, rejected_prediction_tokens = 0 },
  }
  local r = { usage = { input = prompt_tokens, output = completion_tokens }, request_id = request_id }

  r.json = encode({
    id = id, object = "chat.completion", created = created, model = model,
    choices = { { index = 0, message = { role = "assistant", content = text, refusal = cjson.null },
                  logprobs = cjson.null, finish_reason = "stop" } },
    usage = usage, service_tier = "default", system_fingerprint = "fp_mock",
  })
  -- held back by the content filter: no content, finish_reason "content_filter"
  r.refusal_json = encode({
    id = id, object = "chat.completion", created = created, model = model,
    choices = { { index = 0, message = { role = "assistant", content = cjson.null, refusal = cjson.null },
                  logprobs = cjson.null, finish_reason = "content_filter" } },
    usage = usage, service_tier = "default", system_fingerprint = "fp_mock",
  })

  local include_usage = type(req.stream_options) == "table" and req.stream_options.include_usage == true
  local function chunk(delta, finish)
    local c = {
      id = id, object = "chat.completion.chunk", created = created, model = model,
      system_fingerprint = "fp_mock", service_tier = "default",
      choices = { { index = 0, delta = delta, logprobs = cjson.null, finish_reason = finish or cjson.null } },
    }
    if include_usage then
      c.usage = cjson.null
    end
    return "data: " .. encode(c) .. "\n\n"
  end
  local head = { chunk({ role = "assistant", content = "", refusal = cjson.null }) }
  local deltas = {}
  for _, piece in ipairs(pieces(text, 4)) do
    deltas[#deltas + 1] = chunk({ content = piece })
  end
  -- The finishing chunk has an empty delta object, as in the real API.
  local tail = { chunk({}, "stop") }
  if include_usage then
    tail[#tail + 1] = "data: " .. encode({
      id = id, object = "chat.completion.chunk", created = created, model = model,
      system_fingerprint = "fp_mock", service_tier = "default", choices = EMPTY_ARRAY, usage = usage,
    }) .. "\n\n"
  end
  r.stream = { head = head, deltas = deltas, tail = tail, terminal = { "data: [DONE]\n\n" } }
  r.stream_error = "data: " .. encode({ error = {
    message = "The server had an error while processing your request. Sorry about that!",
    type = "server_error", param = cjson.null, code = cjson.null } }) .. "\n\n"
  return r
end

local function echo_body(body)
  return encode({
    method = ngx.req.get_method(),
    uri = ngx.var.request_uri,
    request_line = ngx.var.request,
    headers = ngx.req.get_headers(0),
    body = body,
    connection = tonumber(ngx.var.connection),
    connection_requests = tonumber(ngx.var.connection_requests),
    http_version = ngx.req.http_version(),
    scheme = ngx.var.scheme,
    host = ngx.var.host,
  })
end

---------------------------------------------------------------------------
-- Sending

local function sleep_ms(ms)
  if ms and ms > 0 then
    ngx.sleep(ms / 1000)
  end
end

-- Stream parts in order, each flushed; drip sleeps before each part.
local function send_parts(parts, drip)
  for _, part in ipairs(parts) do
    sleep_ms(drip)
    ngx.print(part)
    local ok = ngx.flush(true)
    if not ok then
      return ngx.exit(ngx.OK)   -- client went away
    end
  end
end

local function flush_headers()
  ngx.send_headers()
  ngx.flush(true)
end

-- Close the connection now. After headers went out, nginx sees 444 as
-- "terminate": no final chunk, no padding to the content-length.
local function abort()
  return ngx.exit(444)
end

local function concat_lists(...)
  local out = {}
  for i = 1, select("#", ...) do
    for _, v in ipairs((select(i, ...))) do
      out[#out + 1] = v
    end
  end
  return out
end

local function send_step_headers(step)
  local p = step.params
  if p["retry-after"] then
    ngx.header["retry-after"] = p["retry-after"]
  end
  if p["retry-after-ms"] then
    ngx.header["retry-after-ms"] = p["retry-after-ms"]
  end
  if p["should-retry"] then
    ngx.header["x-should-retry"] = p["should-retry"]
  end
end

local function reply_json(status, body, step)
  local p = step.params
  ngx.status = status
  ngx.header["content-type"] = "application/json"
  ngx.header["content-length"] = #body
  local kw = step.keyword
  if kw == "drop_mid" or kw == "stall_mid" then
    local half = floor(#body / 2)
    flush_headers()
    send_parts({ body:sub(1, half) })
    if kw == "drop_mid" then
      return abort()
    end
    sleep_ms(p.stall or DEFAULT_STALL_MS)
    send_parts({ body:sub(half + 1) })
    return ngx.exit(ngx.OK)
  end
  if p.drip then
    flush_headers()
    send_parts(pieces(body, p.pieces or DEFAULT_DRIP_PIECES), p.drip)
    return ngx.exit(ngx.OK)
  end
  ngx.print(body)
  return ngx.exit(ngx.OK)
end

local function reply_stream(bodies, step)
  local p, s = step.params, bodies.stream
  ngx.status = 200
  ngx.header["content-type"] = "text/event-stream"
  ngx.header["cache-control"] = "no-cache"
  flush_headers()
  local kw = step.keyword
  if kw == "drop_mid" or kw == "stall_mid" then
    local first = { s.deltas[1] }
    send_parts(concat_lists(s.head, first), p.drip)
    if kw == "drop_mid" then
      return abort()
    end
    sleep_ms(p.stall or DEFAULT_STALL_MS)
    local rest = { unpack(s.deltas, 2) }
    send_parts(concat_lists(rest, s.tail, s.terminal), p.drip)
  elseif kw == "truncated" then
    send_parts(concat_lists(s.head, s.deltas, s.tail), p.drip)
  elseif kw == "stream_error" then
    local before = { s.head[1] }
    if p.after_delta and p.after_delta > 0 then
      before = concat_lists(s.head, { s.deltas[1] })
    end
    send_parts(concat_lists(before, { bodies.stream_error }), p.drip)
  else
    send_parts(concat_lists(s.head, s.deltas, s.tail, s.terminal), p.drip)
  end
  sleep_ms(p.linger)
  return ngx.exit(ngx.OK)
end

local HTML_PAGE = [[
<html>
<head><title>%d %s</title></head>
<body>
<center><h1>%d %s</h1></center>
<hr><center>nginx</center>
</body>
</html>
]]

local HTML_REASONS = { [500] = "Internal Server Error", [502] = "Bad Gateway",
                       [503] = "Service Temporarily Unavailable", [504] = "Gateway Time-out" }

local function reply_html(step)
  local status = step.params.status or 502
  local reason = HTML_REASONS[status] or "Error"
  local body = string.format(HTML_PAGE, status, reason, status, reason)
  ngx.status = status
  ngx.header["content-type"] = "text/html"
  ngx.header["content-length"] = #body
  ngx.print(body)
  return ngx.exit(ngx.OK)
end

-- A JSON object of exactly `size` bytes (when size allows), streamed in
-- chunks so a 70 MiB body never sits in memory.
local function reply_huge(step)
  local p = step.params
  local size = floor(p.size or DEFAULT_HUGE_SIZE)
  local prefix, suffix = '{"type":"padding","data":"', '"}'
  if size < #prefix + #suffix then
    prefix, suffix = "", ""
  end
  ngx.status = 200
  ngx.header["content-type"] = "application/json"
  if not (p.chunked and p.chunked > 0) then
    ngx.header["content-length"] = size
  end
  flush_headers()
  local filler = string.rep("x", HUGE_CHUNK)
  send_parts({ prefix }, p.drip)
  local left = size - #prefix - #suffix
  while left > 0 do
    local n = min(left, HUGE_CHUNK)
    send_parts({ n == HUGE_CHUNK and filler or filler:sub(1, n) }, p.drip)
    left = left - n
  end
  send_parts({ suffix }, p.drip)
  return ngx.exit(ngx.OK)
end

-- A 400 in the provider's words for a prompt above the context window.
local function reply_context_error(provider, request_id)
  local e = CONTEXT_ERRORS[provider] or CONTEXT_ERRORS.anthropic
  local body = provider == "openai" and openai_error(400, e.message, e.code)
    or anthropic_error(400, request_id, e.message)
  ngx.status = 400
  ngx.header["content-type"] = "application/json"
  ngx.header["content-length"] = #body
  ngx.print(body)
  return ngx.exit(ngx.OK)
end

-- Raw bytes on the connection itself (HTTP/1.x only), past nginx's own
-- response writer, so the reply can break HTTP.
local function reply_raw(parts)
  local sock, err = ngx.req.socket(true)
  if not sock then
    ngx.log(ngx.ERR, "mock: no raw socket (HTTP/2?): ", err)
    return abort()
  end
  for _, part in ipairs(parts) do
    if not sock:send(part) then break end   -- client went away
  end
  return ngx.exit(ngx.OK)
end

-- A 200 whose head (status line and header lines) is about `size` bytes:
-- x-pad-N header lines of 1 KiB (line=1: one x-pad line of `size` bytes),
-- then a 2-byte JSON body.
local function reply_big_head(step)
  local size = floor(step.params.size or DEFAULT_BIG_HEAD)
  local parts = { "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n" }
  if step.params.line and step.params.line > 0 then
    parts[2] = "x-pad: " .. string.rep("a", size) .. "\r\ncontent-length: 2\r\n\r\n{}"
    return reply_raw(parts)
  end
  local used, n, batch = #parts[1], 0, {}
  local pad = string.rep("a", 1000)
  while used < size do
    n = n + 1
    local line = string.format("x-pad-%d: %s\r\n", n, pad)
    batch[#batch + 1] = line
    used = used + #line
    if #batch == 64 then
      parts[#parts + 1] = table.concat(batch)
      batch = {}
    end
  end
  parts[#parts + 1] = table.concat(batch) .. "content-length: 2\r\n\r\n{}"
  return reply_raw(parts)
end

local function reply_error(provider, status, request_id, message, echo)
  if echo then
    -- a server that echoes the request's headers in its error message
    message = "request rejected; received headers: " .. encode(ngx.req.get_headers(0))
  end
  local body
  if provider == "openai" then
    body = openai_error(status, message)
  else
    body = anthropic_error(status, request_id, message)
  end
  ngx.status = status
  ngx.header["content-type"] = "application/json"
  ngx.header["content-length"] = #body
  ngx.print(body)
  return ngx.exit(ngx.OK)
end

-- A recorded stream from spec/fixtures/streams, byte for byte; with drip=MS
-- in `pieces` parts (default 5) cut at byte offsets, sleeping MS before each.
local function reply_replay(step, provider, request_id)
  local p = step.params
  local f = io.open((settings.fixtures or "") .. "/" .. p.file, "rb")
  if not f then
    return reply_error(provider, 400, request_id, "mock: no stream fixture '" .. p.file .. "'")
  end
  local body = f:read("*a")
  f:close()
  ngx.status = 200
  ngx.header["content-type"] = "text/event-stream"
  ngx.header["cache-control"] = "no-cache"
  if p.drip then
    flush_headers()
    send_parts(pieces(body, p.pieces or DEFAULT_DRIP_PIECES), p.drip)
  else
    ngx.print(body)
  end
  return ngx.exit(ngx.OK)
end

-- Status line code this step will produce (0: closed without a reply).
local function step_status(step)
  if step.status then
    return step.status
  elseif step.keyword == "drop" or step.keyword == "garbage" then
    return 0
  elseif step.keyword == "html" then
    return step.params.status or 502
  end
  return 200
end

---------------------------------------------------------------------------
-- Control endpoints: /_mock/counters, /_mock/reset, /_mock/config

local function reply_control(status, value)
  local body = encode(value)
  ngx.status = status
  ngx.header["content-type"] = "application/json"
  ngx.header["content-length"] = #body
  ngx.print(body)
  return ngx.exit(ngx.OK)
end

local function apply_config(cfg)
  if type(cfg) ~= "table" then
    return nil, "config must be a JSON object"
  end
  for k in pairs(cfg) do
    if k ~= "rate_limit" and k ~= "capacity" then
      return nil, "unknown config key '" .. tostring(k) .. "'"
    end
  end
  local cap = cfg.capacity
  if cap == false or cap == cjson.null then
    dict():delete("cap")
  elseif type(cap) == "table" then
    for k in pairs(cap) do
      if k ~= "knee" and k ~= "cliff" and k ~= "work" and k ~= "power" then
        return nil, "unknown capacity key '" .. tostring(k) .. "'"
      end
    end
    local knee, cliff, work, power = tonumber(cap.knee), tonumber(cap.cliff), tonumber(cap.work),
      tonumber(cap.power or 1)
    if not (knee and knee >= 1 and cliff and cliff >= knee and work and work > 0 and power and power > 0) then
      return nil, "capacity needs knee >= 1, cliff >= knee, work > 0 (ms), power > 0"
    end
    dict():set("cap", encode({ knee = knee, cliff = cliff, work = work, power = power }))
  elseif cap ~= nil then
    return nil, "capacity must be an object or false"
  end
  local rl = cfg.rate_limit
  if rl == false or rl == cjson.null then
    dict():delete("rl")
  elseif type(rl) == "table" then
    for k in pairs(rl) do
      if k ~= "rpm" and k ~= "burst" then
        return nil, "unknown rate_limit key '" .. tostring(k) .. "'"
      end
    end
    local rpm = tonumber(rl.rpm)
    if not rpm or rpm <= 0 then
      return nil, "rate_limit.rpm must be a positive number"
    end
    local burst = tonumber(rl.burst) or max(1, ceil(rpm / 60))
    if burst < 1 then
      return nil, "rate_limit.burst must be >= 1"
    end
    dict():set("rl", encode({ rpm = rpm, burst = burst, tokens = burst, last = now() }))
  elseif rl ~= nil then
    return nil, "rate_limit must be an object or false"
  end
  return true
end

local function handle_control(uri, method)
  if uri == "/_mock/counters" then
    return reply_control(200, counters())
  elseif uri == "/_mock/reset" and method == "POST" then
    dict():flush_all()
    dict():flush_expired()
    return reply_control(200, { ok = true })
  elseif uri == "/_mock/config" and method == "POST" then
    local cfg, err = cjson.decode(read_body())
    if cfg == nil then
      return reply_control(400, { ok = false, error = "bad JSON: " .. tostring(err) })
    end
    local ok, cerr = apply_config(cfg)
    if not ok then
      return reply_control(400, { ok = false, error = cerr })
    end
    return reply_control(200, { ok = true })
  end
  return reply_control(404, { ok = false, error = "unknown control endpoint " .. method .. " " .. uri })
end

---------------------------------------------------------------------------
-- Main handler

local function provider_bodies(provider, body, request_id)
  local req = cjson.decode(body)
  if type(req) ~= "table" then
    return nil, "Request body is not valid JSON"
  end
  if provider == "anthropic" then
    return anthropic_bodies(req, request_id), req
  end
  return openai_bodies(req, request_id), req
end

local function run_step(step, provider, request_id, view, t)
  local kw = step.keyword
  local p = step.params
  if p.slow and p.slow_share and math.random() < p.slow_share then
    dict():incr("slow", 1, 0)
    sleep_ms(p.slow)
  else
    sleep_ms(p.delay)
  end
  if kw == "drop" then
    return abort()
  end

  if provider == "openai" then
    ngx.header["x-request-id"] = request_id
  else
    ngx.header["request-id"] = request_id
  end
  send_step_headers(step)

  if step.status and step.status ~= 200 then
    if provider ~= "generic" then
      set_ratelimit_headers(provider, view, t, nil, step)
    end
    return reply_error(provider, step.status, request_id, nil, step.params.echo)
  elseif kw == "shape" then
    -- a 200 JSON reply of a given shape: "object" {}, "array" [], or "bare" (the
    -- provider's object without content / choices)
    local shapes = { object = "{}", array = "[]",
                     bare = provider == "openai" and '{"id":"chatcmpl-bare","object":"chat.completion"}'
                            or '{"id":"msg_bare","type":"message","role":"assistant"}' }
    return reply_json(200, shapes[step.params.json or "object"] or "{}", step)
  elseif kw == "malformed" then
    return reply_json(200, '{"id": "msg_broken", "content": [', step)
  elseif kw == "html" then
    return reply_html(step)
  elseif kw == "huge" then
    return reply_huge(step)
  elseif kw == "replay" then
    if provider ~= "generic" then
      set_ratelimit_headers(provider, view, t, nil, step)
    end
    return reply_replay(step, provider, request_id)
  elseif kw == "garbage" then
    if step.params.code then
      -- "HTTP/1.1 <code> X": a status that is not three digits, or 000
      return reply_raw({ "HTTP/1.1 " .. step.params.code .. " X\r\ncontent-type: application/json\r\n"
                         .. "content-length: 2\r\n\r\n{}" })
    end
    return reply_raw({ GARBAGE_REPLY })
  elseif kw == "big_head" then
    return reply_big_head(step)
  elseif kw == "context" then
    if provider ~= "generic" then
      set_ratelimit_headers(provider, view, t)
    end
    return reply_context_error(provider, request_id)
  end

  local body = read_body()
  if provider == "generic" then
    -- x-mock-repeat: N sends x-repeated N times, for clients that must keep repeated headers
    local repeats = tonumber(ngx.var.http_x_mock_repeat)
    if repeats and repeats > 0 then
      local values = {}
      for i = 1, math.min(repeats, 100) do values[i] = tostring(i) end
      ngx.header["x-repeated"] = values
    end
    return reply_json(200, echo_body(body), step)
  end
  if ngx.req.get_method() ~= "POST" then
    return reply_error(provider, 405, request_id, "Method Not Allowed")
  end
  local bodies, req = provider_bodies(provider, body, request_id)
  if not bodies then
    return reply_error(provider, 400, request_id, req)
  end
  set_ratelimit_headers(provider, view, t, bodies.usage, step)
  if req.stream == true or kw == "truncated" or kw == "stream_error" then
    return reply_stream(bodies, step)
  end
  return reply_json(200, kw == "refusal" and bodies.refusal_json or bodies.json, step)
end

function M.handle()
  local uri, method = ngx.var.uri, ngx.req.get_method()
  if uri:sub(1, 7) == "/_mock/" then
    return handle_control(uri, method)
  end

  local t = now()
  count_request(uri)
  local provider = provider_for(uri)
  local request_id = (provider == "openai" and "req_" or "req_011C") .. random_id(24)

  local headers = ngx.req.get_headers(0)
  local steps_spec = header_value(headers, "x-mock-steps")
  local scenario = header_value(headers, "x-mock-scenario") or steps_spec
  local step = { text = "200", status = 200, params = {} }
  local position, sc = 1, nil
  if scenario then
    position, sc = scenario_next(scenario)
  end
  if steps_spec then
    local steps, err = parse_steps(steps_spec, header_value(headers, "x-mock-steps-sep") or ",")
    if not steps then
      ngx.log(ngx.ERR, "mock: bad x-mock-steps: ", err)
      if sc then
        scenario_record(scenario, sc, t, "invalid", 400)
      end
      ngx.header[provider == "openai" and "x-request-id" or "request-id"] = request_id
      return reply_error(provider, 400, request_id, "mock: bad x-mock-steps: " .. err)
    end
    step = steps[min(position, #steps)]
  end

  local view
  if uri:sub(1, 4) == "/v1/" then
    local allowed
    local body_data = ngx.req.get_body_data()
    local api_key = header_value(headers, "x-api-key") or header_value(headers, "authorization")
    allowed, view = limiter_take(t, body_data and body_data:match('"model"%s*:%s*"([^"]*)"'), api_key)
    if not allowed then
      dict():incr("rate_limited", 1, 0)
      if sc then
        scenario_record(scenario, sc, t, "rate_limited", 429)
      end
      ngx.header[provider == "openai" and "x-request-id" or "request-id"] = request_id
      ngx.header["retry-after"] = view.retry_after
      set_ratelimit_headers(provider == "openai" and "openai" or "anthropic", view, t)
      return reply_error(provider, 429, request_id)
    end
  end

  local cap = uri:sub(1, 4) == "/v1/" and capacity_get()
  local admitted = not cap or capacity_admit(cap)
  if sc then
    scenario_record(scenario, sc, t, admitted and step.text or "capacity", admitted and step_status(step) or 529)
  end
  if not admitted then
    ngx.sleep(CAPACITY_TICK / 1000)
    ngx.header[provider == "openai" and "x-request-id" or "request-id"] = request_id
    return reply_error(provider, 529, request_id)
  end
  if cap then capacity_work(cap) end
  return run_step(step, provider, request_id, view, t)
end

---------------------------------------------------------------------------
-- Lifecycle

-- opts: prefix (the temp dir), owner_pid and owner_start (to stop nginx if
-- the Lua process that started it dies without calling m:stop()).
function M.init(opts)
  settings = opts or {}
  require "resty.core"
end

local function owner_alive()
  local f = io.open("/proc/" .. settings.owner_pid .. "/stat", "r")
  if not f then
    return false
  end
  local stat = f:read("*a") or ""
  f:close()
  local fields = {}
  for field in (stat:match("%) (.*)$") or ""):gmatch("%S+") do
    fields[#fields + 1] = field
  end
  -- fields[1] is the state (field 3 of stat), fields[20] the start time.
  if fields[1] == "Z" or fields[1] == "X" then
    return false
  end
  return settings.owner_start == nil or fields[20] == settings.owner_start
end

local function watchdog(premature)
  if premature or owner_alive() then
    return
  end
  ngx.log(ngx.WARN, "mock: owner process ", settings.owner_pid, " is gone; stopping")
  local prefix = settings.prefix or ""
  local f = io.open(prefix .. "/nginx.pid", "r")
  local master = f and f:read("*l")
  if f then
    f:close()
  end
  if prefix:match("/sturdy%-mock%.[%w]+/?$") then
    os.execute("rm -rf '" .. prefix .. "'")
  end
  if master and master:match("^%d+$") then
    os.execute("kill -TERM " .. master)
  end
end

function M.init_worker()
  math.randomseed(floor(now() * 1000) + ngx.worker.pid())
  if settings.owner_pid then
    ngx.timer.every(1, watchdog)
  end
end

-- Exposed for tests of the helpers themselves.
M.go_duration = go_duration
M.parse_steps = parse_steps

return M
