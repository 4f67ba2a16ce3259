"""The real-model benchmark's generation and its shipped asset, without the real model:

* greedy decoding through the KV cache (left padding, finished rows leaving the batch) gives the
  tokens that recomputing the whole sequence gives, and the tokens of transformers' own
  generate(), on a small random Llama (the real model's check is in test_real_model_smoke.py);
* the task's exact metric;
* the shipped aligned adapter matches its manifest's SHA-256, and a corrupted or missing file
  stops `run` at once with a message that names the file and how to remake it.
A few seconds."""
import json
import os
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BENCH = os.path.join(ROOT, "bench")
sys.path.insert(0, BENCH)
import real_model_align as ra  # noqa: E402
import real_model_gen as gen  # noqa: E402


def _tiny():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      pad_token_id=0, eos_token_id=1, bos_token_id=2)
    m = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # sharper logits than the init's: no near-ties for float noise to flip
        m.lm_head.weight.mul_(20)
    return m


ROWS = [[5, 9, 11, 40, 7], [3, 8], [22, 23, 24, 25, 26, 27, 28, 29], [60, 61, 62]]


def test_cached_greedy_equals_recomputing_and_generate():
    m = _tiny()
    ref = gen.greedy(m, ROWS, 12, stop=set(), pad_id=0, cache=False)
    assert [len(r) for r in ref] == [12] * 4
    # a stop token met early by one row only: that row leaves the batch, the others go on
    stop = {ref[1][3]}
    first = [next((i for i, t in enumerate(r) if t in stop), None) for r in ref]
    want = [r[:f + 1] if f is not None else r for r, f in zip(ref, first)]
    assert any(len(w) == 12 for w in want) and any(len(w) < 12 for w in want), want
    assert gen.greedy(m, ROWS, 12, stop=stop, pad_id=0, cache=True) == want
    assert gen.greedy(m, ROWS, 12, stop=stop, pad_id=0, cache=False) == want
    # transformers' own generate() with the same left padding (no stop token: eos never met)
    n = max(len(r) for r in ROWS)
    ids = torch.tensor([[0] * (n - len(r)) + r for r in ROWS])
    mask = torch.tensor([[0] * (n - len(r)) + [1] * len(r) for r in ROWS])
    m.generation_config.eos_token_id = None
    out = m.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert out[:, n:].tolist() == ref


def test_each_row_alone_gives_its_batched_tokens():
    m = _tiny()
    batched = gen.greedy(m, ROWS, 8, stop=set(), pad_id=0)
    assert [gen.greedy(m, [r], 8, stop=set(), pad_id=0)[0] for r in ROWS] == batched


def test_task_metric_reads_the_last_number():
    assert gen.task_correct("37 plus 45 is 82.", "82")
    assert not gen.task_correct("37 plus 45 is 83.", "82")
    assert not gen.task_correct("The sum is 82, or 1,082 in some bases 12", "82")
    assert gen.task_correct("It is 1,082", "1082")
    assert not gen.task_correct("I don't know", "82")


def test_shipped_asset_matches_its_manifest():
    if not os.path.exists(os.path.join(ra.ASSET_DIR, "manifest.json")):
        pytest.skip("no aligned adapter in %s" % ra.ASSET_DIR)
    man = ra.check_asset()
    assert os.path.getsize(os.path.join(ra.ASSET_DIR, "adapter_model.safetensors")) <= 20 * 10 ** 6
    assert man["validation"]["figures"]["step"] == man["validation"]["selected_step"]
    assert man.get("partial") is not True  # written at the end of its attempt, not mid-way
    for k in ("command", "packages", "inputs", "data_args", "recipe", "base_model_sha256"):
        assert man[k], k
    assert all(len(v["sha256"]) == 64 for v in man["inputs"].values())


def _fake_asset(d):
    os.makedirs(d)
    with open(os.path.join(d, "adapter_model.safetensors"), "wb") as f:
        f.write(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    with open(os.path.join(d, "adapter_config.json"), "w") as f:
        f.write('{"peft_type": "LORA"}')
    man = {"asset_sha256": {n: ra.sha256(os.path.join(d, n)) for n in ra.ASSET_FILES}}
    with open(os.path.join(d, "manifest.json"), "w") as f:
        json.dump(man, f)
    return man


def test_corrupted_asset_is_refused_with_the_file_named(tmp_path):
    d = str(tmp_path / "asset")
    man = _fake_asset(d)
    assert ra.check_asset(d)["asset_sha256"] == man["asset_sha256"]
    p = os.path.join(d, "adapter_model.safetensors")
    with open(p, "r+b") as f:  # one byte flipped
        f.seek(9)
        f.write(b"]")
    with pytest.raises(ra.AssetError, match="adapter_model.safetensors has SHA-256 [0-9a-f]{64} but its manifest says "
                                            + man["asset_sha256"]["adapter_model.safetensors"]):
        ra.check_asset(d)
    os.unlink(p)
    with pytest.raises(ra.AssetError, match="adapter_model.safetensors is missing"):
        ra.check_asset(d)
    os.unlink(os.path.join(d, "manifest.json"))
    with pytest.raises(ra.AssetError, match="no manifest.json"):
        ra.check_asset(d)


def test_run_stops_at_once_on_a_corrupted_asset(tmp_path):
    d = str(tmp_path / "asset")
    _fake_asset(d)
    with open(os.path.join(d, "adapter_config.json"), "a") as f:
        f.write(" ")
    p = subprocess.run([sys.executable, os.path.join(BENCH, "real_model.py"), "run", "--asset-dir", d,
                        "--json", str(tmp_path / "r.json")], capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert p.returncode == 2, p.stderr
    assert "adapter_config.json has SHA-256" in p.stderr and "real_model.py align" in p.stderr, p.stderr
    assert not (tmp_path / "r.json").exists()
