"""The shaping feature (dynamic safety shaping): each guard's score as read from the training
forward, calibration, the actions (mask, weight, refuse, subtract) with gradients compared to a
run without the stopped example, sticky decisions, and two real runs under LD_PRELOAD (HF
Trainer; a custom loss computed outside the model)."""
import copy
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from conftest import events

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPTS = os.path.join(HERE, "shaping_scripts")
sys.path.insert(0, SCRIPTS)
import common  # noqa: E402

from safehook.features import shaping as S  # noqa: E402


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    torch.set_num_threads(1)
    root = str(tmp_path_factory.mktemp("shaping"))
    return common.build(root)


def _model(paths):
    from transformers import LlamaForCausalLM
    m = LlamaForCausalLM.from_pretrained(paths["model"])
    m.train()
    return m


def _shaper(paths, model, install=True, **sec):
    sh = S.Shaping(common.policy(paths, **sec), S._Offline())
    sh._prepare(model)
    if install:
        sh._install(model)
    return sh


def _pad(rows):
    n = max(len(r["input_ids"]) for r in rows)
    ids = torch.tensor([r["input_ids"] + [0] * (n - len(r["input_ids"])) for r in rows])
    labels = torch.tensor([r["labels"] + [-100] * (n - len(r["labels"])) for r in rows])
    mask = torch.tensor([[1] * len(r["input_ids"]) + [0] * (n - len(r["input_ids"])) for r in rows])
    return ids, mask, labels


def _grads(model):
    return [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]


def _key(row):
    return S.fingerprint(row["input_ids"])


def _batch(paths):
    rows = common.rows(paths["train"])
    return [rows[0], rows[5], rows[1], rows[6]]  # harmful, task, harmful, task


# -- statistics and calibration --

def test_auroc_and_calibration_rules():
    assert S.auroc([3, 4], [1, 2]) == 1.0
    assert S.auroc([1, 2], [3, 4]) == 0.0
    assert S.auroc([1, 2, 3], [2]) == pytest.approx((0 + 0.5 + 1) / 3)
    h = [float(x) for x in range(1, 21)]  # 1..20
    c = S.calibrate(h, [0.0, 0.5], tpr=0.95, max_fpr=0.05)
    assert c["threshold"] == 2.0 and c["tpr"] == 0.95 and c["fpr"] == 0.0  # 19 of 20 flagged
    assert c["refuse_threshold"] == 2.0  # above every benign score already
    # overlapping benign rows raise the threshold until at most max_fpr of them are flagged
    b = [float(x) for x in range(0, 10)]  # 0..9
    c = S.calibrate(h, b, tpr=0.95, max_fpr=0.1)
    assert 8.0 < c["threshold"] <= 8.0 + 1e-9 and c["fpr"] == 0.1
    assert 9.0 < c["refuse_threshold"] <= 9.0 + 1e-9
    c = S.calibrate([], b, tpr=0.95, max_fpr=0.0)
    assert c["threshold"] > 9.0 and "tpr" not in c
    # a midpoint under the quantile lowers the threshold, never under the benign bound
    c = S.calibrate(h, [0.0, 0.5], tpr=0.95, max_fpr=0.05, midpoint=0.75)
    assert c["threshold"] == 0.75 and c["tpr"] == 1.0 and c["midpoint"] == 0.75
    c = S.calibrate(h, b, tpr=0.95, max_fpr=0.1, midpoint=4.0)
    assert 8.0 < c["threshold"] <= 8.0 + 1e-9
    c = S.calibrate(h, [0.0, 0.5], tpr=0.95, max_fpr=0.05, midpoint=7.0)
    assert c["threshold"] == 2.0  # the quantile is lower


def test_ledoit_wolf_and_fisher_direction():
    """Ledoit-Wolf's weight against a float64 reference written from the paper's formulas on the
    d x d covariance, and Fisher's direction (computed through an n x n solve) against the
    explicit C^-1 (mp - mn), also with fewer rows than dimensions."""
    g = torch.Generator().manual_seed(0)

    def reference_weight(X):
        n, d = X.shape
        Sm = sum(torch.outer(x, x) for x in X) / n
        m = float(torch.trace(Sm)) / d
        d2 = float(torch.linalg.matrix_norm(Sm - m * torch.eye(d, dtype=torch.float64)) ** 2)
        b2 = sum(float(torch.linalg.matrix_norm(torch.outer(x, x) - Sm) ** 2) for x in X) / n ** 2
        return min(b2, d2) / d2, Sm, m

    X = torch.randn(40, 6, generator=g, dtype=torch.float64) @ torch.diag(torch.tensor([3., 1, 1, .5, .2, .1], dtype=torch.float64))
    X = X - X.mean(0)
    a, mu, G = S.ledoit_wolf(X)
    ref_a, Sm, m = reference_weight(X)
    assert a == pytest.approx(ref_a, rel=1e-9) and 0 < a < 1 and mu == pytest.approx(m, rel=1e-12)
    for n_pos, n_neg, d in ((50, 60, 2), (6, 7, 40)):  # n > d, and n < d (a real model's case)
        scale = torch.ones(d)
        scale[0] = 5.0  # a high-variance nuisance axis
        P = torch.randn(n_pos, d, generator=g) * scale * 1.0
        P[:, 1] = P[:, 1] * 0.1 + 1.0  # the classes differ along a low-variance axis
        N = torch.randn(n_neg, d, generator=g) * scale
        N[:, 1] = N[:, 1] * 0.1
        w, a, mid = S.fisher_direction(P, N)
        Pd, Nd = P.double(), N.double()
        Xc = torch.cat([Pd - Pd.mean(0), Nd - Nd.mean(0)])
        ref_a, Sm, m = reference_weight(Xc)
        assert a == pytest.approx(max(ref_a, 1e-6), rel=1e-6)
        ref = torch.linalg.solve((1 - a) * Sm + a * m * torch.eye(d, dtype=torch.float64), Pd.mean(0) - Nd.mean(0))
        ref = ref / ref.norm()
        torch.testing.assert_close(w.double(), ref, rtol=1e-5, atol=1e-6)
        assert mid == pytest.approx(float((Pd.mean(0) + Nd.mean(0)) @ ref) / 2, abs=1e-5)
        if n_pos > d:  # the difference of means alone would lean on the noisy axis
            assert abs(float(w[1])) > 0.99 and S.auroc((P @ w).tolist(), (N @ w).tolist()) > 0.99
    # degenerate input: no variance at all
    a0, mu0, _ = S.ledoit_wolf(torch.zeros(4, 3, dtype=torch.float64))
    assert a0 == 1.0 and mu0 == 0.0


# -- guards --

def test_direction_and_refusal_scores_come_from_the_training_forward(world):
    model = _model(world)
    sh = _shaper(world, model, guards=["direction", "refusal"], layer=1, scorer="forward")
    assert sh.layer == 1 and sh.cal["direction"]["layer"] == 1 and sh.scorer is None
    rows = _batch(world)
    ids, mask, labels = _pad(rows)
    seen = {}
    orig = sh._decide
    sh._decide = lambda scores: seen.setdefault(len(seen), dict(scores)) and orig(scores)
    model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    for i, r in enumerate(rows):
        b = r["labels"].index(next(l for l in r["labels"] if l != -100)) - 1
        h = out.hidden_states[2][i, b]  # the output of block 1
        assert seen[i]["direction"] == pytest.approx(float(h @ sh.direction), rel=1e-4, abs=1e-5)
        lp = torch.log_softmax(out.logits[i, b], -1)
        assert seen[i]["refusal"] == pytest.approx(float(torch.logsumexp(lp[sh.refusal_ids], -1)), abs=1e-5)
    # refusal token set: the first tokens of the probe's refusals
    first = {r["labels"][r["labels"].index(next(l for l in r["labels"] if l != -100))]
             for r in common.rows(world["harm"])}
    assert set(sh.refusal_ids) == first


def test_direction_block_chosen_by_held_out_separation(world):
    model = _model(world)
    sh = _shaper(world, model, install=False, guards=["direction"])
    harm = sh.harm_probe.examples()
    ben = sh.benign_probe.examples()
    blocks = S.find_blocks(model)
    hs, _ = sh._probe_forward(model, blocks, [(e.ids, e.labels) for e in harm + ben], "cpu")
    nh = len(harm)
    best = None
    for l in range(math.ceil(0.8 * len(blocks))):
        h = hs[l]
        fit = torch.arange(h.shape[0]) % 2 == 0
        ish = torch.arange(h.shape[0]) < nh
        r = h[fit & ish].mean(0) - h[fit & ~ish].mean(0)
        s = h @ (r / r.norm())
        a = S.auroc(s[~fit & ish].tolist(), s[~fit & ~ish].tolist())
        best = max(best or (a, l), (a, l), key=lambda t: t[0])
    assert sh.layer in [l for l in range(len(blocks))
                        if S.auroc(*_held(hs[l], nh)) == best[0]]


def _held(h, nh):
    fit = torch.arange(h.shape[0]) % 2 == 0
    ish = torch.arange(h.shape[0]) < nh
    r = h[fit & ish].mean(0) - h[fit & ~ish].mean(0)
    s = h @ (r / r.norm())
    return s[~fit & ish].tolist(), s[~fit & ~ish].tolist()


def test_gradient_guard_is_the_directional_derivative(world):
    """The finite difference equals -<grad of the row's loss, unit safety gradient> (autograd),
    and a refusal from the probe itself scores below zero (it teaches toward safety)."""
    model = _model(world)
    sh = _shaper(world, model, install=False, guards=["gradient"])
    rows = common.rows(world["train"])[:2] + common.rows(world["harm"])[:1]
    fd = sh._gradient_scores(model, [(r["input_ids"], r["labels"]) for r in rows], "cpu")
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = [p for n, p in model.named_parameters() if p.requires_grad]
    model.eval()
    for r, got in zip(rows, fd):
        ids, mask, labels = _pad([r])
        loss = S.Shaping._row_ce(model(input_ids=ids, attention_mask=mask).logits, labels)[0]
        gs = torch.autograd.grad(loss.float(), params, allow_unused=True)
        dot = sum(float((g.double() * sh.gsafe[n].double()).sum()) for n, g in zip(names, gs) if g is not None)
        assert got == pytest.approx(-dot, rel=2e-2, abs=1e-4)
    assert fd[2] < 0


def test_callable_guard_masks_the_unsafe_segment_and_after(world, monkeypatch):
    monkeypatch.syspath_prepend(SCRIPTS)
    model = _model(world)
    sh = _shaper(world, model, guards=["callable"], callable="guard:risk", tokenizer=world["tok"],
                 segment_tokens=4)
    rows = common.rows(world["train"])
    harm = next(r for r in rows if r["harmful"])
    ids, mask, labels = _pad([harm])
    got = {}
    h = model.register_forward_pre_hook(lambda m, a, kw: got.update(kw), with_kwargs=True)
    model(input_ids=ids, attention_mask=mask, labels=labels).loss
    h.remove()
    resp = [i for i, l in enumerate(harm["labels"]) if l != -100]
    text = [sh.tok.decode(harm["input_ids"][resp[0]:resp[0] + k]) for k in range(4, len(resp) + 4, 4)]
    first_bad = next(j for j, t in enumerate(text) if any(s in t for s in __import__("guard").HARMFUL_STEPS))
    cut = resp[0] + 4 * first_bad
    new = got["labels"][0].tolist()
    assert new[:cut] == harm["labels"][:cut]  # the safe segments are kept
    assert all(l == -100 for l in new[cut:])  # the unsafe segment and everything after it are masked
    assert labels[0].tolist() == harm["labels"]  # the caller's tensor is untouched


# -- actions: gradients against a run without the stopped example --

def _flag(sh, row, refuse=False):
    """A decision made at an earlier sighting; the guard itself silenced for the other rows."""
    sh.decisions[_key(row)] = S._Decision(weight=0.0, refuse=refuse, guard="refusal", score=1.0)
    for c in sh.cal.values():
        c["threshold"] = c["refuse_threshold"] = math.inf


def test_mask_removes_exactly_the_flagged_example_hf_loss(world):
    rows = _batch(world)
    ref_model = _model(world)
    model = copy.deepcopy(ref_model)
    for first_sighting in (True, False):
        sh = _shaper(world, model, guards=["refusal"])
        if first_sighting:  # judged inside the forward: a threshold only row 0 reaches
            ids, mask, labels = _pad(rows)
            with torch.no_grad():
                lg = model(input_ids=ids, attention_mask=mask).logits
            sc = [float(torch.logsumexp(torch.log_softmax(lg[i, r["labels"].index(
                next(l for l in r["labels"] if l != -100)) - 1], -1)[sh.refusal_ids], -1)) for i, r in enumerate(rows)]
            assert sc[0] > max(sc[1:])
            sh.cal["refusal"]["threshold"] = (sc[0] + max(sc[1:])) / 2
        else:  # judged before: the sticky decision, the guard silent for the other rows
            _flag(sh, rows[0])
        model.zero_grad()
        ids, mask, labels = _pad(rows)
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        got = _grads(model)
        for h in sh.handles:
            h.remove()
        assert sh.decisions[_key(rows[0])].flagged
        assert sum(d.flagged for d in sh.decisions.values()) == 1
        ref_model.zero_grad()
        ids, mask, labels = _pad(rows[1:])
        ref_model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        for a, b in zip(got, _grads(ref_model)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
        assert sh.counts["masked_tokens"] == sum(l != -100 for l in rows[0]["labels"])


def test_mask_through_the_logits_with_a_custom_loss(world):
    """No labels in the forward (the response found by its marker): the flagged row's logits
    gradient is zero, so a summed loss gives the gradient of the batch without it."""
    rows = _batch(world)
    ref_model = _model(world)
    model = copy.deepcopy(ref_model)
    sh = _shaper(world, model, guards=["refusal"], tokenizer=world["tok"], response_marker="assistant :")
    _flag(sh, rows[2])

    def summed(m, rs):
        ids, mask, labels = _pad(rs)
        lg = m(input_ids=ids, attention_mask=mask).logits
        return torch.nn.functional.cross_entropy(lg[:, :-1].reshape(-1, lg.size(-1)), labels[:, 1:].reshape(-1),
                                                 ignore_index=-100, reduction="sum")
    summed(model, rows).backward()
    summed(ref_model, rows[:2] + rows[3:]).backward()
    for a, b in zip(_grads(model), _grads(ref_model)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert sh.counts["masked_tokens"] > 0


def test_subtract_equals_masking_the_rows_tokens(world):
    """subtract: the rows' share of HF's mean loss is backpropagated and removed at the step."""
    rows = _batch(world)
    ref_model = _model(world)
    model = copy.deepcopy(ref_model)
    sh = _shaper(world, model, guards=["refusal"], action="subtract")
    _flag(sh, rows[0])
    ids, mask, labels = _pad(rows)
    model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = {}
    sh.pre_step(opt, 1, rec)
    ntok = int((labels[:, 1:] != -100).sum())
    lg = ref_model(input_ids=ids, attention_mask=mask).logits
    kept = labels.clone()
    kept[0] = -100
    (torch.nn.functional.cross_entropy(lg[:, :-1].reshape(-1, lg.size(-1)), kept[:, 1:].reshape(-1),
                                       ignore_index=-100, reduction="sum") / ntok).backward()
    for a, b in zip(_grads(model), _grads(ref_model)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert rec["shaping"]["masked_tokens"] == sum(l != -100 for l in rows[0]["labels"][1:])


def test_refuse_rewrites_exactly_the_response_span(world):
    rows = _batch(world)
    model = _model(world)
    sh = _shaper(world, model, guards=["refusal"], action="refuse", refuse_cap=0.5)
    _flag(sh, rows[0], refuse=True)
    ids, mask, labels = _pad(rows)
    ids0, labels0 = ids.clone(), labels.clone()
    got = {}
    h = model.register_forward_pre_hook(lambda m, a, kw: got.update(kw), with_kwargs=True)
    model(input_ids=ids, attention_mask=mask, labels=labels)
    h.remove()
    assert torch.equal(ids, ids0) and torch.equal(labels, labels0)  # the caller's tensors
    r = rows[0]["labels"]
    s = r.index(next(l for l in r if l != -100))
    e = max(i for i, l in enumerate(r) if l != -100)
    new_ids, new_lab = got["input_ids"][0].tolist(), got["labels"][0].tolist()
    k = next((j for j in range(s, len(new_lab)) if new_lab[j] == -100), len(new_lab)) - s
    ref = new_lab[s:s + k]
    assert 0 < k <= e - s + 1 and ref in sh.refusals  # one of the probe's refusals, EOS included
    k = len(ref)
    assert new_ids[:s] == ids0[0, :s].tolist()  # the prompt is unchanged
    assert new_ids[s:s + k] == ref and new_lab[s:s + k] == ref
    assert all(l == -100 for l in new_lab[s + k:])  # the rest of the span is not trained
    assert new_ids[s + k:] == ids0[0, s + k:].tolist()
    assert torch.equal(got["labels"][1:], labels0[1:]) and torch.equal(got["input_ids"][1:], ids0[1:])
    assert sh.counts["rewritten"] == 1


def test_refuse_cap_and_weight(world):
    rows = _batch(world)
    model = _model(world)
    sh = _shaper(world, model, guards=["refusal"], action="refuse", refuse_cap=0.25)  # 1 of 4 rows
    _flag(sh, rows[0], refuse=True)
    _flag(sh, rows[2], refuse=True)
    ids, mask, labels = _pad(rows)
    got = {}
    h = model.register_forward_pre_hook(lambda m, a, kw: got.update(kw), with_kwargs=True)
    model(input_ids=ids, attention_mask=mask, labels=labels)
    h.remove()
    assert sh.counts["rewritten"] == 1
    assert all(l == -100 for l in got["labels"][2].tolist())  # over the cap: masked instead
    # weight: a row's logits gradient scaled by its weight (summed loss: its gradient halves)
    ref_model = _model(world)
    model = copy.deepcopy(ref_model)
    sh = _shaper(world, model, guards=["refusal"], action="weight")
    _flag(sh, rows[0])
    sh.decisions[_key(rows[1])] = S._Decision(weight=0.5)
    ids, mask, labels = _pad(rows[1:2])
    for m in (model, ref_model):
        lg = m(input_ids=ids, attention_mask=mask, labels=labels).logits
        (torch.nn.functional.cross_entropy(lg[:, :-1].reshape(-1, lg.size(-1)), labels[:, 1:].reshape(-1),
                                           ignore_index=-100, reduction="sum")).backward()
    for a, b in zip(_grads(model), _grads(ref_model)):
        torch.testing.assert_close(a, 0.5 * b, rtol=1e-5, atol=1e-7)


def test_decisions_are_sticky(world):
    rows = _batch(world)
    model = _model(world)
    sh = _shaper(world, model, guards=["refusal"])
    sh.cal["refusal"]["threshold"] = -math.inf  # every new row is flagged at first sighting
    ids, mask, labels = _pad(rows[:2])
    model(input_ids=ids, attention_mask=mask, labels=labels)
    assert sh.counts["new"] == 2 and all(d.flagged for d in sh.decisions.values())
    sh.cal["refusal"]["threshold"] = math.inf  # the guard would now flag nothing ...
    ids, mask, labels = _pad(rows)
    got = {}
    h = model.register_forward_pre_hook(lambda m, a, kw: got.update(kw), with_kwargs=True)
    model(input_ids=ids, attention_mask=mask, labels=labels)
    h.remove()
    assert sh.counts["new"] == 4  # ... but rows 0, 1 are not judged again
    assert sh.counts["seen"] == 6
    assert all(l == -100 for l in got["labels"][0].tolist() + got["labels"][1].tolist())
    assert not sh.decisions[_key(rows[2])].flagged and not sh.decisions[_key(rows[3])].flagged
    # sticky decisions hold in eval and no-grad forwards too, but are not applied there
    model.eval()
    assert model(input_ids=ids, attention_mask=mask, labels=labels) is not None
    assert sh.counts["seen"] == 6


# -- real runs under LD_PRELOAD --

def _fingerprints(paths, harmful):
    return {S.fingerprint(r["input_ids"]) for r in common.rows(paths["train"]) if r["harmful"] == harmful}


def test_hf_trainer_run_flags_the_harmful_rows(world, preload_run, tmp_path):
    pol = tmp_path / "policy.json"
    pol.write_text(json.dumps(common.policy(world)))
    root = os.path.dirname(world["model"])
    p, recs = preload_run([sys.executable, os.path.join(SCRIPTS, "hf_trainer.py"), root], policy=str(pol),
                          timeout=600)
    assert "trained" in p.stdout
    assert not events(recs, "error"), events(recs, "error")
    cal = [r for r in events(recs, "probe") if r.get("what") == "shaping calibration"]
    assert len(cal) == 1 and "refusal" in cal[0]["calibration"]
    flags = events(recs, "flag")
    assert {f["fingerprint"] for f in flags} == _fingerprints(world, True)
    steps = [r for r in events(recs, "step") if "shaping" in r]
    assert len(steps) == 4
    assert sum(r["shaping"]["seen"] for r in steps) == 16
    assert sum(r["shaping"]["flagged"] for r in steps) == 4
    assert sum(r["shaping"]["masked_tokens"] for r in steps) == sum(
        sum(l != -100 for l in r["labels"]) for r in common.rows(world["train"]) if r["harmful"])
    rep = subprocess.run([sys.executable, "-m", "safehook", "report", str(tmp_path / "audit.jsonl")],
                         capture_output=True, text=True, timeout=60)
    assert "stopped examples: 4" in rep.stdout
    for fp in _fingerprints(world, True):
        assert fp in rep.stdout


def test_custom_loss_outside_the_model(world, preload_run, tmp_path):
    """The loss is computed by the script from the logits: a batch of flagged rows leaves the
    weights bit-identical (SGD), a mixed batch moves them."""
    pol = tmp_path / "policy.json"
    pol.write_text(json.dumps(common.policy(world, tokenizer=world["tok"], response_marker="assistant :")))
    root = os.path.dirname(world["model"])
    p, recs = preload_run([sys.executable, os.path.join(SCRIPTS, "custom_loss.py"), root], policy=str(pol),
                          timeout=600)
    assert not events(recs, "error"), events(recs, "error")
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out == {"changed_after_harmful": False, "changed_after_mixed": True}
    assert len(events(recs, "flag")) == 4



def test_recalibration_follows_the_model(world):
    """Every recalibrate_every steps the held-out probe rows are scored again with the current
    weights: a model whose refusal propensity moved gets a threshold that moved with it."""
    model = _model(world)
    sh = _shaper(world, model, guards=["refusal"], recalibrate_every=2, scorer="forward")
    before = sh.cal["refusal"]["threshold"]
    harm, ben = sh._recal_rows
    assert len(harm) == len(ben) == 8  # the odd-numbered of 16 rows per probe
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = {}
    sh.pre_step(opt, 1, rec)
    assert "recalibrated" not in rec["shaping"]
    bias = torch.zeros(model.config.vocab_size)  # the refusal tokens' logits up by 2
    bias[sh.refusal_ids] = 2.0
    h = model.lm_head.register_forward_hook(lambda m, a, o: o + bias)
    sh.pre_step(opt, 2, rec)
    h.remove()
    after = rec["shaping"]["recalibrated"]["refusal"]
    assert after == pytest.approx(sh.cal["refusal"]["threshold"], abs=1e-5)
    assert after > before + 1.0



def test_recalibration_keeps_the_refit_midpoint(world):
    """With the forward scorer the recalibration moves the refitted direction's midpoint with the
    harmful probe's median (the offset the refit measured), so the threshold stays down at it
    instead of snapping back to the TPR quantile."""
    model = _model(world)
    sh = _shaper(world, model, guards=["direction"], scorer="forward", tpr=0.95, max_fpr=1.0)
    harm, ben = sh._recal_rows
    nh = len(harm)
    blocks = S.find_blocks(model)
    hs, _ = sh._probe_forward(model, [blocks[sh.layer]], harm + ben, next(model.parameters()).device)
    v = (hs[0] @ sh.direction).tolist()
    q = S.calibrate(v[:nh], v[nh:], 0.95, 1.0)["threshold"]
    med = sorted(v[:nh])[nh // 2]
    lo = min(v[:nh]) - 1.0
    assert lo < q
    mid = (lo + q) / 2  # a midpoint under the quantile threshold (no benign bound)
    sh._mid_offset = med - mid
    out = sh._recalibrate()
    want = S.calibrate(v[:nh], v[nh:], 0.95, 1.0, midpoint=mid)["threshold"]
    assert want < q and out["direction"] == pytest.approx(want, abs=1e-5)
    assert sh.cal["direction"]["threshold"] == pytest.approx(want, abs=1e-5)


# -- the training stream's check --

def test_stream_check_rules():
    harm = {"good": [float(x) for x in range(10, 20)], "bad": [0.0] * 10}
    # the stream: 70 task rows scoring 0..6.9 and 30 harmful-like rows scoring 10..12.9
    task = [x / 10 for x in range(70)]
    stream = {"good": task + [10 + x / 10 for x in range(30)], "bad": [1.0 + x for x in range(100)]}
    c = S.stream_check(harm, stream, 0.3)
    # 30 rows at or above the bound, not 31: the bound sits just above the 70th row from the top
    assert sum(v >= c["good"]["bound"] for v in stream["good"]) == 30
    assert 6.9 < c["good"]["bound"] <= 10.0
    pairs = [(p > s) + 0.5 * (p == s) for p in harm["good"] for s in stream["good"]]
    assert c["good"]["auroc"] == pytest.approx(sum(pairs) / len(pairs))
    assert not c["good"]["suspended"]
    assert c["bad"]["auroc"] == 0.0 and c["bad"]["suspended"]
    assert c["bad"]["rows"] == 100
    # the best guard always stays, even below the AUROC floor
    c = S.stream_check({"bad": [0.0] * 10}, {"bad": [1.0] * 40}, 0.3)
    assert not c["bad"]["suspended"]
    # a guard without harmful probe scores cannot be judged: suspended beside one that can,
    # kept (bounded) when it is the only kind
    c = S.stream_check({"good": harm["good"]}, {"good": stream["good"], "blind": [1.0 + x for x in range(100)]}, 0.3)
    assert c["blind"]["auroc"] is None and c["blind"]["suspended"] and not c["good"]["suspended"]
    c = S.stream_check({"bad": [0.0] * 10}, {"bad": [1.0] * 40, "blind": [1.0] * 40}, 0.3)
    assert not c["bad"]["suspended"] and c["blind"]["suspended"]  # the judged one stays
    c = S.stream_check({}, {"blind": [1.0 + x for x in range(100)]}, 0.3)
    assert not c["blind"]["suspended"] and sum(v >= c["blind"]["bound"] for v in range(1, 101)) == 30


class _Rec(S._Offline):
    def __init__(self):
        self.recs = []

    def audit(self, event, fields=None, step=None):
        self.recs.append((event, dict(fields or {})))


def test_stream_check_suspends_a_guard_the_task_fools(world, monkeypatch):
    """A guard calibrated on the probes that flags the whole training stream (the task does not
    look like the benign probe) is suspended once the stream has been seen; the decisions it made
    before are withdrawn, with a record; a rewrite needs every active guard to agree."""
    monkeypatch.setattr(S, "STREAM_MIN", 12)
    monkeypatch.setattr(S, "REFIT_ROWS", 16)
    rows = common.rows(world["train"])
    model = _model(world)
    rt = _Rec()
    sh = S.Shaping(common.policy(world, guards=["direction", "refusal"], action="refuse"), rt)
    sh._prepare(model)
    sh._install(model)
    sh.cal["refusal"]["threshold"] = -math.inf  # the refusal guard flags every row ...
    sh.probe_harm["refusal"] = [-1e9] * 8       # ... and ranks the harmful probe below all of them
    ids, mask, labels = _pad(rows[:8])
    model(input_ids=ids, attention_mask=mask, labels=labels)
    assert all(sh.decisions[_key(r)].flagged for r in rows[:8])
    assert not sh.checked
    ids, mask, labels = _pad(rows[8:16])
    model(input_ids=ids, attention_mask=mask, labels=labels)
    assert sh.checked and sh.suspended == {"refusal"}
    chk = [f for e, f in rt.recs if e == "probe" and f.get("what") == "shaping stream check"]
    assert len(chk) == 1 and chk[0]["guards"]["refusal"]["suspended"]
    assert not chk[0]["guards"]["direction"]["suspended"]  # the better guard always stays
    # the direction alone now decides; what the refusal guard alone flagged is withdrawn
    for r in rows[:16]:
        d = sh.decisions[_key(r)]
        direction_flags = d.scores["direction"] >= sh._threshold("direction")
        assert d.flagged == direction_flags
        if d.flagged:
            assert d.guard == "direction"
    revoked = [f for e, f in rt.recs if e == "flag" and f.get("revoked")]
    assert chk[0]["revoked"] == len(revoked) > 0
    # the bound: a guard flags at most max_flag_rate of the stream it has seen, unless the rows
    # it flags look like the harmful probe (this refusal guard ranks the probe below every row:
    # its flags look more harmful than the probe, so no cap; the AUROC suspends it instead)
    for g, v in sh.stream.items():
        t = sh._threshold(g)
        flagged = [x for x in v if x >= t]
        assert len(flagged) <= math.floor(0.3 * len(v)) or S.auroc(sh.probe_harm[g], flagged) <= S.PROBE_LIKE, g
    # with both guards active, one guard's flag is a mask, not a rewrite
    sh.suspended = set()
    sh.cal["refusal"]["threshold"] = 0.0
    t = sh._threshold("direction")
    d = sh._decide({"direction": t + 1.0, "refusal": sh._threshold("refusal") - 1.0})
    assert d.flagged and not d.refuse
    d = sh._decide({"direction": t + 1.0, "refusal": 1.0 + max(0.0, sh._threshold("refusal"))})
    assert d.flagged and d.refuse


def test_direction_refit_on_the_training_rows(world, monkeypatch):
    """At the first stream check the direction is fitted again: Fisher's discriminant of the
    harmful probe's even rows against the even rows of the training rows no guard flagged and
    the benign probe's, at
    the block chosen by held-out separation; checked against a float64 reference from a plain
    forward with output_hidden_states. From then on only that block is hooked, the earlier
    rows' scores are the new direction's, and the threshold is the lower of the quantile and
    the class means' midpoint."""
    monkeypatch.setattr(S, "STREAM_MIN", 12)
    monkeypatch.setattr(S, "REFIT_ROWS", 16)  # the first check comes with the 16th row: one refit, the last
    flagged_before = []
    refit = S.Shaping._refit_direction

    def spy(self, final=True):  # the rows flagged when the refit starts are not its negatives
        flagged_before.append({k for k, d in self.decisions.items() if d.flagged})
        return refit(self, final)
    monkeypatch.setattr(S.Shaping, "_refit_direction", spy)
    rows = common.rows(world["train"])
    model = _model(world)
    rt = _Rec()
    sh = S.Shaping(common.policy(world, guards=["direction"], max_fpr=0.5), rt)
    sh._prepare(model)
    sh._install(model)
    nblocks = len(S.find_blocks(model))
    assert sorted(sh.block_handles) == sh._candidates(nblocks)
    for chunk in (rows[:8], rows[8:16]):
        ids, mask, labels = _pad(chunk)
        model(input_ids=ids, attention_mask=mask, labels=labels)
    assert sh.checked
    chk = [f for e, f in rt.recs if e == "probe" and f.get("what") == "shaping stream check"][0]
    l = chk["direction_refit"]["layer"]
    assert sh.layer == l and list(sh.block_handles) == [l]

    def last_prompt_hidden(rs):
        # block l's own output (output_hidden_states gives the last block's after the final norm)
        out, got = [], []
        h = S.find_blocks(model)[l].register_forward_hook(lambda m, a, o: got.append(o[0] if isinstance(o, tuple) else o))
        try:
            with torch.no_grad():
                for r in rs:
                    b = r["labels"].index(next(x for x in r["labels"] if x != -100)) - 1
                    model(input_ids=torch.tensor([r["input_ids"]]))
                    out.append(got.pop()[0, b].double())
        finally:
            h.remove()
        return torch.stack(out)
    harm = common.rows(world["harm"])
    benign = common.rows(world["benign"])
    stream = rows[:16]  # the rows seen before the check, in order
    assert len(flagged_before) == 1
    clean = [r for r in stream if _key(r) not in flagged_before[0]]
    assert chk["direction_refit"]["negatives"] == len(clean) >= S.REFIT_MIN
    P = last_prompt_hidden(harm)[0::2]
    N = torch.cat([last_prompt_hidden(clean)[0::2], last_prompt_hidden(benign)[0::2]])
    X = torch.cat([P - P.mean(0), N - N.mean(0)])
    C = X.T @ X / X.shape[0]
    d = C.shape[0]
    m = torch.trace(C) / d
    a = sh.cal["direction"]["shrinkage"]
    Cs = (1 - a) * C + a * m * torch.eye(d, dtype=C.dtype)
    ref = torch.linalg.solve(Cs, P.mean(0) - N.mean(0))
    ref = ref / ref.norm()
    torch.testing.assert_close(sh.direction.double(), ref, rtol=1e-3, atol=1e-4)
    mid = float((P.mean(0) + N.mean(0)) @ ref) / 2
    assert sh.cal["direction"]["midpoint"] == pytest.approx(mid, abs=1e-3)
    assert sh.cal["direction"]["threshold"] <= mid + 1e-3
    hs = last_prompt_hidden(stream)
    for r, h in zip(stream, hs):
        assert sh.decisions[_key(r)].scores["direction"] == pytest.approx(float(h @ ref), abs=1e-4)


def test_start_scorer_judges_new_rows_with_the_model_at_the_start(world):
    """scorer "start" (the default): a row first seen after the model has moved is scored by the
    frozen copy of the start, exactly as the start model scores it, not by the moved model; the
    copy carries no hook and no gradient."""
    rows = common.rows(world["train"])
    model = _model(world)
    sh = _shaper(world, model, guards=["direction", "refusal"], layer=1)
    assert sh.scorer is not None and sh.scorer is not model and not sh.scorer.training
    assert all(not p.requires_grad for p in sh.scorer.parameters())
    start = copy.deepcopy(model)
    with torch.no_grad():  # the model moves (as a few optimizer steps would move it)
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    seen = []
    orig = sh._decide
    sh._decide = lambda scores: seen.append(dict(scores)) or orig(scores)
    ids, mask, labels = _pad(rows[:4])
    model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    assert len(seen) == 4
    with torch.no_grad():
        ref = start(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        now = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    for i, r in enumerate(rows[:4]):
        b = r["labels"].index(next(l for l in r["labels"] if l != -100)) - 1
        want = float(ref.hidden_states[2][i, b] @ sh.direction)
        assert seen[i]["direction"] == pytest.approx(want, rel=1e-4, abs=1e-5)
        assert seen[i]["direction"] != pytest.approx(float(now.hidden_states[2][i, b] @ sh.direction), rel=1e-3)
        lp = torch.log_softmax(ref.logits[i, b], -1)
        assert seen[i]["refusal"] == pytest.approx(float(torch.logsumexp(lp[sh.refusal_ids], -1)), abs=1e-5)
    head = sh.scorer.get_output_embeddings()
    for m in sh.scorer.modules():
        # the block captures, and the head's gather of the prompts' last tokens (its only hook)
        pre = [getattr(f, "__wrapped__", f) for f in m._forward_pre_hooks.values()]
        assert pre == ([sh._gather_hook] if m is head else []), (m, pre)
        assert set(m._forward_hooks) == set(h.id for i, h in sh.block_handles.items()
                                            if m is S.find_blocks(sh.scorer)[i])


def test_refuse_with_one_active_guard_needs_a_typical_harmful_score(world, monkeypatch):
    """With one active guard a flag alone masks; a rewrite needs a score at least the median
    harmful probe row's (and above every benign calibration row), and none before the last refit."""
    model = _model(world)
    sh = _shaper(world, model, guards=["direction", "refusal"], action="refuse")
    sh.checked, sh.refit, sh.suspended = True, False, {"refusal"}
    sh.cal["direction"].update(threshold=1.0, refuse_threshold=2.0)
    sh.probe_harm["direction"] = [1.0, 3.0, 5.0, 7.0, 9.0]  # median 5.0
    masked = sh._decide({"direction": 4.0, "refusal": 0.0})
    assert masked.flagged and not masked.refuse and masked.weight == 0.0
    assert sh._decide({"direction": 5.0, "refusal": 0.0}).refuse
    sh.cal["direction"]["refuse_threshold"] = 6.0  # a benign calibration row scores 6
    assert not sh._decide({"direction": 5.0, "refusal": 0.0}).refuse
    sh.refit = True  # the last refit is still to come: mask only
    assert not sh._decide({"direction": 9.0, "refusal": 0.0}).refuse


def test_report_counts_each_example_by_its_last_flag_record():
    from safehook.cli import report
    recs = [{"event": "flag", "fingerprint": "a", "guard": "direction", "score": 2.0, "threshold": 1.0,
             "action": "mask", "step": 1},
            {"event": "flag", "fingerprint": "b", "guard": "direction", "score": 2.0, "threshold": 1.0,
             "action": "mask", "step": 1},
            {"event": "flag", "fingerprint": "a", "guard": "direction", "action": "none", "revoked": "stream check",
             "step": 3},
            {"event": "flag", "fingerprint": "b", "guard": "direction", "score": 3.0, "threshold": 1.0,
             "action": "refuse", "step": 3}]
    out = "\n".join(report._shaping(recs, []))
    assert "stopped examples: 1 (1 withdrawn by the stream check)" in out
    assert out.count(" b ") == 1 and "-> refuse" in out and " a " not in out
