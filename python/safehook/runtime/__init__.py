"""The runtime: how safehook comes to life in a process and what a feature is handed.

``boot`` activates safehook (from the preload library when torch is first imported, or from
``safehook.install()``): it resolves the policy, opens the audit log, registers torch's global
optimizer step hooks as soon as ``torch.optim.optimizer`` exists, and makes the Runtime of the
features the policy asks for. ``context`` is the Runtime: everything a feature may use (the audit
log, ``fail``, the bound models, step callables) and everything it leaves in the process (hooks,
wrappers, state, caches), destroyed by uninstall() or the next install(). ``model`` finds the
models being trained; ``stacks`` is how the training stacks look (wrappers, shards, partitions,
ranks); ``log`` is the one writer to stderr. Features import ``context`` (and ``stacks``) only;
nothing imports ``boot`` back.
"""
