# sturdy: build, install and test.
#   make                 build sturdy/core.so for $(LUA) (default lua5.4)
#   make install         install where `require "sturdy"` finds it
#   make test            install missing Debian packages, then run the suite on $(LUA)
#   make test-all        the suite on Lua 5.1, 5.2, 5.3, 5.4 and LuaJIT
#   make test-asan       the suite with AddressSanitizer + UndefinedBehaviorSanitizer
#   make demo            the main job against the bundled mock API
#   make demo-openresty  examples/openresty/nginx.conf (two workers) against the mock, driven with wrk
#   make bench           micro-benchmarks, and benchmarks against a bare libcurl client
#   make bench-cache     the cache's memory backend: hit cost, lookups against entry count
#   make bench-metrics   the cost of rendering the metrics of 50 upstream keys
#   make bench-shared    limits shared through Redis: cost per call, with and without leases
#   make bench-features  CPU per call of adaptive concurrency, spend caps and hedging, off and on
#   make goodput         goodput under a provider rate limit learned from headers
#   make bench-cosocket  sturdy.cosocket inside nginx against proxy_pass (wrk)
#   make bench-fallback  a fallback chain's CPU per call next to a direct provider call
#   make bench-openresty the ngx transport: a slow API, overhead against proxy_pass, two workers
#   make fidelity        the official SDKs against the mock (installs them with npm)
#   make fuzz            the parsers under libFuzzer, 60 s per target (fuzz/README.md)
#   make soak            mixed mock faults at concurrency 64 for 600 s (bench/README.md)
#   make docs            the API reference (LDoc) into build/docs; a warning fails it
#   make check-rock      the rock built and installed with luarocks, loaded from outside the checkout
#   make check-fresh     `make demo`, then `make test`, as the first commands on a fresh Debian root
# Each installs the Debian packages it needs first (scripts/deps.sh).

LUA ?= lua5.4
LUA_VERSION := $(if $(findstring luajit,$(LUA)),5.1,$(patsubst lua%,%,$(LUA)))
LUA_PC ?= $(LUA)
PKG_CONFIG ?= pkg-config

PREFIX ?= /usr/local
LIBDIR ?= $(PREFIX)/lib/lua/$(LUA_VERSION)
LUADIR ?= $(PREFIX)/share/lua/$(LUA_VERSION)
BINDIR ?= $(PREFIX)/bin
DESTDIR ?=

CC ?= cc
CFLAGS ?= -O2 -g
WARNINGS := -std=c99 -pedantic -Wall -Wextra -Wmissing-prototypes -Wshadow
WERROR ?= -Werror

# Expanded where used (=, not :=): on a fresh machine pkg-config and the
# headers only exist once `deps-build`, a prerequisite of every compile, ran.
ifdef LUA_INCDIR
LUA_CFLAGS = -I$(LUA_INCDIR)
else
LUA_CFLAGS = $(shell $(PKG_CONFIG) --cflags $(LUA_PC) 2>/dev/null)
endif
CURL_CFLAGS = $(shell $(PKG_CONFIG) --cflags libcurl 2>/dev/null)
CURL_LIBS = $(shell $(PKG_CONFIG) --libs libcurl 2>/dev/null || echo -lcurl)

BUILD ?= build/$(LUA)
# The layers, one folder each: pure policies (no I/O, no clock), the curl
# transport, and the Lua bindings.
POLICY_SRC := $(wildcard src/policy/*.c)
CURL_SRC := $(filter-out src/curl/diagnose.c,$(wildcard src/curl/*.c))
CORE_SRC := $(CURL_SRC) src/lua/core.c src/lua/convert.c src/lua/request.c $(POLICY_SRC)
NETDIAG_SRC := src/curl/diagnose.c src/lua/netdiag.c src/policy/httpdate.c
POLICY_LIB_SRC := src/lua/policy.c src/lua/decider.c src/lua/convert.c src/lua/request.c $(POLICY_SRC)
INCLUDES := -Isrc/policy -Isrc/curl -Isrc/lua
C_TESTS := test_policies test_breaker test_latency test_ratelimit test_sse test_headers test_sha256 test_adaptive test_spend test_upstream
HEADERS := $(wildcard src/*/*.h)
C_TESTS += test_decide test_admission
C_TESTS += test_counts
C_TESTS += test_fleet
CORE_SO := $(BUILD)/sturdy/core.so
POLICY_SO := $(BUILD)/sturdy/policy.so
NETDIAG_SO := $(BUILD)/sturdy/netdiag.so

BUSTED ?= /usr/bin/busted
BUSTED_ARGS ?=
SUITE_LUAS := lua5.1 lua5.2 lua5.3 lua5.4 luajit

SAN_FLAGS := -fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer
SAN_CC ?= gcc

.PHONY: all install uninstall deps deps-build test test-lua test-c test-all test-asan lint check-rock check-fresh demo bench goodput fidelity fuzz clean ngx-policy bench-cosocket bench-cache docs soak fuzz-seeds bench-metrics demo-openresty bench-openresty bench-shared bench-features

all: $(CORE_SO) $(POLICY_SO) $(NETDIAG_SO)

# Only luaopen_* is exported: the libraries carry some of the same C code.
SO_FLAGS := -fPIC -shared -fvisibility=hidden

$(CORE_SO): $(CORE_SRC) $(HEADERS) | deps-build
	@mkdir -p $(dir $@)
	$(CC) $(WARNINGS) $(WERROR) $(CFLAGS) $(SO_FLAGS) $(INCLUDES) $(LUA_CFLAGS) $(CURL_CFLAGS) \
		-o $@ $(CORE_SRC) $(CURL_LIBS) -lm $(LDFLAGS)

# sturdy.policy: no libcurl, so it loads where blocking I/O must not (OpenResty)
$(POLICY_SO): $(POLICY_LIB_SRC) $(HEADERS) | deps-build
	@mkdir -p $(dir $@)
	$(CC) $(WARNINGS) $(WERROR) $(CFLAGS) $(SO_FLAGS) $(INCLUDES) $(LUA_CFLAGS) \
		-o $@ $(POLICY_LIB_SRC) -lm $(LDFLAGS)

# sturdy.netdiag: the network diagnosis, a module of its own so that
# require "sturdy" does not load it
$(NETDIAG_SO): $(NETDIAG_SRC) $(HEADERS)
	@mkdir -p $(dir $@)
	$(CC) $(WARNINGS) $(WERROR) $(CFLAGS) $(SO_FLAGS) $(INCLUDES) $(LUA_CFLAGS) $(CURL_CFLAGS) \
		-o $@ $(NETDIAG_SRC) $(CURL_LIBS) -lm $(LDFLAGS)

install: $(CORE_SO) $(POLICY_SO) $(NETDIAG_SO)
	install -d $(DESTDIR)$(LIBDIR)/sturdy $(DESTDIR)$(LUADIR)/sturdy/mock $(DESTDIR)$(LUADIR)/sturdy/cache $(DESTDIR)$(BINDIR)
	install -m 0755 $(CORE_SO) $(DESTDIR)$(LIBDIR)/sturdy/core.so
	install -m 0755 $(POLICY_SO) $(DESTDIR)$(LIBDIR)/sturdy/policy.so
	install -m 0755 $(NETDIAG_SO) $(DESTDIR)$(LIBDIR)/sturdy/netdiag.so
	install -m 0644 lua/sturdy/*.lua $(DESTDIR)$(LUADIR)/sturdy/
	install -m 0644 lua/sturdy/cache/*.lua $(DESTDIR)$(LUADIR)/sturdy/cache/
	install -m 0644 lua/sturdy/mock/*.lua $(DESTDIR)$(LUADIR)/sturdy/mock/
	sed '1s|.*|#!/usr/bin/env $(LUA)|' bin/sturdy > $(DESTDIR)$(BINDIR)/sturdy
	chmod 0755 $(DESTDIR)$(BINDIR)/sturdy

uninstall:
	rm -rf $(DESTDIR)$(LIBDIR)/sturdy $(DESTDIR)$(LUADIR)/sturdy $(DESTDIR)$(BINDIR)/sturdy

# deps-build first, once, so a parallel make never runs two apt-gets
deps: deps-build
	@sh scripts/deps.sh suite

deps-build:
	@sh scripts/deps.sh build

# The pure C policies, tested directly with a virtual clock.
$(BUILD)/test_%: spec/c/test_%.c spec/c/test.h $(POLICY_SRC) $(HEADERS) | deps-build
	@mkdir -p $(dir $@)
	$(CC) $(WARNINGS) $(WERROR) $(CFLAGS) -Isrc/policy -o $@ $< $(POLICY_SRC) -lm $(LDFLAGS)

test-c: $(addprefix $(BUILD)/,$(C_TESTS))
	@set -e; for t in $(C_TESTS); do $(BUILD)/$$t; done

# The in-nginx specs load sturdy.policy into nginx's LuaJIT: always a plain
# build (nginx carries no sanitizer runtime), whatever this make was given.
NGX_POLICY_MAKE = $(MAKE) --no-print-directory LUA=luajit BUILD=build/luajit CC=cc CFLAGS="-O2 -g" LDFLAGS=
ngx-policy:
	@$(NGX_POLICY_MAKE) -q build/luajit/sturdy/policy.so || $(NGX_POLICY_MAKE) build/luajit/sturdy/policy.so

test-lua: $(CORE_SO) $(POLICY_SO) $(NETDIAG_SO) ngx-policy | deps
	$(LUA) $(BUSTED) --lpath='lua/?.lua;lua/?/init.lua;./?.lua' --cpath='$(BUILD)/?.so' $(BUSTED_ARGS) spec

test: deps
	$(MAKE) --no-print-directory test-c test-lua lint

test-all: deps
	@set -e; for l in $(SUITE_LUAS); do \
		echo "== $$l"; $(MAKE) --no-print-directory LUA=$$l test-c test-lua; done

# Lua itself is not instrumented, so the sanitizer runtime is preloaded.
# use_tls=0: LeakSanitizer's scan of dynamic TLS can fault on a garbage slot
# (gcc 12 runtime, glibc 2.36), depending only on memory layout; not scanning
# TLS can only report more, and glibc's own loader names are suppressed.
test-asan: deps
	$(MAKE) --no-print-directory ngx-policy
	$(MAKE) --no-print-directory BUILD=build/asan-$(LUA) CC=$(SAN_CC) \
		CFLAGS="-O1 -g $(SAN_FLAGS)" LDFLAGS="$(SAN_FLAGS)" \
		build/asan-$(LUA)/sturdy/core.so build/asan-$(LUA)/sturdy/policy.so \
		build/asan-$(LUA)/sturdy/netdiag.so $(addprefix build/asan-$(LUA)/,$(C_TESTS))
	@set -e; for t in $(C_TESTS); do \
		ASAN_OPTIONS=detect_leaks=1:abort_on_error=0 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
		build/asan-$(LUA)/$$t; done
	ASAN_OPTIONS=detect_leaks=1:abort_on_error=0 LSAN_OPTIONS=suppressions=$(CURDIR)/spec/support/lsan.supp:print_suppressions=0:use_tls=0 \
		UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
		LD_PRELOAD="$$($(SAN_CC) -print-file-name=libasan.so) $$($(SAN_CC) -print-file-name=libubsan.so)" \
		$(LUA) $(BUSTED) --lpath='lua/?.lua;lua/?/init.lua;./?.lua' --cpath='build/asan-$(LUA)/?.so' $(BUSTED_ARGS) spec

# luacheck, and the rockspecs held to the sources and Lua files built here
lint: | deps
	luacheck --quiet lua spec examples bench scripts bin/sturdy
	@$(LUA) scripts/check-rockspecs.lua 'sturdy.core=$(CORE_SRC)' 'sturdy.policy=$(POLICY_LIB_SRC)' \
		'sturdy.netdiag=$(NETDIAG_SRC)' 'lua=$(wildcard lua/sturdy/*.lua lua/sturdy/*/*.lua)' \
		$(wildcard rockspec/*.rockspec)

# The rock as users install it: plain `luarocks make` and `luarocks install`
# into scratch trees, loaded from outside the checkout (scripts/check-rock.sh)
check-rock: deps
	@sh scripts/check-rock.sh

# The README's two commands on a fresh Debian root (scripts/check-fresh.sh; root)
check-fresh:
	@sh scripts/deps.sh fresh
	@sh scripts/check-fresh.sh

demo: deps $(CORE_SO) $(POLICY_SO)
	STURDY_CPATH='$(BUILD)/?.so' $(LUA) spec/support/with_mock.lua \
		$(LUA) -e "package.path='lua/?.lua;lua/?/init.lua;./?.lua;'..package.path; package.cpath='$(BUILD)/?.so;'..package.cpath" examples/demo.lua

bench: deps $(CORE_SO) $(POLICY_SO)
	@sh bench/micro.sh $(BUILD)
	@sh bench/run.sh $(LUA) $(BUILD)
	@$(MAKE) --no-print-directory bench-cache

# A fallback chain's own cost per call, beside the same call made on the provider
.PHONY: bench-fallback
bench-fallback: deps $(CORE_SO) $(POLICY_SO)
	STURDY_CPATH='$(BUILD)/?.so' $(LUA) spec/support/with_mock.lua \
		$(LUA) -e "package.path='lua/?.lua;lua/?/init.lua;./?.lua;'..package.path; package.cpath='$(BUILD)/?.so;'..package.cpath" bench/fallback.lua

# The cache's memory backend: hit cost and lookups from 1e3 to 1e6 entries
bench-cache: deps $(CORE_SO) $(POLICY_SO)
	STURDY_CPATH='$(BUILD)/?.so' $(LUA) spec/support/with_mock.lua \
		$(LUA) -e "package.path='lua/?.lua;lua/?/init.lua;./?.lua;'..package.path; package.cpath='$(BUILD)/?.so;'..package.cpath" bench/cache.lua

# sturdy.metrics: rendering the metrics of 50 upstream keys, beside reading their stats
bench-metrics: deps $(CORE_SO) $(POLICY_SO)
	STURDY_CPATH='$(BUILD)/?.so' $(LUA) spec/support/with_mock.lua \
		$(LUA) -e "package.path='lua/?.lua;lua/?/init.lua;./?.lua;'..package.path; package.cpath='$(BUILD)/?.so;'..package.cpath" bench/metrics.lua

# Limits shared through Redis: cost per call against a local limit, leases' accuracy
bench-shared: deps $(CORE_SO) $(POLICY_SO)
	STURDY_CPATH='$(BUILD)/?.so' $(LUA) bench/shared.lua

# sturdy.cosocket in nginx against a plain proxy_pass to the mock, with wrk
# CPU per provider call with adaptive concurrency, spend caps and hedging off and on
bench-features: deps $(CORE_SO) $(POLICY_SO)
	STURDY_CPATH='$(BUILD)/?.so' $(LUA) spec/support/with_mock.lua \
		$(LUA) -e "package.path='lua/?.lua;lua/?/init.lua;./?.lua;'..package.path; package.cpath='$(BUILD)/?.so;'..package.cpath" bench/features.lua

bench-cosocket: deps ngx-policy
	$(LUA) bench/cosocket.lua

# The OpenResty example (two workers) against the mock: well, rate limited, down
demo-openresty: deps ngx-policy
	LUA_PATH='lua/?.lua;lua/?/init.lua;;' $(LUA) examples/openresty/demo.lua

# The ngx transport's figures: a slow API on one worker, overhead against
# proxy_pass, two workers against a down API and against a rate limit
bench-openresty: deps ngx-policy
	LUA_PATH='lua/?.lua;lua/?/init.lua;./?.lua;;' $(LUA) bench/openresty.lua

# The official Anthropic and OpenAI SDKs (from npm) accept the mock's replies and streams
fidelity: deps
	sh spec/fidelity/run.sh

# The parsers under libFuzzer (clang and its runtime, libclang-rt-14-dev), one
# target after another for FUZZ_SECONDS each; FUZZ_TARGETS picks some. Seeds are
# written here, corpora grow under build/fuzz/corpus/<target>; see fuzz/README.md.
FUZZ_SECONDS ?= 60
FUZZ_TARGETS ?= sse headers httpdate ratelimit
FUZZ_FLAGS := -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer
FUZZ_SRC_sse := src/policy/sse.c src/policy/buf.c
FUZZ_SRC_headers := src/policy/headers.c src/policy/buf.c
FUZZ_SRC_httpdate := src/policy/httpdate.c
FUZZ_SRC_ratelimit := src/policy/ratelimit.c src/policy/httpdate.c
FUZZ_CORPUS := build/fuzz/corpus

build/fuzz/fuzz_%: fuzz/fuzz_%.c $(POLICY_SRC) $(HEADERS)
	@mkdir -p $(dir $@)
	clang $(WARNINGS) $(WERROR) -g -O1 $(FUZZ_FLAGS) -Isrc/policy -o $@ $< $(FUZZ_SRC_$*)

fuzz-seeds:
	@for t in sse headers httpdate ratelimit; do mkdir -p $(FUZZ_CORPUS)/$$t; done
	@# sse: 4 header bytes (limit, stop after, chunk seed), then a stream
	@printf '\000\000\001\007event: message_start\ndata: {"a":1}\n\nevent: ping\ndata: {}\n\ndata: [DONE]\n\n' > $(FUZZ_CORPUS)/sse/seed-events
	@printf '\000\000\002\003\357\273\277id: 7\r\nretry: 10\r\ndata: a\r\ndata: b\r\r: note\n\ndata:cut' > $(FUZZ_CORPUS)/sse/seed-line-endings
	@# headers: limit byte, split byte (0: after LF, 1: on 0xFF), then the head
	@printf '\000\000HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nretry-after:  7 \r\nSet-Cookie: a=1\r\nset-cookie: b=2\r\n\r\n' > $(FUZZ_CORPUS)/headers/seed-head
	@printf '\040\001HTTP/2 429 \377x-ratelimit-limit-requests: 60\377 folded\377bad name: x\377nul: a\000b\377:empty\r\n\377x: \t\r\n' > $(FUZZ_CORPUS)/headers/seed-limits
	@printf '\000\000HTTP/1.0 529 Overloaded\nanthropic-ratelimit-requests-remaining:0\nretry-after-ms: 250.5\n' > $(FUZZ_CORPUS)/headers/seed-lf
	@# httpdate: "NOW_MS\nVALUE", or a value alone
	@printf '1764072000000\nSun, 06 Nov 1994 08:49:37 GMT' > $(FUZZ_CORPUS)/httpdate/seed-imf
	@printf '1764072000000\nSunday, 06-Nov-94 08:49:37 GMT  ' > $(FUZZ_CORPUS)/httpdate/seed-rfc850
	@printf '1764072000000\nSun Nov  6 08:49:37 1994' > $(FUZZ_CORPUS)/httpdate/seed-asctime
	@printf '1764072000000\nWed, 26 Nov 2025 12:00:30 GMT' > $(FUZZ_CORPUS)/httpdate/seed-future
	@printf '\t 120 ' > $(FUZZ_CORPUS)/httpdate/seed-seconds
	@printf '250.5' > $(FUZZ_CORPUS)/httpdate/seed-ms
	@printf -- '-9223372036854775808\nFri, 31 Dec 9999 23:59:60 GMT' > $(FUZZ_CORPUS)/httpdate/seed-extremes
	@printf '4102444800000\nTuesday, 29-Feb-00 00:00:00 GMT' > $(FUZZ_CORPUS)/httpdate/seed-century
	@# ratelimit: a script, one command per line (see fuzz/README.md)
	@printf 'I 0 0 0 0 1 1000\nH anthropic-ratelimit-requests-limit: 50\nH anthropic-ratelimit-requests-remaining: 0\nH anthropic-ratelimit-requests-reset: 2025-11-25T12:00:02Z\nD\nW\nT 500\nA 1 10 5 15\nT 2000\nW 1 0 0 0\n' > $(FUZZ_CORPUS)/ratelimit/seed-anthropic
	@printf 'H x-ratelimit-limit-requests: 600\nH x-ratelimit-remaining-requests: 3\nH x-ratelimit-reset-requests: 1m0.5s\nH x-ratelimit-limit-tokens:30000\nH X-RateLimit-Remaining-Tokens: 12.5\nD\nA\nA\nA\nW\nC 3 -500\nP 1500\nW 1 nan inf -1\nL 1 1e300 -1 99999999999999999\n' > $(FUZZ_CORPUS)/ratelimit/seed-openai
	@printf 'R 2025-11-25t12:00:00.1234+01:00\nG +1h2m3.5s\nG 250\302\265s\nG 0\nN anthropic-ratelimit-tokens-reset\nS 7 1 50 12345\nS 600 2.5 200 99\nI nan -1 1e13 60 inf -9223372036854775808\nT 9223372036854775807\nW\nT -5\nW\n' > $(FUZZ_CORPUS)/ratelimit/seed-extremes

fuzz: deps
	@$(MAKE) --no-print-directory $(addprefix build/fuzz/fuzz_,$(FUZZ_TARGETS)) fuzz-seeds
	@set -e; for t in $(FUZZ_TARGETS); do \
		echo "== fuzz_$$t for $(FUZZ_SECONDS) s"; \
		dict=""; [ -f fuzz/$$t.dict ] && dict="-dict=fuzz/$$t.dict"; \
		build/fuzz/fuzz_$$t -max_total_time=$(FUZZ_SECONDS) -print_final_stats=1 \
			-artifact_prefix=build/fuzz/$$t- $$dict $(FUZZ_CORPUS)/$$t; done

# 1000 calls against the mock's 3000/min limiter that sturdy is not told about
goodput: deps $(CORE_SO) $(POLICY_SO)
	STURDY_CPATH='$(BUILD)/?.so' $(LUA) spec/support/with_mock.lua $(LUA) bench/goodput.lua

# LDoc runs on Lua 5.1, where Debian's lua-markdown installs markdown.lua;
# config.ld lists the modules. --testing leaves the date out (reproducible).
docs: deps
	@rm -rf build/docs
	lua5.1 "$$(command -v ldoc)" --fatalwarnings --testing .

# Mixed mock faults at concurrency 64 through the public API, hooks calling back
# into the client (SOAK_HOOKS=0: they only count); CI runs SOAK_SECONDS=60
SOAK_SECONDS ?= 600
soak: deps $(CORE_SO) $(POLICY_SO)
	SOAK_SECONDS=$(SOAK_SECONDS) STURDY_CPATH='$(BUILD)/?.so' $(LUA) spec/support/with_mock.lua $(LUA) bench/soak.lua

clean:
	rm -rf build
