"""Parallel mechanisms, applied from outside the plain model: layout + process groups (dims), the declarative
tensor-parallel plan and its inverse (tensor), RNG streams (rng) and DeepSpeed's view of megatron's groups (mpu).
The engines that use them live in unmask.engines."""

import warnings

# megatron-core warns on import that its GPU fusions (Transformer Engine, Apex) are absent, and on CPU that a
# CUDA env var would speed up async all-reduce: neither applies to unmask's use, and every rank repeats them.
warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
warnings.filterwarnings("ignore", message="When using async grad allreduce it is recommended")
