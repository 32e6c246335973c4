#!/bin/sh
# Benchmarks sturdy against a bare libcurl client, under one mock API.
# usage: sh bench/run.sh LUA BUILD      (make bench: sh bench/run.sh lua5.4 build/lua5.4)
set -e
LUA=${1:-lua5.4}
BUILD=${2:-build/$LUA}
cd "$(dirname "$0")/.."

if [ ! -f "$BUILD/sturdy/core.so" ]; then
    echo "bench: $BUILD/sturdy/core.so is missing; run make LUA=$LUA first" >&2
    exit 1
fi
if [ ! -f spec/support/with_mock.lua ]; then
    echo "bench: spec/support/with_mock.lua (the mock API) is missing" >&2
    exit 1
fi

mkdir -p "$BUILD"
# shellcheck disable=SC2046
${CC:-cc} -std=c99 -O2 -Wall -Wextra $(pkg-config --cflags libcurl) \
    -o "$BUILD/bench-bare" bench/bare.c $(pkg-config --libs libcurl 2>/dev/null || echo -lcurl)

# Unpinned first, as users run it: the client shares the cores with the mock,
# so its own cost shows. Then pinned (the mock's nginx on one core, the
# clients on the other), which hides the client's cost from the server's:
# both are printed. BENCH_PIN=unpinned|pinned runs one.
status=0
if [ "${BENCH_PIN:-both}" != pinned ]; then
    STURDY_CPATH="$BUILD/?.so" BENCH_PINNED=unpinned "$LUA" spec/support/with_mock.lua \
        sh bench/driver.sh "$LUA" "$BUILD" || status=1
fi
if [ "${BENCH_PIN:-both}" != unpinned ] && command -v taskset >/dev/null 2>&1 && [ "$(nproc)" -ge 2 ]; then
    STURDY_CPATH="$BUILD/?.so" BENCH_PINNED=pinned taskset -c 0 "$LUA" spec/support/with_mock.lua \
        taskset -c 1 sh bench/driver.sh "$LUA" "$BUILD" || status=1
fi
exit $status
