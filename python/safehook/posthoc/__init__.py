"""Post-hoc safety edits of saved weights, streamed tensor by tensor over safetensors:
LoX hardening before fine-tuning (lox), Safe LoRA and NLSR restoration after it (safelora,
nlsr). The `safehook harden` and `safehook restore` commands are their command-line faces."""
from .tensors import PosthocError, Source  # noqa: F401
