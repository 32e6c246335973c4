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
external_dependencies = {
   CURL = { header = "curl/curl.h" },
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
      ["sturdy.core"] = {
         sources = {
            "src/buf.c", "src/timerheap.c", "src/upstream.c", "src/engine.c", "src/lsturdy.c",
            "src/backoff.c", "src/budget.c", "src/httpdate.c", "src/outcome.c",
            "src/breaker.c", "src/latency.c", "src/ratelimit.c", "src/sse.c",
         },
         libraries = { "curl", "m" },
         incdirs = { "$(CURL_INCDIR)" },
         libdirs = { "$(CURL_LIBDIR)" },
         defines = {},
      },
   },
}
