"""DeepSpeed's "mpu" interface over megatron-core's process groups.

DeepSpeed asks an mpu for the data-parallel group (ZeRO partitions and gradient all-reduces run over it
only) and for the model-parallel group (grad norms are summed over it; replicated parameters are counted
on model-parallel rank 0 only). Without pipeline stages, model parallel means tensor parallel.
"""

from __future__ import annotations

from megatron.core import parallel_state as ps


class MegatronMPU:
    # tensor (slice) parallel
    def get_tensor_model_parallel_rank(self) -> int:
        return ps.get_tensor_model_parallel_rank()

    def get_tensor_model_parallel_world_size(self) -> int:
        return ps.get_tensor_model_parallel_world_size()

    def get_tensor_model_parallel_group(self):
        return ps.get_tensor_model_parallel_group()

    def get_tensor_model_parallel_src_rank(self) -> int:
        return ps.get_tensor_model_parallel_src_rank()

    # DeepSpeed's "model parallel" = every non-data axis; the pipeline engine brings its own grid instead.
    def get_model_parallel_rank(self) -> int:
        return ps.get_tensor_model_parallel_rank()

    def get_model_parallel_world_size(self) -> int:
        return ps.get_tensor_model_parallel_world_size()

    def get_model_parallel_group(self):
        return ps.get_tensor_model_parallel_group()

    # data parallel
    def get_data_parallel_rank(self) -> int:
        return ps.get_data_parallel_rank()

    def get_data_parallel_world_size(self) -> int:
        return ps.get_data_parallel_world_size()

    def get_data_parallel_group(self):
        return ps.get_data_parallel_group()

    # pipeline (one stage here)
    def get_pipeline_model_parallel_rank(self) -> int:
        return ps.get_pipeline_model_parallel_rank()

    def get_pipeline_model_parallel_world_size(self) -> int:
        return ps.get_pipeline_model_parallel_world_size()

    def get_pipeline_model_parallel_group(self):
        return ps.get_pipeline_model_parallel_group()
