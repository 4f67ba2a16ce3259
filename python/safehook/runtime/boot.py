"""Activation: resolve the policy, open the audit log, and register the optimizer hooks as soon
as torch.optim.optimizer exists, whatever the import order. Shared by the preload path
(libsafehook.so calls from_preload when torch is first imported) and by install()."""
import atexit
import json
import os
import sys

from .. import _core
from .log import debug as _debug, warn as _warn

_OPT_MODULE = "torch.optim.optimizer"

_state = {
    "active": False,   # hooks registered
    "via": None,       # "preload" or "install"
    "policy": None,    # normalized policy dict in force
    "handles": [],     # torch RemovableHandles
    "watcher": None,
    "runtime": None,   # context.Runtime: the features, their hooks, state and caches
}


def _env(name):
    """The environment as safehook reads it: secure_getenv, so a setuid/setgid (AT_SECURE)
    process ignores it."""
    return _core.secure_getenv(name)


# The system policy's path: None is the path compiled in (meson option system_policy). Never
# taken from the environment; tests running in a subprocess of their own may set it.
_SYSTEM_PATH = None


def _compiled_enforced():
    """True when the system policy at the compiled-in path is enforced (or unreadable)."""
    return _core.system_policy_state(system_path=None)["state"] not in ("none", "advisory")


def _system_path():
    """_SYSTEM_PATH, unless the compiled-in system policy is enforced: a job cannot point itself
    at a weaker system policy by setting a Python variable."""
    if _SYSTEM_PATH is not None and _compiled_enforced():
        return None
    return _SYSTEM_PATH


def _configure(policy):
    """Resolve the policy in force (user policy against the system policy) and open the log."""
    kw = {"audit_path": _env("SAFEHOOK_AUDIT") or None, "system_path": _system_path()}
    if policy is None:
        policy = _env("SAFEHOOK_POLICY") or None
    if isinstance(policy, dict):
        kw["policy_text"] = json.dumps(policy)
        kw["policy_name"] = "<dict>"
    elif policy is not None:
        kw["policy_path"] = os.fspath(policy)
    return _core.configure(**kw)


def _setup_one(feat, policy, rt):
    """Set up the registry feature FEAT for POLICY in RT (a Runtime, or a branch of the embedded
    default: runtime/default.py)."""
    import importlib
    try:
        mod = importlib.import_module(feat.module)
    except ImportError as e:
        rt.fail("the policy asks for '%s', which this safehook cannot do (%s)" % (feat.name, e))
        return
    try:
        mod.setup(policy, rt)
    except Exception as e:
        rt.fail("cannot set up '%s': %s: %s" % (feat.name, type(e).__name__, e))


def _setup_features():
    """The Runtime of the policy in force: each feature of the registry (safehook.runtime.registry,
    read from the C schema) that the policy asks for, set up in registry order with
    setup(policy, rt). See context.py for what rt offers. The embedded default is set up model by
    model (runtime/default.py: protect each model it can, fall back to freezing the others)."""
    from . import registry
    from .context import Runtime
    policy = _state["policy"]
    _close_features()  # a new policy replaces the features of the one before
    if policy is None:
        return
    rt = Runtime(policy, report=_report_failure, active=lambda: _state["active"],
                 restore_step_hooks=_restore_step_hooks)
    _state["runtime"] = rt
    if (policy.get("_meta") or {}).get("origin") == "<embedded default>":
        from . import default
        default.setup(policy, rt, registry.features(), _setup_one)
    else:
        for feat in registry.features():
            if feat.wanted(policy):
                _setup_one(feat, policy, rt)
    rt.start()


def _close_features():
    """Destroy the runtime of the policy before: its features, hooks, wrappers, state, caches."""
    _core.set_features([], [])
    rt, _state["runtime"] = _state["runtime"], None
    if rt is not None:
        rt.close()


def _step_hooks(optmod):
    _state["handles"] += [optmod.register_optimizer_step_pre_hook(_core.pre_step),
                          optmod.register_optimizer_step_post_hook(_core.post_step)]


def _restore_step_hooks():
    """Our step hooks were removed from torch's tables behind our back (tamper saw it): register
    them again, keeping the handles so that uninstall() removes them too."""
    optmod = sys.modules.get(_OPT_MODULE)
    if optmod is not None and _state["active"]:
        _step_hooks(optmod)


def runtime():
    """The Runtime in force, or None (tests and benchmarks look at it; features are handed theirs)."""
    return _state["runtime"]


def _register(optmod):
    if _state["active"]:
        return
    _setup_features()
    _state["handles"] = []
    _step_hooks(optmod)
    _state["active"] = True
    _debug("optimizer hooks registered (%s, pid %d)" % (_state["via"], os.getpid()))


def _after_optimizer_import(module):
    _unwatch()
    _register(module)


def _watch():
    optmod = sys.modules.get(_OPT_MODULE)
    if optmod is not None and hasattr(optmod, "register_optimizer_step_pre_hook"):
        _register(optmod)
        return
    if _state["watcher"] is None:
        from .importwatch import AfterImport
        _state["watcher"] = AfterImport(_OPT_MODULE, _after_optimizer_import, lambda e: _protection_failed(
            "cannot register optimizer hooks: %r" % (e,))).insert()


def _unwatch():
    w, _state["watcher"] = _state["watcher"], None
    if w is not None:
        w.remove()


def _report_failure(msg, on_error, now=False):
    """A failure of the runtime's features: an "error" record and one line on stderr (the
    runtime itself stops the job, on every rank at once: at the step running when NOW, else at
    the next one)."""
    _core.audit("error", {"message": msg, "on_error": on_error})
    if on_error == "abort":
        st = _core.stats()
        at = st["current"] if now else st["steps"] + 1
        _warn(msg + (" (training stops at step %d)" % at if st["steps"] else
                     " (training will stop at its first optimizer step)"))
    else:
        _warn(msg + " (on_error=warn: training continues)")


def _protection_failed(msg):
    """Protection the policy asks for cannot be applied, and no runtime is there to stop the
    job (the hooks could not be registered): say so once, and under on_error=abort make the
    first optimizer step raise instead of training unprotected."""
    policy = _state["policy"] or {}
    on_error = (policy.get("_meta") or {}).get("on_error", "abort")
    _core.audit("error", {"message": msg, "on_error": on_error})
    if on_error == "abort":
        _core.set_pending_error(msg)
        steps = _core.stats()["steps"]
        _warn(msg + (" (training stops at step %d)" % steps if steps else
                     " (training will stop at its first optimizer step)"))
    else:
        _warn(msg + " (on_error=warn: training continues)")


def _policy_refused(e):
    """The policy was refused: invalid, or weakening an enforced system policy. Record it, then
    stop at the first optimizer step, unless an enforced system policy says on_error=warn: then
    that policy alone applies. An invalid policy's own on_error cannot be trusted: abort holds."""
    import traceback
    kind = getattr(e, "kind", "invalid")
    on_error = getattr(e, "on_error", "abort")
    rec = {"message": str(e), "kind": kind, "pointer": getattr(e, "pointer", ""), "on_error": on_error}
    if kind == "weakening":
        rec["what"] = "the user policy weakens the enforced system policy"
        rec["python_stack"] = [l.rstrip("\n") for l in traceback.format_stack()[:-1]]
        rec["native_stack"] = _core.native_stack(0)
        _core.audit("violation", rec)
    else:
        _core.audit("error", rec)
    if on_error == "warn" and getattr(e, "system_enforced", False):
        try:
            _state["policy"] = _core.configure(audit_path=_env("SAFEHOOK_AUDIT") or None,
                                               system_path=_system_path())
            _warn("policy error: %s (on_error=warn: the enforced system policy applies without the user policy)" % e)
            return
        except _core.PolicyError as e2:
            e = e2
    _core.set_pending_error("policy error: %s" % e)
    _warn("policy error: %s (training will stop at its first optimizer step)" % e)


def _finish():
    fields = {}
    rt = _state["runtime"]
    if rt is not None:
        rt.finish(fields)
    try:
        _core.finish(fields)
    except Exception:
        pass


def _activate(policy, via):
    _state["via"] = via
    try:
        _state["policy"] = _configure(policy)
        _core.set_pending_error(None)
    except _core.PolicyError as e:
        _state["policy"] = None
        _policy_refused(e)
    if _state["active"]:
        _setup_features()  # hooks already in place: only the features change with the policy
    else:
        _watch()
    if not getattr(_finish, "registered", False):
        atexit.register(_finish)
        _finish.registered = True
    return _state["policy"]


def from_preload(lib):
    """Called by libsafehook.so when this process first imports torch."""
    if _state["via"] is not None:
        return
    if _env("SAFEHOOK_DISABLE") == "1":
        system = _core.system_policy_state(system_path=_system_path())
        if system["state"] in ("none", "advisory"):
            _debug("SAFEHOOK_DISABLE=1: not protecting pid %d" % os.getpid())
            return
        # An enforced system policy (or one that cannot be read, so may be): refuse, record, protect.
        _activate(None, "preload")
        _core.audit("violation", {"what": "SAFEHOOK_DISABLE=1 refused", "system_policy": system["path"],
                                  "state": system["state"]})
        _warn("SAFEHOOK_DISABLE=1 refused: the system policy %s is %s; this process stays protected"
              % (system["path"], system["state"]))
        return
    _activate(None, "preload")


def install(policy=None):
    """Public safehook.install(): see the package docstring."""
    if _state["active"] and _state["via"] == "preload" and policy is None:
        return _state["policy"]
    return _activate(policy, "install" if _state["via"] != "preload" else "preload")


def uninstall():
    policy = _state["policy"] or {}
    if (policy.get("_meta") or {}).get("enforce") or _compiled_enforced():
        raise _core.SafehookError("the policy in force is enforced; safehook cannot be uninstalled")
    for h in _state["handles"]:
        h.remove()
    _state["handles"] = []
    _state["active"] = False
    _unwatch()
    _close_features()
