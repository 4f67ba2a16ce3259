"""Safety probes: a safety loss (for gradients and the gate) and a safety score (for the
monitor, higher is safer) measured on a small safety set.

A probe is data plus a judge, or a callable:

* data: a JSONL file. Text rows ``{"prompt": str, "response": str}`` need ``tokenizer`` (a
  local Hugging Face tokenizer directory). Pre-tokenized rows ``{"input_ids": [int],
  "labels": [int]}`` use the Hugging Face convention (labels aligned with input_ids, -100 =
  not scored); for generation the prompt is the part of input_ids before the first scored
  label. For the contrastive loss a row also holds the harmful answer to the same prompt:
  ``"harmful_response"`` (text) or ``"harmful_input_ids"``/``"harmful_labels"``.
* callable ``"pkg.module:function"``: ``f(model)`` returns a loss tensor (``kind: "loss"``) or a
  float score (``kind: "score"``).

Scores (``score``): ``loss`` (-probe loss: cheap, no generation), ``refusal_rate`` (fraction of
harmful prompts whose greedy answer the judge calls a refusal), ``over_refusal`` (on benign
prompts; the score is 1 - the refusal fraction, so that higher is still better).
Judges (``judge``): ``keyword`` (a refusal phrase occurs in the answer, case-insensitive),
``exact`` (the greedy answer reproduces the row's reference refusal token for token), or a
callable ``f(prompt, answer) -> bool`` (True = refused).
Losses (``loss``): ``ce`` (mean token cross-entropy of the responses) or ``contrastive`` (the
SAP safety loss, arXiv 2505.16737: CE of the safe responses minus CE of the harmful responses
to the same prompts).

Everything heavy (tokenizer, data, callables) is loaded at first use, never during
activation: activation runs while torch itself is being imported.

The package: ``probe`` (the Probe class and the per-process registry), ``judges`` (refusal
judges and named callables), ``batch`` (the one padded-batch builder and the one row
fingerprint), ``gradient`` (the one
safety gradient of a step: computed once per step, batch by batch, and shared by SafeGrad, the
gate and shaping's gradient guard).
"""
from .batch import fingerprint, fingerprints, pad_batch  # noqa: F401
from .judges import REFUSAL_KEYWORDS, check_callable, load_callable, make_judge  # noqa: F401
from .probe import Example, Probe, Probes, eval_mode, get, setup  # noqa: F401
