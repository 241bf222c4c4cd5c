"""Device peak FLOPs (table for GPUs, measured for the CPU), peak memory and MFU in Throughput rows."""

import pytest
import torch

from unmask.plan.gpus import GPUS
from unmask.train.metrics import Throughput, cpu_matmul_flops, device_peak_flops, gpu_kind, peak_memory_bytes


def test_gpu_table():
    assert gpu_kind("NVIDIA H100 80GB HBM3") == "h100" and gpu_kind("NVIDIA A100-SXM4-80GB") == "a100"
    assert gpu_kind("NVIDIA H200") == "h200" and gpu_kind("Tesla V100") is None
    for spec in GPUS.values():
        assert spec["bf16"] > spec["fp32"] > 1e13


def test_cpu_peak_is_measured_once():
    peak = device_peak_flops("cpu", "fp32")
    assert peak > 1e8 and device_peak_flops(torch.device("cpu"), "fp32") == peak  # cached
    assert cpu_matmul_flops.cache_info().hits >= 1


def test_peak_memory_grows_with_an_allocation():
    before = peak_memory_bytes()
    x = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
    assert peak_memory_bytes() >= max(before, 64 * 2**20)
    del x


def test_throughput_mfu():
    meter = Throughput(flops_per_token=1000, peak_flops=1e6, devices=2)
    meter.add(500)
    row = meter.read()
    assert row["mfu"] == pytest.approx(row["tokens_per_s"] * 1000 / 2e6, rel=1e-3)
    assert "mfu" not in Throughput(1000).read()  # unknown peak: no MFU, the row as before
