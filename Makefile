# sturdy: build, install and test.
#   make                 build sturdy/core.so for $(LUA) (default lua5.4)
#   make install         install where `require "sturdy"` finds it
#   make test            install missing Debian packages, then run the suite on $(LUA)
#   make test-all        the suite on Lua 5.1, 5.2, 5.3, 5.4 and LuaJIT
#   make test-asan       the suite with AddressSanitizer + UndefinedBehaviorSanitizer
#   make demo            the main job against the bundled mock API
#   make bench           micro-benchmarks, and benchmarks against a bare libcurl client
#   make bench-cache     the cache's memory backend: hit cost, lookups against entry count
#   make bench-shared    limits shared through Redis: cost per call, with and without leases
#   make goodput         goodput under a provider rate limit learned from headers
#   make bench-cosocket  sturdy.cosocket inside nginx against proxy_pass (wrk)
#   make fidelity        the official SDKs against the mock (installs them with npm)
#   make fuzz            the SSE parser under libFuzzer for 60 s
#   make docs            the API reference (LDoc) into build/docs; a warning fails it

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

ifdef LUA_INCDIR
LUA_CFLAGS := -I$(LUA_INCDIR)
else
LUA_CFLAGS := $(shell $(PKG_CONFIG) --cflags $(LUA_PC) 2>/dev/null)
endif
CURL_CFLAGS := $(shell $(PKG_CONFIG) --cflags libcurl 2>/dev/null)
CURL_LIBS := $(shell $(PKG_CONFIG) --libs libcurl 2>/dev/null || echo -lcurl)

BUILD ?= build/$(LUA)
# The layers, one folder each: pure policies (no I/O, no clock), the curl
# transport, and the Lua bindings.
POLICY_SRC := $(wildcard src/policy/*.c)
CURL_SRC := $(filter-out src/curl/diagnose.c,$(wildcard src/curl/*.c))
CORE_SRC := $(CURL_SRC) src/lua/core.c src/lua/convert.c src/lua/request.c $(POLICY_SRC)
NETDIAG_SRC := src/curl/diagnose.c src/lua/netdiag.c src/policy/httpdate.c
POLICY_LIB_SRC := src/lua/policy.c src/lua/convert.c $(POLICY_SRC)
INCLUDES := -Isrc/policy -Isrc/curl -Isrc/lua
C_TESTS := test_policies test_breaker test_latency test_ratelimit test_sse test_headers test_sha256 test_adaptive test_spend
HEADERS := $(wildcard src/*/*.h)
C_TESTS += test_decide test_fleet
CORE_SO := $(BUILD)/sturdy/core.so
POLICY_SO := $(BUILD)/sturdy/policy.so
NETDIAG_SO := $(BUILD)/sturdy/netdiag.so

BUSTED ?= /usr/bin/busted
BUSTED_ARGS ?=
SUITE_LUAS := lua5.1 lua5.2 lua5.3 lua5.4 luajit

SAN_FLAGS := -fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer
SAN_CC ?= gcc

.PHONY: all install uninstall deps test test-lua test-c test-all test-asan lint check-rock demo bench goodput fidelity fuzz clean ngx-policy bench-cosocket bench-cache bench-shared docs

all: $(CORE_SO) $(POLICY_SO) $(NETDIAG_SO)

# Only luaopen_* is exported: the libraries carry some of the same C code.
SO_FLAGS := -fPIC -shared -fvisibility=hidden

$(CORE_SO): $(CORE_SRC) $(HEADERS)
	@mkdir -p $(dir $@)
	$(CC) $(WARNINGS) $(WERROR) $(CFLAGS) $(SO_FLAGS) $(INCLUDES) $(LUA_CFLAGS) $(CURL_CFLAGS) \
		-o $@ $(CORE_SRC) $(CURL_LIBS) -lm $(LDFLAGS)

# sturdy.policy: no libcurl, so it loads where blocking I/O must not (OpenResty)
$(POLICY_SO): $(POLICY_LIB_SRC) $(HEADERS)
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

deps:
	@sh scripts/deps.sh

# The pure C policies, tested directly with a virtual clock.
$(BUILD)/test_%: spec/c/test_%.c spec/c/test.h $(POLICY_SRC) $(HEADERS)
	@mkdir -p $(dir $@)
	$(CC) $(WARNINGS) $(WERROR) $(CFLAGS) -Isrc/policy -o $@ $< $(POLICY_SRC) -lm $(LDFLAGS)

test-c: $(addprefix $(BUILD)/,$(C_TESTS))
	@set -e; for t in $(C_TESTS); do $(BUILD)/$$t; done

# The in-nginx specs load sturdy.policy into nginx's LuaJIT: always a plain
# build (nginx carries no sanitizer runtime), whatever this make was given.
NGX_POLICY_MAKE = $(MAKE) --no-print-directory LUA=luajit BUILD=build/luajit CC=cc CFLAGS="-O2 -g" LDFLAGS=
ngx-policy:
	@$(NGX_POLICY_MAKE) -q build/luajit/sturdy/policy.so || $(NGX_POLICY_MAKE) build/luajit/sturdy/policy.so

test-lua: $(CORE_SO) $(POLICY_SO) $(NETDIAG_SO) ngx-policy
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

lint:
	luacheck --quiet lua spec examples bench bin/sturdy

# The rock installs into a scratch tree and loads from outside the checkout.
# Debian keeps curl.h under the multiarch include directory; lua-cjson comes
# from Debian's package, so LuaRocks is not asked to fetch it.
CURL_INCDIR ?= $(shell $(PKG_CONFIG) --variable=includedir libcurl 2>/dev/null)
check-rock: deps
	@tree=$$(mktemp -d) && \
	luarocks --lua-version=$(LUA_VERSION) make --deps-mode=none rockspec/sturdy-scm-1.rockspec \
		--tree "$$tree" CURL_INCDIR=$(CURL_INCDIR) >/dev/null && \
	cd / && eval "$$(luarocks --lua-version=$(LUA_VERSION) path --tree "$$tree")" && \
	$(LUA) -e 'local s = require "sturdy"; assert(s.client and s.Error); print("rock ok: sturdy " .. s._VERSION .. " from " .. package.searchpath("sturdy.core", package.cpath))' ; \
	rc=$$?; rm -rf "$$tree"; exit $$rc

demo: deps $(CORE_SO) $(POLICY_SO)
	STURDY_CPATH='$(BUILD)/?.so' $(LUA) spec/support/with_mock.lua \
		$(LUA) -e "package.path='lua/?.lua;lua/?/init.lua;./?.lua;'..package.path; package.cpath='$(BUILD)/?.so;'..package.cpath" examples/demo.lua

bench: deps $(CORE_SO) $(POLICY_SO)
	@sh bench/micro.sh $(BUILD)
	@sh bench/run.sh $(LUA) $(BUILD)
	@$(MAKE) --no-print-directory bench-cache

# The cache's memory backend: hit cost and lookups from 1e3 to 1e6 entries
bench-cache: deps $(CORE_SO) $(POLICY_SO)
	STURDY_CPATH='$(BUILD)/?.so' $(LUA) spec/support/with_mock.lua \
		$(LUA) -e "package.path='lua/?.lua;lua/?/init.lua;./?.lua;'..package.path; package.cpath='$(BUILD)/?.so;'..package.cpath" bench/cache.lua

# Limits shared through Redis: cost per call against a local limit, leases' accuracy
bench-shared: deps $(CORE_SO) $(POLICY_SO)
	STURDY_CPATH='$(BUILD)/?.so' $(LUA) bench/shared.lua

# sturdy.cosocket in nginx against a plain proxy_pass to the mock, with wrk
bench-cosocket: deps ngx-policy
	$(LUA) bench/cosocket.lua

# The official Anthropic and OpenAI SDKs (from npm) accept the mock's replies and streams
fidelity: deps
	sh spec/fidelity/run.sh

# The SSE parser under libFuzzer (clang and its runtime, libclang-rt-14-dev);
# seeds: 4 header bytes (see fuzz/README.md), then a stream
FUZZ_SECONDS ?= 60
FUZZ_FLAGS := -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer
fuzz: deps
	@mkdir -p build/fuzz/corpus
	clang $(WARNINGS) $(WERROR) -g -O1 $(FUZZ_FLAGS) -Isrc/policy -o build/fuzz/fuzz_sse fuzz/fuzz_sse.c src/policy/sse.c src/policy/buf.c
	@printf '\000\000\001\007event: message_start\ndata: {"a":1}\n\nevent: ping\ndata: {}\n\ndata: [DONE]\n\n' \
		> build/fuzz/corpus/seed-events
	@printf '\000\000\002\003\357\273\277id: 7\r\nretry: 10\r\ndata: a\r\ndata: b\r\r: note\n\ndata:cut' \
		> build/fuzz/corpus/seed-line-endings
	build/fuzz/fuzz_sse -max_total_time=$(FUZZ_SECONDS) -print_final_stats=1 build/fuzz/corpus

# 1000 calls against the mock's 3000/min limiter that sturdy is not told about
goodput: deps $(CORE_SO) $(POLICY_SO)
	STURDY_CPATH='$(BUILD)/?.so' $(LUA) spec/support/with_mock.lua $(LUA) bench/goodput.lua

# LDoc runs on Lua 5.1, where Debian's lua-markdown installs markdown.lua;
# config.ld lists the modules. --testing leaves the date out (reproducible).
docs: deps
	@rm -rf build/docs
	lua5.1 "$$(command -v ldoc)" --fatalwarnings --testing .

clean:
	rm -rf build
