"""The one safety gradient of a step (safehook.probes.gradient): computed batch by batch (the
graph of one probe batch alive at a time, the same gradient as one graph over the whole probe,
float64), shared between the features that ask for it at the same weights, and leaving the
task gradients in .grad as they were."""
import os
import sys
import weakref

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "monitor_scripts"))
import tiny  # noqa: E402

from safehook import probes  # noqa: E402
from safehook.probes import gradient  # noqa: E402
from safehook.runtime.context import Runtime  # noqa: E402

torch.set_num_threads(1)


class _Ctx(Runtime):
    """A runtime that publishes nothing; its failures raise."""

    def on_model(self, cb):
        pass

    def model_for(self, optimizer):
        return None  # the test hands SafeGrad its model through on_model's info

    def fail(self, msg):
        raise AssertionError(msg)


class _Box:
    __slots__ = ("t", "__weakref__")

    def __init__(self, t):
        self.t = t


class _Saved:
    """Bytes of the tensors autograd holds for backward, alive now and at most."""

    def __init__(self):
        self.live = self.peak = 0

    def hooks(self):
        def pack(t):
            n = t.numel() * t.element_size()
            self.live += n
            self.peak = max(self.peak, self.live)
            box = _Box(t)
            weakref.finalize(box, self._free, n)
            return box

        return torch.autograd.graph.saved_tensors_hooks(pack, lambda box: box.t)

    def _free(self, n):
        self.live -= n


def _probe_file(d, n, name="probe.jsonl"):
    path = d / name
    tiny.write_probe(str(path), n=n)
    return str(path)


def _safegrad_peak(tmp_path, rows, loss):
    """Peak bytes saved for backward while SafeGrad computes its probe gradient."""
    from safehook.features import safegrad
    from safehook.runtime import model as _model
    policy = {"probes": {"p": {"data": _probe_file(tmp_path, rows, "p%d.jsonl" % rows), "batch_size": 2}},
              "safegrad": {"source": "probe", "probe": "p", "loss": loss}}
    m = tiny.model()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    ids, mask, labels = tiny.batch("harmful", n=4)
    m(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    sg = safegrad.SafeGrad(policy, _Ctx())
    sg._on_model(_model.ModelInfo(m))
    saved = _Saved()
    record = {}
    with saved.hooks():
        sg.pre_step(opt, 1, record)
    assert record.get("safety_refreshed") and "cosine" in record
    return saved.peak


@pytest.mark.parametrize("loss", ["ce", "kl"])
def test_probe_gradient_holds_one_batch_of_graph(tmp_path, loss):
    one = _safegrad_peak(tmp_path, 2, loss)     # one batch of 2 rows
    many = _safegrad_peak(tmp_path, 16, loss)   # eight batches of 2 rows
    assert one > 0
    assert many < 1.5 * one, (one, many)  # one graph over all eight would hold about 8x


def _trained_double(steps=3):
    m = tiny.model().double()
    opt = torch.optim.SGD(m.parameters(), lr=0.5)
    ids, mask, labels = tiny.batch("harmful", n=8)
    for _ in range(steps):
        opt.zero_grad()
        m(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        opt.step()
    opt.zero_grad()
    return m


@pytest.mark.parametrize("contrastive", [False, True], ids=["ce", "contrastive"])
def test_ce_gradient_equals_one_graph_float64(tmp_path, contrastive):
    SG = gradient.SafetyGradients()  # a cache of its own, as a runtime has
    path = tmp_path / "c.jsonl"
    tiny.write_probe(str(path), n=10, contrastive=contrastive)
    pr = probes.Probe("c", {"data": str(path), "batch_size": 3, "loss": "contrastive" if contrastive else "ce"})
    m = _trained_double()
    params = list(m.parameters())
    with probes.eval_mode(m):
        ref_loss = pr.loss(m)  # one graph over all four batches
        ref = torch.autograd.grad(ref_loss, params)
    with gradient.no_sharing():
        loss, grads = SG.get(pr, m, params, step=1)
    assert loss == pytest.approx(float(ref_loss.detach()), rel=1e-12)
    for g, r in zip(grads, ref):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-13)


def test_kl_gradient_equals_one_graph_float64(tmp_path):
    SG = gradient.SafetyGradients()  # a cache of its own, as a runtime has
    pr = probes.Probe("k", {"data": _probe_file(tmp_path, 10), "batch_size": 3})
    m = _trained_double(steps=0)
    params = list(m.parameters())
    # the reference: one padded batch of every row, KL(p0 || p) over the response positions
    ids, mask, labels = probes.pad_batch(pr.rows(), 0)
    pos = labels[:, 1:] != -100

    def logp():
        return torch.log_softmax(m(input_ids=ids, attention_mask=mask).logits[:, :-1][pos], -1)

    with torch.no_grad(), probes.eval_mode(m):
        ref0 = logp()
    with gradient.no_sharing():
        l0, g0 = SG.get(pr, m, params, step=1, loss="kl")  # step 0: p0 recorded
    assert l0 == pytest.approx(0.0, abs=1e-12) and all(g.abs().max() < 1e-12 for g in g0)
    with torch.no_grad():
        for p in params:
            p.add_(0.05 * torch.randn_like(p))
    with probes.eval_mode(m):
        lp = logp()
        ref_loss = (ref0.exp() * (ref0 - lp)).sum(-1).mean()
        ref = torch.autograd.grad(ref_loss, params)
    with gradient.no_sharing():
        loss, grads = SG.get(pr, m, params, step=2, loss="kl")
    assert ref_loss > 1e-4 and loss == pytest.approx(float(ref_loss.detach()), rel=1e-10)
    for g, r in zip(grads, ref):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-13)


def test_computed_once_per_step_and_task_gradients_kept(tmp_path):
    SG = gradient.SafetyGradients()  # a cache of its own, as a runtime has
    pr = probes.Probe("s", {"data": _probe_file(tmp_path, 6)})
    m = tiny.model()
    _opt = torch.optim.AdamW(m.parameters(), lr=1e-3, fused=True)  # fused: versions do not move
    ids, mask, labels = tiny.batch("harmful", n=4)
    m(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    params = list(m.parameters())
    task = [(p.grad, p.grad.clone()) for p in params]
    n0 = SG.stats()

    def count():
        s = SG.stats()
        return s["computed"] - n0["computed"], s["shared"] - n0["shared"]

    l1, g1 = SG.get(pr, m, params, step=7)
    assert all(p.grad is t and torch.equal(p.grad, v) for p, (t, v) in zip(params, task))  # .grad untouched
    l2, g2 = SG.get(pr, m, params, step=7)  # a second feature, same step
    assert count() == (1, 1) and l2 == l1 and all(a is b for a, b in zip(g1, g2))
    # a forward-time request (no step) at the same weights shares it too
    assert SG.get(pr, m, params[:3])[1] == g1[:3] and count() == (1, 2)
    _, g3 = SG.get(pr, m, params, step=8)  # another step: computed anew
    assert count() == (2, 2)
    for a, b in zip(g1, g3):
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # the weights did not move
    with torch.no_grad():
        params[0].mul_(1.5)  # an in-place change of a weight: its version moves
    SG.get(pr, m, params, step=8)
    assert count() == (3, 2)
    # the KL loss is its own entry
    SG.get(pr, m, params, step=8, loss="kl")
    assert count() == (4, 2)
    with pytest.raises(ValueError):
        SG.get(pr, m, params, step=8, loss="mse")
