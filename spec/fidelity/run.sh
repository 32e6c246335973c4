#!/bin/sh
# Fidelity check of the mock API against the official SDKs (see README.md here).
#
#   sh spec/fidelity/run.sh        (from anywhere; `make fidelity`)
#
# Installs the pinned SDKs into a cache directory outside the repository
# (STURDY_FIDELITY_DIR, default ${XDG_CACHE_HOME:-~/.cache}/sturdy-fidelity),
# skipping the install when the pinned versions are already there, then runs
# spec/fidelity/check.mjs with the mock up.
set -eu

ANTHROPIC_SDK_VERSION=1.14.0   # @anthropic-ai/sdk
OPENAI_SDK_VERSION=6.49.0      # openai (7.x needs Node >= 22)

root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"

STURDY_FIDELITY_DIR=${STURDY_FIDELITY_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/sturdy-fidelity}
export STURDY_FIDELITY_DIR
LUA=${LUA:-lua5.4}

for tool in node npm "$LUA"; do
  if ! command -v "$tool" >/dev/null 2>&1; then
    echo "fidelity: '$tool' not found; needs Node.js >= 20 with npm, and $LUA for the mock" >&2
    exit 1
  fi
done

# Prints the installed version of package $1, or nothing.
installed_version() {
  node -e '
    try {
      const p = require("path").join(process.argv[1], "node_modules", process.argv[2], "package.json");
      console.log(JSON.parse(require("fs").readFileSync(p, "utf8")).version);
    } catch (e) {}
  ' "$STURDY_FIDELITY_DIR" "$1"
}

if [ "$(installed_version @anthropic-ai/sdk)" != "$ANTHROPIC_SDK_VERSION" ] ||
   [ "$(installed_version openai)" != "$OPENAI_SDK_VERSION" ]; then
  echo "fidelity: installing @anthropic-ai/sdk@$ANTHROPIC_SDK_VERSION openai@$OPENAI_SDK_VERSION into $STURDY_FIDELITY_DIR" >&2
  mkdir -p "$STURDY_FIDELITY_DIR"
  if ! npm install --no-save --no-audit --no-fund --no-package-lock --loglevel=error \
         --prefix "$STURDY_FIDELITY_DIR" \
         "@anthropic-ai/sdk@$ANTHROPIC_SDK_VERSION" "openai@$OPENAI_SDK_VERSION" >&2; then
    echo "fidelity: npm install failed (offline or registry unreachable?)." >&2
    echo "fidelity: the check needs @anthropic-ai/sdk@$ANTHROPIC_SDK_VERSION and openai@$OPENAI_SDK_VERSION" >&2
    echo "fidelity: in $STURDY_FIDELITY_DIR/node_modules; install them there and rerun." >&2
    exit 1
  fi
  if [ "$(installed_version @anthropic-ai/sdk)" != "$ANTHROPIC_SDK_VERSION" ] ||
     [ "$(installed_version openai)" != "$OPENAI_SDK_VERSION" ]; then
    echo "fidelity: npm install finished but the pinned versions are not in $STURDY_FIDELITY_DIR/node_modules" >&2
    exit 1
  fi
fi

exec "$LUA" spec/support/with_mock.lua node spec/fidelity/check.mjs
