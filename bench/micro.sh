#!/bin/sh
# Micro-benchmark of the pure C policies (breaker, latency window, limiter,
# adaptive concurrency, spend caps, hedge budget) against a naive tracker. No
# Lua, no network: compiles bench/micro.c with -O2 and runs it.
# usage: sh bench/micro.sh [BUILD [ROUNDS]]      (defaults: build, 7)
set -e
BUILD=${1:-build}
ROUNDS=${2:-7}
cd "$(dirname "$0")/.."

mkdir -p "$BUILD"
${CC:-cc} -std=c99 -O2 -Wall -Wextra -Isrc/policy -o "$BUILD/bench-micro" \
    bench/micro.c src/policy/breaker.c src/policy/latency.c src/policy/ratelimit.c src/policy/httpdate.c \
    src/policy/adaptive.c src/policy/spend.c src/policy/budget.c -lm

# One core, when possible, so the figures do not wander between runs.
pin=""
if command -v taskset >/dev/null 2>&1; then
    pin="taskset -c 0"
fi
exec $pin "$BUILD/bench-micro" "$ROUNDS"
