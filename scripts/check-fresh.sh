#!/bin/sh
# make check-fresh: the README's two commands, in README order (`make demo`,
# then `make test`), as the very first commands on a fresh Debian root, inside
# a chroot that shares the machine's network (the mock API runs on loopback).
# Prints how long each took.
#
#   sh scripts/check-fresh.sh          (as root, from the checkout)
#
# The root is what a newcomer has: debootstrap's minbase plus make, git and
# ca-certificates, from the mirror the machine's apt sources name for its own
# release. It is built once and cached as a tarball in STURDY_CACHE (default
# ${XDG_CACHE_HOME:-~/.cache}/sturdy). Each run unpacks a copy into a tmpfs
# (about 1.2 GB of memory by the end of `make test`) and clones the committed
# HEAD into /root/sturdy there. All of it runs in its own mount and PID
# namespaces, so the copy, the mounts and the processes (apt, nginx from the
# specs) end with them, also when a step fails or check-fresh is stopped; a
# trap checks that nothing is left.
#
# Environment: STURDY_FRESH_MIRROR (a mirror URL instead of the apt sources'),
# STURDY_FRESH_SUITE (instead of this machine's release), STURDY_CACHE,
# STURDY_FRESH_COMMANDS (other commands, separated by ';', e.g. "make bench").
set -eu

INCLUDE="make,git,ca-certificates"
commands=${STURDY_FRESH_COMMANDS:-make demo;make test}   # the README's, in its order
# The script runs itself inside the namespaces: --bootstrap WORK, --inside WORK COMMIT.
mode=${1:-} mode_work=${2:-} mode_commit=${3:-}

here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"

fail() { echo "check-fresh: $*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || fail "needs root (debootstrap, chroot, mounts)"
for tool in debootstrap unshare chroot findmnt flock git dpkg; do
    command -v "$tool" >/dev/null 2>&1 || fail "'$tool' not found (make check-fresh installs debootstrap)"
done

# This machine's release and architecture.
suite=${STURDY_FRESH_SUITE:-$(. /etc/os-release && echo "${VERSION_CODENAME:-}")}
[ -n "$suite" ] || fail "no VERSION_CODENAME in /etc/os-release; set STURDY_FRESH_SUITE"
arch=$(dpkg --print-architecture)

# The first enabled "deb" source for $suite with component main, from
# sources.list and sources.list.d/*.list (one-line) and *.sources (deb822),
# in the order apt reads them. Prints "URI KEYRING" (KEYRING "-" when the
# source names no keyring file).
find_mirror() {
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
        [ -f "$f" ] || continue
        case "$f" in
        *.sources) awk -v suite="$suite" '
            function has(list, word,   n, a, i) {
                n = split(list, a, /[ \t]+/)
                for (i = 1; i <= n; i++) if (a[i] == word) return 1
                return 0
            }
            function stanza_end(   n, u) {
                if (has(f["types"], "deb") && has(f["suites"], suite) && has(f["components"], "main") &&
                    tolower(f["enabled"]) != "no") {
                    n = split(f["uris"], u, /[ \t]+/)
                    key = (f["signed-by"] ~ /^\/[^ \t]*$/) ? f["signed-by"] : "-"
                    if (n > 0 && u[1] != "") { print u[1], key; found = 1; exit }
                }
                delete f; last = ""
            }
            /^#/ { next }
            /^[ \t]*$/ { stanza_end(); next }
            /^[ \t]/ { if (last != "") f[last] = f[last] " " $0; next }
            {
                name = tolower(substr($0, 1, index($0, ":") - 1))
                value = substr($0, index($0, ":") + 1)
                gsub(/^[ \t]+|[ \t]+$/, "", value)
                f[name] = value; last = name
            }
            END { if (!found) stanza_end() }' "$f" ;;
        *) awk -v suite="$suite" '
            /^[ \t]*#/ || $1 != "deb" { next }
            {
                key = "-"; i = 2
                if ($2 ~ /^\[/) {
                    for (; i <= NF; i++) {
                        if ($i ~ /^\[?signed-by=/) { key = $i; sub(/^\[?signed-by=/, "", key); sub(/\]$/, "", key) }
                        if ($i ~ /\]$/) { i++; break }
                    }
                }
                uri = $i; s = $(i + 1); main = 0
                for (j = i + 2; j <= NF; j++) if ($j == "main") main = 1
                if (s == suite && main) { print uri, key; exit }
            }' "$f" ;;
        esac
    done | head -n 1
}

if [ -n "${STURDY_FRESH_MIRROR:-}" ]; then
    mirror=$STURDY_FRESH_MIRROR keyring=-
else
    found=$(find_mirror)
    [ -n "$found" ] || fail "no enabled 'deb' source for $suite (component main) in /etc/apt/sources.list*; set STURDY_FRESH_MIRROR"
    mirror=${found% *} keyring=${found##* }
fi
case "$mirror" in
    http://*|https://*|file:/*) ;;
    *) fail "mirror '$mirror' is not http(s) or file; set STURDY_FRESH_MIRROR" ;;
esac

# The cached root: one tarball per suite, architecture, mirror and package set.
cache=${STURDY_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/sturdy}
key=$(printf '%s\n' "$suite" "$arch" "$mirror" "$INCLUDE" | sha256sum | cut -c1-12)
tarball="$cache/fresh-$suite-$arch-$key.tar.gz"

# Run as `check-fresh.sh --bootstrap WORK` in a private mount namespace:
# debootstrap into a tmpfs, so its mounts and files end with the namespace.
bootstrap() {
    dir="$1/bootstrap" log="$1/debootstrap.log"
    mkdir "$dir"
    mount -t tmpfs -o mode=0755 tmpfs "$dir"
    set -- --variant=minbase --include="$INCLUDE" --arch="$arch"
    if [ "$keyring" != - ] && [ -f "$keyring" ]; then set -- "$@" --keyring="$keyring"; fi
    debootstrap "$@" "$suite" "$dir" "$mirror" >"$log" 2>&1 ||
        { tail -n 30 "$log" >&2; fail "debootstrap failed (log above)"; }
    rm -f "$dir"/var/cache/apt/archives/*.deb
    # What every installed system has and debootstrap leaves to the installer.
    [ -s "$dir/etc/hosts" ] ||
        printf '127.0.0.1\tlocalhost\n::1\t\tlocalhost ip6-localhost ip6-loopback\n' >"$dir/etc/hosts"
    tar -C "$dir" --numeric-owner -czf "$tarball.tmp" .
    mv "$tarball.tmp" "$tarball"
}

# Run as `check-fresh.sh --inside WORK COMMIT` as PID 1 of new mount and PID
# namespaces: the root unpacked into a tmpfs, the checkout cloned into it,
# the mounts a running system has, then each command chrooted with a
# login-like environment, timed into WORK/times.
inside() {
    work=$1 commit=$2
    root="$work/root"
    trap inside_cleanup EXIT
    trap 'exit 143' TERM
    mkdir "$root"
    mount -t tmpfs -o mode=0755 tmpfs "$root"
    tar -C "$root" --numeric-owner -xzf "$tarball"
    # Network settings come from the machine (a newcomer's has its own);
    # services that packages install are not started (Debian's policy-rc.d).
    cp -L /etc/resolv.conf "$root/etc/resolv.conf"
    proxy=$(apt-config dump 2>/dev/null | grep -i '^Acquire::[a-z]*::Proxy' || true)
    [ -z "$proxy" ] || echo "$proxy" >"$root/etc/apt/apt.conf.d/01proxy"
    printf '#!/bin/sh\nexit 101\n' >"$root/usr/sbin/policy-rc.d"
    chmod 0755 "$root/usr/sbin/policy-rc.d"
    git clone --quiet --no-hardlinks "$here" "$root/root/sturdy"
    git -C "$root/root/sturdy" checkout --quiet --detach "$commit"

    mount -t proc proc "$root/proc"
    mount -t sysfs sysfs "$root/sys"
    mount --bind /dev "$root/dev"
    mount --bind /dev/pts "$root/dev/pts"
    mount -t tmpfs -o mode=1777 tmpfs "$root/dev/shm"
    IFS=';'
    set -f
    for cmd in $commands; do
        unset IFS
        cmd=$(echo $cmd)   # trimmed (globbing is still off)
        set +f
        [ -n "$cmd" ] || continue
        echo "check-fresh: == $cmd (in the fresh root)"
        t0=$(date +%s.%N)
        rc=0
        # in the background, so that SIGTERM from check-fresh reaches the trap at once
        chroot "$root" env -i HOME=/root USER=root LOGNAME=root SHELL=/bin/sh LANG=C.UTF-8 TERM=dumb \
            PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
            ${http_proxy:+http_proxy=$http_proxy} ${https_proxy:+https_proxy=$https_proxy} \
            ${no_proxy:+no_proxy=$no_proxy} \
            sh -c "cd /root/sturdy && $cmd" &
        wait $! || rc=$?
        secs=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.0f", b - a }')
        printf '%s\t%s\t%s\n' "$cmd" "$rc" "$secs" >>"$work/times"
        [ $rc -eq 0 ] || exit $rc
    done
}

# The namespace's end takes its processes and mounts; this lets what is left
# (nginx from the specs, say) stop on SIGTERM first.
inside_cleanup() {
    for p in /proc/[0-9]*; do
        p=${p#/proc/}
        [ "$p" = 1 ] || [ "$p" = "$$" ] || kill -TERM "$p" 2>/dev/null || true
    done
    sleep 1
    umount -R "$root" 2>/dev/null || true
}

case "$mode" in
    --bootstrap) bootstrap "$mode_work"; exit 0 ;;
    --inside) inside "$mode_work" "$mode_commit"; exit 0 ;;
    "") ;;
    *) fail "unknown argument '$mode'" ;;
esac

# Processes whose root is under WORK, from outside the namespaces.
procs_in() {
    for p in /proc/[0-9]*; do
        r=$(readlink "$p/root" 2>/dev/null) || continue
        case "$r/" in "$1"/*) echo "${p#/proc/}" ;; esac
    done
}

# The child of process $1 (unshare's: the namespaces' PID 1).
child_of() {
    awk -v parent="$1" '$4 == parent { print $1 }' /proc/[0-9]*/stat 2>/dev/null
}

# Whether process $1 runs (a zombie does not).
running() {
    state=$(awk '{ print $3 }' "/proc/$1/stat" 2>/dev/null)
    [ -n "$state" ] && [ "$state" != Z ]
}

work="" ns_pid=""
cleanup() {
    rc=$?
    trap - EXIT INT TERM HUP
    if [ -n "$ns_pid" ]; then
        # unshare ignores SIGTERM while it waits; its child, the namespaces'
        # PID 1, stops what runs inside and ends them (SIGKILL if it takes >10 s).
        init=$(child_of "$ns_pid")
        [ -z "$init" ] || kill -TERM "$init" 2>/dev/null || true
        i=0
        while running "$ns_pid" && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
        if [ -n "$init" ] && running "$ns_pid"; then kill -KILL "$init" 2>/dev/null || true; fi
        wait "$ns_pid" 2>/dev/null || true
    fi
    if [ -n "$work" ] && [ -d "$work" ]; then
        i=0
        while [ -n "$(procs_in "$work")" ] && [ $i -lt 50 ]; do
            for p in $(procs_in "$work"); do kill -KILL "$p" 2>/dev/null || true; done
            sleep 0.1; i=$((i + 1))
        done
        [ -z "$(procs_in "$work")" ] || { echo "check-fresh: processes left in $work: $(procs_in "$work")" >&2; rc=1; }
        if [ -n "$(findmnt -rn -o TARGET | awk -v w="$work/" 'index($0, w) == 1')" ]; then
            echo "check-fresh: mounts left under $work; not removing it" >&2
            rc=1
        else
            rm -rf --one-file-system "$work"
        fi
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'exit 129' HUP

mkdir -p "$cache"
work=$(mktemp -d "${TMPDIR:-/var/tmp}/sturdy-fresh.XXXXXX")

if [ ! -f "$tarball" ]; then
    exec 9>"$cache/fresh.lock"
    flock 9
    if [ ! -f "$tarball" ]; then
        echo "check-fresh: building a $suite/$arch minbase root (+ $INCLUDE) from $mirror; cached in $tarball"
        t0=$(date +%s)
        unshare --mount --propagation private sh "$0" --bootstrap "$work"
        echo "check-fresh: root built in $(($(date +%s) - t0)) s"
    fi
    flock -u 9
    exec 9>&-
fi

commit=$(git rev-parse HEAD)
[ -z "$(git status --porcelain --untracked-files=no)" ] ||
    echo "check-fresh: uncommitted changes are not in the check; it runs commit $commit"
echo "check-fresh: commit $commit on a fresh $suite root"
status=0
# In the background so that a signal reaches the trap at once (a non-interactive
# shell would wait for a foreground command first).
unshare --mount --pid --fork --kill-child --mount-proc --propagation private \
    sh "$0" --inside "$work" "$commit" &
ns_pid=$!
wait "$ns_pid" || status=$?
ns_pid=""

echo "check-fresh: times on a fresh root:"
[ -f "$work/times" ] && awk -F '\t' '{ printf "  %s: %s in %d s\n", $1, ($2 == 0 ? "ok" : "FAILED (" $2 ")"), $3 }' "$work/times"
[ "$status" -eq 0 ] || fail "a command failed on the fresh root (exit $status)"
echo "check-fresh: ok"
