rockspec_format = "3.0"
package = "sturdy"
version = "scm-1"
source = {
   url = "git+https://example.invalid/sturdy.git",
   branch = "main",
}
description = {
   summary = "LLM API calls that hold up in production: retries, rate limits, breakers, timeouts",
   detailed = [[
sturdy is a Lua module with a C core on libcurl that makes calls to LLM APIs
(Anthropic, OpenAI, any JSON-over-HTTPS API) survive rate limits, overload,
outages and slow tails, and shows what happened.
]],
   license = "MIT",
}
dependencies = {
   "lua >= 5.1, < 5.5",
   "lua-cjson",
}
-- libcurl is found by its library: LuaRocks looks for libraries in the
-- multiarch directory (lib/x86_64-linux-gnu and the like) but for headers only
-- in include/, and Debian and Ubuntu keep curl/curl.h under the multiarch
-- include directory, which the compiler searches by itself. CURL_DIR, or
-- CURL_INCDIR and CURL_LIBDIR, point elsewhere.
external_dependencies = {
   CURL = { library = "curl" },
}
build = {
   type = "builtin",
   modules = {
      ["sturdy"] = "lua/sturdy/init.lua",
      ["sturdy.provider"] = "lua/sturdy/provider.lua",
      ["sturdy.anthropic"] = "lua/sturdy/anthropic.lua",
      ["sturdy.openai"] = "lua/sturdy/openai.lua",
      ["sturdy.prices"] = "lua/sturdy/prices.lua",
      ["sturdy.stream"] = "lua/sturdy/stream.lua",
      ["sturdy.options"] = "lua/sturdy/options.lua",
      ["sturdy.partial_json"] = "lua/sturdy/partial_json.lua",
      ["sturdy.cosocket"] = "lua/sturdy/cosocket.lua",
      ["sturdy.ngx"] = "lua/sturdy/ngx.lua",
      ["sturdy.redis"] = "lua/sturdy/redis.lua",
      ["sturdy.shared"] = "lua/sturdy/shared.lua",
      ["sturdy.fallback"] = "lua/sturdy/fallback.lua",
      ["sturdy.translate"] = "lua/sturdy/translate.lua",
      ["sturdy.cache"] = "lua/sturdy/cache.lua",
      ["sturdy.cache.memory"] = "lua/sturdy/cache/memory.lua",
      ["sturdy.cache.redis"] = "lua/sturdy/cache/redis.lua",
      ["sturdy.cache.ngx"] = "lua/sturdy/cache/ngx.lua",
      ["sturdy.diagnose"] = "lua/sturdy/diagnose.lua",
      ["sturdy.telemetry"] = "lua/sturdy/telemetry.lua",
      ["sturdy.metrics"] = "lua/sturdy/metrics.lua",
      ["sturdy.log"] = "lua/sturdy/log.lua",
      ["sturdy.trace"] = "lua/sturdy/trace.lua",
      ["sturdy.alerts"] = "lua/sturdy/alerts.lua",
      ["sturdy.health"] = "lua/sturdy/health.lua",
      ["sturdy.hedge"] = "lua/sturdy/hedge.lua",
      ["sturdy.mock"] = "lua/sturdy/mock/init.lua",
      ["sturdy.mock.server"] = "lua/sturdy/mock/server.lua",
      ["sturdy.core"] = {
         sources = {
            "src/curl/engine.c", "src/lua/core.c", "src/lua/convert.c", "src/lua/request.c",
            "src/policy/blob.c", "src/policy/buf.c", "src/policy/decide.c", "src/policy/headers.c", "src/policy/timerheap.c", "src/policy/upstream.c",
            "src/policy/backoff.c", "src/policy/budget.c", "src/policy/httpdate.c", "src/policy/outcome.c",
            "src/policy/breaker.c", "src/policy/latency.c", "src/policy/ratelimit.c", "src/policy/sse.c",
            "src/policy/sha256.c", "src/policy/adaptive.c", "src/policy/spend.c", "src/policy/spendbook.c", "src/policy/counts.c",
         },
         libraries = { "curl", "m" },
         incdirs = { "$(CURL_INCDIR)", "src/policy", "src/curl", "src/lua" },
         libdirs = { "$(CURL_LIBDIR)" },
         defines = {},
      },
      ["sturdy.policy"] = {
         sources = {
            "src/lua/policy.c", "src/lua/decider.c", "src/lua/convert.c", "src/lua/request.c",
            "src/policy/blob.c", "src/policy/buf.c", "src/policy/decide.c", "src/policy/headers.c", "src/policy/timerheap.c", "src/policy/upstream.c",
            "src/policy/backoff.c", "src/policy/budget.c", "src/policy/httpdate.c", "src/policy/outcome.c",
            "src/policy/breaker.c", "src/policy/latency.c", "src/policy/ratelimit.c", "src/policy/sse.c",
            "src/policy/sha256.c", "src/policy/adaptive.c", "src/policy/spend.c", "src/policy/spendbook.c", "src/policy/counts.c",
         },
         libraries = { "m" },
         incdirs = { "src/policy", "src/lua" },
         defines = {},
      },
      ["sturdy.netdiag"] = {
         sources = { "src/curl/diagnose.c", "src/lua/netdiag.c", "src/policy/httpdate.c" },
         libraries = { "curl", "m" },
         incdirs = { "$(CURL_INCDIR)", "src/policy", "src/curl", "src/lua" },
         libdirs = { "$(CURL_LIBDIR)" },
         defines = {},
      },
   },
   install = {
      bin = { ["sturdy"] = "bin/sturdy" },
   },
}
-- `luarocks test`: the suite (`make test`) on the Lua LuaRocks is set up for;
-- arguments after `--` go to busted (e.g. `luarocks test -- --filter=retries`).
test = {
   type = "command",
   script = "scripts/luarocks-test.lua",
}
