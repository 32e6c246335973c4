// Fidelity check: run the official Anthropic and OpenAI TypeScript SDKs
// against the mock API (spec/support/mock_server.lua) and check that they
// accept its replies, streams, errors and headers as the real thing.
//
//   lua5.4 spec/support/with_mock.lua node spec/fidelity/check.mjs
//
// (spec/fidelity/run.sh installs the pinned SDKs first and does exactly that.)
//
// Env: STURDY_MOCK_URL (from with_mock.lua), STURDY_FIDELITY_DIR (npm prefix
// holding node_modules/@anthropic-ai/sdk and node_modules/openai; default
// $XDG_CACHE_HOME/sturdy-fidelity or ~/.cache/sturdy-fidelity).
//
// Prints one line per check, "ok - NAME" or "not ok - NAME (reason)", then
// "N passed, M failed"; exits 1 if any check failed.

import { createRequire } from 'node:module';
import { join } from 'node:path';
import { homedir } from 'node:os';
import { readFileSync } from 'node:fs';

const MOCK = (process.env.STURDY_MOCK_URL || '').replace(/\/+$/, '');
if (!MOCK) {
  console.error('check.mjs: STURDY_MOCK_URL is not set (run under spec/support/with_mock.lua)');
  process.exit(2);
}
const SDK_DIR =
  process.env.STURDY_FIDELITY_DIR ||
  join(process.env.XDG_CACHE_HOME || join(homedir(), '.cache'), 'sturdy-fidelity');

const require = createRequire(join(SDK_DIR, 'node_modules', '.fidelity-anchor.js'));
let AnthropicMod, OpenAIMod;
try {
  AnthropicMod = require('@anthropic-ai/sdk');
  OpenAIMod = require('openai');
} catch (e) {
  console.error(`check.mjs: cannot load the SDKs from ${SDK_DIR} (run spec/fidelity/run.sh): ${e.message}`);
  process.exit(2);
}
const Anthropic = AnthropicMod.Anthropic || AnthropicMod.default;
const OpenAI = OpenAIMod.OpenAI || OpenAIMod.default;
const pkgVersion = (name) =>
  JSON.parse(readFileSync(join(SDK_DIR, 'node_modules', name, 'package.json'), 'utf8')).version;
const versions = { anthropic: pkgVersion('@anthropic-ai/sdk'), openai: pkgVersion('openai') };

const API_KEY = 'sk-mock-not-a-real-key';
const PROMPT = 'Hello from the sturdy fidelity check';
const EXPECTED_TEXT = `Echo: ${PROMPT}`;
const A_MODEL = 'claude-mock-fidelity';
const O_MODEL = 'gpt-mock-fidelity';

// ---------------------------------------------------------------------------
// Tiny harness

let passed = 0;
let failed = 0;

class CheckFailure extends Error {}

function fail(reason) {
  throw new CheckFailure(reason);
}

function assert(cond, reason) {
  if (!cond) fail(reason);
}

function show(v) {
  const s = JSON.stringify(v);
  return s === undefined ? String(v) : s.length > 160 ? s.slice(0, 157) + '...' : s;
}

function eq(actual, expected, what) {
  if (actual !== expected) fail(`${what}: expected ${show(expected)}, got ${show(actual)}`);
}

function isPosInt(n) {
  return Number.isInteger(n) && n > 0;
}

async function check(name, fn) {
  try {
    await fn();
    passed++;
    console.log(`ok - ${name}`);
  } catch (e) {
    failed++;
    let reason;
    if (e instanceof CheckFailure) reason = e.message;
    else reason = `unexpected ${e?.constructor?.name || typeof e}: ${e?.message ?? show(e)}`;
    console.log(`not ok - ${name} (${reason.replace(/\s+/g, ' ')})`);
  }
}

// Run fn, which must throw; return what it threw.
async function mustThrow(fn, what) {
  try {
    await fn();
  } catch (e) {
    return e;
  }
  fail(`${what}: expected an error, none was raised`);
}

function errName(e) {
  return `${e?.constructor?.name || typeof e}(${e?.status ?? '-'}): ${e?.message}`;
}

function isInstance(e, cls, clsName) {
  if (!cls) fail(`SDK has no ${clsName} export`);
  if (!(e instanceof cls)) fail(`expected ${clsName}, got ${errName(e)}`);
}

// An API error raised from a reply (not a transport failure, which the SDKs
// also report as an APIError subclass).
function isReplyError(e, mod) {
  isInstance(e, mod.APIError, 'APIError');
  if (mod.APIConnectionError && e instanceof mod.APIConnectionError) fail(`expected an API error, got ${errName(e)}`);
}

let scenarioSeq = 0;
function scenario() {
  return `fidelity-${process.pid}-${++scenarioSeq}`;
}

async function counters() {
  const r = await fetch(`${MOCK}/_mock/counters`);
  return r.json();
}

async function scenarioCount(id) {
  const c = await counters();
  return c.scenarios?.[id]?.count ?? 0;
}

// ---------------------------------------------------------------------------
// Anthropic

const anthropic = new Anthropic({ apiKey: API_KEY, baseURL: MOCK, maxRetries: 0, timeout: 20000 });
const aParams = () => ({
  model: A_MODEL,
  max_tokens: 64,
  messages: [{ role: 'user', content: PROMPT }],
});
const A_REQ_ID = /^req_[A-Za-z0-9]+$/;
const A_RATELIMIT_HEADERS = [
  'anthropic-ratelimit-requests-limit',
  'anthropic-ratelimit-requests-remaining',
  'anthropic-ratelimit-requests-reset',
  'anthropic-ratelimit-input-tokens-limit',
  'anthropic-ratelimit-input-tokens-remaining',
  'anthropic-ratelimit-input-tokens-reset',
  'anthropic-ratelimit-output-tokens-limit',
  'anthropic-ratelimit-output-tokens-remaining',
  'anthropic-ratelimit-output-tokens-reset',
  'anthropic-ratelimit-tokens-limit',
  'anthropic-ratelimit-tokens-remaining',
  'anthropic-ratelimit-tokens-reset',
];
const A_EVENT_ORDER =
  /^message_start content_block_start( content_block_delta)+ content_block_stop message_delta message_stop$/;

let aMessage; // non-streamed result, reused by the stream checks

async function anthropicChecks() {
  await check('anthropic: messages.create returns a typed Message', async () => {
    const m = await anthropic.messages.create(aParams());
    aMessage = m;
    assert(typeof m.id === 'string' && m.id.startsWith('msg_'), `id: got ${show(m.id)}`);
    eq(m.type, 'message', 'type');
    eq(m.role, 'assistant', 'role');
    eq(m.model, A_MODEL, 'model');
    assert(Array.isArray(m.content) && m.content.length === 1, `content: got ${show(m.content)}`);
    eq(m.content[0].type, 'text', 'content[0].type');
    eq(m.content[0].text, EXPECTED_TEXT, 'content[0].text');
    eq(m.stop_reason, 'end_turn', 'stop_reason');
    eq(m.stop_sequence, null, 'stop_sequence');
    assert(isPosInt(m.usage?.input_tokens), `usage.input_tokens: got ${show(m.usage)}`);
    assert(isPosInt(m.usage?.output_tokens), `usage.output_tokens: got ${show(m.usage)}`);
    assert(A_REQ_ID.test(m._request_id ?? ''), `_request_id: got ${show(m._request_id)}`);
  });

  await check('anthropic: .withResponse() exposes request-id and anthropic-ratelimit-* headers', async () => {
    const { data, response, request_id } = await anthropic.messages.create(aParams()).withResponse();
    eq(response.status, 200, 'status');
    assert((response.headers.get('content-type') || '').startsWith('application/json'),
      `content-type: got ${show(response.headers.get('content-type'))}`);
    const hid = response.headers.get('request-id');
    assert(A_REQ_ID.test(hid ?? ''), `request-id header: got ${show(hid)}`);
    eq(request_id, hid, 'withResponse().request_id');
    eq(data._request_id, hid, 'data._request_id');
    const missing = A_RATELIMIT_HEADERS.filter((h) => response.headers.get(h) == null);
    assert(missing.length === 0, `missing headers: ${missing.join(', ')}`);
    for (const h of A_RATELIMIT_HEADERS.filter((h) => h.endsWith('-reset'))) {
      const v = response.headers.get(h);
      assert(/^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$/.test(v) && !isNaN(Date.parse(v)), `${h} not RFC 3339: ${v}`);
    }
    for (const h of A_RATELIMIT_HEADERS.filter((h) => !h.endsWith('-reset'))) {
      const v = response.headers.get(h);
      assert(/^\d+$/.test(v), `${h} not an integer: ${v}`);
    }
  });

  await check('anthropic: messages.stream() events in order, finalMessage() == deltas == create()', async () => {
    assert(aMessage, 'no non-streamed message to compare with (first check failed)');
    const stream = anthropic.messages.stream(aParams());
    const { response, request_id } = await stream.withResponse();
    assert((response.headers.get('content-type') || '').startsWith('text/event-stream'),
      `content-type: got ${show(response.headers.get('content-type'))}`);
    assert(A_REQ_ID.test(request_id ?? ''), `stream request_id: got ${show(request_id)}`);
    let textEvents = '';
    stream.on('text', (delta) => {
      textEvents += delta;
    });
    const types = [];
    let deltas = '';
    let startId;
    for await (const ev of stream) {
      types.push(ev.type);
      if (ev.type === 'message_start') startId = ev.message.id;
      if (ev.type === 'content_block_delta') {
        eq(ev.delta.type, 'text_delta', 'delta.type');
        eq(ev.index, 0, 'delta index');
        deltas += ev.delta.text;
      }
    }
    assert(A_EVENT_ORDER.test(types.join(' ')), `event order: ${types.join(' ')}`);
    const final = await stream.finalMessage();
    eq(final.id, startId, 'finalMessage().id vs message_start id');
    eq(final.content[0]?.text, deltas, 'finalMessage() text vs concatenated deltas');
    eq(deltas, aMessage.content[0].text, 'streamed text vs messages.create text');
    eq(textEvents, deltas, "'text' events vs deltas");
    eq(await stream.finalText(), deltas, 'finalText()');
    eq(final.stop_reason, 'end_turn', 'finalMessage().stop_reason');
    eq(final.usage.output_tokens, aMessage.usage.output_tokens, 'usage.output_tokens vs create()');
    eq(final.usage.input_tokens, aMessage.usage.input_tokens, 'usage.input_tokens vs create()');
  });

  await check('anthropic: messages.create({stream: true}) raw events', async () => {
    assert(aMessage, 'no non-streamed message to compare with (first check failed)');
    const stream = await anthropic.messages.create({ ...aParams(), stream: true });
    const events = [];
    for await (const ev of stream) events.push(ev);
    const types = events.map((e) => e.type);
    assert(A_EVENT_ORDER.test(types.join(' ')), `event order: ${types.join(' ')}`);
    const start = events[0].message;
    assert(start.id?.startsWith('msg_'), `message_start id: ${show(start.id)}`);
    eq(start.type, 'message', 'message_start.message.type');
    eq(start.role, 'assistant', 'message_start.message.role');
    assert(Array.isArray(start.content) && start.content.length === 0, `message_start content: ${show(start.content)}`);
    eq(start.stop_reason, null, 'message_start stop_reason');
    assert(isPosInt(start.usage?.input_tokens), `message_start usage: ${show(start.usage)}`);
    const cbs = events[1];
    eq(cbs.index, 0, 'content_block_start.index');
    eq(cbs.content_block?.type, 'text', 'content_block_start.content_block.type');
    eq(cbs.content_block?.text, '', 'content_block_start.content_block.text');
    const text = events
      .filter((e) => e.type === 'content_block_delta')
      .map((e) => e.delta.text)
      .join('');
    eq(text, aMessage.content[0].text, 'concatenated deltas vs messages.create text');
    const md = events.find((e) => e.type === 'message_delta');
    eq(md.delta.stop_reason, 'end_turn', 'message_delta.delta.stop_reason');
    eq(md.usage?.output_tokens, aMessage.usage.output_tokens, 'message_delta.usage.output_tokens');
  });

  await check('anthropic: 529 -> OverloadedError/APIError status 529, overloaded_error, request id', async () => {
    const id = scenario();
    const e = await mustThrow(
      () => anthropic.messages.create(aParams(), { headers: { 'x-mock-steps': '529', 'x-mock-scenario': id } }),
      '529',
    );
    isReplyError(e, AnthropicMod);
    if (AnthropicMod.OverloadedError) isInstance(e, AnthropicMod.OverloadedError, 'OverloadedError');
    else isInstance(e, AnthropicMod.InternalServerError, 'InternalServerError');
    eq(e.status, 529, 'status');
    eq(e.error?.type, 'error', 'body type');
    eq(e.error?.error?.type, 'overloaded_error', 'body error.type');
    if ('type' in e) eq(e.type, 'overloaded_error', 'err.type');
    const rid = e.requestID ?? e.request_id;
    assert(A_REQ_ID.test(rid ?? ''), `err.requestID: got ${show(rid)}`);
    eq(rid, e.headers?.get('request-id'), 'err.requestID vs request-id header');
    eq(e.error?.request_id, rid, 'body request_id vs request-id header');
    eq(await scenarioCount(id), 1, 'requests sent with maxRetries 0');
  });

  await check('anthropic: 429 -> RateLimitError, rate_limit_error', async () => {
    const e = await mustThrow(
      () => anthropic.messages.create(aParams(), { headers: { 'x-mock-steps': '429' } }),
      '429',
    );
    isInstance(e, AnthropicMod.RateLimitError, 'RateLimitError');
    eq(e.status, 429, 'status');
    eq(e.error?.error?.type, 'rate_limit_error', 'body error.type');
    assert(A_REQ_ID.test(e.requestID ?? ''), `err.requestID: got ${show(e.requestID)}`);
  });

  await check('anthropic: 400 -> BadRequestError, invalid_request_error', async () => {
    const e = await mustThrow(
      () => anthropic.messages.create(aParams(), { headers: { 'x-mock-steps': '400' } }),
      '400',
    );
    isInstance(e, AnthropicMod.BadRequestError, 'BadRequestError');
    eq(e.status, 400, 'status');
    eq(e.error?.error?.type, 'invalid_request_error', 'body error.type');
    assert(typeof e.error?.error?.message === 'string', `body error.message: ${show(e.error)}`);
  });

  await check('anthropic: SDK retries 529 (retry-after-ms) then succeeds', async () => {
    const id = scenario();
    const client = anthropic.withOptions({ maxRetries: 2 });
    const m = await client.messages.create(aParams(), {
      headers: { 'x-mock-steps': '529;retry-after-ms=10,200', 'x-mock-scenario': id },
    });
    eq(m.content[0]?.text, EXPECTED_TEXT, 'text after retry');
    eq(await scenarioCount(id), 2, 'requests sent');
  });

  await check('anthropic: x-should-retry: false stops the SDK retrying a 529', async () => {
    const id = scenario();
    const client = anthropic.withOptions({ maxRetries: 2 });
    const e = await mustThrow(
      () => client.messages.create(aParams(), {
        headers: { 'x-mock-steps': '529;should-retry=false,200', 'x-mock-scenario': id },
      }),
      'should-retry=false',
    );
    isReplyError(e, AnthropicMod);
    eq(e.status, 529, 'status');
    eq(await scenarioCount(id), 1, 'requests sent');
  });

  await check('anthropic: stream_error -> messages.stream() rejects with overloaded_error', async () => {
    const stream = anthropic.messages.stream(aParams(), { headers: { 'x-mock-steps': 'stream_error' } });
    const seen = [];
    const e = await mustThrow(async () => {
      for await (const ev of stream) seen.push(ev.type);
    }, 'stream iteration');
    isReplyError(e, AnthropicMod);
    eq(e.error?.error?.type, 'overloaded_error', 'error event error.type');
    if ('type' in e) eq(e.type, 'overloaded_error', 'err.type');
    eq(seen.join(' '), 'message_start', 'events before the error');
    const e2 = await mustThrow(() => stream.finalMessage(), 'finalMessage()');
    eq(e2, e, 'finalMessage() rejection vs iteration error');
  });

  await check('anthropic: stream_error;after_delta=1 -> raw create({stream}) iteration throws after a delta', async () => {
    const stream = await anthropic.messages.create(
      { ...aParams(), stream: true },
      { headers: { 'x-mock-steps': 'stream_error;after_delta=1' } },
    );
    const seen = [];
    const e = await mustThrow(async () => {
      for await (const ev of stream) seen.push(ev.type);
    }, 'stream iteration');
    isReplyError(e, AnthropicMod);
    eq(e.error?.error?.type, 'overloaded_error', 'error event error.type');
    eq(seen.join(' '), 'message_start content_block_start content_block_delta', 'events before the error');
  });

  await check('anthropic: truncated stream (no message_stop) -> finalMessage() rejects', async () => {
    const stream = anthropic.messages.stream(aParams(), { headers: { 'x-mock-steps': 'truncated' } });
    const types = [];
    for await (const ev of stream) types.push(ev.type);
    eq(types.at(-1), 'message_delta', 'last event');
    await mustThrow(() => stream.finalMessage(), 'finalMessage()');
  });
}

// ---------------------------------------------------------------------------
// OpenAI

const openai = new OpenAI({ apiKey: API_KEY, baseURL: `${MOCK}/v1`, maxRetries: 0, timeout: 20000 });
const oParams = () => ({ model: O_MODEL, messages: [{ role: 'user', content: PROMPT }] });
const O_REQ_ID = /^req_[A-Za-z0-9]+$/;
const O_RATELIMIT_HEADERS = [
  'x-ratelimit-limit-requests',
  'x-ratelimit-remaining-requests',
  'x-ratelimit-reset-requests',
  'x-ratelimit-limit-tokens',
  'x-ratelimit-remaining-tokens',
  'x-ratelimit-reset-tokens',
];

let oCompletion;

async function openaiChecks() {
  await check('openai: chat.completions.create returns a typed ChatCompletion', async () => {
    const c = await openai.chat.completions.create(oParams());
    oCompletion = c;
    assert(typeof c.id === 'string' && c.id.startsWith('chatcmpl-'), `id: got ${show(c.id)}`);
    eq(c.object, 'chat.completion', 'object');
    eq(c.model, O_MODEL, 'model');
    assert(Number.isInteger(c.created), `created: ${show(c.created)}`);
    assert(Array.isArray(c.choices) && c.choices.length === 1, `choices: ${show(c.choices)}`);
    const ch = c.choices[0];
    eq(ch.index, 0, 'choices[0].index');
    eq(ch.message?.role, 'assistant', 'message.role');
    eq(ch.message?.content, EXPECTED_TEXT, 'message.content');
    eq(ch.finish_reason, 'stop', 'finish_reason');
    const u = c.usage;
    assert(isPosInt(u?.prompt_tokens) && isPosInt(u?.completion_tokens), `usage: ${show(u)}`);
    eq(u.total_tokens, u.prompt_tokens + u.completion_tokens, 'usage.total_tokens');
    assert(O_REQ_ID.test(c._request_id ?? ''), `_request_id: got ${show(c._request_id)}`);
  });

  await check('openai: .withResponse() exposes x-request-id and x-ratelimit-* headers', async () => {
    const { data, response, request_id } = await openai.chat.completions.create(oParams()).withResponse();
    eq(response.status, 200, 'status');
    const hid = response.headers.get('x-request-id');
    assert(O_REQ_ID.test(hid ?? ''), `x-request-id header: got ${show(hid)}`);
    eq(request_id, hid, 'withResponse().request_id');
    eq(data._request_id, hid, 'data._request_id');
    const missing = O_RATELIMIT_HEADERS.filter((h) => response.headers.get(h) == null);
    assert(missing.length === 0, `missing headers: ${missing.join(', ')}`);
    for (const h of O_RATELIMIT_HEADERS.filter((h) => h.includes('-reset-'))) {
      const v = response.headers.get(h);
      assert(/^(\d+h)?(\d+m)?(\d+(\.\d+)?(ms|s))$/.test(v), `${h} not a Go duration: ${v}`);
    }
  });

  await check('openai: stream with include_usage -> chunks, final usage chunk, content == create()', async () => {
    assert(oCompletion, 'no non-streamed completion to compare with (first check failed)');
    const { data: stream, response } = await openai.chat.completions
      .create({ ...oParams(), stream: true, stream_options: { include_usage: true } })
      .withResponse();
    assert((response.headers.get('content-type') || '').startsWith('text/event-stream'),
      `content-type: got ${show(response.headers.get('content-type'))}`);
    assert(O_REQ_ID.test(response.headers.get('x-request-id') ?? ''), 'x-request-id on stream');
    const chunks = [];
    for await (const c of stream) chunks.push(c);
    assert(chunks.length >= 4, `only ${chunks.length} chunks`);
    const ids = new Set(chunks.map((c) => c.id));
    eq(ids.size, 1, 'distinct chunk ids');
    assert(chunks.every((c) => c.object === 'chat.completion.chunk'), 'object != chat.completion.chunk');
    eq(chunks[0].choices[0]?.delta?.role, 'assistant', 'first delta role');
    const last = chunks.at(-1);
    assert(Array.isArray(last.choices) && last.choices.length === 0, `usage chunk choices: ${show(last.choices)}`);
    assert(last.usage, 'final chunk has no usage');
    eq(last.usage.prompt_tokens, oCompletion.usage.prompt_tokens, 'usage.prompt_tokens vs create()');
    eq(last.usage.completion_tokens, oCompletion.usage.completion_tokens, 'usage.completion_tokens vs create()');
    eq(last.usage.total_tokens, oCompletion.usage.total_tokens, 'usage.total_tokens vs create()');
    const body = chunks.slice(0, -1);
    assert(body.every((c) => c.usage === null), 'non-final chunks should carry usage: null');
    const finishes = body.map((c) => c.choices[0]?.finish_reason).filter((f) => f != null);
    eq(finishes.join(','), 'stop', 'finish_reasons');
    eq(body.at(-1).choices[0].finish_reason, 'stop', 'finish_reason on the last choice chunk');
    const text = body.map((c) => c.choices[0]?.delta?.content ?? '').join('');
    eq(text, oCompletion.choices[0].message.content, 'concatenated deltas vs create() content');
  });

  await check('openai: stream without include_usage has no usage chunk', async () => {
    const stream = await openai.chat.completions.create({ ...oParams(), stream: true });
    const chunks = [];
    for await (const c of stream) chunks.push(c);
    assert(chunks.every((c) => c.choices.length === 1), 'a chunk without a choice');
    assert(chunks.every((c) => c.usage == null), 'a chunk with usage');
    eq(chunks.map((c) => c.choices[0].delta.content ?? '').join(''), EXPECTED_TEXT, 'content');
  });

  await check('openai: chat.completions.stream() helper -> finalChatCompletion()', async () => {
    const stream = openai.chat.completions.stream({ ...oParams(), stream_options: { include_usage: true } });
    let deltas = '';
    stream.on('content', (delta) => {
      deltas += delta;
    });
    const final = await stream.finalChatCompletion();
    eq(final.choices[0].message.content, EXPECTED_TEXT, 'final content');
    eq(final.choices[0].finish_reason, 'stop', 'final finish_reason');
    eq(deltas, EXPECTED_TEXT, "'content' events");
    eq(final.usage?.total_tokens, oCompletion?.usage?.total_tokens, 'final usage.total_tokens');
  });

  await check('openai: 429 -> RateLimitError, code rate_limit_exceeded, requestID = x-request-id', async () => {
    const e = await mustThrow(
      () => openai.chat.completions.create(oParams(), { headers: { 'x-mock-steps': '429' } }),
      '429',
    );
    isInstance(e, OpenAIMod.RateLimitError, 'RateLimitError');
    eq(e.status, 429, 'status');
    eq(e.code, 'rate_limit_exceeded', 'err.code');
    assert(typeof e.type === 'string', `err.type: ${show(e.type)}`);
    assert(O_REQ_ID.test(e.requestID ?? ''), `err.requestID: got ${show(e.requestID)}`);
    eq(e.requestID, e.headers?.get('x-request-id'), 'err.requestID vs x-request-id header');
  });

  await check('openai: 400 -> BadRequestError, invalid_request_error', async () => {
    const e = await mustThrow(
      () => openai.chat.completions.create(oParams(), { headers: { 'x-mock-steps': '400' } }),
      '400',
    );
    isInstance(e, OpenAIMod.BadRequestError, 'BadRequestError');
    eq(e.status, 400, 'status');
    eq(e.type, 'invalid_request_error', 'err.type');
    assert('param' in e.error, `error.param missing: ${show(e.error)}`);
  });

  await check('openai: 500 with maxRetries 0 -> InternalServerError, one request', async () => {
    const id = scenario();
    const e = await mustThrow(
      () => openai.chat.completions.create(oParams(), {
        headers: { 'x-mock-steps': '500', 'x-mock-scenario': id },
      }),
      '500',
    );
    isInstance(e, OpenAIMod.InternalServerError, 'InternalServerError');
    eq(e.status, 500, 'status');
    eq(e.type, 'server_error', 'err.type');
    eq(await scenarioCount(id), 1, 'requests sent');
  });

  await check('openai: SDK retries 429 (retry-after-ms) then succeeds', async () => {
    const id = scenario();
    const client = openai.withOptions({ maxRetries: 2 });
    const c = await client.chat.completions.create(oParams(), {
      headers: { 'x-mock-steps': '429;retry-after-ms=10,200', 'x-mock-scenario': id },
    });
    eq(c.choices[0].message.content, EXPECTED_TEXT, 'content after retry');
    eq(await scenarioCount(id), 2, 'requests sent');
  });

  await check('openai: stream_error -> error chunk raises APIError during iteration', async () => {
    const stream = await openai.chat.completions.create(
      { ...oParams(), stream: true },
      { headers: { 'x-mock-steps': 'stream_error' } },
    );
    const seen = [];
    const e = await mustThrow(async () => {
      for await (const c of stream) seen.push(c);
    }, 'stream iteration');
    isReplyError(e, OpenAIMod);
    eq(e.type, 'server_error', 'err.type');
    assert(typeof e.message === 'string' && e.message.length > 0, 'empty message');
    eq(seen.length, 1, 'chunks before the error');
    eq(seen[0].choices[0]?.delta?.role, 'assistant', 'role chunk before the error');
  });

  await check('openai: truncated stream (no [DONE]) still yields all chunks', async () => {
    const stream = await openai.chat.completions.create(
      { ...oParams(), stream: true },
      { headers: { 'x-mock-steps': 'truncated' } },
    );
    const chunks = [];
    for await (const c of stream) chunks.push(c);
    eq(chunks.map((c) => c.choices[0]?.delta?.content ?? '').join(''), EXPECTED_TEXT, 'content');
  });
}

// ---------------------------------------------------------------------------

console.log(`# @anthropic-ai/sdk ${versions.anthropic}, openai ${versions.openai}, node ${process.version}, mock ${MOCK}`);
await anthropicChecks();
await openaiChecks();
console.log(`${passed} passed, ${failed} failed`);
process.exit(failed > 0 ? 1 : 0);
