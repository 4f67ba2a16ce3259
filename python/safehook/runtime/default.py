"""The embedded default policy, model by model.

With neither a user nor a system policy, safehook runs the embedded default
(policies/default.json): shaping, SafeGrad and the gate on the safety probes shipped inside the
package (safehook.data), rendered with the trained model's own tokenizer and chat template. Whether
it can is known only once the model is: when a model is bound (the optimizer's construction, its
first forward or step) or handed to DistributedDataParallel, ``Decider.decide`` looks for its
tokenizer (probes/tokenizer.py: one created by the script, config._name_or_path) and its
transformer blocks:

* found: the model is protected ("protect");
* not found (no tokenizer, a model without a token embedding, no block list): the model gets the
  default's fallback, policies/default-fallback.json (the middle blocks frozen: the default of
  before), and the process one line on stderr saying why and what to add ("fallback").

Each model is decided once; models of one process may be decided differently (a toy model and
a language model in one notebook). The shipped probes are encoded with the tokenizer of the first
model protected; a later model with another vocabulary falls back.

How: the features of each branch are set up as the activation sets up any policy's, each handed a
``Branch`` of the runtime: the runtime as the features know it, except that their model listeners
and step callables act only on the models of their branch (a step of an optimizer with no model
goes to the fallback), and ``accepts(root)`` tells freeze's DDP watch. The decision is recorded
once per model with the tokenizer and template (probes.tokenizer.Tokenizers.say: the start record
when the model is bound before the first step, else a probe record, what "tokenizer"):
``"default": {"applied": "protect" | "fallback", "reason", "digest"}`` (the policy applied).

Under an enforced system policy, and for a user policy, this module plays no part: a policy whose
shipped probes find no tokenizer cannot be applied and stops the job (on_error abort: fail closed)."""
import json
import weakref

from .. import _core
from .log import debug, warn
from .stacks import unwrap

NO_TOKENIZER_HINT = ("load the model's tokenizer in the script before creating the optimizer "
                     "(AutoTokenizer.from_pretrained), or set SAFEHOOK_POLICY to a policy whose probes name "
                     "a tokenizer folder")
NO_MODEL_HINT = "set SAFEHOOK_POLICY to a policy of your own (safehook check --explain shows the default)"


def fallback_policy(policy):
    """The default's fallback as a normalized policy dict, its _meta that of POLICY (the default:
    origin "<embedded default>", which freeze reads to pass over a model without blocks) with
    the fallback's digest."""
    fb = _core.default_policy(fallback=True)
    doc = json.loads(fb["policy"])
    doc["_meta"] = dict(policy.get("_meta") or {}, digest=fb["digest"], fallback=True)
    return doc


class Decider:
    """Protect or fall back, once per model (see the module docstring)."""

    def __init__(self, rt, policy, fallback):
        self.rt, self.policy, self.fallback = rt, policy, fallback
        self.made = {}      # id(root) -> (weakref to root, "protect" | "fallback")
        self.warned = False

    def decide(self, root):
        root = unwrap(root)
        hit = self.made.get(id(root))
        if hit is not None and hit[0]() is root:
            return hit[1]
        from ..probes.tokenizer import NotFound, tokenizers
        tz = tokenizers(self.rt)
        from ..features.freeze import find_blocks
        found, why, hint = None, None, NO_TOKENIZER_HINT
        blocks = find_blocks(root)
        try:
            found = tz.for_model(root, say=False)
        except NotFound as e:
            why = str(e)
            if "no token embedding" in why:
                hint = NO_MODEL_HINT
        if found is not None:
            if blocks is None:
                why, hint = "%s has no transformer block list" % type(root).__name__, NO_MODEL_HINT
            elif tz.probes is not None and not found.same_vocabulary(tz.probes):
                why = ("its tokenizer (%s) is not that of the first model protected, with which the shipped "
                       "probes are encoded" % found.name)
                hint = NO_MODEL_HINT
        applied = "protect" if why is None else "fallback"
        if applied == "protect" and tz.probes is None:
            tz.probes = found
        self.made[id(root)] = (weakref.ref(root), applied)
        doc = self.policy if applied == "protect" else self.fallback
        extra = {"default": {"applied": applied, "digest": (doc.get("_meta") or {}).get("digest")}}
        if why is not None:
            extra["default"]["reason"] = why
        tz.say(root, found if found is not None else NotFound(why), extra)
        if applied == "fallback":
            if not self.warned:
                self.warned = True
                what = ("it gets the default's fallback, its middle blocks frozen" if blocks is not None else
                        "the default's fallback, which freezes the middle transformer blocks, finds none in it")
                warn("the default policy cannot protect %s: %s; %s. To protect it, %s."
                     % (type(root).__name__, why, what, hint))
            else:
                debug("default: %s falls back: %s" % (type(root).__name__, why))
        else:
            debug("default: protecting %s with the shipped probes (tokenizer %s, %s)"
                  % (type(root).__name__, found.name, found.template))
        return applied

    def on_model(self, info):
        try:
            self.decide(info.root)
        except Exception as e:  # never break the binding; the branches ask again
            debug("default: cannot decide for %s: %r" % (type(info.root).__name__, e))


class Branch:
    """The runtime as the features of one branch ("protect" or "fallback") see it: the real
    runtime, except for the models their listeners and step callables act on."""

    def __init__(self, rt, decider, want, policy):
        self._rt, self._decider, self._want = rt, decider, want
        self.policy = policy

    def __getattr__(self, name):
        return getattr(self._rt, name)

    def accepts(self, root):
        return self._decider.decide(root) == self._want

    def on_model(self, cb):
        self._rt.on_model(lambda info: cb(info) if self.accepts(info.root) else None)

    def _for_branch(self, fn):
        def step(opt, step, record):
            info = self._rt.model_for(opt)
            if (self.accepts(info.root) if info is not None else self._want == "fallback"):
                return fn(opt, step, record)
            return None
        return step

    def add_pre(self, fn, order=50):
        self._rt.add_pre(self._for_branch(fn), order)

    def add_post(self, fn, order=50):
        self._rt.add_post(self._for_branch(fn), order)

    def all_models(self):
        return [i for i in self._rt.all_models() if self.accepts(i.root)]

    def model(self):
        mine = self.all_models()
        return mine[0] if mine else None


def setup(policy, rt, features, setup_one):
    """Set up the embedded default POLICY in RT: the decider first (it decides at each binding,
    before any feature's listener runs), then the fallback's features, the protecting ones, and
    those set up for every policy on RT itself. FEATURES: the registry's (runtime/registry.py),
    in setup order; SETUP_ONE(feature, policy, rt) is the activation's own feature setup."""
    fallback = fallback_policy(policy)
    decider = Decider(rt, policy, fallback)
    rt.provide("default", decider)
    rt.on_model(decider.on_model)
    for doc, want in ((fallback, "fallback"), (policy, "protect")):
        branch = Branch(rt, decider, want, doc)
        for feat in features:
            if not feat.always and feat.wanted(doc):
                setup_one(feat, doc, branch)
    for feat in features:
        if feat.always and feat.wanted(policy):
            setup_one(feat, policy, rt)
