#!/bin/sh
# Runs in the Bento's image after the Python packages are installed (bentofile.yaml,
# docker.setup_script): llama-cpp-python is compiled by then, so the compilers and cmake go,
# leaving a runtime image in which nothing can be built. The image's last USER is BentoML's
# non-root `bentoml` user (BentoML's Dockerfile template), so this step is the last one as root.
set -eu
# llama.cpp's shared library links OpenMP's runtime, which gcc pulled in: keep it.
apt-mark manual libgomp1
apt-get purge -y --auto-remove build-essential cmake gcc g++ cpp make dpkg-dev
apt-get clean
rm -rf /var/lib/apt/lists/*
# Fail the build if a compiler is still there.
for tool in cc gcc g++ c++ cmake make; do
    if command -v "$tool" >/dev/null 2>&1; then
        echo "drop-build-tools: $tool is still installed" >&2
        exit 1
    fi
done
