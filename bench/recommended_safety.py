"""The demo's safety check (`safehook demo`: plain SFT and recommended on one world) with the
shipped recommended policy patched, so that a candidate setting's safety is read in the same
table as the shipped one's (docs/cost.md):

    python bench/recommended_safety.py --seed 2 --ratios 0.1,0.2 --out /tmp/s2.json \\
        --patch '{"safegrad": {"refresh_every": 16, "rows": 32, "directions": 4}}'

The patch merges into policies/recommended.json as bench/recommended_overhead.py merges it
(objects key by key, null deletes a key). No attack settings are run unless --attacks names them."""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from recommended_overhead import merge  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--layers", type=int)
    ap.add_argument("--ratios", help="harmful fractions, comma-separated (default: the preset's)")
    ap.add_argument("--attacks", default="", help="attack settings, comma-separated (default: none)")
    ap.add_argument("--modes", default="plain,recommended")
    ap.add_argument("--jobs", type=int)
    ap.add_argument("--patch", default="{}", metavar="JSON")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    from safehook.demo import bench, modes as M
    shipped, patch = M.recommended_policy, json.loads(a.patch)
    M.recommended_policy = lambda: merge(shipped(), patch)
    ratios = [float(x) for x in a.ratios.split(",")] if a.ratios else None
    res = bench.run(quick=a.quick, seed=a.seed, layers=a.layers, out=a.out, modes=a.modes.split(","),
                    ratios=ratios, attacks=[x for x in a.attacks.split(",") if x], jobs=a.jobs)
    res["patch"] = patch
    with open(a.out, "w") as f:
        json.dump(res, f, indent=1)
    print(bench.table(res))
    for n, c in res["checks"].items():
        print("check %-24s %s  %s" % (n, "pass" if c["pass"] else "FAIL", c.get("verdict", "")))


if __name__ == "__main__":
    main()
