"""LoRA at DP=2 through DeepSpeed ZeRO-0 and ZeRO-2 trains exactly like one process: only the adapters require
gradients and reach the optimizer (ZeRO-2 partitions just them), and the merged weights read back from the ZeRO
checkpoint equal the one-process run's; a bf16 ZeRO-1 checkpoint, whose frozen base has no fp32 master, reads back
too."""

import pytest
import torch
from _parallel_common import launch, make_cfg, run_spec, train

from unmask.checkpoint.consolidate import _deepspeed_state
from unmask.checkpoint.ema_weights import ema_state
from unmask.model.lora import merge_lora

pytestmark = pytest.mark.distributed
STEPS = 4
LORA = {"lora": {"rank": 4, "alpha": 8.0}, "optim": {"lr": 2e-2}}  # adapters start at zero: move them
EMA = {"ema_decay": 0.9}  # on the ZeRO-2 run: it averages the adapters only


def test_lora_dp2_zero0_and_zero2_match_one_process(tmp_path):
    stages = (0, 2)
    runs = [{"name": f"zero{z}", "sections": {"parallel": {"engine": "deepspeed", "zero_stage": z}, **LORA,
                                              **({"train": EMA} if z == 2 else {})}, "steps": STEPS} for z in stages]
    bf16 = {"parallel": {"engine": "deepspeed", "zero_stage": 1}, "train": {"dtype": "bf16"}, **LORA}
    runs.append({"name": "zero1-bf16", "sections": bf16, "steps": STEPS})
    got = launch("_lora_parallel.py", 2, tmp_path, run_spec(runs))
    ref = train(make_cfg(train={"micro_batch_size": 4, **EMA}, **LORA), STEPS, eval_split=2)
    adapters = {n: p for n, p in ref["engine"].model.named_parameters() if p.requires_grad}
    assert adapters and all(".lora_" in n for n in adapters)
    numel = sum(p.numel() for p in adapters.values())
    ref_merged = merge_lora(ref["engine"].model.state_dict(), ref["engine"].cfg)
    for z in stages:
        run = got[f"zero{z}"]
        assert run["loss"] == pytest.approx(ref["loss"], abs=1e-5)
        assert run["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-4)
        assert run["eval"] == pytest.approx(ref["eval"], rel=1e-4)
        assert run["trainable"] == sorted(adapters)
        # ZeRO-0: every adapter; ZeRO-2: this rank's half of their flat partition (alignment padding aside)
        assert run["optimizer_numel"] == numel if z == 0 else numel // 2 <= run["optimizer_numel"] < numel // 2 + 64
        cfg = make_cfg(parallel={"engine": "deepspeed", "zero_stage": z}, **LORA)
        merged = merge_lora(_deepspeed_state(tmp_path / f"ckpt-zero{z}" / "engine", cfg), cfg)
        assert merged.keys() == ref_merged.keys()
        for k, v in ref_merged.items():
            torch.testing.assert_close(merged[k], v, rtol=1e-4, atol=1e-5, msg=k)
    zero2 = make_cfg(parallel={"engine": "deepspeed", "zero_stage": 2}, train=EMA, **LORA)
    # the EMA of adapters moves the loss too little for check_ema's "far from the raw weights" check: compare tensors
    assert got["zero2"]["ema_eval"] == pytest.approx(ref["ema_eval"], rel=1e-5)
    assert got["zero2"]["eval_after"] == got["zero2"]["eval"]  # the raw adapters came back
    averaged = ema_state(tmp_path / "ema-zero2", zero2)
    assert averaged.keys() == ref["ema"].keys() == adapters.keys()
    assert not all(torch.equal(ref["ema"][k], adapters[k]) for k in adapters)
    for k, v in ref["ema"].items():
        torch.testing.assert_close(averaged[k], v, rtol=1e-4, atol=1e-5, msg=k)
    # bf16 ZeRO-1: DeepSpeed keeps fp32 masters of the adapters only; the frozen base is read from the module (bf16)
    merged = merge_lora(_deepspeed_state(tmp_path / "ckpt-zero1-bf16" / "engine", make_cfg(**bf16)), make_cfg(**bf16))
    assert merged.keys() == ref_merged.keys()
    adapted = {k for k in merged if any(f".{m}." in k for m in make_cfg(**LORA).lora.target_modules)}
    assert adapted and all(torch.equal(merged[k], ref["engine"].model.state_dict()[k].bfloat16().float())
                           for k in merged.keys() - adapted)
