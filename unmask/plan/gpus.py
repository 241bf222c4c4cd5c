"""GPU datasheet figures: the planner sizes layouts with them and the training loop's MFU divides by them."""

# Dense (no sparsity) peak FLOP/s per GPU from the vendors' datasheets (SXM, 80 GB A100); "fp32" is plain fp32
# matmul (torch's default, TF32 off). Memory is what torch.cuda reports as total.
GPUS: dict[str, dict] = {
    "a100": {"bf16": 312e12, "fp32": 19.5e12, "memory": 79.3 * 2**30},
    "h100": {"bf16": 989e12, "fp32": 67e12, "memory": 79.6 * 2**30},
    "h200": {"bf16": 989e12, "fp32": 67e12, "memory": 139.8 * 2**30},
}
