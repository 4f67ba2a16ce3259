#!/usr/bin/env bash
# The main job on a fresh machine: install what it needs, build safehook, run the main job.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if ! pkg-config --exists jansson 2>/dev/null || ! [ -e /usr/include/x86_64-linux-gnu/libunwind.h ]; then
    SUDO=; [ "$(id -u)" = 0 ] || SUDO=sudo
    $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq libjansson-dev libunwind-dev pkg-config >/dev/null
fi
"$PYTHON" -m pip install -q --disable-pip-version-check -r tests/requirements.txt
"$PYTHON" -m pip install -q --disable-pip-version-check --no-build-isolation .
mkdir -p results
# The alignment-tax demo on its embedded defaults: trains (once, then cached) a small aligned
# Llama, fine-tunes it under every protection mode, prints the table, writes
# results/alignment_tax.json and results/alignment_tax.png. Pass --quick for the short version.
exec "$PYTHON" -m safehook demo "$@"
