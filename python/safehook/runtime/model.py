"""Finding the models being trained. A model is the root module that owns an optimizer's
parameters: one per optimizer, several per process (a notebook, a sweep, a GAN). A module that
no optimizer trains (a reference model evaluated first, a teacher, a decoy) is never bound.

How an optimizer gets its model, earliest first:

* at its construction (torch.optim.Optimizer.__init__ is wrapped while the runtime is active): a
  module already called that holds all its parameters, else the root module holding them all
  (find_root: one gc scan). So the freeze happens before the first forward and backward, before
  DeepSpeed flattens the parameters, before FSDP2's lazy initialization;
* at the next forward of a module that holds all its parameters: a global forward pre-hook is
  registered only while some known optimizer has no model (a global module hook slows every
  module call and makes torch.compile warn), checked once per module, and removed as soon as
  every known optimizer is bound;
* at install(), for optimizers that already exist (find_root);
* at its first step (the features' first pre-step callable, see bind_step), when none of the
  above saw it (an optimizer created before install(), Lightning calling training_step instead
  of the module): the smallest live module holding all its parameters (one gc scan).

The binding state is a ``Models`` object owned by the runtime (``rt.models``): its hooks and its
Optimizer.__init__ wrapper are the runtime's, and it is dropped with the runtime, so that nothing
of it holds a model after uninstall(). A new runtime binds the models that still train again
(their optimizers are found by one gc scan). Listeners (``Runtime.on_model``) are called once per
model, the first time it is bound, with a ModelInfo. An optimizer over parameters no module
holds (bare tensors, DeepSpeed's flat partitions) has no model."""
import gc
import weakref

from .log import debug
from .stacks import strip_name, unwrap


class ModelInfo:
    """A bound model: ``root`` (unwrapped), ``called`` (the module found, maybe a wrapper),
    ``params``: {stripped name: parameter}, ``when`` ("optimizer_init", "install",
    "first_forward", "first_step") and ``optimizers`` (weak references)."""

    def __init__(self, called, when="first_forward"):
        self.called = called
        self.root = unwrap(called)
        self.params = {strip_name(n): p for n, p in self.root.named_parameters()}
        self.when = when
        self.optimizers = []


def _opt_ids(opt):
    return {id(p) for grp in opt.param_groups for p in grp["params"]}


def _owns(module, ids):
    if not ids:
        return False
    have = {id(p) for p in module.parameters()}
    return ids <= have


def find_root(ids):
    """The root module holding every parameter of IDS (ids of tensors): among the live modules
    holding them all (one gc scan), those inside no other such module; the smallest of those
    (a container holding the model and another one is not the model). None when no module
    holds them (bare tensors, DeepSpeed's flat partitions)."""
    if not ids:
        return None
    import torch.nn
    hold = []
    for o in gc.get_objects():
        if issubclass(type(o), torch.nn.Module):  # type(), not isinstance: no __class__ property runs
            try:
                have = [id(p) for p in o.parameters()]
            except Exception:
                continue
            if len(have) >= len(ids) and ids <= set(have):
                hold.append((len(have), o))
    if not hold:
        return None
    inner = set()
    for _, o in hold:
        for sub in o.modules():
            if sub is not o:
                inner.add(id(sub))
    roots = [(k, o) for k, o in hold if id(o) not in inner] or hold
    root = min(roots, key=lambda t: t[0])[1]
    # a container without a forward of its own (a LightningModule that only has training_step)
    # is not what a probe can call: its one child holding every parameter is the model
    while _no_forward(root):
        kids = [c for c in root.children() if _owns(c, ids)]
        if len(kids) != 1:
            break
        root = kids[0]
    return root


def _no_forward(m):
    import torch.nn
    f = type(m).forward
    return f is torch.nn.Module.forward or getattr(f, "__qualname__", "") == "LightningModule.forward"


class Models:
    """The models bound by one runtime RT (see the module docstring). Hooks and the
    Optimizer.__init__ wrapper go through RT, so closing RT removes them."""

    def __init__(self, rt):
        self.rt = rt
        self.listeners = []
        self.infos = []
        self.by_opt = {}                      # id(optimizer) -> ModelInfo or None
        self.optimizers = weakref.WeakSet()   # every optimizer known
        self.finalizers = []
        self.candidates = []                  # weakrefs to modules called before any optimizer
        self.checked = {}
        self.gen = 0
        self.handle = None                    # the global forward pre-hook, while one is needed
        self.watching = False

    def _unbound(self):
        return [o for o in list(self.optimizers) if id(o) not in self.by_opt]

    def _bind(self, opt, module, when):
        root = unwrap(module)
        info = next((i for i in self.infos if i.root is root), None)
        new = info is None
        if new:
            info = ModelInfo(module, when)
            self.infos.append(info)
        info.optimizers.append(weakref.ref(opt))
        self.by_opt[id(opt)] = info
        self.finalizers.append(weakref.finalize(opt, self.by_opt.pop, id(opt), None))
        self.optimizers.add(opt)
        if not self._unbound():
            self._unhook()  # every known optimizer has its model: no global module hook left
        if new:
            debug("model bound (%s): %s (%d parameter tensors) for %s" % (
                when, type(info.root).__name__, len(info.params), type(opt).__name__))
            for cb in list(self.listeners):
                cb(info)
        return info

    def _unhook(self):
        if self.handle is not None:
            self.handle.remove()
            self.handle = None
            self.checked = {}

    def _hook(self):
        if self.handle is None:
            self.handle = self.rt.register_hook("global_forward_pre", None, self._pre_hook)

    def _pre_hook(self, module, args):
        unbound = self._unbound()
        if not unbound:  # no optimizer yet (remember the outermost module called), or all bound
            if not self.infos:
                self.candidates.append(weakref.ref(module))
                del self.candidates[:-16]
            self._unhook()
            return None
        if self.checked.get(id(module)) == self.gen:
            return None
        self.checked[id(module)] = self.gen
        have = None
        for opt in unbound:
            ids = _opt_ids(opt)
            if have is None:
                have = {id(p) for p in module.parameters()}
            if ids and ids <= have:
                self._bind(opt, module, "first_forward")
        if not self._unbound():
            self._unhook()
        return None

    def _candidate(self, ids):
        for ref in reversed(self.candidates):
            m = ref()
            if m is not None and _owns(m, ids):
                return m
        return None

    def _new_optimizer(self, opt):
        """An optimizer was constructed: bind it to a module already called, else watch forwards."""
        if not self.listeners:
            return
        self.optimizers.add(opt)
        self.gen += 1
        ids = _opt_ids(opt)
        found = self._candidate(ids) or find_root(ids)
        if found is not None:
            self._bind(opt, found, "optimizer_init")
            return
        self._hook()

    def _watch_optimizer_init(self):
        """Wrap torch.optim.Optimizer.__init__ (every subclass calls it) and note the optimizers
        that already exist. Taken from sys.modules: this runs while torch itself may be importing."""
        if self.watching:
            return
        import sys
        mod = sys.modules.get("torch.optim.optimizer")
        if mod is None:
            return
        self.watching = True
        models = self

        def wrap(real):
            def __init__(self, *args, **kwargs):
                real(self, *args, **kwargs)
                try:
                    models._new_optimizer(self)
                except Exception as e:  # never break the user's optimizer
                    debug("model: cannot bind a new optimizer: %r" % (e,))
            __init__.__doc__ = real.__doc__
            return __init__

        cls = mod.Optimizer
        self.rt.patch(cls, "__init__", wrap)
        for o in gc.get_objects():  # optimizers created before install()
            if issubclass(type(o), cls):  # type(), not isinstance: no __class__ property runs
                self.optimizers.add(o)

    def on_model(self, cb):
        """Call cb(ModelInfo) for every model bound, now for those already bound."""
        self.listeners.append(cb)
        self._watch_optimizer_init()
        for info in list(self.infos):
            cb(info)
        for opt in self._unbound():  # optimizers built before install(): their models now
            root = find_root(_opt_ids(opt))
            if root is not None:
                self._bind(opt, root, "install")
        if self._unbound():
            self._hook()

    def bind_step(self, opt):
        """At a step of OPT: its ModelInfo, binding it now if nothing did before (None when no
        module holds its parameters)."""
        if id(opt) in self.by_opt:
            return self.by_opt[id(opt)]
        if not self.listeners:
            return None
        self.optimizers.add(opt)
        ids = _opt_ids(opt)
        found = self._candidate(ids) or find_root(ids)
        if found is None:
            self.by_opt[id(opt)] = None
            debug("model: no module holds the parameters of %s" % type(opt).__name__)
            if not self._unbound():
                self._unhook()
            return None
        info = self._bind(opt, found, "first_step")
        if not self._unbound():
            self._unhook()
        return info

    def for_optimizer(self, opt):
        """The ModelInfo bound to OPT, or None."""
        return self.by_opt.get(id(opt))

    def current(self):
        """The first model bound, or None."""
        return self.infos[0] if self.infos else None

    def all(self):
        return list(self.infos)

    def close(self):
        """Forget every model and listener (the runtime removes the hooks and the wrapper)."""
        for f in self.finalizers:
            f.detach()
        self.finalizers = []
        self._unhook()
        self.listeners, self.infos, self.candidates = [], [], []
        self.by_opt.clear()
        self.checked = {}
