"""A probe: safety data plus a judge, or a callable; its loss, gradient and score."""
import contextlib
import json
import os

from ..runtime import registry
from .batch import pad_batch
from .judges import check_callable, load_callable, make_judge



@contextlib.contextmanager
def eval_mode(model):
    """Run the model in eval mode (no dropout) and put every submodule's flag back after."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, t in flags:
            m.training = t


@contextlib.contextmanager
def _quiet_transformers():
    """generate() warns about generation-config details; a user's process is never printed to."""
    import warnings
    try:
        from transformers.utils import logging as tlog
        old = tlog.get_verbosity()
        tlog.set_verbosity_error()
    except Exception:
        tlog = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            yield
        finally:
            if tlog is not None:
                tlog.set_verbosity(old)


def at_least_float32(t):
    """T in float32 when it is in a narrower float type (bf16/fp16 logits), else as it is."""
    import torch
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


# Above this many rows a probe warns with its cost (each evaluation runs them all).
LARGE_PROBE_ROWS = 10000

class Example:
    """One encoded row: ids/labels for the loss, prompt/reference for generation, and the
    harmful counterpart for the contrastive loss."""
    __slots__ = ("ids", "labels", "prompt", "reference", "prompt_text", "harm_ids", "harm_labels")

    def __init__(self, ids, labels, prompt, reference, prompt_text=None, harm_ids=None, harm_labels=None):
        self.ids, self.labels, self.prompt, self.reference = ids, labels, prompt, reference
        self.prompt_text, self.harm_ids, self.harm_labels = prompt_text, harm_ids, harm_labels


def _split_prompt(ids, labels):
    k = next((i for i, l in enumerate(labels) if l != -100), len(ids))
    return ids[:k], ids[k:]


class Probe:
    """A probe of the policy: data (a JSONL file, or ``builtin``: a set shipped in safehook.data,
    rendered with the trained model's own tokenizer, found by TOKENIZERS: a
    probes.tokenizer.Tokenizers) plus a judge, or a callable."""

    def __init__(self, name, cfg, tokenizers=None):
        self.name = name
        self.cfg = registry.defaults("probe")
        self.cfg.update(cfg or {})
        self._tokenizers = tokenizers
        self._found = None
        self._fn = None
        self._judge_fn = None
        self._examples = None
        self._tok = None
        self._batches = {}
        c = self.cfg
        if not c.get("callable") and not c.get("data") and not c.get("builtin"):
            raise ValueError("probe %r needs 'data', 'builtin' or 'callable'" % name)
        if c["score"] not in ("loss", "refusal_rate", "over_refusal"):
            raise ValueError("probe %r: unknown score %r" % (name, c["score"]))
        if c["loss"] not in ("ce", "contrastive"):
            raise ValueError("probe %r: unknown loss %r" % (name, c["loss"]))

    # -- setup checks (cheap: nothing imported or parsed) --
    def check(self):
        c = self.cfg
        if c.get("callable"):
            check_callable(c["callable"])
        if c.get("data") and not os.path.isfile(c["data"]):
            raise ValueError("probe %r: data file %s not found" % (self.name, c["data"]))
        if c.get("builtin") and not os.path.isfile(self.data_path()):
            raise ValueError("probe %r: the shipped data %s is missing from this installation"
                             % (self.name, self.data_path()))
        if c.get("tokenizer") and not os.path.isdir(c["tokenizer"]):
            raise ValueError("probe %r: tokenizer %s is not a directory" % (self.name, c["tokenizer"]))
        j = c["judge"]
        if j not in ("keyword", "exact"):
            check_callable(j)

    # -- loading --
    def _callable(self):
        if self._fn is None and self.cfg.get("callable"):
            self._fn = load_callable(self.cfg["callable"])
        return self._fn

    def data_path(self):
        """The JSONL file of the rows: ``data``, or the shipped set ``builtin``."""
        if self.cfg.get("builtin"):
            from .. import data
            return data.path(self.cfg["builtin"])
        return self.cfg.get("data")

    def found(self):
        """For shipped rows: the probes.tokenizer.Found they are rendered with (the trained
        model's tokenizer; the probe's ``tokenizer`` folder only when none is found first)."""
        if self._found is None:
            if self._tokenizers is None:
                raise ValueError("probe %r: the shipped rows need the trained model's tokenizer" % self.name)
            self._found = self._tokenizers.for_probes(self.cfg.get("tokenizer"))
        return self._found

    def tokenizer(self):
        if self.cfg.get("builtin"):
            return self.found().tok
        if self._tok is None and self.cfg.get("tokenizer"):
            from transformers import AutoTokenizer
            self._tok = AutoTokenizer.from_pretrained(self.cfg["tokenizer"], local_files_only=True)
        return self._tok

    def _encode_prompt(self, tok, prompt):
        if self.cfg.get("chat_template"):
            ids = tok.apply_chat_template([{"role": "user", "content": prompt}],
                                          add_generation_prompt=True, tokenize=True)
            if isinstance(ids, dict) or hasattr(ids, "keys"):
                ids = ids["input_ids"]
            return list(ids)
        return list(tok(prompt)["input_ids"])

    def _encode_answer(self, tok, text):
        ids = list(tok(text, add_special_tokens=False)["input_ids"])
        return ids, ids + ([tok.eos_token_id] if tok.eos_token_id is not None else [])

    def examples(self):
        if self._examples is not None:
            return self._examples
        with open(self.data_path()) as f:
            rows = [json.loads(l) for l in f if l.strip()]
        if self.cfg.get("limit"):
            rows = rows[: self.cfg["limit"]]
        if not rows:
            raise ValueError("probe %r: %s has no rows" % (self.name, self.data_path()))
        if len(rows) > LARGE_PROBE_ROWS:
            # each evaluation runs every row: say what that costs before it is paid for
            from ..runtime.log import warn
            bs = int(self.cfg.get("batch_size") or 16)
            warn("probe %r: %d rows (%s): every evaluation, gate check or safety gradient runs all of them, "
                 "%d forward batches of %d; set probes.%s.limit to bound it"
                 % (self.name, len(rows), self.data_path(), -(-len(rows) // bs), bs, self.name))
        out = []
        from ..integrations.rows import convert
        for n, r in enumerate(rows):
            r = convert(r, self.tokenizer, self.name, n)  # chat and Alpaca rows
            if "input_ids" in r:
                ids = list(r["input_ids"])
                labels = list(r.get("labels", ids))
                prompt, ref = _split_prompt(ids, labels)
                hi = r.get("harmful_input_ids")
                hl = list(r.get("harmful_labels", hi)) if hi is not None else None
                out.append(Example(ids, labels, prompt, ref, None, hi, hl))
            elif "prompt" in r and self.cfg.get("builtin"):  # the model's own tokenizer and template
                from .tokenizer import render
                ids, labels = render(self.found(), r["prompt"], r.get("response", ""), self.name)
                p, ref = _split_prompt(ids, labels)
                out.append(Example(ids, labels, p, ref, r["prompt"]))
            elif "prompt" in r:
                tok = self.tokenizer()
                if tok is None:
                    raise ValueError("probe %r: text rows need 'tokenizer'" % self.name)
                p = self._encode_prompt(tok, r["prompt"])
                ref, full = self._encode_answer(tok, r.get("response", ""))
                hi = hl = None
                if "harmful_response" in r:
                    _, hfull = self._encode_answer(tok, r["harmful_response"])
                    hi, hl = p + hfull, [-100] * len(p) + hfull
                out.append(Example(p + full, [-100] * len(p) + full, p, ref, r["prompt"], hi, hl))
            else:
                raise ValueError("probe %r: row %d has neither 'prompt' nor 'input_ids'" % (self.name, n + 1))
        if self.cfg["loss"] == "contrastive" and any(e.harm_ids is None for e in out):
            raise ValueError("probe %r: the contrastive loss needs a harmful answer in every row" % self.name)
        self._examples = out
        return out

    def rows(self):
        """The (safe) rows as pre-tokenized dicts {"input_ids", "labels"} (text rows encoded)."""
        return [{"input_ids": e.ids, "labels": e.labels} for e in self.examples()]

    # -- loss --
    def _padded(self, seqs, dev):
        """Right-padded batches of (ids, labels, mask) tensors, built once per device."""
        key = (id(seqs), str(dev))
        if key in self._batches:
            return self._batches[key]
        bs = self.cfg["batch_size"]
        batches = [pad_batch(seqs[i:i + bs], 0, dev) for i in range(0, len(seqs), bs)]
        batches = [(ids, labels, mask) for ids, mask, labels in batches]
        ntok = sum(len([l for l in s[1][1:] if l != -100]) for s in seqs)
        self._batches[key] = (batches, ntok)
        return self._batches[key]

    def _sets(self):
        """[(sign, sequences)]: the CE sets whose token means add up to the loss."""
        ex = self.examples()
        if not hasattr(self, "_seqsets"):
            safe = [(e.ids, e.labels) for e in ex]
            self._seqsets = [(1.0, safe)]
            if self.cfg["loss"] == "contrastive":
                self._seqsets.append((-1.0, [(e.harm_ids, e.harm_labels) for e in ex]))
        return self._seqsets

    def _batch_terms(self, model):
        """Yield (scale, batch) where the loss is the sum over batches of scale * summed CE."""
        dev = next(model.parameters()).device
        for sign, seqs in self._sets():
            batches, ntok = self._padded(seqs, dev)
            for b in batches:
                yield sign / max(ntok, 1), b

    @staticmethod
    def _summed_ce(model, batch):
        import torch.nn.functional as F
        ids, labels, mask = batch
        out = model(input_ids=ids, attention_mask=mask)
        logits = getattr(out, "logits", None)
        if logits is None:
            logits = out if not isinstance(out, (tuple, list)) else out[0]
        return F.cross_entropy(at_least_float32(logits[:, :-1].reshape(-1, logits.size(-1))),
                               labels[:, 1:].reshape(-1), ignore_index=-100, reduction="sum")

    def safe_batches(self, device):
        """([(input_ids, labels, attention_mask)] right-padded batches of the safe rows, count of
        scored tokens over all of them), built once per device."""
        return self._padded(self._sets()[0][1], device)

    def loss_terms(self, model):
        """Yield differentiable scalars, one per probe batch (one for a callable), whose sum is
        the safety loss: backpropagate each as it comes and the graph of one batch is alive at a
        time."""
        fn = self._callable()
        if fn is not None:
            if self.cfg.get("kind") == "score":
                raise ValueError("probe %r returns a score, not a loss" % self.name)
            yield fn(model)
            return
        for scale, b in self._batch_terms(model):
            yield self._summed_ce(model, b) * scale

    def loss(self, model):
        """A differentiable scalar: the safety loss at the model's current weights (token mean
        CE of the responses, or the contrastive safe-minus-harmful loss). One graph over every
        batch: for gradients use loss_terms or safehook.probes.gradient."""
        total = None
        for t in self.loss_terms(model):
            total = t if total is None else total + t
        return total

    def loss_and_grad(self, model, params):
        """(loss as float, [grad or None per param]) of the safety loss, one batch at a time
        (memory stays that of one batch). Does not touch p.grad. Runs in eval mode."""
        import torch
        params = list(params)
        grads = [None] * len(params)
        total = 0.0
        with eval_mode(model), torch.enable_grad():
            for l in self.loss_terms(model):
                gs = torch.autograd.grad(l, params, allow_unused=True)
                total += float(l.detach())
                for i, g in enumerate(gs):
                    if g is not None:
                        grads[i] = g if grads[i] is None else grads[i].add_(g)
        return total, grads

    def loss_value(self, model):
        """The safety loss as a float, without gradients, in eval mode."""
        import torch
        with eval_mode(model), torch.no_grad():
            return float(self.loss(model))

    # -- generation and judges --
    def _judge(self):
        if self._judge_fn is None:
            self._judge_fn = make_judge(self.cfg)
        return self._judge_fn

    def generate(self, model):
        """Greedy answers to every prompt: a list of token-id lists (cut at EOS)."""
        import torch
        ex = self.examples()
        tok = self.tokenizer()
        dev = next(model.parameters()).device
        eos = tok.eos_token_id if tok is not None else getattr(getattr(model, "config", None), "eos_token_id", None)
        if isinstance(eos, (list, tuple)):
            eos = eos[0] if eos else None
        pad = tok.pad_token_id if tok is not None and tok.pad_token_id is not None else (eos if eos is not None else 0)
        bs, mnt = self.cfg["batch_size"], self.cfg["max_new_tokens"]
        answers = []
        with eval_mode(model), torch.no_grad(), _quiet_transformers():
            for i in range(0, len(ex), bs):
                chunk = ex[i:i + bs]
                n = max(len(e.prompt) for e in chunk)
                ids = torch.full((len(chunk), n), pad, dtype=torch.long)
                mask = torch.zeros(len(chunk), n, dtype=torch.long)
                for j, e in enumerate(chunk):  # left padding: every prompt ends at column n
                    ids[j, n - len(e.prompt):] = torch.tensor(e.prompt)
                    mask[j, n - len(e.prompt):] = 1
                ids, mask = ids.to(dev), mask.to(dev)
                if hasattr(model, "generate"):
                    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=mnt, do_sample=False,
                                         pad_token_id=pad, eos_token_id=eos, num_beams=1)
                    new = out[:, n:].tolist()
                else:
                    new = self._greedy(model, ids, mask, mnt).tolist()
                for row in new:
                    if eos is not None and eos in row:
                        row = row[:row.index(eos)]
                    answers.append(row)
        return answers

    @staticmethod
    def _greedy(model, ids, mask, steps):
        import torch
        out = []
        for _ in range(steps):
            pos = (mask.cumsum(1) - 1).clamp(min=0)
            o = model(input_ids=ids, attention_mask=mask, position_ids=pos)
            logits = getattr(o, "logits", o if not isinstance(o, (tuple, list)) else o[0])
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            out.append(nxt)
            ids = torch.cat([ids, nxt], 1)
            mask = torch.cat([mask, torch.ones_like(nxt)], 1)
        return torch.cat(out, 1)

    def refusal_fraction(self, model):
        answers = self.generate(model)
        tok = self.tokenizer()
        judge = self._judge()
        refused = 0
        for e, a in zip(self.examples(), answers):
            text = tok.decode(a, skip_special_tokens=True) if tok is not None else None
            if text is None and self.cfg["judge"] == "keyword":
                raise ValueError("probe %r: the keyword judge needs 'tokenizer' to read answers" % self.name)
            refused += bool(judge(e, a, text))
        return refused / len(answers)

    # -- scores --
    def evaluate(self, model):
        """{"score": float (higher is safer), and what it came from: "loss" or "refusal_rate"}."""
        kind = self.cfg["score"]
        fn = self._callable()
        if fn is not None and self.cfg.get("kind") == "score":
            import torch
            with eval_mode(model), torch.no_grad():
                return {"score": float(fn(model))}
        if kind == "loss":
            l = self.loss_value(model)
            return {"score": -l, "loss": l}
        r = self.refusal_fraction(model)
        if kind == "refusal_rate":
            return {"score": r, "refusal_rate": r}
        return {"score": 1.0 - r, "over_refusal": r}

    def score(self, model):
        """Higher is safer: -loss, the refusal rate, or 1 - the over-refusal rate."""
        return self.evaluate(model)["score"]


class Probes:
    """The probes of one runtime, each made once per configuration (its data, tokenizer and
    padded batches are loaded at first use and go with the runtime)."""

    def __init__(self, rt):
        self.made = {}
        self.rt = rt

    def get(self, policy, name):
        cfg = (policy.get("probes") or {}).get(name)
        if cfg is None:
            raise KeyError("no probe named %r in the policy's 'probes'" % name)
        key = (name, json.dumps(cfg, sort_keys=True))
        if key not in self.made:
            from .tokenizer import tokenizers
            self.made[key] = Probe(name, cfg, tokenizers(self.rt) if cfg.get("builtin") else None)
        return self.made[key]


def get(rt, name, policy=None):
    """The probe NAME of POLICY (default: RT's policy), made once per runtime RT."""
    return rt.owned("probes", Probes).get(policy if policy is not None else rt.policy, name)


def setup(policy, rt):
    """Check every probe's files and callables (without loading them: this runs while torch is
    being imported); the data, tokenizer and callables load at first use."""
    for name in policy.get("probes") or {}:
        get(rt, name).check()
