"""The trained model's own tokenizer, found without a path, and probe rows rendered with it.

``find(root, policy_path)`` looks, in order, for

1. a tokenizer the training script created: a live transformers tokenizer
   (``PreTrainedTokenizerBase``) whose vocabulary fits the model's input embedding. One gc scan,
   at the model's binding (``Tokenizers.for_model``: once per model, never per step), and none at
   all when transformers is not imported (then no such tokenizer can exist);
2. ``model.config._name_or_path``, when it is a local folder holding a tokenizer (what
   ``from_pretrained(folder)`` leaves there);
3. the policy's ``tokenizer`` (a probe's ``tokenizer`` folder).

A tokenizer fits when every id it makes has a row in the input embedding and it covers at least
``FIT_RATIO`` of those rows: ``FIT_RATIO * rows <= len(tokenizer) <= rows``. Checkpoints pad
their embedding beyond the vocabulary (Pythia 50277 of 50304, Qwen2.5 151665 of 151936, Phi-2
50295 of 51200), never by a tenth; a tokenizer of another model family does not fit. Among
several that fit, the one whose name is the model's ``_name_or_path`` wins, then the one whose
vocabulary is nearest the embedding's size.

``render(found, prompt, response)`` encodes one text row: with the tokenizer's chat template
when it has one (the user turn and the assistant's answer, exactly as ``apply_chat_template``
renders the conversation; the loss on the answer's tokens: integrations.rows.chat), else in a
plain format, ``"User: PROMPT\\nAssistant:"`` then `` RESPONSE`` and the end-of-sequence token.
A template that renders the conversation without its last turn differently from the start of
the whole one (some render no assistant turn at all) gets the prompt through the template with
the generation prompt and the answer's tokens after it (``template: "chat_template (prompt)"``).
"""
import gc
import os
import sys
import weakref

FIT_RATIO = 0.9
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")
PLAIN_PROMPT = "User: %s\nAssistant:"


class NotFound(ValueError):
    """No tokenizer that fits: the message says what was tried, and why each was passed over."""


class Found:
    """A tokenizer found for a model: ``tok``, ``source`` ("script", "config" or "policy"),
    ``name`` (its name_or_path or folder), ``vocab`` (len), ``rows`` (of the input embedding),
    ``template`` ("chat_template" or "plain"; see render)."""

    def __init__(self, tok, source, name, rows):
        self.tok, self.source, self.name, self.rows = tok, source, name, rows
        self.vocab = len(tok)
        self.template = "plain"
        if getattr(tok, "chat_template", None):
            from ..integrations.rows import chat
            try:  # one short conversation tells whether the template renders an answer turn
                chat(tok, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}])
                self.template = "chat_template"
            except Exception:
                self.template = "chat_template (prompt)"

    def record(self):
        """What the audit log says of it."""
        return {"source": self.source, "name": self.name, "class": type(self.tok).__name__,
                "vocab": self.vocab, "embedding_rows": self.rows, "template": self.template}

    def same_vocabulary(self, other):
        return other is not None and (other.tok is self.tok or (
            other.vocab == self.vocab and type(other.tok) is type(self.tok) and other.tok.get_vocab() == self.tok.get_vocab()))


def embedding_rows(root):
    """Rows of ROOT's input embedding (a Hugging Face model's get_input_embeddings()), or None
    when it has none that safehook can read."""
    import torch
    get = getattr(root, "get_input_embeddings", None)
    if get is None:
        return None
    try:
        emb = get()
    except Exception:  # a custom model whose method is not implemented
        return None
    if isinstance(emb, torch.nn.Embedding):
        return int(emb.num_embeddings)
    w = getattr(emb, "weight", None)
    return int(w.shape[0]) if isinstance(w, torch.Tensor) and w.dim() == 2 else None


def fit_problem(tok, rows):
    """Why TOK does not fit an embedding of ROWS rows, or None when it does."""
    n = len(tok)
    if n > rows:
        return "its %d tokens do not fit the embedding's %d rows" % (n, rows)
    if n < FIT_RATIO * rows:
        return "its %d tokens cover under %d%% of the embedding's %d rows (another model's)" % (
            n, round(100 * FIT_RATIO), rows)
    return None


def name_or_path(root):
    cfg = getattr(root, "config", None)
    p = getattr(cfg, "_name_or_path", None) if cfg is not None else None
    return p if isinstance(p, str) and p else None


def _live_tokenizers():
    """The transformers tokenizers alive in this process (one gc scan), or [] without transformers."""
    mod = sys.modules.get("transformers.tokenization_utils_base")
    base = getattr(mod, "PreTrainedTokenizerBase", None) if mod is not None else None
    if base is None:
        return []
    return [o for o in gc.get_objects() if issubclass(type(o), base)]  # type(): no __class__ property runs


def _load(path):
    from transformers import AutoTokenizer
    from .probe import _quiet_transformers
    with _quiet_transformers():
        return AutoTokenizer.from_pretrained(path, local_files_only=True)


def _holds_tokenizer(path):
    return os.path.isdir(path) and any(os.path.isfile(os.path.join(path, f)) for f in TOKENIZER_FILES)


def find(root, policy_path=None):
    """The Found tokenizer of the model ROOT (see the module docstring); raises NotFound."""
    rows = embedding_rows(root)
    model = type(root).__name__
    if rows is None:
        raise NotFound("%s has no token embedding that safehook can read (get_input_embeddings())" % model)
    tried = []
    own = name_or_path(root)
    fitting = []
    for tok in _live_tokenizers():
        why = fit_problem(tok, rows)
        if why is None:
            fitting.append(tok)
        else:
            tried.append("%s %s: %s" % (type(tok).__name__, getattr(tok, "name_or_path", "") or "(in memory)", why))
    if fitting:
        fitting.sort(key=lambda t: (getattr(t, "name_or_path", None) != own, rows - len(t)))
        tok = fitting[0]
        return Found(tok, "script", getattr(tok, "name_or_path", "") or "(in memory)", rows)
    if not tried:
        tried.append("no tokenizer in the process" if "transformers" in sys.modules
                     else "no tokenizer in the process (transformers is not imported)")
    for source, path in (("config", own), ("policy", policy_path)):
        if not path:
            tried.append("no %s" % ("config._name_or_path" if source == "config" else "tokenizer in the policy"))
            continue
        what = "config._name_or_path %s" % path if source == "config" else "the policy's tokenizer %s" % path
        if not _holds_tokenizer(path):
            tried.append("%s is not a local folder holding a tokenizer" % what)
            continue
        try:
            tok = _load(path)
        except Exception as e:
            tried.append("%s cannot be loaded: %s" % (what, str(e).splitlines()[0] if str(e) else type(e).__name__))
            continue
        why = fit_problem(tok, rows)
        if why is None:
            return Found(tok, source, path, rows)
        tried.append("%s: %s" % (what, why))
    raise NotFound("no tokenizer found for %s (%s)" % (model, "; ".join(tried)))


def render(found, prompt, response, name="probe"):
    """(input_ids, labels) of one text row, rendered as FOUND.template says (module docstring)."""
    tok = found.tok
    eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
    if found.template != "plain":
        from ..integrations.rows import _ids, chat
        msgs = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
        if found.template == "chat_template":
            return chat(tok, msgs, name)
        p = _ids(tok.apply_chat_template(msgs[:1], add_generation_prompt=True, tokenize=True))
        a = list(tok(response, add_special_tokens=False)["input_ids"]) + eos
        return p + a, [-100] * len(p) + a
    p = list(tok(PLAIN_PROMPT % prompt)["input_ids"])
    a = list(tok(" " + response, add_special_tokens=False)["input_ids"]) + eos
    return p + a, [-100] * len(p) + a


class Tokenizers:
    """The tokenizers found for the models of one runtime (rt.owned("tokenizers", Tokenizers)):
    each model searched once, at its binding or the first use of a shipped probe; the result
    said once in the audit log (see say)."""

    def __init__(self, rt):
        self.rt = rt
        self.found = {}      # id(root) -> (weakref to root, Found or NotFound)
        self.probes = None   # the Found the shipped probes are encoded with (the first one used)

    def for_model(self, root, policy_path=None, say=True):
        """Found for ROOT, or raises NotFound (the same answer every time for one model)."""
        hit = self.found.get(id(root))
        if hit is not None and hit[0]() is root:
            res = hit[1]
        else:
            try:
                res = find(root, policy_path)
            except NotFound as e:
                res = e
            self.found[id(root)] = (weakref.ref(root), res)
            if say:
                self.say(root, res)
        if isinstance(res, NotFound):
            raise res
        return res

    def for_probes(self, policy_path=None):
        """The Found the shipped probes are encoded with: that of the first model bound."""
        if self.probes is None:
            info = self.rt.model()
            if info is None:
                raise NotFound("the shipped probes need the trained model's tokenizer, and no model is bound yet")
            self.probes = self.for_model(info.root, policy_path)
        return self.probes

    def say(self, root, res, extra=None):
        """Record which tokenizer and template the model gets: in the 'start' record when it is
        still to be written (the model was bound before the first step), else in a 'probe'
        record (what: "tokenizer")."""
        from .. import _core
        rec = {"model": type(root).__name__}
        if isinstance(res, NotFound):
            rec["error"] = str(res)
        else:
            rec.update(res.record())
        fields = {"tokenizer": rec}
        fields.update(extra or {})
        if not _core.start_fields(fields):
            self.rt.audit("probe", dict(fields, what="tokenizer"))


def tokenizers(rt):
    """The runtime's Tokenizers."""
    return rt.owned("tokenizers", Tokenizers)
