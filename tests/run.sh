#!/usr/bin/env bash
# Set up and run every test: system packages, Python packages, the build, the C unit tests
# (also under ASan+UBSan), the policy fuzzer for a minute, and the integration tests.
# Usage: bash tests/run.sh            (PYTHON=... to pick the interpreter; FUZZ_SECONDS=0 to skip fuzzing)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
FUZZ_SECONDS=${FUZZ_SECONDS:-60}
step() { printf '\n== %s\n' "$*"; }

step "system packages"
need=()
pkg-config --exists jansson 2>/dev/null || need+=(libjansson-dev)
[ -e /usr/include/x86_64-linux-gnu/libunwind.h ] || [ -e /usr/include/libunwind.h ] || need+=(libunwind-dev)
command -v pkg-config >/dev/null || need+=(pkg-config)
# gcc's AddressSanitizer runtime: the C unit tests under ASan, and tests/py/test_hooks_native.py
# (the extension built with -fsanitize=address, run with libasan preloaded)
[ -e "$(gcc -print-file-name=libasan.so 2>/dev/null)" ] || need+=(libasan8)
# Shared-server tests (tests/py/test_slurm.py, test_daemon.py): a one-node Slurm with munge, and
# spank.h for the plugin; libsystemd-dev lets safehookd forward to journald. Root only.
if [ "$(id -u)" = 0 ]; then
    for p in slurmd:slurmd slurmctld:slurmctld srun:slurm-client munged:munge; do
        command -v "${p%%:*}" >/dev/null || need+=("${p#*:}")
    done
    [ -e /usr/include/slurm/spank.h ] || need+=(libslurm-dev)
    pkg-config --exists libsystemd 2>/dev/null || need+=(libsystemd-dev)
fi
if [ "$FUZZ_SECONDS" -gt 0 ]; then
    command -v clang-14 >/dev/null || command -v clang >/dev/null || need+=(clang)
    ls /usr/lib/llvm-*/lib/clang/*/lib/linux/libclang_rt.fuzzer-x86_64.a >/dev/null 2>&1 || need+=(libclang-rt-14-dev)
fi
if [ ${#need[@]} -gt 0 ]; then
    echo "apt-get install ${need[*]}"
    SUDO=; [ "$(id -u)" = 0 ] || SUDO=sudo
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi

# The test stack, pinned (torch==2.13.0 is the CPU build on this project's machines; a CUDA build
# here would be several GB and is refused below), then safehook itself.
step "python packages: the test stack of tests/requirements.txt (torch, transformers, peft, accelerate, lightning, trl, deepspeed, ...)"
"$PYTHON" -m pip install --disable-pip-version-check --progress-bar on -r tests/requirements.txt
"$PYTHON" -c 'import sys, torch; cuda = torch.version.cuda
print("torch %s (%s)" % (torch.__version__, "CUDA %s build: expected the CPU build" % cuda if cuda else "CPU build"))
sys.exit(1 if cuda else 0)'
step "safehook: build and install (pip install --no-build-isolation .)"
"$PYTHON" -m pip install --disable-pip-version-check --progress-bar on --no-build-isolation .

step "C unit tests (warnings are errors)"
rm -rf build-test build-asan
meson setup build-test --werror >/dev/null
meson compile -C build-test >/dev/null
meson test -C build-test --print-errorlogs

step "C unit tests under AddressSanitizer + UndefinedBehaviorSanitizer"
meson setup build-asan -Db_sanitize=address,undefined -Db_lundef=false --buildtype=debug >/dev/null
meson compile -C build-asan >/dev/null
ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 meson test -C build-asan --print-errorlogs

if [ "$FUZZ_SECONDS" -gt 0 ] && [ -x tests/fuzz/run.sh ]; then
    step "policy fuzzer, ${FUZZ_SECONDS}s"
    tests/fuzz/run.sh "$FUZZ_SECONDS"
fi

step "integration tests (real torch under LD_PRELOAD)"
# safehookd from the build above; the Slurm test must run (not skip) where root installed Slurm.
export SAFEHOOKD="$PWD/build-test/daemon/safehookd"
[ "$(id -u)" = 0 ] && export SAFEHOOK_TEST_SLURM=1
cd tests/py
"$PYTHON" -m pytest -q -p no:cacheprovider "$@"
