"""Safety probes: a safety loss (for gradients and gates) and a safety score (for monitoring,
higher is safer) on a small safety set. This first version reads pre-tokenized rows and
callables; the probes issue adds text with a tokenizer, judges and generation scores."""
import importlib
import json


def load_callable(spec):
    """'pkg.module:function' -> the function."""
    mod, _, fn = spec.partition(":")
    if not mod or not fn:
        raise ValueError("a callable is named 'pkg.module:function', got %r" % spec)
    return getattr(importlib.import_module(mod), fn)


class Probe:
    def __init__(self, name, cfg):
        self.name = name
        self.cfg = cfg
        self._fn = load_callable(cfg["callable"]) if cfg.get("callable") else None
        self._rows = None

    def rows(self):
        if self._rows is None:
            with open(self.cfg["data"]) as f:
                rows = [json.loads(l) for l in f if l.strip()]
            if self.cfg.get("limit"):
                rows = rows[: self.cfg["limit"]]
            self._rows = rows
        return self._rows

    def loss(self, model):
        """A differentiable scalar: the safety loss at the model's current weights."""
        if self._fn is not None:
            return self._fn(model)
        import torch
        rows = self.rows()
        dev = next(model.parameters()).device
        n = max(len(r["input_ids"]) for r in rows)
        ids = torch.zeros(len(rows), n, dtype=torch.long, device=dev)
        labels = torch.full((len(rows), n), -100, dtype=torch.long, device=dev)
        mask = torch.zeros(len(rows), n, dtype=torch.long, device=dev)
        for i, r in enumerate(rows):
            k = len(r["input_ids"])
            ids[i, :k] = torch.tensor(r["input_ids"])
            labels[i, :k] = torch.tensor(r.get("labels", r["input_ids"]))
            mask[i, :k] = 1
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        return out.loss if hasattr(out, "loss") else out[0]

    def score(self, model):
        """Higher is safer. Default: the negated probe loss, without gradients."""
        import torch
        if self._fn is not None and self.cfg.get("kind") == "score":
            return float(self._fn(model))
        with torch.no_grad():
            return -float(self.loss(model))


_probes = {}


def get(policy, name):
    """The probe NAME of POLICY (created once per process)."""
    if name not in _probes:
        cfg = (policy.get("probes") or {}).get(name)
        if cfg is None:
            raise KeyError("no probe named %r in the policy's 'probes'" % name)
        _probes[name] = Probe(name, cfg)
    return _probes[name]


def setup(policy, rt):
    """Probes are used by other features; loading them checks that callables import."""
    for name in policy.get("probes") or {}:
        get(policy, name)
