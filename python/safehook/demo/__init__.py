"""The alignment-tax demo (`safehook demo`): a small aligned Llama trained on a synthetic
instruction world, fine-tuned on a benign task and on a harmful mix under every protection
mode, each run under LD_PRELOAD with its policy; ASR, over-refusal, task accuracy and step time
side by side. See bench.run."""
