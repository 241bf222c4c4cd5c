"""DeepSpeed's "mpu" interface over megatron-core's process groups.

DeepSpeed asks an mpu for the data-parallel group (ZeRO partitions and gradient all-reduces run over it
only) and for the model-parallel group (grad norms are summed over it; replicated parameters are counted
on model-parallel rank 0 only). Without pipeline stages, model parallel means tensor parallel.
"""

from __future__ import annotations

from megatron.core import parallel_state as ps


class MegatronMPU:
    """Each method is megatron-core's function of the same meaning, called as DeepSpeed names it."""

    # tensor (slice) parallel
    get_tensor_model_parallel_rank = staticmethod(ps.get_tensor_model_parallel_rank)
    get_tensor_model_parallel_world_size = staticmethod(ps.get_tensor_model_parallel_world_size)
    get_tensor_model_parallel_group = staticmethod(ps.get_tensor_model_parallel_group)
    get_tensor_model_parallel_src_rank = staticmethod(ps.get_tensor_model_parallel_src_rank)
    # DeepSpeed's "model parallel" = every non-data axis; the pipeline engine brings its own grid instead.
    get_model_parallel_rank = staticmethod(ps.get_tensor_model_parallel_rank)
    get_model_parallel_world_size = staticmethod(ps.get_tensor_model_parallel_world_size)
    get_model_parallel_group = staticmethod(ps.get_tensor_model_parallel_group)
    # data parallel
    get_data_parallel_rank = staticmethod(ps.get_data_parallel_rank)
    get_data_parallel_world_size = staticmethod(ps.get_data_parallel_world_size)
    get_data_parallel_group = staticmethod(ps.get_data_parallel_group)
    # pipeline (one stage here)
    get_pipeline_model_parallel_rank = staticmethod(ps.get_pipeline_model_parallel_rank)
    get_pipeline_model_parallel_world_size = staticmethod(ps.get_pipeline_model_parallel_world_size)
    get_pipeline_model_parallel_group = staticmethod(ps.get_pipeline_model_parallel_group)
