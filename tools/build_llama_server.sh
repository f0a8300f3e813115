#!/usr/bin/env bash
# Build llama.cpp's native `llama-server` (it serves OpenAI /v1/responses and Anthropic
# /v1/messages + /v1/messages/count_tokens; llama-cpp-python's own server does not) from the
# llama.cpp that the pinned llama-cpp-python sdist vendors, and install the binary into a cache
# directory that outlives the virtualenv:
#
#   ${CCPROXY_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/ccproxy}/llama-server-<version>/llama-server
#
# Idempotent: a cached binary that runs is kept. Generic x86-64 (AVX2, like the Makefile's
# CMAKE_ARGS for llama-cpp-python), static llama/ggml libraries, no curl, no OpenSSL, no web UI
# download. Prints the path of the binary on its last line.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
JOBS="${JOBS:-$(nproc)}"

say() { echo "[llama-server $(date -u +%H:%M:%S)] $*"; }
die() { echo "[llama-server] ERROR: $*" >&2; exit 1; }

# The version pinned in pyproject.toml's dependencies ("llama-cpp-python==X.Y.Z").
VERSION="$(sed -n 's/^[[:space:]]*"llama-cpp-python==\([0-9][0-9A-Za-z.]*\)".*/\1/p' "$REPO/pyproject.toml" | head -n1)"
[ -n "$VERSION" ] || die "no \"llama-cpp-python==<version>\" pin found in $REPO/pyproject.toml"

CACHE_ROOT="${CCPROXY_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/ccproxy}"
DEST_DIR="$CACHE_ROOT/llama-server-$VERSION"
DEST="$DEST_DIR/llama-server"

if [ -x "$DEST" ] && "$DEST" --version >/dev/null 2>&1; then
  say "present: $DEST (llama-cpp-python $VERSION), nothing to build"
  echo "$DEST"
  exit 0
fi

for tool in cmake make c++ cc tar; do
  command -v "$tool" >/dev/null || die "'$tool' is not installed (needed to build llama-server)"
done

WORK="$(mktemp -d "${TMPDIR:-/tmp}/ccproxy-llama-server.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
start=$(date +%s)

say "downloading the llama-cpp-python==$VERSION sdist"
"$PYTHON" -m pip download --quiet --no-binary :all: --no-deps --dest "$WORK" "llama-cpp-python==$VERSION" \
  || die "pip download of llama-cpp-python==$VERSION failed"
SDIST="$(ls "$WORK"/llama_cpp_python-"$VERSION".tar.gz 2>/dev/null | head -n1)"
[ -n "$SDIST" ] || die "pip download left no llama_cpp_python-$VERSION.tar.gz in $WORK"

say "unpacking vendor/llama.cpp"
SRC="$WORK/llama.cpp"
mkdir -p "$SRC"
tar -xzf "$SDIST" -C "$SRC" --strip-components=3 "llama_cpp_python-$VERSION/vendor/llama.cpp" \
  || die "$SDIST has no vendor/llama.cpp"
[ -f "$SRC/tools/server/server.cpp" ] || die "vendor/llama.cpp in $SDIST has no tools/server/server.cpp"
rm -f "$SRC/.git"  # a submodule pointer to a checkout that is not there (build-info asks git)

# Run from `make`, the outer make's flags (-w, a jobserver) would reach the inner one.
unset MAKEFLAGS MFLAGS MAKELEVEL

say "configuring (cmake)"
cmake -S "$SRC" -B "$WORK/build" \
  -DCMAKE_BUILD_TYPE=Release \
  -DGGML_NATIVE=OFF \
  -DBUILD_SHARED_LIBS=OFF \
  -DLLAMA_CURL=OFF \
  -DLLAMA_OPENSSL=OFF \
  -DLLAMA_BUILD_TESTS=OFF \
  -DLLAMA_BUILD_EXAMPLES=OFF \
  -DLLAMA_BUILD_TOOLS=ON \
  -DLLAMA_BUILD_SERVER=ON \
  -DLLAMA_BUILD_UI=OFF \
  -DLLAMA_USE_PREBUILT_UI=OFF \
  -DGGML_CCACHE=OFF \
  || die "cmake configure failed"

say "building target llama-server with -j$JOBS (several minutes on 2 cores)"
cmake --build "$WORK/build" --target llama-server -j "$JOBS" || die "build of llama-server failed"

BUILT="$WORK/build/bin/llama-server"
[ -x "$BUILT" ] || die "build finished but $BUILT is missing"
"$BUILT" --version || die "$BUILT does not run"

mkdir -p "$DEST_DIR"
cp "$BUILT" "$DEST.tmp.$$"
mv -f "$DEST.tmp.$$" "$DEST"
say "installed $DEST in $(( $(date +%s) - start ))s"
echo "$DEST"
