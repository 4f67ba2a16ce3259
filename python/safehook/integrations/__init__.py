"""safehook in the tools people train with.

- ``SafehookCallback`` (integrations/hf.py): a transformers ``TrainerCallback`` that logs
  safehook's per-step stats through the Trainer's own ``log()`` (log_history, TensorBoard, W&B,
  whatever ``report_to`` names). Added to every Trainer while safehook is active.
- The same stats go to ``Accelerator.log()`` under Accelerate and to Python ``logging`` under
  the ``safehook`` logger (integrations/tap.py).
- Probe files in the formats of HF datasets: chat rows ``{"messages": [...]}`` rendered with the
  tokenizer's own chat template, and Alpaca rows ``instruction``/``input``/``output``
  (integrations/rows.py).

Importing this package imports neither torch nor transformers; ``SafehookCallback`` imports
transformers when first used."""


def __getattr__(name):
    if name == "SafehookCallback":
        from .hf import classes
        return classes()[0]
    raise AttributeError("module 'safehook.integrations' has no attribute %r" % name)


__all__ = ["SafehookCallback"]
