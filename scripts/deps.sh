#!/bin/sh
# Installs the Debian packages a make target needs, asking apt-get only when
# one is missing (as root, or with sudo):
#
#   sh scripts/deps.sh build   compiler, pkg-config, libcurl and Lua headers,
#                              lua-cjson: `make`, `make install`
#   sh scripts/deps.sh suite   build + interpreters, busted, luacheck, luarocks,
#                              clang, the mock API (nginx + Lua): `make test` etc.
#   sh scripts/deps.sh fresh   debootstrap: `make check-fresh`
#
# Elsewhere than Debian it names the packages (Debian names) and leaves them to you.
set -e
BUILD="build-essential pkg-config libcurl4-openssl-dev
liblua5.1-0-dev liblua5.2-dev liblua5.3-dev liblua5.4-dev libluajit2-5.1-dev lua-cjson"
SUITE="$BUILD clang libclang-rt-14-dev openssl curl
lua5.1 lua5.2 lua5.3 lua5.4 luajit2 lua-socket lua-busted lua-check luarocks lua-luv
nginx libnginx-mod-http-lua lua-resty-core lua-resty-lrucache redis-server redis-tools lua-redis lua-nginx-redis
wrk lua-ldoc lua-markdown prometheus python3-prometheus-client"
FRESH="debootstrap"

case "${1:-suite}" in
    build) PACKAGES=$BUILD ;;
    suite) PACKAGES=$SUITE ;;
    fresh) PACKAGES=$FRESH ;;
    *) echo "deps.sh: unknown group '$1' (build, suite or fresh)" >&2; exit 2 ;;
esac
PACKAGES=$(echo $PACKAGES)   # one line, single spaces

if ! command -v dpkg-query >/dev/null 2>&1 || ! command -v apt-get >/dev/null 2>&1; then
    echo "deps: no dpkg/apt-get here; install the equivalents of: $PACKAGES" >&2
    exit 0
fi

# One dpkg-query for all: it prints the installed ones, names unknown ones on stderr.
# shellcheck disable=SC2086
installed=" $(dpkg-query -W -f='${db:Status-Abbrev} ${Package}\n' $PACKAGES 2>/dev/null |
    awk '$1 == "ii" { printf "%s ", $2 }')"
missing=""
for p in $PACKAGES; do
    case "$installed" in *" $p "*) ;; *) missing="$missing $p" ;; esac
done
[ -z "$missing" ] && exit 0

echo "installing:$missing"
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null 2>&1 || { echo "deps: installing needs root or sudo" >&2; exit 1; }
    SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
# shellcheck disable=SC2086
$SUDO apt-get install -y -qq --no-install-recommends $missing >/dev/null
