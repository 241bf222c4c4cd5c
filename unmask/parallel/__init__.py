"""Parallel training: layout + process groups (dims), megatron-core tensor parallelism (tensor), DeepSpeed ZeRO
(engine) and pipeline stages (pipeline), all applied from outside the plain model."""

import warnings

# megatron-core warns on import that its GPU fusions (Transformer Engine, Apex) are absent, and on CPU that a
# CUDA env var would speed up async all-reduce: neither applies to unmask's use, and every rank repeats them.
warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
warnings.filterwarnings("ignore", message="When using async grad allreduce it is recommended")
