"""The cached safety signal (probes/gradient.py, Signal): SafeGrad's safety gradient computed
every `refresh_every` steps, or earlier when the probe's loss drifts, optionally as a subspace
of slice gradients (`directions`), shared by the gate, invalidated by a rollback, and the same
on every rank. The projection onto the cone of the cached directions against a float64
reference; drift, rollback and the gate on real training runs under LD_PRELOAD; DDP with 2
gloo ranks."""
import itertools
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import SCRIPTS, events

HERE = os.path.dirname(os.path.abspath(__file__))
MON = os.path.join(HERE, "monitor_scripts")
sys.path.insert(0, MON)


# -- the cone projection --

def _reference(g, dirs, groups):
    """g' in float64: per group, the nearest point to g with <g', s_j> >= 0 for every j, by
    enumerating the active sets (the feasible Karush-Kuhn-Tucker point of least change)."""
    out = [t.double().clone() for t in g]
    k = len(dirs)
    for grp in sorted(set(groups)):
        idx = [i for i, q in enumerate(groups) if q == grp]
        x = torch.cat([g[i].double().reshape(-1) for i in idx])
        S = torch.stack([torch.cat([d[i].double().reshape(-1) for i in idx]) for d in dirs])
        G, a = S @ S.T, S @ x
        best = None
        for r in range(k + 1):
            for P in itertools.combinations(range(k), r):
                lam = torch.zeros(k, dtype=torch.float64)
                if P:
                    p = torch.tensor(P)
                    lam[p] = torch.linalg.lstsq(G[p][:, p], -a[p].unsqueeze(1)).solution.squeeze(1)
                if (lam < -1e-12).any() or ((G @ lam + a) < -1e-9 * max(1.0, float(a.abs().max()))).any():
                    continue
                xp = x + S.T @ lam
                d = float((xp - x).pow(2).sum())
                if best is None or d < best[0] - 1e-18:
                    best = (d, xp)
        xp, off = best[1], 0
        for i in idx:
            n = g[i].numel()
            out[i] = xp[off:off + n].view(g[i].shape)
            off += n
    return out


@pytest.mark.parametrize("granularity", ["global", "layer"])
@pytest.mark.parametrize("k", [1, 3, 4])
def test_cone_projection_equals_float64_reference(granularity, k):
    from safehook.features import projection
    gen = torch.Generator().manual_seed(10 * k + len(granularity))
    shapes = [(7, 5), (13,), (4, 4), (9,)]
    groups = ["a", "a", "b", "b"]
    for trial in range(6):
        g = [torch.randn(s, generator=gen) for s in shapes]
        dirs = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(k)]
        if trial % 2 == 0:  # a conflicting task gradient: along minus the directions, plus noise
            for i in range(len(g)):
                g[i] = g[i] * 0.3 - sum(d[i] for d in dirs)
        if trial == 4 and k > 1:
            dirs[1] = [2.0 * t for t in dirs[0]]  # linearly dependent directions (G singular)
        ref = _reference(g, dirs, groups if granularity == "layer" else ["all"] * len(g))
        work = [t.clone() for t in g]
        res = projection.project_cone(work, dirs, granularity, groups=groups if granularity == "layer" else None)
        for w, r, t in zip(work, ref, g):
            assert torch.allclose(w.double(), r, rtol=1e-5, atol=1e-5 * float(t.abs().max())), (trial, w, r)
        moved = any(not torch.equal(w, t) for w, t in zip(work, g))
        proj = res["projected"] if granularity == "global" else any(res["projected"])
        assert proj == moved
        if trial % 2 == 0:
            assert moved  # the conflicting ones are projected
        # no direction conflicts with the result (up to float32 rounding)
        for d in dirs:
            for q in sorted(set(groups if granularity == "layer" else ["all"] * len(g))):
                idx = [i for i in range(len(g)) if granularity != "layer" or groups[i] == q]
                dot = sum(float((work[i].double() * d[i].double()).sum()) for i in idx)
                scale = sum(float(work[i].double().norm() * d[i].double().norm()) for i in idx)
                assert dot >= -1e-5 * scale


def test_one_direction_is_safegrads_projection():
    from safehook.features import projection
    gen = torch.Generator().manual_seed(3)
    g = [torch.randn(50, generator=gen), torch.randn(6, 6, generator=gen)]
    s = [-t * 0.7 + 0.2 * torch.randn(t.shape, generator=gen) for t in g]
    a, b = [t.clone() for t in g], [t.clone() for t in g]
    r1 = projection.project(a, s, "global", 0.0)
    r2 = projection.project_cone(b, [s], "global")
    assert r1["projected"] and r2["projected"] and r2["active"] == 1
    assert r2["cosine"] == pytest.approx(r1["cosine"], rel=1e-9)
    assert r2["coef"][0] == pytest.approx(-r1["coef"], rel=1e-9)
    for x, y in zip(a, b):
        assert torch.allclose(x, y, rtol=1e-6, atol=1e-7)


def _slice_ce(model, rows):
    """The token-mean cross-entropy of ROWS (pre-tokenized dicts), one graph."""
    from tinylm import rows_batch
    ids, mask, labels = rows_batch(rows)
    out = model(input_ids=ids, attention_mask=mask)
    lg = out.logits[:, :-1].reshape(-1, out.logits.shape[-1]).float()
    return torch.nn.functional.cross_entropy(lg, labels[:, 1:].reshape(-1), ignore_index=-100)


def test_rotating_rows_ring_equals_the_slices_gradients(tmp_path):
    """rows R: the first refresh fills the ring with `directions` slices of R rows; each later
    refresh computes the next R rows (wrapping) and replaces the oldest; the signal is the mean
    of the held slices' gradients and the directions its parts."""
    sys.path.insert(0, SCRIPTS)
    from tinylm import TinyLM
    from safehook.probes import Probe
    from safehook.probes import gradient
    gen = torch.Generator().manual_seed(4)
    rows = []
    for _ in range(8):
        prompt = torch.randint(4, 40, (6,), generator=gen).tolist()
        tail = torch.randint(50, 60, (int(torch.randint(2, 5, (1,), generator=gen)),), generator=gen).tolist()
        rows.append({"input_ids": prompt + tail, "labels": [-100] * 6 + tail})
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = {"data": str(path), "batch_size": 2, "judge": "keyword", "score": "loss", "loss": "ce",
           "max_new_tokens": 8, "chat_template": False}
    torch.manual_seed(0)
    model = TinyLM()
    params = list(model.parameters())
    sg = gradient.SafetyGradients()
    sig = sg.signal(Probe("p", cfg), model, every=1, directions=2, rows=3)

    def ref(idx):
        return torch.autograd.grad(_slice_ce(model, [rows[i] for i in idx]), params)

    u1 = sig.at(params, 1)
    assert u1.fresh and u1.reason == "first" and len(u1.directions) == 2
    want = [ref([0, 1, 2]), ref([3, 4, 5])]
    for n in range(len(params)):
        torch.testing.assert_close(u1.grads[n], (want[0][n] + want[1][n]) / 2, rtol=1e-5, atol=1e-7)
        for j in range(2):
            torch.testing.assert_close(u1.directions[j][n], want[j][n] / 2, rtol=1e-5, atol=1e-7)
    with torch.no_grad():  # the model moves; the next slice is computed at the new weights
        for p in params:
            p.add_(0.01 * torch.randn(p.shape, generator=gen))
    u2 = sig.at(params, 2)
    assert u2.fresh and u2.reason == "every" and u2.age == 0 and u2.oldest == 1
    new = ref([6, 7, 0])  # wraps around the probe
    for n in range(len(params)):
        torch.testing.assert_close(u2.directions[0][n], want[1][n] / 2, rtol=1e-5, atol=1e-7)  # kept, older
        torch.testing.assert_close(u2.directions[1][n], new[n] / 2, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(u2.grads[n], (want[1][n] + new[n]) / 2, rtol=1e-5, atol=1e-7)
    assert sig.counts["rows"] == 9
    sg.invalidate("rollback")  # fills the ring again
    u3 = sig.at(params, 3)
    assert u3.fresh and u3.reason == "rollback" and sig.counts["rows"] == 15 and u3.oldest == 0


# -- real training runs (tests/py/monitor_scripts/train.py) --

def _run(tmp_path, sections, cfg):
    import tiny
    from test_monitor import _env
    probe = tmp_path / "probe.jsonl"
    tiny.write_probe(str(probe))
    pol = {"version": 1, "probes": {"refusals": {"data": str(probe), "batch_size": 4}}, "audit": {"level": "steps"}}
    pol.update(sections)
    path = tmp_path / "policy.json"
    path.write_text(json.dumps(pol))
    audit = tmp_path / "audit.jsonl"
    cfg = dict(cfg, out=str(tmp_path / "out.json"))
    p = subprocess.run([sys.executable, os.path.join(MON, "train.py"), json.dumps(cfg)], env=_env(path, audit),
                       capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads((tmp_path / "out.json").read_text()), [json.loads(l) for l in open(audit)]


def test_drift_check_refreshes_when_the_model_moves(tmp_path):
    """A cached gradient (refresh_every 1000) is refreshed when the refusal probe's loss rises by
    more than refresh_drift: training on data that unlearns the refusals makes it rise. On the
    refusal data itself it does not rise, so nothing is refreshed there."""
    sg = {"source": "probe", "probe": "refusals", "refresh_every": 1000, "refresh_drift": 0.05, "drift_rows": 4}
    out, recs = _run(tmp_path, {"safegrad": sg}, {"phases": [["safe", 6], ["harmful", 14]], "lr": 0.003,
                                                   "pretrain": 25})
    steps = events(recs, "step")
    assert [r["step"] for r in steps] == list(range(1, 21))
    s = {r["step"]: r["safety"] for r in steps}
    assert s[1]["fresh"] and s[1]["reason"] == "first" and s[1]["age"] == 0
    for i in range(2, 7):  # the safe phase: cached, its age counted, the check below the bound
        assert not s[i]["fresh"] and s[i]["drift"] <= 0.05, s[i]
    drift = [i for i in s if s[i].get("reason") == "drift"]
    assert drift and min(drift) > 6, s  # refreshed by the check once the harmful phase moves the model
    for i in range(2, 21):
        if s[i]["fresh"]:
            assert s[i]["reason"] == "drift" and s[i]["drift"] > 0.05 and s[i]["age"] == 0
            assert steps[i - 1].get("safety_refreshed")
        else:
            last = max(j for j in range(1, i) if s[j]["fresh"])
            assert s[i]["age"] == i - last and s[i]["drift"] <= 0.05


def test_rollback_invalidates_the_cached_gradient(tmp_path):
    """A monitor rollback puts the weights back: the step after it computes the safety gradient
    anew (reason 'rollback') although refresh_every is not due."""
    from test_monitor import ROLLBACK_RUN
    mon = {"probe": "refusals", "every": 4, "threshold": 0.9, "action": "both", "lr_factor": 0.5, "max_rollbacks": 2,
           "progress": False}
    sg = {"source": "probe", "probe": "refusals", "refresh_every": 100}
    out, recs = _run(tmp_path, {"safegrad": sg, "monitor": mon}, ROLLBACK_RUN)
    rbs = [r["step"] for r in events(recs, "rollback")]
    assert rbs == [12, 16]
    s = {r["step"]: r["safety"] for r in events(recs, "step")}
    for i in sorted(s):
        if i == 1:
            assert s[i]["reason"] == "first"
        elif i - 1 in rbs:
            assert s[i]["fresh"] and s[i]["reason"] == "rollback", (i, s[i])
        else:
            assert not s[i]["fresh"], (i, s[i])


def test_gate_uses_the_cached_signal_and_says_so(tmp_path):
    """The gate on SafeGrad's probe takes the step's signal, fresh or cached, and its record says
    which and how old; with directions, its shrink leaves no slice of the probe rising."""
    sg = {"source": "probe", "probe": "refusals", "refresh_every": 4, "directions": 2}
    out, recs = _run(tmp_path, {"safegrad": sg, "gate": {"probe": "refusals", "ratio": 0.0}},
                     {"phases": [["harmful", 10]], "lr": 0.01, "pretrain": 25})
    steps = events(recs, "step")
    assert [r["step"] for r in steps] == list(range(1, 11))
    for r in steps:
        fresh = (r["step"] - 1) % 4 == 0
        assert r["safety"]["fresh"] == fresh and r["safety"]["age"] == (r["step"] - 1) % 4
        assert r["safety"]["directions"] == 2
        g = r["gate"]
        assert g["gradient"] == ("shared" if fresh else "cached") and g["age"] == r["safety"]["age"], g
        if g["action"] == "shrink":
            assert len(g["coefs"]) == 2 and all(c >= 0 for c in g["coefs"]) and g["active"] >= 1
    assert any(r["gate"]["action"] == "shrink" for r in steps)
    assert any(r.get("active") for r in steps)  # SafeGrad's cone projection acted


def test_two_ddp_ranks_hold_the_same_cached_directions(tmp_path):
    """Two gloo ranks, each with a different probe file: the cached directions are rank 0's on
    both (one broadcast per refresh), the refreshes and drift decisions are taken together, and
    the replicas stay bit-identical."""
    gen = torch.Generator().manual_seed(2)
    for r in range(2):
        with open(tmp_path / ("probe_%d.jsonl" % r), "w") as f:
            for _ in range(8):
                prompt = torch.randint(4, 40, (6,), generator=gen).tolist()
                ids = prompt + ([50, 51, 52, 53] if r == 0 else [50, 52, 51, 54])
                f.write(json.dumps({"input_ids": ids, "labels": [-100] * 6 + ids[6:]}) + "\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAFEHOOK_") and k != "LD_PRELOAD"}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=SCRIPTS, SAFEHOOK_AUDIT=str(tmp_path / "audit.jsonl"),
               PYTHONWARNINGS="ignore")
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            os.path.join(SCRIPTS, "signal_dist.py"), str(tmp_path / "probe_{rank}.jsonl"),
            str(tmp_path / "out_{rank}.pt"), "8"]
    p = subprocess.run(argv, env=env, cwd=str(tmp_path), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    r0, r1 = (torch.load(str(tmp_path / ("out_%d.pt" % r))) for r in (0, 1))
    assert len(r0["dirs"]) == 2
    for a, b in zip(r0["dirs"], r1["dirs"]):
        assert a.keys() == b.keys()
        for n in a:
            assert torch.equal(a[n], b[n]), n
    for n in r0["grads"]:
        assert torch.equal(r0["grads"][n], r1["grads"][n]), n
    for n in r0["final"]:
        assert torch.equal(r0["final"][n], r1["final"][n]), n
    assert r0["counts"] == r1["counts"] and r0["counts"]["cached"] > 0 and r0["counts"]["fresh"] > 1
    recs = [json.loads(l) for l in open(tmp_path / "audit.jsonl")]
    steps = events(recs, "step")
    assert len(steps) == 16
    by = {}
    for r in steps:
        by.setdefault(r["step"], []).append(r)
    for st, rs in by.items():
        assert len(rs) == 2
        a, b = rs
        assert a["safety"] == b["safety"], (st, a["safety"], b["safety"])
        assert a["projected"] == b["projected"] and a["gate"]["action"] == b["gate"]["action"]
        assert a["cosine"] == b["cosine"]
    assert any(not rs[0]["safety"]["fresh"] for rs in by.values())
