"""The runtime (safehook/runtime/context.py): one object per activation that owns every hook,
wrapper, feature state and cache, destroyed exactly by uninstall() or the next install(). Each
test pins a defect of the round before (issue 21), checked to fail on its code: hooks and logs of
a first policy left behind after uninstall() or a re-install, caches holding the model, a stale
freeze restored by a later save, false tamper records from the monitor's own work, shaping
writing into the caller's labels, install()'s docstring."""
import json
import math
import os
import sys

import pytest
import torch

from conftest import base_env, events, read_audit, run

HERE = os.path.dirname(os.path.abspath(__file__))
RSCRIPTS = os.path.join(HERE, "runtime_scripts")
sys.path.insert(0, os.path.join(HERE, "shaping_scripts"))
sys.path.insert(0, os.path.join(HERE, "monitor_scripts"))
import common  # noqa: E402


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    torch.set_num_threads(1)
    root = str(tmp_path_factory.mktemp("runtime"))
    paths = common.build(root)
    return root, paths


def _script(name, *argv, env_extra=None, check=True):
    return run([sys.executable, os.path.join(RSCRIPTS, name)] + [str(a) for a in argv],
               base_env(**(env_extra or {})), timeout=300, check=check)


def test_uninstall_and_reinstall_leave_nothing_of_the_first_runtime(world, tmp_path):
    """install(freeze, safegrad probe, gate, monitor, shaping with the forward scorer) twice,
    train, uninstall(), install another policy with another log: no module hook, global hook or
    wrapper of the first is left (before: shaping's, the monitor's and tamper's hooks stayed and
    a re-install stacked a second set), no cache holds the model or a safety gradient (before:
    process-global caches did), and each policy's records go to its own log (before: a policy
    without a log kept writing to the log of the one before)."""
    root, _ = world
    out = tmp_path / "out.json"
    _script("lifecycle.py", root, out)
    r = json.loads(out.read_text())
    assert r["hooks_before"] == 0 and r["hooks_one"] > 0
    assert r["hooks_reinstalled"] == r["hooks_one"], "a re-install stacked hooks"
    assert set(r["during"]["wrapped"]) >= {"torch.save", "Optimizer.__init__", "DDP.__init__"}
    assert r["runtime_hooks"] > 0 and r["cached_gradients"] > 0
    assert r["hooks_after"] == 0, "uninstall() left module hooks"
    assert r["after"] == r["before"], "uninstall() left global hooks or wrappers: %s" % r["after"]
    assert r["runtime_after"] and r["closed_state"] == {"hooks": 0, "features": [], "caches": []}
    assert r["labels_untouched"] and r["log_a_grew_after_uninstall"] == 0
    assert not r["model_alive"], "something of safehook still holds the uninstalled model"
    assert r["gradients_alive"] == 0
    assert r["frozen_two"] == [1] and r["hooks_two"] == 1  # tamper's watch of the new model only
    assert r["log_a_grew_under_two"] == 0
    assert r["log_b"].count("start") == 1 and r["log_b"].count("step") == 2 and "freeze" in r["log_b"]
    assert r["log_b_grew_under_three"] == 0


def test_a_policy_without_freeze_does_not_restore_the_freeze_of_the_one_before(tmp_path):
    """install(freeze block 1), train, install(no freeze), train block 1, save: the checkpoint
    holds the trained block 1 and no violation is recorded (before: the first policy's freezers
    stayed global, and the save's check copied their snapshots back into block 1, in the live
    model and in the file, with a false "frozen weights changed" violation)."""
    audit = tmp_path / "audit.jsonl"
    ck = tmp_path / "ck.pt"
    _script("stale_freeze.py", ck, env_extra={"SAFEHOOK_AUDIT": audit})
    recs = read_audit(str(audit))
    assert events(recs, "violation") == [], events(recs, "violation")
    got = torch.load(str(ck))
    live = torch.load(str(ck) + ".live")
    first = torch.load(str(ck) + ".frozen")
    for k in live:
        assert torch.equal(got[k], live[k]), k
    assert not torch.equal(got["layers.1.weight"], first["layers.1.weight"]), "block 1 was put back"
    ckr = events(recs, "checkpoint")
    assert len(ckr) == 1 and "frozen" not in ckr[0]


def test_monitor_rollback_and_disk_snapshots_are_not_taken_for_tampering(tmp_path):
    """A monitor with disk snapshots that rolls back at the last step, then a torch.save: no
    moved_without_step violation (before: the rollback in the post-step hook looked like a
    manual update to the save's check), and no "checkpoint" record but the user's one (before:
    each snapshot went through the wrapped torch.save, recorded as "BufferedWriter", with a full
    freeze check)."""
    import tiny
    probe = tmp_path / "probe.jsonl"
    tiny.write_probe(str(probe))
    pol = {"version": 1, "freeze": {"layers": "0"},
           "probes": {"refusals": {"data": str(probe), "score": "loss", "batch_size": 1}},
           "monitor": {"probe": "refusals", "every": 4, "threshold": 0.9, "action": "rollback", "max_rollbacks": 5,
                       "snapshot": "disk", "snapshot_dir": str(tmp_path / "snaps"), "progress": False}}
    (tmp_path / "policy.json").write_text(json.dumps(pol))
    audit = tmp_path / "audit.jsonl"
    ck = tmp_path / "ck.pt"
    _script("rollback_save.py", tmp_path / "policy.json", ck, env_extra={"SAFEHOOK_AUDIT": audit})
    recs = read_audit(str(audit))
    rb = events(recs, "rollback")
    assert rb and rb[-1]["step"] == 12, [r["step"] for r in rb]  # the last step rolled back
    assert [v.get("kind") for v in events(recs, "violation")] == []
    ckr = events(recs, "checkpoint")
    assert [r["path"] for r in ckr] == [str(ck)] and ckr[0]["frozen"] == "ok"
    assert "moved_without_step" not in ckr[0]


def test_forward_scorer_never_writes_into_the_callers_labels(world):
    """Shaping with the forward scorer masks a row it flags inside the forward in a copy of the
    labels the model reads (before: in the caller's own tensor, against its promise)."""
    from safehook.features import shaping as S
    from transformers import LlamaForCausalLM
    _, paths = world
    model = LlamaForCausalLM.from_pretrained(paths["model"])
    model.train()
    sh = S.Shaping(common.policy(paths, scorer="forward"), S._Offline())
    sh._prepare(model)
    sh._install(model)
    try:
        sh.cal["refusal"]["threshold"] = -math.inf  # every new row is flagged at first sighting
        rows = common.rows(paths["train"])[:3]
        n = max(len(r["input_ids"]) for r in rows)
        ids = torch.tensor([r["input_ids"] + [0] * (n - len(r["input_ids"])) for r in rows])
        labels = torch.tensor([r["labels"] + [-100] * (n - len(r["labels"])) for r in rows])
        mask = torch.tensor([[1] * len(r["input_ids"]) + [0] * (n - len(r["input_ids"])) for r in rows])
        keep = labels.clone()
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        assert sh.counts["flagged"] == 3 and sh.counts["masked_tokens"] > 0
        assert torch.equal(labels, keep), "the caller's labels were written"
    finally:
        for h in list(sh.handles) + list(sh.block_handles.values()):
            h.remove()


def test_install_says_what_it_does_with_a_bad_policy(tmp_path):
    """install() of an invalid policy records the error, returns None and makes the first
    optimizer step raise PolicyError (fail closed); its docstring says so (before: it said
    install() raises PolicyError, which it does not)."""
    import safehook
    doc = " ".join(safehook.install.__doc__.split())
    assert "Raises PolicyError on a bad policy" not in doc
    assert "first optimizer step raises PolicyError" in doc
    code = ("import safehook, torch\n"
            "assert safehook.install({'version': 1, 'freeze': {'layerz': '0'}}) is None\n"
            "p = torch.nn.Parameter(torch.zeros(2)); opt = torch.optim.SGD([p], lr=0.1); p.grad = torch.ones(2)\n"
            "try:\n    opt.step()\nexcept safehook.PolicyError as e:\n    print('refused', p.tolist())\n")
    r = run([sys.executable, "-c", code], base_env(SAFEHOOK_AUDIT=str(tmp_path / "a.jsonl")), check=False)
    assert r.returncode == 0 and r.stdout.strip() == "refused [0.0, 0.0]", r.stdout + r.stderr
    assert [x["event"] for x in read_audit(str(tmp_path / "a.jsonl"))] == ["error"]
