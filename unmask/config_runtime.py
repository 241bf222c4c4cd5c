"""The run-time sections of the configuration: how a run is laid out on devices (`[parallel]`), launched
(`[launch]`), saved (`[checkpoint]`) and tracked (`[tracking]`). unmask.config assembles them into `Config`; import
them from there."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from unmask.config_base import Section


class ParallelConfig(Section):
    """Parallel layout; dp is inferred as world_size / (tp * pp)."""

    tp: int = Field(1, gt=0, description="tensor-parallel degree (megatron-core layers)")
    pp: int = Field(1, gt=0, description="pipeline-parallel degree (DeepSpeed PipelineModule)")
    zero_stage: int = Field(0, ge=0, le=3, description="DeepSpeed ZeRO stage 0-3")
    engine: Literal["local", "deepspeed"] = Field("local", description="local: plain torch; deepspeed")
    activation_checkpointing: bool = Field(False, description="recompute block activations in backward")
    cpu_offload: bool = Field(False, description="ZeRO optimizer-state offload to CPU")

    @model_validator(mode="before")
    @classmethod
    def _removed_keys(cls, data: Any) -> Any:
        # Removed: it was validated but never wired into an engine. Checkpoints written before the removal
        # carry `sequence_parallel = false` in their saved config; that no-op value is dropped so they still load.
        if isinstance(data, dict) and "sequence_parallel" in data:
            if data["sequence_parallel"] is not False:
                raise ValueError("parallel.sequence_parallel was removed (unmask never ran megatron sequence "
                                 "parallelism); delete the key, and use parallel.activation_checkpointing=true to "
                                 "save activation memory")
            data = {k: v for k, v in data.items() if k != "sequence_parallel"}
        return data


# Set in every rank before CUDA and the process group start (unless already set), and exported by the sbatch
# script.
DEFAULT_COLLECTIVE_ENV = [
    "TORCH_NCCL_ASYNC_ERROR_HANDLING=1",  # a failed or timed-out NCCL collective aborts the process
    "CUDA_DEVICE_MAX_CONNECTIONS=1",  # megatron's tensor-parallel overlap needs kernels in issue order
    "NCCL_DEBUG=WARN",  # NCCL's own one-line reasons for a failure
    # The masked-token gathers change shape every step; with fixed segments the CUDA caching allocator reserved
    # 70.5 GiB for 27.1 GiB allocated (125m preset on an H200, bench/results/gpu-h200-2026-11-29.txt).
    "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True",
]


class LaunchConfig(Section):
    """How ranks start, wait and stop: collective timeout, NCCL/CUDA environment, preemption watchdog."""

    collective_timeout_minutes: float = Field(
        15.0, gt=0, description="a collective that waits this long fails the run instead of hanging (torch: 30)"
    )
    preempt_grace_seconds: float = Field(
        120.0, gt=0, description="after SIGTERM/SIGUSR1, exit with the requeue code (without saving) if the step "
        "has not ended by then: a rank blocked in a collective never reaches the save"
    )
    env: list[str] = Field(
        default_factory=lambda: list(DEFAULT_COLLECTIVE_ENV),
        description="NAME=VALUE set before the process group starts and in the sbatch script (a variable already "
        "set wins)",
    )

    @model_validator(mode="after")
    def _check_env(self) -> LaunchConfig:
        for item in self.env:
            name, eq, _ = item.partition("=")
            if not eq or not name.isidentifier():
                raise ValueError(f"launch.env item {item!r} is not NAME=VALUE, e.g. \"NCCL_DEBUG=INFO\"")
        return self

    @property
    def env_vars(self) -> dict[str, str]:
        return dict(item.split("=", 1) for item in self.env)


class CheckpointConfig(Section):
    """Checkpoints: when to save, what to keep, how to resume and recover."""

    interval_steps: int = Field(500, ge=0, description="save every N optimizer steps (0: off)")
    interval_minutes: float = Field(0.0, ge=0, description="also save when this many minutes passed (0: off)")
    keep_last: int = Field(2, ge=1, description="checkpoints kept, newest first")
    keep_every: int = Field(0, ge=0, description="also keep every checkpoint whose step is a multiple (0: none)")
    resume: str = Field("auto", description="auto (latest valid checkpoint in run_dir, if any), never, or a path")
    max_bad_steps: int = Field(
        3, ge=0, description="consecutive non-finite steps (each skipped) before rolling back (0: never roll back)"
    )
    rollback_lr_scale: float = Field(1.0, gt=0, le=1, description="multiply the lr by this after a rollback")


class TrackingConfig(Section):
    """Experiment tracking (mlflow, local sqlite store by default)."""

    enabled: bool = Field(False, description="log to mlflow")
    uri: str | None = Field(None, description="tracking URI; default MLFLOW_TRACKING_URI or sqlite in run_dir")
    experiment: str = Field("unmask", description="mlflow experiment name")
