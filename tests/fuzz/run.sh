#!/bin/sh
# Build the policy fuzzer (clang, libFuzzer, ASan, UBSan) and run it for SECONDS seconds,
# seeded from tests/policies and policies/. Exits non-zero when it finds a crash.
#   tests/fuzz/run.sh SECONDS [WORKDIR]
# WORKDIR (default: a new temporary folder) keeps the build, the corpus and any crash inputs
# (crash-*); CC picks the compiler (default: clang, else clang-14).
set -eu
secs=${1:?usage: tests/fuzz/run.sh SECONDS [WORKDIR]}
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
keep=${2:-}
work=${2:-$(mktemp -d /tmp/safehook-fuzz.XXXXXX)}
if [ -z "${CC:-}" ]; then
    CC=clang
    command -v clang >/dev/null 2>&1 || CC=clang-14
fi
mkdir -p "$work/corpus" "$work/seeds" "$work/artifacts"

python3 "$root/src/gen_embed.py" "$root/policies/default.json" sh_default_policy "$work/default_policy.c"
printf '#define SH_VERSION "fuzz"\n#define SH_SYSTEM_POLICY "/nonexistent/safehook-fuzz/policy.json"\n' \
    >"$work/sh_config.h"
# shellcheck disable=SC2046
"$CC" -g -O1 -std=c11 -D_GNU_SOURCE -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all \
    -I"$work" -I"$root/src" "$here/fuzz_policy.c" \
    "$root/src/policy.c" "$root/src/policy_error.c" "$root/src/policy_layers.c" \
    "$root/src/policy_schema.c" "$root/src/policy_merge.c" \
    "$root/src/sha256.c" "$root/src/suggest.c" "$root/src/system_path.c" "$work/default_policy.c" \
    $(pkg-config --cflags --libs jansson) -o "$work/fuzz_policy"

# seeds: every policy the tests and the examples hold (generated cases are made by the pytest)
i=0
for f in "$root"/policies/*.json "$root"/tests/policies/*/*/policy.json; do
    [ -f "$f" ] || continue
    i=$((i + 1))
    cp "$f" "$work/seeds/seed-$i.json"
done
echo "fuzz: $i seeds, ${secs}s, work folder $work"

rc=0
"$work/fuzz_policy" -max_total_time="$secs" -max_len=65536 -timeout=10 -rss_limit_mb=2048 \
    -dict="$here/policy.dict" -artifact_prefix="$work/artifacts/" -print_final_stats=1 \
    "$work/corpus" "$work/seeds" || rc=$?
crashes=$(find "$work/artifacts" -type f | wc -l)
echo "fuzz: exit $rc, $crashes crash/timeout/leak input(s) in $work/artifacts"
if [ "$rc" -eq 0 ] && [ "$crashes" -eq 0 ]; then
    [ -n "$keep" ] || rm -rf "$work"
    exit 0
fi
exit 1
