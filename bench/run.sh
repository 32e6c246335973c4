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

# The mock's nginx on one core and the clients on the other, so that both
# sides of a comparison meet the same scheduler (two cores is the norm here).
server_cpu="" client_cpu=""
if command -v taskset >/dev/null 2>&1 && [ "$(nproc)" -ge 2 ]; then
    server_cpu="taskset -c 0" client_cpu="taskset -c 1"
fi

STURDY_CPATH="$BUILD/?.so" exec $server_cpu "$LUA" spec/support/with_mock.lua \
    $client_cpu sh bench/driver.sh "$LUA" "$BUILD"
