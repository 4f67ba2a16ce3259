"""The default policy protects: with no user or system policy, a chat model whose tokenizer the
script created is fine-tuned under shaping, SafeGrad and the gate on the probes shipped inside
the package (tokenizer and template recorded in the start record); a model without a tokenizer
falls back to freezing its middle blocks with one line on stderr; under an enforced system
policy naming the shipped probes, no tokenizer stops the job instead; a policy's own probes
replace the shipped ones. Real tiny Llamas (tests/py/scripts/tinychat.py) under LD_PRELOAD."""
import json
import os
import re
import sys

from conftest import SCRIPTS, base_env, events, read_audit, run

from safehook import data

TRAIN = os.path.join(SCRIPTS, "default_train.py")


def _train(lib, tmp_path, kind, steps, policy=None, system=None, check=True, folder=None):
    audit, out = tmp_path / "audit.jsonl", tmp_path / "out.json"
    for f in (audit, out):
        if f.exists():
            f.unlink()
    env = base_env(SAFEHOOK_AUDIT=str(audit), SAFEHOOK_POLICY=policy, SAFEHOOK_TEST_SYSTEM=system,
                   LD_PRELOAD=None if system else lib)
    argv = [sys.executable, TRAIN, kind, str(steps), str(out)] + ([folder] if folder else [])
    p = run(argv, env, cwd=str(tmp_path), check=check, timeout=300)
    got = json.loads(out.read_text()) if out.exists() else None
    return p, read_audit(str(audit)), got


def _write(path, doc):
    path.write_text(json.dumps(doc))
    return str(path)


def test_no_policy_protects_a_chat_model_with_its_own_tokenizer(lib, tmp_path):
    p, recs, got = _train(lib, tmp_path, "script", 12)
    assert p.stderr == ""  # protected: nothing to say
    start = events(recs, "start")[0]
    assert start["policy"] == "<embedded default>"
    assert start["tokenizer"] == {"model": "LlamaForCausalLM", "source": "script", "name": "(in memory)",
                                  "class": start["tokenizer"]["class"], "vocab": 305, "embedding_rows": 305,
                                  "template": "chat_template"}
    assert start["default"]["applied"] == "protect" and "reason" not in start["default"]
    assert not events(recs, "freeze") and got["frozen"] == []  # the fallback's freeze is not applied
    # shaping calibrated on the shipped probes (64 rows each, the default's limit) and flagged rows
    cal = [r for r in events(recs, "probe") if r.get("what") == "shaping calibration"]
    assert len(cal) == 1 and (cal[0]["calibration"]["refusal"]["n_harmful"], cal[0]["calibration"]["refusal"]
                              ["n_benign"]) == (64, 64)
    stopped = [f for f in events(recs, "flag") if f["action"] != "none"]  # (not a withdrawal by the stream check)
    assert stopped and all(f["score"] >= f["threshold"] for f in stopped)
    # SafeGrad and the gate at every step, on the shipped refusals (8 rows, the default's limit)
    steps = events(recs, "step")
    assert [r["step"] for r in steps] == list(range(1, 13))
    assert all("cosine" in r and isinstance(r["projected"], bool) and r["safety_loss"] > 0 and "gate" in r
               for r in steps)
    assert sum(r["shaping"]["seen"] for r in steps) == 96 and sum(r["shaping"]["masked_tokens"] for r in steps) > 0


def test_no_tokenizer_falls_back_to_freezing_with_one_line(lib, tmp_path):
    p, recs, got = _train(lib, tmp_path, "none", 3)
    assert re.fullmatch(
        r"safehook: the default policy cannot protect LlamaForCausalLM: no tokenizer found for LlamaForCausalLM "
        r"\(no tokenizer in the process; no config._name_or_path; no tokenizer in the policy\); it gets the "
        r"default's fallback, its middle blocks frozen\. To protect it, load the model's tokenizer in the script "
        r"before creating the optimizer \(AutoTokenizer.from_pretrained\), or set SAFEHOOK_POLICY to a policy "
        r"whose probes name a tokenizer folder\.\n", p.stderr), p.stderr
    start = events(recs, "start")[0]
    assert start["default"]["applied"] == "fallback" and "no tokenizer found" in start["default"]["reason"]
    assert start["default"]["digest"] != start["digest"]  # the fallback's, not the protecting policy's
    assert "error" in start["tokenizer"]
    fr = events(recs, "freeze")
    assert len(fr) == 1 and fr[0]["frozen_blocks"] == [1, 2]  # fraction [0.375, 0.625] of 4 blocks
    assert got["frozen"] and all(n.startswith(("model.layers.1.", "model.layers.2.")) for n in got["frozen"])
    assert not [r for r in events(recs, "probe") if r.get("what") == "shaping calibration"]
    assert all("cosine" not in r and "gate" not in r for r in events(recs, "step"))


def _system(tmp_path, shaping=True):
    doc = {"version": 1, "enforce": True, "probes": "builtin", "safegrad": {"source": "probe", "probe": "refusals"},
           "audit": {"path": str(tmp_path / "system-audit.jsonl")}}
    if shaping:
        doc["shaping"] = {"probe": "refusals", "benign": "benign"}
    return _write(tmp_path / "system.json", doc)


def test_enforced_policy_with_the_shipped_probes_stops_without_a_tokenizer(lib, tmp_path):
    p, _, got = _train(lib, tmp_path, "none", 3, system=_system(tmp_path, shaping=False), check=False)
    assert p.returncode != 0 and got is None
    assert "safehook.PolicyError: safegrad:" in p.stderr and "no tokenizer found for LlamaForCausalLM" in p.stderr
    assert "the default policy" not in p.stderr  # no fallback under a policy
    recs = read_audit(str(tmp_path / "system-audit.jsonl"))
    assert [r for r in events(recs, "error") if "no tokenizer found" in r["message"]]
    assert not events(recs, "step")


def test_enforced_policy_with_the_shipped_probes_loads_them_all(lib, tmp_path):
    p, _, got = _train(lib, tmp_path, "script", 2, system=_system(tmp_path))
    recs = read_audit(str(tmp_path / "system-audit.jsonl"))
    start = events(recs, "start")[0]
    assert start["policy"].startswith("system:") and start["tokenizer"]["source"] == "script"
    assert "default" not in start
    cal = [r for r in events(recs, "probe") if r.get("what") == "shaping calibration"][0]["calibration"]
    counts = data.counts()
    assert (cal["refusal"]["n_harmful"], cal["refusal"]["n_benign"]) == (
        counts["refusals"], counts["benign"] + counts["hard_negative"])  # "probes": "builtin": every row
    assert all(r["safety_loss"] > 0 for r in events(recs, "step"))


def test_a_policy_with_its_own_probes_replaces_the_shipped_ones(lib, tmp_path):
    sys.path.insert(0, SCRIPTS)
    import tinychat
    tinychat.tokenizer(extra=43).save_pretrained(str(tmp_path / "tok"))
    harm = tmp_path / "harm.jsonl"
    harm.write_text("".join(json.dumps({"prompt": "Help me hurt someone, number %d." % i,
                                        "response": "I can't help with that."}) + "\n" for i in range(6)))
    ben = tmp_path / "ben.jsonl"
    ben.write_text("".join(json.dumps({"prompt": "Name a fruit, number %d." % i, "response": "A pear."}) + "\n"
                           for i in range(5)))
    own = {"data": str(harm), "tokenizer": str(tmp_path / "tok"), "chat_template": True}
    policy = _write(tmp_path / "user.json", {
        "version": 1, "probes": {"refusals": own, "benign": dict(own, data=str(ben))},
        "shaping": {"probe": "refusals", "benign": "benign"}})
    p, recs, _ = _train(lib, tmp_path, "script", 2, policy=policy)
    cal = [r for r in events(recs, "probe") if r.get("what") == "shaping calibration"][0]["calibration"]
    assert (cal["refusal"]["n_harmful"], cal["refusal"]["n_benign"]) == (6, 5)
    start = events(recs, "start")[0]
    assert start["policy"].startswith("user:") and "tokenizer" not in start and "default" not in start
