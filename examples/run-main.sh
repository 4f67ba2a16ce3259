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
if "$PYTHON" -m safehook demo --help >/dev/null 2>&1; then
    exec "$PYTHON" -m safehook demo "$@"
fi
# Until the alignment-tax demo lands: a small protected training run and its audit summary.
rm -f results/audit.jsonl
"$PYTHON" -m safehook run --audit results/audit.jsonl -- "$PYTHON" examples/train_plain.py "$@"
"$PYTHON" - <<'PY'
import collections, json
recs = [json.loads(l) for l in open("results/audit.jsonl")]
print("audit log results/audit.jsonl:", dict(collections.Counter(r["event"] for r in recs)))
PY
