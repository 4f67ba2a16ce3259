"""safehook report on a real run (a tiny Llama under LD_PRELOAD with freeze, SafeGrad at layer
granularity, the gate and the monitor): the freeze summary, the safety-loss panel, --json, the
counts (the demo's counter agrees, flags once per example), and the refusal of files that are
not audit logs."""
import json
import os
import struct
import subprocess
import sys
import zlib

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPTS = os.path.join(HERE, "monitor_scripts")


def _safehook(*argv):
    return subprocess.run([sys.executable, "-m", "safehook", *argv], capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    sys.path.insert(0, SCRIPTS)
    import tiny
    d = tmp_path_factory.mktemp("report")
    tiny.write_probe(str(d / "probe.jsonl"))
    pol = {"version": 1, "probes": {"refusals": {"data": str(d / "probe.jsonl"), "score": "loss"}},
           "freeze": {"layers": "0"}, "safegrad": {"source": "probe", "probe": "refusals", "granularity": "layer"},
           "gate": {"probe": "refusals"},
           "monitor": {"probe": "refusals", "every": 4, "threshold": 0.9, "action": "both", "max_rollbacks": 2}}
    (d / "policy.json").write_text(json.dumps(pol))
    lib = subprocess.check_output([sys.executable, "-m", "safehook", "lib"], text=True).strip()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAFEHOOK_") and k != "LD_PRELOAD"}
    env.update(LD_PRELOAD=lib, SAFEHOOK_POLICY=str(d / "policy.json"), SAFEHOOK_AUDIT=str(d / "audit.jsonl"),
               OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cfg = {"phases": [["safe", 8], ["harmful", 12]], "lr": 0.01, "pretrain": 25, "out": str(d / "out.json")}
    p = subprocess.run([sys.executable, os.path.join(SCRIPTS, "train.py"), json.dumps(cfg)], env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    recs = [json.loads(l) for l in open(d / "audit.jsonl")]
    return d, recs


def _png_series(path):
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, text = 8, {}
    while pos < len(data):
        n, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + n]
        assert zlib.crc32(kind + body) == struct.unpack(">I", data[pos + 8 + n:pos + 12 + n])[0]
        if kind == b"tEXt":
            k, v = body.split(b"\0", 1)
            text[k] = v
        pos += 12 + n
    return json.loads(text[b"safehook-series"])


def test_freeze_summary_safety_loss_and_json(run, tmp_path):
    d, recs = run
    steps = [r for r in recs if r["event"] == "step"]
    (fz,) = [r for r in recs if r["event"] == "freeze"]
    end = [r for r in recs if r["event"] == "end"][-1]
    # one type for "projected": a bool, with the group count beside it (layer granularity)
    assert all(type(r["projected"]) is bool for r in steps), [r["projected"] for r in steps]
    assert all(r["projected"] == (r["groups_projected"] > 0) for r in steps)
    projected = sum(r["projected"] for r in steps)
    assert 0 < projected < len(steps)
    png = tmp_path / "r.png"
    p = _safehook("report", str(d / "audit.jsonl"), "-o", str(png))
    assert p.returncode == 0 and p.stderr == "", p.stderr
    text = p.stdout
    assert ("freeze: LlamaForCausalLM: blocks 0 of model.layers[0-1]: %d tensors, %s values (requires_grad, bound "
            "at %s)" % (fz["tensors"], "{:,}".format(fz["numel"]), fz["when"])) in text
    assert "  checks: %d (at exit), 0 changed, 0 restored, 0 violations, 0 gradients dropped" % end["freeze"]["checks"] \
        in text
    losses = [r["safety_loss"] for r in steps]
    assert "safety loss: %d steps, %.4g at the first, %.4g at the last, max %.4g" % (
        len(losses), losses[0], losses[-1], max(losses)) in text
    assert "%d projected" % projected in text and "projected %d" % projected in text.splitlines()[-2]
    series = _png_series(png)
    assert series["safety_loss"] == len(steps) and series["cosine"] == len(steps)
    assert "plot: %s (" % png in text
    j = _safehook("report", "--json", str(d / "audit.jsonl"))
    assert j.returncode == 0
    doc = json.loads(j.stdout)
    assert doc["schema"] == "safehook.report/1" and doc["kind"] == "training" and doc["file"] == str(d / "audit.jsonl")
    assert doc["steps"] == {"count": end["steps"], "records": len(steps), "ended": True}
    assert doc["freeze"]["models"][0]["frozen_blocks"] == [0] and doc["freeze"]["end"] == end["freeze"]
    assert doc["safegrad"]["projected"] == projected and doc["safegrad"]["measured"] == len(steps)
    assert doc["safety_loss"]["points"] == len(steps) and doc["safety_loss"]["max"] == max(losses)
    assert doc["gate"]["checked"] == len(steps)
    assert doc["counts"]["events"]["step"] == len(steps) and doc["counts"]["step_flags"]["projected"] == projected
    assert len(doc["rollbacks"]) == sum(1 for r in recs if r["event"] == "rollback")


def test_counts_agree_with_the_demo_and_count_each_example_once(run, tmp_path):
    from safehook.cli.audit import counts, load
    from safehook.demo.table import audit_summary as _audit_summary
    d, recs = run
    mine = counts(load(str(d / "audit.jsonl"))[0])
    demo = _audit_summary(str(d / "audit.jsonl"))
    assert mine["events"] == demo["events"] and mine["step_flags"] == demo["step_flags"]
    # flags: b re-judged (mask -> refuse), a withdrawn by the stream check, c once
    log = tmp_path / "flags.jsonl"
    flag = {"event": "flag", "time": 1.0, "pid": 1, "guard": "direction", "score": 2.0, "threshold": 1.0}
    rows = [dict(flag, fingerprint="a", step=1, action="mask"), dict(flag, fingerprint="b", step=1, action="mask"),
            dict(flag, fingerprint="c", step=2, action="mask"),
            dict(flag, fingerprint="a", step=3, action="none", revoked="stream check"),
            dict(flag, fingerprint="b", step=3, action="refuse")]
    log.write_text("".join(json.dumps(r) + "\n" for r in rows))
    c = counts(load(str(log))[0])
    assert (c["events"]["flag"], c["examples_flagged"], c["examples_withdrawn"]) == (5, 2, 1)
    p = _safehook("report", str(log))
    assert p.returncode == 0
    assert "  stopped examples: 2 (1 withdrawn by the stream check); each example counted once, by its last flag " \
           "record\n" in p.stdout
    assert p.stdout.splitlines()[-1] == ("counts: flagged examples 2 (1 withdrawn; each example counted once, by its "
                                         "last flag record; 5 flag records)")


@pytest.mark.parametrize("kind", ["policy", "probe_rows", "binary", "empty", "json_array"])
def test_refuses_what_is_not_an_audit_log(tmp_path, kind):
    f = tmp_path / "f"
    content, why = {
        "policy": (b'{\n  "version": 1\n}\n', "not JSON"),
        "probe_rows": (b'{"prompt": "hi", "response": "no"}\n', 'a JSON object without an "event" and "time"'),
        "binary": (bytes(range(256)) * 64, "not JSON"),
        "empty": (b"\n\n", None),
        "json_array": (b"[1, 2]\n", "JSON, but not an object"),
    }[kind]
    f.write_bytes(content)
    p = _safehook("report", str(f))
    assert p.returncode == 2 and p.stdout == ""
    want = ("%s: empty, no audit records" % f) if why is None else ("%s: not an audit log (its first line is %s)"
                                                                    % (f, why))
    assert p.stderr == "safehook report: %s\n" % want
