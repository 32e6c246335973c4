#!/bin/sh
# make check-rock: the rock as users install it, each into a scratch tree and
# loaded from / with only that tree's paths (scripts/rock-load.lua checks that
# sturdy, sturdy.core and sturdy.policy come from the tree and that a call
# goes through libcurl):
#
#   1. `luarocks make` of the scm rockspec with no variables, for Lua 5.4, 5.3,
#      5.2 and 5.1 (loaded by lua5.1 and by LuaJIT, and by nginx's LuaJIT with
#      the README's lua_package_path / lua_package_cpath lines);
#      policy.so neither imports nor links libcurl;
#   2. `luarocks install` of the released rockspec (0.2.0-1; its source URL
#      pointed at a clone of HEAD tagged as the rockspec says) for 5.4, and of
#      the source rock `luarocks pack` makes of it for 5.1 (LuaJIT);
#   3. libcurl elsewhere, with Debian's curl headers hidden (a private mount
#      namespace): CURL_DIR, CURL_INCDIR + CURL_LIBDIR, and /usr/local with no
#      variables; the libcurl in use must be the one pointed at;
#   4. `luarocks test`, filtered to one group of specs.
#
# lua-cjson comes from Debian's package (`make deps`), so LuaRocks is told not
# to fetch dependencies (--deps-mode=none); everything else is as typed by users.
set -eu

here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
SCM=rockspec/sturdy-scm-1.rockspec
LOAD="$here/scripts/rock-load.lua"

fail() { echo "check-rock: $*" >&2; exit 1; }

# luarocks VERSION ARGS...: quiet unless it fails.
luarocks_run() {
    v=$1; shift
    log="$scratch/luarocks.log"
    luarocks --lua-version "$v" "$@" >"$log" 2>&1 || { cat "$log" >&2; fail "luarocks --lua-version $v $* failed"; }
}

# load VERSION TREE INTERPRETER [WANT_VERSION [LIBCURL_DIR]]: rock-load.lua from /.
load() {
    v=$1 tree=$2 lua=$3; shift 3
    (cd / && eval "$(luarocks --lua-version "$v" path --tree "$tree")" && "$lua" "$LOAD" "$tree" "$@") ||
        fail "$lua could not load the rock from $tree"
}

# policy.so: no libcurl symbol and no libcurl among its libraries; core.so links it.
check_libraries() {
    dir=$1
    nm -D "$dir/policy.so" | grep -i curl && fail "$dir/policy.so refers to curl symbols (above)"
    readelf -d "$dir/policy.so" | grep NEEDED | grep -i curl && fail "$dir/policy.so links libcurl"
    readelf -d "$dir/core.so" | grep NEEDED | grep -q libcurl || fail "$dir/core.so does not link libcurl"
    echo "rock ok: $dir/policy.so has no curl symbol or library"
}

# In a private mount namespace (check-rock.sh --elsewhere SCRATCH): Debian's
# curl headers hidden, a copy of them and of libcurl in three other places.
elsewhere() {
    incdir=$(pkg-config --variable=includedir libcurl)
    libdir=$(pkg-config --variable=libdir libcurl)
    [ -f "$incdir/curl/curl.h" ] || fail "no curl.h in $incdir (make deps installs libcurl4-openssl-dev)"
    libcurl=$(readlink -f "$libdir/libcurl.so")
    soname=$(readelf -d "$libcurl" | sed -n 's/.*SONAME.*\[\(.*\)\].*/\1/p')
    cp -r "$incdir/curl" "$scratch/curl-headers"
    mount -t tmpfs tmpfs "$incdir/curl"
    [ ! -e "$incdir/curl/curl.h" ] || fail "could not hide $incdir/curl"

    put_curl "$scratch/prefix/include" "$scratch/prefix/lib"
    luarocks_run 5.4 make --deps-mode=none --tree "$scratch/dir" "$SCM" CURL_DIR="$scratch/prefix"
    load 5.4 "$scratch/dir" lua5.4 - "$scratch/prefix/lib"

    put_curl "$scratch/split/headers" "$scratch/split/libs"
    luarocks_run 5.4 make --deps-mode=none --tree "$scratch/split-tree" "$SCM" \
        CURL_INCDIR="$scratch/split/headers" CURL_LIBDIR="$scratch/split/libs"
    load 5.4 "$scratch/split-tree" lua5.4 - "$scratch/split/libs"

    mount -t tmpfs tmpfs /usr/local
    put_curl /usr/local/include /usr/local/lib
    luarocks_run 5.4 make --deps-mode=none --tree "$scratch/usr-local" "$SCM"
    load 5.4 "$scratch/usr-local" lua5.4 - /usr/local/lib
}

# put_curl INCDIR LIBDIR: a copy of the headers and of the library there.
put_curl() {
    mkdir -p "$1" "$2"
    cp -r "$scratch/curl-headers" "$1/curl"
    cp "$libcurl" "$2/$soname"
    ln -sf "$soname" "$2/libcurl.so"
}

if [ "${1:-}" = --elsewhere ]; then
    scratch=$2
    elsewhere
    exit 0
fi

scratch=$(mktemp -d "${TMPDIR:-/tmp}/sturdy-rock.XXXXXX")
nginx_pid=""
cleanup() {
    rc=$?
    [ -z "$nginx_pid" ] || kill "$nginx_pid" 2>/dev/null || true
    rm -rf "$scratch"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

set -- rockspec/sturdy-[0-9]*.rockspec
[ $# -eq 1 ] && [ -f "$1" ] || fail "expected one released rockspec in rockspec/, found: $*"
RELEASED=$1
rock_version=$(basename "$RELEASED" .rockspec | sed 's/^sturdy-//')   # 0.2.0-1
version=${rock_version%-*}

echo "== luarocks make $SCM (no variables)"
for spec in "5.4 lua5.4" "5.3 lua5.3" "5.2 lua5.2" "5.1 lua5.1 luajit"; do
    # shellcheck disable=SC2086
    set -- $spec
    v=$1; shift
    tree="$scratch/make-$v"
    luarocks_run "$v" make --deps-mode=none --tree "$tree" "$SCM"
    for lua in "$@"; do load "$v" "$tree" "$lua"; done
    check_libraries "$tree/lib/lua/$v/sturdy"
done

echo "== OpenResty-style: nginx's LuaJIT with lua_package_path / lua_package_cpath"
tree="$scratch/make-5.1"
modules=""
for d in /usr/share/nginx/modules /usr/lib/nginx/modules; do
    [ -f "$d/ngx_http_lua_module.so" ] && { modules=$d; break; }
done
[ -n "$modules" ] || fail "no ngx_http_lua_module.so (make deps installs libnginx-mod-http-lua)"
debian_cpath=$(ls -d /usr/lib/*/lua/5.1 2>/dev/null | sed 's|$|/?.so|' | tr '\n' ';')
mkdir -p "$scratch/nginx/tmp"
cat >"$scratch/nginx/nginx.conf" <<EOF
load_module $modules/ndk_http_module.so;
load_module $modules/ngx_http_lua_module.so;
$( [ "$(id -u)" -eq 0 ] && echo "user root;" )
daemon off;
master_process off;
pid $scratch/nginx/nginx.pid;
error_log $scratch/nginx/error.log warn;
events { worker_connections 16; }
http {
  access_log off;
  client_body_temp_path $scratch/nginx/tmp;
  # The README's lines; Debian's nginx also needs its own resty.core and cjson.
  lua_package_path "$tree/share/lua/5.1/?.lua;$tree/share/lua/5.1/?/init.lua;/usr/share/lua/5.1/?.lua;;";
  lua_package_cpath "$tree/lib/lua/5.1/?.so;$debian_cpath;";
  server {
    listen unix:$scratch/nginx/sock;
    location / {
      content_by_lua_block {
        local sturdy = require "sturdy"
        local policy = require "sturdy.policy"
        assert(policy.monotime() > 0)
        ngx.say(sturdy._VERSION, " ", package.searchpath("sturdy.core", package.cpath),
                " ", package.searchpath("sturdy.policy", package.cpath), " ", jit.version)
      }
    }
  }
}
EOF
nginx -p "$scratch/nginx" -c "$scratch/nginx/nginx.conf" &
nginx_pid=$!
i=0
until [ -S "$scratch/nginx/sock" ]; do
    i=$((i + 1))
    [ $i -le 100 ] && kill -0 "$nginx_pid" 2>/dev/null || { cat "$scratch/nginx/error.log" >&2; fail "nginx did not start"; }
    sleep 0.05
done
reply=$(curl -sS --unix-socket "$scratch/nginx/sock" http://localhost/) ||
    { cat "$scratch/nginx/error.log" >&2; fail "nginx could not load sturdy (error log above)"; }
kill "$nginx_pid"; wait "$nginx_pid" 2>/dev/null || true; nginx_pid=""
case "$reply" in
    *" $tree/lib/lua/5.1/sturdy/core.so $tree/lib/lua/5.1/sturdy/policy.so LuaJIT"*)
        echo "rock ok: nginx loaded sturdy $reply" ;;
    *) fail "nginx loaded sturdy from elsewhere: $reply" ;;
esac

echo "== luarocks install $RELEASED (its tag from a clone of HEAD), and its source rock"
git clone --quiet --no-hardlinks "$here" "$scratch/src"
git -C "$scratch/src" checkout --quiet --detach "$(git rev-parse HEAD)"
tag=$(sed -n 's/^ *tag = "\(.*\)",$/\1/p' "$RELEASED")
[ -n "$tag" ] || fail "$RELEASED names no source tag"
git -C "$scratch/src" tag "$tag"
mkdir "$scratch/pack"
sed "s|^\( *url = \)\"git+[^\"]*\",|\1\"git+file://$scratch/src\",|" "$RELEASED" >"$scratch/pack/$(basename "$RELEASED")"
grep -q "git+file://" "$scratch/pack/$(basename "$RELEASED")" || fail "could not point $RELEASED at the clone"
(cd "$scratch/pack" && luarocks_run 5.4 pack "$(basename "$RELEASED")")
rock="$scratch/pack/sturdy-$rock_version.src.rock"
[ -f "$rock" ] || fail "luarocks pack made no $rock"
# 5.4 from the rockspec (LuaRocks fetches the tag), 5.1 from the source rock
luarocks_run 5.4 install --deps-mode=none --tree "$scratch/install-5.4" "$scratch/pack/$(basename "$RELEASED")"
load 5.4 "$scratch/install-5.4" lua5.4 "$version"
luarocks_run 5.1 install --deps-mode=none --tree "$scratch/install-5.1" "$rock"
load 5.1 "$scratch/install-5.1" luajit "$version"

echo "== libcurl elsewhere: CURL_DIR, CURL_INCDIR + CURL_LIBDIR, /usr/local"
incdir=$(pkg-config --variable=includedir libcurl)
libdir=$(pkg-config --variable=libdir libcurl)
[ -f "$incdir/curl/curl.h" ] || fail "no curl.h in $incdir (make deps installs libcurl4-openssl-dev)"
libcurl=$(readlink -f "$libdir/libcurl.so")
soname=$(readelf -d "$libcurl" | sed -n 's/.*SONAME.*\[\(.*\)\].*/\1/p')
userns=""
[ "$(id -u)" -eq 0 ] || userns="--map-root-user"
# shellcheck disable=SC2086
unshare --mount --propagation private $userns sh "$0" --elsewhere "$scratch" ||
    fail "a build against libcurl elsewhere failed (above)"

echo "== luarocks test (the specs filtered to 'sturdy client success paths')"
luarocks --lua-version 5.4 test "$SCM" -- --filter="sturdy client success paths" >"$scratch/test.log" 2>&1 ||
    { cat "$scratch/test.log" >&2; fail "luarocks test failed"; }
grep -E '^[0-9]+ successes / 0 failures / 0 errors' "$scratch/test.log" | grep -qv '^0 successes' ||
    { cat "$scratch/test.log" >&2; fail "luarocks test ran no spec"; }
echo "rock ok: luarocks test ran the C tests and $(sed -n 's/^\([0-9]*\) successes .*/\1/p' "$scratch/test.log") specs, none failing"
echo "check-rock: ok"
