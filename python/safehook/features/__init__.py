"""The features: what safehook does to a training job, one file (or, for shaping, one package)
each.

``freeze`` (safety-critical blocks: requires_grad=False, enforced, checksummed), ``safegrad``
with ``projection`` (SafeGrad: project the task gradient off a conflicting safety gradient),
``gate`` (check each update against a probe before it is applied), ``monitor`` with
``snapshot`` (measure a probe every N steps, roll back to the last safe state), ``shaping``
(judge each training example and stop the unsafe ones), ``tamper`` (tamper evidence, for every
policy). A feature has ``setup(policy, rt)``, called at activation when its policy section is
present (the registry: safehook.runtime.registry), with ``rt`` a
``safehook.runtime.context.Runtime``, which owns what the feature attaches (hooks, wrappers) and
keeps (its state, caches). It imports only ``safehook._core``, the runtime's ``context``,
``stacks`` and ``registry``, ``safehook.probes`` and other features, never the activation code.
"""
