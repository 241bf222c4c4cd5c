"""A CPU stand-in for megatron-core's CUDA RNG tracker.

Megatron keeps named RNG streams (one shared by a tensor-parallel group, one per tensor-parallel rank)
and forks into them around random ops inside sharded regions. `model_parallel_cuda_manual_seed` builds
them with `torch.cuda` calls, which fail on a CPU-only machine; this tracker keeps the same streams as
CPU generator states and is installed in megatron's module-level slot, so megatron code that asks
`get_cuda_rng_tracker()` gets it. unmask's own model draws no random numbers in the forward pass (no
dropout), so the streams matter only to megatron code paths and to users who add dropout.
"""

from __future__ import annotations

import contextlib

import torch
from megatron.core.tensor_parallel import random as mrandom

# Same offsets as megatron's model_parallel_cuda_manual_seed, so CPU and GPU runs name the same seeds.
_TP_OFFSET, _EXPERT_OFFSET = 2718, 1024


class CPURNGStatesTracker(mrandom.CudaRNGStatesTracker):
    """Named CPU generator states with megatron's tracker interface (add / fork / get_states / set_states)."""

    def __init__(self):
        super().__init__(use_cudagraphable_rng=False, is_inference_rng_tracker=False)

    def add(self, name: str, seed: int) -> None:
        if seed in self.seeds_ or name in self.states_:
            raise ValueError(f"RNG stream {name!r} or seed {seed} already added")
        self._is_initialized = True
        self.seeds_.add(seed)
        self.states_[name] = torch.Generator().manual_seed(seed).get_state()

    @contextlib.contextmanager
    def fork(self, name: str = mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME):
        """Run the block on stream `name` of torch's default CPU generator, then restore the caller's state."""
        if name not in self.states_:
            raise ValueError(f"RNG stream {name!r} was never added")
        outer = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(outer)


def install_cpu_rng_tracker(seed: int, tp_rank: int) -> CPURNGStatesTracker:
    """Put a CPU tracker in megatron's slot with the data-parallel, model-parallel and expert streams."""
    tracker = CPURNGStatesTracker()
    tracker.add(mrandom._DATA_PARALLEL_RNG_TRACKER_NAME, seed)
    tracker.add(mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME, seed + _TP_OFFSET + tp_rank)
    tracker.add(mrandom._EXPERT_PARALLEL_RNG_TRACKER_NAME, seed + _EXPERT_OFFSET + tp_rank)  # ep_rank 0
    mrandom._CUDA_RNG_STATE_TRACKER = tracker
    mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    return tracker
