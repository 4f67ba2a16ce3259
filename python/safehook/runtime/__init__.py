"""The runtime: how safehook comes to life in a process and what a feature is handed.

``boot`` activates safehook (from the preload library when torch is first imported, or from
``safehook.install()``): it resolves the policy, opens the audit log, registers torch's global
optimizer step hooks as soon as ``torch.optim.optimizer`` exists, and sets up the features the
policy asks for. ``context`` is everything a feature may use: the audit log, ``fail`` (protection
that cannot be applied), the bound model, step callables. ``model`` finds the model being
trained; ``log`` is the one writer to stderr. Features import ``context`` only; nothing imports
``boot`` back.
"""
