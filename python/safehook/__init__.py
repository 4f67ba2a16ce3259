"""safehook: keep a language model's safety alignment while it is fine-tuned.

Three ways in, one runtime per process:

* ``LD_PRELOAD=$(safehook lib) python train.py`` (or ``safehook run -- python train.py``);
* ``import safehook; safehook.install(policy)`` in a notebook or script;
* a system-wide policy on a shared server (see the README).
"""
import os as _os

from . import _core
from ._core import PolicyError, SafehookError

__version__ = _core.__version__
__all__ = ["install", "uninstall", "lib", "project", "PolicyError", "SafehookError", "__version__"]


def lib():
    """Absolute path of libsafehook.so, the preload library."""
    return _os.path.join(_os.path.dirname(_os.path.abspath(__file__)), "libsafehook.so")


def install(policy=None):
    """Protect every optimizer step of this process from now on, including optimizers that
    already exist. ``policy`` is a path, a dict, or None (SAFEHOOK_POLICY, else the embedded
    default). Returns the normalized policy in force. A new install() replaces the policy and
    the features of the one before (see uninstall()).

    A policy that is invalid, or that weakens an enforced system policy, is not raised here: it
    is recorded (an "error" or "violation" record), said once on stderr, install() returns None,
    and the first optimizer step raises PolicyError (fail closed: the job cannot train
    unprotected by catching an exception). Only where an enforced system policy says
    on_error=warn does training go on, under that policy alone (its normalized form is returned)."""
    from .runtime import boot
    return boot.install(policy)


def uninstall():
    """Remove everything safehook put in this process (the optimizer hooks, every feature's
    hooks, wrappers, state and caches; the freeze is undone), unless the policy in force is
    enforced (then raises SafehookError)."""
    from .runtime import boot
    boot.uninstall()


def project(task_grads, safety_grads, granularity="global", threshold=0.0, **kw):
    """SafeGrad's projection, in place, exactly as the hook does it: see safehook.features.projection."""
    from .features.projection import project as _project
    return _project(task_grads, safety_grads, granularity, threshold, **kw)
