"""Checkpoints: atomic save/load verified by a manifest (store.py), full fp32 weights from any layout
(consolidate.py), and re-partitioning for a resume under another data-parallel size (reshard.py).

Only store's names are re-exported: consolidate imports the model and reshard DeepSpeed, which the loop's
`from unmask.checkpoint import Checkpointer` should not pay for."""

from unmask.checkpoint.store import Checkpointer, config_hash, rng_state, set_rng_state, verify

__all__ = ["Checkpointer", "config_hash", "rng_state", "set_rng_state", "verify"]
