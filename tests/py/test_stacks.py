"""The training stacks users run, each under the preload with freeze "1-2" of 4 blocks (and
SafeGrad with an anchor where it applies): frozen blocks bit-identical, the other blocks
changed, the projected update equal to a float64 single-process reference, one step record per
optimizer step. Scripts in stacks/; helpers in stacks/stacknet.py."""
import json
import os
import sys

import pytest
import torch

from conftest import base_env, events, read_audit, run

HERE = os.path.dirname(os.path.abspath(__file__))
STACKS = os.path.join(HERE, "stacks")
sys.path.insert(0, STACKS)
import stacknet  # noqa: E402


def stack_run(lib, tmp_path, argv, policy=None, env_extra=None, timeout=300, check=True, name="audit.jsonl"):
    audit = tmp_path / name
    if audit.exists():
        audit.unlink()
    env = base_env(LD_PRELOAD=lib, SAFEHOOK_AUDIT=str(audit), SAFEHOOK_POLICY=policy, STACK_OUT=str(tmp_path),
                   PYTHONPATH=STACKS, **(env_extra or {}))
    p = run(argv, env, cwd=str(tmp_path), timeout=timeout, check=check)
    return p, read_audit(str(audit))


def check_frozen(final, init, frozen=stacknet.is_frozen):
    """Frozen blocks bit-identical, every other tensor changed."""
    for n, w in final.items():
        if frozen(n):
            assert torch.equal(w, init[n]), "frozen %s moved" % n
        else:
            assert not torch.equal(w, init[n]), "trainable %s did not move" % n


def close(a, b, tol=2e-6):
    return all(torch.allclose(a[n], b[n], rtol=0, atol=tol) for n in a)


def steps_of(recs, opt=None):
    return [r for r in events(recs, "step") if opt is None or r.get("opt") == opt]


@pytest.mark.parametrize("mode", ["positional", "keyword"])
def test_closure_gets_features_on_fresh_gradients(lib, tmp_path, mode):
    """opt.step(closure): SafeGrad projects the gradients the closure computes (before: the
    stale ones of the step before, and the result equalled a freeze-only run)."""
    steps = 6
    argv = [sys.executable, os.path.join(STACKS, "closure_train.py"), mode, str(steps)]
    _, recs = stack_run(lib, tmp_path, argv, policy=stacknet.policy(str(tmp_path / "p.json")))
    res = torch.load(str(tmp_path / "result.pt"))
    check_frozen(res["final"], res["init"])
    assert close(res["final"], res["ref"]), max(float((res["final"][n] - res["ref"][n]).abs().max()) for n in res["ref"])
    st = steps_of(recs)
    assert [r["step"] for r in st] == list(range(1, steps + 1))
    assert sum(1 for r in st if r.get("projected")) >= 2, st
    # the same run with freeze only ends elsewhere: the projection changed the update
    _, recs2 = stack_run(lib, tmp_path, argv, policy=stacknet.policy(str(tmp_path / "f.json"), safegrad=False),
                         name="audit2.jsonl")
    res2 = torch.load(str(tmp_path / "result.pt"))
    check_frozen(res2["final"], res2["init"])
    assert not close(res["final"], res2["final"], tol=1e-4)
    assert len(steps_of(recs2)) == steps


def test_lbfgs_closure_evaluated_many_times_gets_one_step_record(lib, tmp_path):
    steps = 3
    argv = [sys.executable, os.path.join(STACKS, "closure_train.py"), "lbfgs", str(steps)]
    _, recs = stack_run(lib, tmp_path, argv, policy=stacknet.policy(str(tmp_path / "p.json")))
    res = torch.load(str(tmp_path / "result.pt"))
    check_frozen(res["final"], res["init"])
    assert [r["step"] for r in steps_of(recs)] == list(range(1, steps + 1))
    assert all("cosine" in r for r in steps_of(recs)[1:])


@pytest.mark.parametrize("order", ["opt_first", "forward_first"])
def test_two_models_each_frozen_reference_model_not_bound(lib, tmp_path, order):
    """Two models with an optimizer each both get the freeze; a reference model run forward
    first (no optimizer trains it) is not bound; no global module hook is left."""
    argv = [sys.executable, os.path.join(STACKS, "two_models.py"), order]
    _, recs = stack_run(lib, tmp_path, argv, policy=stacknet.policy(str(tmp_path / "p.json"), safegrad=False))
    res = torch.load(str(tmp_path / "result.pt"))
    for k in ("a", "b"):
        check_frozen(res["final"][k], res["init"][k])
    assert all(torch.equal(res["final"]["ref"][n], w) for n, w in res["init"]["ref"].items())
    assert res["ref_requires_grad"], "the reference model was frozen"
    assert res["global_hooks"] == 0
    fr = [r for r in events(recs, "freeze") if not r.get("late")]
    assert len(fr) == 2 and all(r["frozen_blocks"] == [1, 2] for r in fr), fr
    assert sorted(r["opt"] for r in steps_of(recs)) == [0, 0, 0, 1, 1, 1]
    assert events(recs, "end")[0]["freeze"]["models"] == 2


def test_uninstall_and_reinstall_undo_freeze_and_hooks(tmp_path):
    """uninstall() gives back requires_grad and removes the model hooks; a second install()
    replaces the first policy's freeze (before: both stayed)."""
    env = base_env(PYTHONPATH=STACKS, SAFEHOOK_AUDIT=str(tmp_path / "a.jsonl"))
    p = run([sys.executable, os.path.join(STACKS, "reinstall.py")], env, cwd=str(tmp_path))
    assert p.stdout.strip().endswith("ok")


def torchrun(nproc=2, extra=()):
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=%d" % nproc] + list(extra)


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_two_gloo_ranks_freeze_and_safegrad(lib, tmp_path, mode):
    """DDP and FSDP2 (fully_shard, DTensor parameters): frozen blocks bit-identical on every
    shard, replicas identical across ranks, the projected update equal to the single-process
    reference (FSDP2 before: the freeze checksum mixed DTensor and Tensor and stopped both ranks)."""
    steps = 3
    argv = torchrun(extra=["--standalone"]) + [os.path.join(STACKS, "dist_train.py"), mode, str(steps)]
    _, recs = stack_run(lib, tmp_path, argv, policy=stacknet.policy(str(tmp_path / "p.json")), timeout=400)
    r0, r1 = (torch.load(str(tmp_path / ("result_%d.pt" % r))) for r in (0, 1))
    for n in r0["final"]:
        assert torch.equal(r0["final"][n], r1["final"][n]), "ranks differ on %s" % n
    check_frozen(r0["final"], r0["init"])
    assert close(r0["final"], r0["ref"], tol=5e-6), max(float((r0["final"][n] - r0["ref"][n]).abs().max()) for n in r0["ref"])
    st = steps_of(recs)
    assert len(st) == 2 * steps and sorted(r["step"] for r in st) == sorted(list(range(1, steps + 1)) * 2)
    assert any(r.get("projected") for r in st)
    assert not events(recs, "error") and not events(recs, "violation")


def test_ranks_agree_on_every_decision(tmp_path):
    """rt.agree reduces over the ranks; replicated gradients that differ in their last bits
    get one projection decision (before: each rank decided on its own numbers)."""
    env = base_env(PYTHONPATH=STACKS)
    p = run(torchrun(extra=["--standalone"]) + [os.path.join(STACKS, "agree_ranks.py")], env,
            cwd=str(tmp_path), timeout=300)
    assert "ok" in p.stdout


@pytest.mark.parametrize("mode", ["missing", "corrupt", "safegrad"])
def test_a_failure_on_one_rank_stops_every_rank_at_the_same_step(tmp_path, mode):
    """Protection fails on rank 1 only (its probe file missing: found at setup; or unreadable:
    found inside the gate's step, or inside SafeGrad's refresh of its cached signal, after the
    ranks agreed to refresh and before rank 0 broadcasts its gradient). Both ranks stop at step 1
    with PolicyError before any update, and a later step refuses at once; nobody hangs (before:
    rank 1 raised alone and rank 0 waited in the gate's collective, or in the signal's
    broadcast)."""
    env = base_env(PYTHONPATH=STACKS, STACK_OUT=str(tmp_path))
    run(torchrun(extra=["--standalone"]) + [os.path.join(STACKS, "rank_fail.py"), mode], env,
        cwd=str(tmp_path), timeout=180)
    r0, r1 = (json.loads((tmp_path / ("rank%d.json" % r)).read_text()) for r in (0, 1))
    for r in (r0, r1):
        assert r["stopped"] is not None and r["stopped"]["step"] == 1, r
        assert not r["moved"] and r["after"] == "refused", r
    assert "probe" in r1["stopped"]["message"]
    if mode == "missing":
        assert "on rank 1" in r0["stopped"]["message"], r0
    else:
        what = "safegrad" if mode == "safegrad" else "gate"
        assert what in r0["stopped"]["message"] and "rank 1" in r0["stopped"]["message"], r0


def test_shaping_subtract_under_ddp_and_gradient_accumulation(tmp_path):
    """shaping.action "subtract" with DDP over 2 ranks and 2 micro-batches per step, one flagged
    row on each rank: the gradient the optimizer gets is that of the loss without the flagged
    rows' tokens (each micro-batch's mean over all its tokens, averaged over micro-batches and
    ranks), the same on both replicas (before: each rank subtracted its own rows' gradient, W
    times too much, and only the micro-batches with flagged rows were counted)."""
    sys.path.insert(0, os.path.join(HERE, "shaping_scripts"))
    import common
    torch.set_num_threads(1)
    paths = common.build(str(tmp_path / "world"))
    env = base_env(PYTHONPATH=STACKS, STACK_OUT=str(tmp_path), SAFEHOOK_AUDIT=str(tmp_path / "audit.jsonl"))
    run(torchrun(extra=["--standalone"]) + [os.path.join(STACKS, "shaping_ddp.py"), str(tmp_path / "world")], env,
        cwd=str(tmp_path), timeout=300)
    g0, g1 = (torch.load(str(tmp_path / ("grads%d.pt" % r))) for r in (0, 1))
    assert g0.keys() == g1.keys() and all(torch.equal(g0[n], g1[n]) for n in g0), "replicas differ"
    flags = events(read_audit(str(tmp_path / "audit.jsonl")), "flag")
    assert len(flags) == 2 and all(f["action"] == "subtract" for f in flags), flags
    from transformers import LlamaForCausalLM
    ref = LlamaForCausalLM.from_pretrained(paths["model"])
    rows = common.rows(paths["train"])
    micro = {0: [[0, 4], [5, 6]], 1: [[7, 8], [9, 1]]}
    for rank_rows in micro.values():
        for idx in rank_rows:
            rs = [rows[i] for i in idx]
            n = max(len(r["input_ids"]) for r in rs)
            ids = torch.tensor([r["input_ids"] + [0] * (n - len(r["input_ids"])) for r in rs])
            labels = torch.tensor([r["labels"] + [-100] * (n - len(r["labels"])) for r in rs])
            mask = torch.tensor([[1] * len(r["input_ids"]) + [0] * (n - len(r["input_ids"])) for r in rs])
            ntok = int((labels[:, 1:] != -100).sum())
            kept = labels.clone()
            for j, r in enumerate(rs):
                if r["harmful"]:
                    kept[j] = -100
            lg = ref(input_ids=ids, attention_mask=mask).logits
            ce = torch.nn.functional.cross_entropy(lg[:, :-1].reshape(-1, lg.size(-1)), kept[:, 1:].reshape(-1),
                                                   ignore_index=-100, reduction="sum")
            (ce / ntok / (2 * 2)).backward()
    for name, p in ref.named_parameters():
        torch.testing.assert_close(g0[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)


def _have(mod):
    try:
        __import__(mod)
        return True
    except Exception:
        return False


@pytest.mark.skipif(not _have("lightning"), reason="lightning not installed (tests/requirements.txt)")
@pytest.mark.parametrize("mode", ["automatic", "manual"])
def test_lightning(lib, tmp_path, mode):
    """Lightning's automatic optimization steps with a closure; manual optimization with a no-op
    one: either way the projection acts on the gradients the optimizer uses."""
    steps = 4
    argv = [sys.executable, os.path.join(STACKS, "lightning_train.py"), mode, str(steps)]
    _, recs = stack_run(lib, tmp_path, argv, policy=stacknet.policy(str(tmp_path / "p.json")))
    res = torch.load(str(tmp_path / "result.pt"))
    check_frozen(res["final"], res["init"])
    assert close(res["final"], res["ref"]), max(float((res["final"][n] - res["ref"][n]).abs().max()) for n in res["ref"])
    assert [r["step"] for r in steps_of(recs)] == list(range(1, steps + 1))


@pytest.mark.parametrize("order", ["opt_first", "compile_first"])
def test_torch_compile_no_global_hook_warning(lib, tmp_path, order):
    """torch.compile under the preload: frozen blocks hold, and no global module hook is there to
    make torch.compile warn (before: the model-finding hook lived until the first forward)."""
    argv = [sys.executable, os.path.join(STACKS, "compile_train.py"), order]
    p, recs = stack_run(lib, tmp_path, argv, policy=stacknet.policy(str(tmp_path / "p.json"), safegrad=False))
    res = torch.load(str(tmp_path / "result.pt"))
    check_frozen(res["final"], res["init"])
    assert "global hooks" not in p.stderr, p.stderr[-2000:]
    assert res["global_hooks"] == 0
    assert len(steps_of(recs)) == 3


def test_torchrun_two_nodes_c10d_rendezvous(lib, tmp_path):
    """Two torchrun 'nodes' on localhost meeting through a c10d rendezvous, one DDP rank each:
    both protected, replicas identical, the update equal to the single-process reference."""
    import socket
    import subprocess
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    audit = tmp_path / "audit.jsonl"
    env = base_env(LD_PRELOAD=lib, SAFEHOOK_AUDIT=str(audit), SAFEHOOK_POLICY=stacknet.policy(str(tmp_path / "p.json")),
                   STACK_OUT=str(tmp_path), PYTHONPATH=STACKS)
    argv = torchrun(1, ["--nnodes=2", "--rdzv_backend=c10d", "--rdzv_endpoint=127.0.0.1:%d" % port,
                        "--rdzv_id=stacks"]) + [os.path.join(STACKS, "dist_train.py"), "ddp", "3"]
    procs = [subprocess.Popen(argv, env=env, cwd=str(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for _ in range(2)]
    outs = [p.communicate(timeout=400)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-2000:] for o in outs)
    recs = read_audit(str(audit))
    r0, r1 = (torch.load(str(tmp_path / ("result_%d.pt" % r))) for r in (0, 1))
    for n in r0["final"]:
        assert torch.equal(r0["final"][n], r1["final"][n])
    check_frozen(r0["final"], r0["init"])
    assert close(r0["final"], r0["ref"], tol=5e-6)
    assert len(steps_of(recs)) == 6 and len({r["pid"] for r in events(recs, "freeze")}) == 2


@pytest.mark.parametrize("params", ["flat", "orig"])
def test_fsdp1_refused_by_every_feature_under_an_enforced_policy(tmp_path, params):
    """FSDP1 (FullyShardedDataParallel, flat parameters or use_orig_params views), 2 gloo ranks,
    an enforced system policy with freeze, SafeGrad, gate and monitor: each feature refuses with
    one line naming FSDP1 and what to use instead, when the model is bound (before: SafeGrad
    refused only at its first step, the gate and the monitor called the inner module without the
    wrapper's gather), and the first step raises PolicyError with the weights untouched."""
    import json
    audit = tmp_path / "system-audit.jsonl"
    system = tmp_path / "system.json"
    system.write_text(json.dumps({
        "version": 1, "enforce": True, "on_error": "abort", "freeze": {"layers": "1-2"},
        "safegrad": {"source": "anchor"}, "probes": {"safety": {"callable": "stacknet:probe_loss"}},
        "gate": {"probe": "safety"}, "monitor": {"probe": "safety", "every": 1, "progress": False},
        "audit": {"path": str(audit)}}))
    env = base_env(PYTHONPATH=STACKS, STACK_OUT=str(tmp_path))
    p = run(torchrun(extra=["--standalone"]) + [os.path.join(STACKS, "fsdp1_train.py"), str(system), params], env,
            cwd=str(tmp_path), timeout=300)
    hint = "use FSDP2 (torch.distributed.fsdp.fully_shard) or DDP"
    errs = events(read_audit(str(audit)), "error")
    assert sorted(e["message"].split(":")[0] for e in errs) == sorted(["freeze", "safegrad", "gate", "monitor"] * 2)
    assert all(e["message"].count("\n") == 0 and "FSDP1" in e["message"] and e["message"].endswith(hint)
               for e in errs), errs
    lines = [l for l in p.stderr.splitlines() if l.startswith("safehook:")]
    assert len(lines) == 8 and all("FSDP1" in l and hint in l for l in lines), p.stderr[-3000:]
    assert not steps_of(read_audit(str(audit)))
    for r in (0, 1):
        res = torch.load(str(tmp_path / ("result_%d.pt" % r)))
        assert res["error"] and "FSDP1" in res["error"] and res["same"], res
