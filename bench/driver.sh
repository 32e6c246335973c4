#!/bin/sh
# Runs the benchmarks against the mock API that spec/support/with_mock.lua has
# started (it sets STURDY_MOCK_URL). Called by bench/run.sh; run from the
# repository root.
#
# usage: sh bench/driver.sh LUA BUILD
# env:   BENCH_ROUNDS (7), BENCH_N_SEQ (2000), BENCH_N_MULTI (10000)
# shellcheck disable=SC2317  # the benchmark functions are called indirectly
set -u

LUA=${1:?usage: driver.sh LUA BUILD}
BUILD=${2:?usage: driver.sh LUA BUILD}
: "${STURDY_MOCK_URL:?STURDY_MOCK_URL is not set: run me under spec/support/with_mock.lua}"
export STURDY_CPATH="${STURDY_CPATH:-$BUILD/?.so}"

BARE=$BUILD/bench-bare
BODY=bench/request.json
URL=$STURDY_MOCK_URL/v1/messages
ROUNDS=${BENCH_ROUNDS:-9}
N_SEQ=${BENCH_N_SEQ:-3000}
N_MULTI=${BENCH_N_MULTI:-10000}

TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
: >"$TMP/summary"
status=0

# --- the benchmarks: each takes N and prints one requests_per_s=... line ---

bare_seq() { "$BARE" seq "$URL" "$1" "$BODY"; }
sturdy_seq() { "$LUA" bench/seq.lua "$1" "$BODY"; }
bare_multi_16() { "$BARE" multi "$URL" "$1" 16 "$BODY"; }
bare_multi_64() { "$BARE" multi "$URL" "$1" 64 "$BODY"; }
sturdy_batch_16() { "$LUA" bench/batch.lua "$1" 16 "$BODY"; }
sturdy_batch_64() { "$LUA" bench/batch.lua "$1" 64 "$BODY"; }
JIT_BUILD=build/luajit
luajit_seq() { STURDY_CPATH="$JIT_BUILD/?.so" luajit bench/seq.lua "$1" "$BODY"; }
luajit_batch_16() { STURDY_CPATH="$JIT_BUILD/?.so" luajit bench/batch.lua "$1" 16 "$BODY"; }
sturdy_request() { "$LUA" bench/provider.lua "$1" request "$BODY"; }
sturdy_anthropic() { "$LUA" bench/provider.lua "$1" anthropic "$BODY"; }

# --- machinery ---

# measure FN N: runs one benchmark, prints its line, records its rate in
# $TMP/FN and its CPU per call (µs) in $TMP/FN.cpu
measure() {
    line=$("$1" "$2")
    rc=$?
    printf '    %-16s %s\n' "$1" "${line:-(no output, exit $rc)}"
    case $line in
    requests_per_s=*) ;;
    *) status=1; return ;;
    esac
    [ "$rc" -eq 0 ] || status=1
    rate=${line#requests_per_s=}
    echo "${rate%% *}" >>"$TMP/$1"
    cpu=${line#*cpu_us=}
    echo "${cpu%% *}" >>"$TMP/$1.cpu"
}

# median FILE: the median of the figures recorded in $TMP/FILE
median() {
    [ -s "$TMP/$1" ] || { echo "n/a"; return; }
    sort -g "$TMP/$1" | awk '{ v[NR] = $1 }
        END { if (NR % 2) printf "%.1f\n", v[(NR + 1) / 2];
              else printf "%.1f\n", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}

# ratio A B: A/B with two decimals
ratio() {
    awk -v a="$1" -v b="$2" 'BEGIN { if (a + 0 > 0 && b + 0 > 0) printf "%.2f\n", a / b; else print "n/a" }'
}

# section TITLE N BASE BASE_LABEL CAND CAND_LABEL
#   A warm-up of each side, then ROUNDS rounds; rounds alternate which side
#   goes first so neither always runs on a warmer (or more tired) machine.
#   CAND may be "-" while the candidate does not exist yet.
section() {
    title=$1 n=$2 base=$3 base_label=$4 cand=$5 cand_label=$6
    echo "== $title: N=$n, $ROUNDS rounds"
    warm=$((n / 10 > 100 ? n / 10 : 100))
    "$base" "$warm" >/dev/null
    [ "$cand" = - ] || "$cand" "$warm" >/dev/null
    r=1
    while [ "$r" -le "$ROUNDS" ]; do
        echo "  round $r"
        if [ "$cand" = - ]; then
            measure "$base" "$n"
        elif [ $((r % 2)) -eq 1 ]; then
            measure "$base" "$n"
            measure "$cand" "$n"
        else
            measure "$cand" "$n"
            measure "$base" "$n"
        fi
        r=$((r + 1))
    done
    mb=$(median "$base") cb=$(median "$base.cpu")
    echo "  median $base_label: $mb requests/s, $cb µs CPU per call"
    if [ "$cand" = - ]; then
        echo "  $cand_label: not yet available"
        echo "$title: $base_label $mb/s; $cand_label: not yet available" >>"$TMP/summary"
    else
        mc=$(median "$cand") cc=$(median "$cand.cpu")
        q=$(ratio "$mc" "$mb") qc=$(ratio "$cc" "$cb")
        echo "  median $cand_label: $mc requests/s, $cc µs CPU per call"
        echo "  $cand_label/$base_label: throughput $q, CPU per call $qc"
        printf '%-22s %s %s/s %s µs | %s %s/s %s µs | throughput %s, CPU per call %s\n' "$title:" \
            "$base_label" "$mb" "$cb" "$cand_label" "$mc" "$cc" "$q" "$qc" >>"$TMP/summary"
    fi
    echo
}

echo "bench: $(curl-config --version 2>/dev/null || echo libcurl), $LUA, mock at $STURDY_MOCK_URL, ${BENCH_PINNED:-unpinned}"
echo

# The mock advertises a request limit in its rate-limit headers, which sturdy
# would learn and pace to; here the server's own speed is the subject.
curl -s -o /dev/null -X POST -H 'content-type: application/json' \
    -d '{"rate_limit":{"rpm":1000000000,"burst":1000000}}' "$STURDY_MOCK_URL/_mock/config"

section "sequential" "$N_SEQ" bare_seq bare sturdy_seq sturdy
section "concurrent c=16" "$N_MULTI" bare_multi_16 "bare multi" sturdy_batch_16 "sturdy batch"
section "concurrent c=64" "$N_MULTI" bare_multi_64 "bare multi" sturdy_batch_64 "sturdy batch"
if [ -f "$JIT_BUILD/sturdy/core.so" ] && command -v luajit >/dev/null 2>&1; then
    section "sequential, LuaJIT" "$N_SEQ" bare_seq bare luajit_seq "sturdy (luajit)"
    section "concurrent c=16, LuaJIT" "$N_MULTI" bare_multi_16 "bare multi" luajit_batch_16 "sturdy batch (luajit)"
else
    echo "(no LuaJIT rows: make LUA=luajit builds $JIT_BUILD)"
fi
section "provider layer" "$N_SEQ" sturdy_request "client:request" sturdy_anthropic "anthropic:messages"

echo "== summary (medians of alternating rounds in this run)"
cat "$TMP/summary"
[ "$status" -eq 0 ] || echo "bench: some requests failed or a benchmark did not report; see above" >&2
exit "$status"
