#!/bin/sh
# Installs the Debian packages the build, the suite and the mock API need,
# asking apt-get only when one is missing.
set -e
PACKAGES="build-essential pkg-config clang libclang-rt-14-dev libcurl4-openssl-dev openssl curl
lua5.1 lua5.2 lua5.3 lua5.4 liblua5.1-0-dev liblua5.2-dev liblua5.3-dev liblua5.4-dev
luajit2 libluajit2-5.1-dev lua-cjson lua-socket lua-busted lua-check luarocks lua-luv
nginx libnginx-mod-http-lua lua-resty-core lua-resty-lrucache redis-server redis-tools lua-redis wrk lua-ldoc lua-markdown"

missing=""
for p in $PACKAGES; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
[ -z "$missing" ] && exit 0

echo "installing:$missing"
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
# shellcheck disable=SC2086
$SUDO apt-get install -y -qq --no-install-recommends $missing >/dev/null
