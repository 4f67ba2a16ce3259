"""The features: what safehook does to a training job, one file each.

``freeze`` (safety-critical blocks: requires_grad=False, enforced, checksummed), ``safegrad``
with ``projection`` (SafeGrad: project the task gradient off a conflicting safety gradient),
``gate`` (check each update against a probe before it is applied), ``monitor`` with
``snapshot`` (measure a probe every N steps, roll back to the last safe state). A feature has
``setup(policy, rt)``, called at activation when its policy section is present, with ``rt`` a
``safehook.runtime.context.Runtime``, which owns
what the feature attaches (hooks, wrappers) and keeps (its state, caches). It imports only ``safehook._core``, the context,
``safehook.probes`` and other features, never the activation code.
"""
