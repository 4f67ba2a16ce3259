#!/usr/bin/env bash
# The main job on a fresh machine: the Debian libraries safehook builds against, a virtual
# environment in the clone (.venv/, made once, then reused) with safehook and its demo extra only,
# then the alignment-tax demo. Nothing is installed outside .venv/ except the Debian packages.
#
#   bash examples/run-main.sh [--setup-only] [DEMO OPTIONS...]     e.g. --quick, --check
#
# PYTHON picks the interpreter the venv is made from (default python3); SAFEHOOK_VENV its folder.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${SAFEHOOK_VENV:-.venv}
step() { printf '== %s\n' "$*"; }
setup_only=
if [ "${1:-}" = "--setup-only" ]; then setup_only=1; shift; fi
t0=$SECONDS

need=()
pkg-config --exists jansson 2>/dev/null || need+=(libjansson-dev)
[ -e /usr/include/x86_64-linux-gnu/libunwind.h ] || [ -e /usr/include/libunwind.h ] || need+=(libunwind-dev)
command -v pkg-config >/dev/null || need+=(pkg-config)
if [ ${#need[@]} -gt 0 ]; then
    step "Debian packages: ${need[*]} (apt-get)"
    SUDO=; [ "$(id -u)" = 0 ] || SUDO=sudo
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi

if [ ! -x "$VENV/bin/python" ]; then
    step "virtual environment $VENV ($("$PYTHON" --version 2>&1))"
    "$PYTHON" -m venv "$VENV"
else
    step "virtual environment $VENV (reused)"
fi
PY=$VENV/bin/python
# tests/requirements.txt pins versions only (-c): of it, only what the demo extra and the build
# need is installed. torch==2.13.0 there is the CPU build on this project's machines.
pip_install() { "$PY" -m pip install --disable-pip-version-check --progress-bar on -c tests/requirements.txt "$@"; }
step "build tools: meson, meson-python, ninja"
pip_install meson meson-python ninja
step "safehook with its demo extra (torch, transformers, tokenizers, safetensors, matplotlib): build and install"
pip_install --no-build-isolation '.[demo]'
"$PY" - <<'EOF'
import torch
print("== torch %s (%s)" % (torch.__version__, "CUDA %s" % torch.version.cuda if torch.version.cuda else "CPU build"))
EOF
step "set up in $((SECONDS - t0))s"
[ -n "$setup_only" ] && exit 0

mkdir -p results
# The alignment-tax demo on its embedded defaults: trains (once, then cached) a small aligned
# Llama, fine-tunes it under every protection mode, prints the table, writes
# results/alignment_tax.json and results/alignment_tax.png. Pass --quick for the short version.
step "safehook demo $*"
exec "$VENV/bin/safehook" demo "$@"
