"""torchrun worker: `--init-from` an export folder into a sharded model (tensor parallel or ZeRO-3), read lazily.

usage: _init_from_sharded.py OUT.json LAYOUT [bert]   (LAYOUT: tp2 | zero3)
Rank 0 writes the export (the tiny model's shape, weights of another seed), or with `bert` a BertForMaskedLM folder
(save_pretrained; biases everywhere, tied decoder); every rank builds its share from the folder's LazyState.
Rank 0 writes the largest difference between the gathered weights and the exported ones, and how many tensors
each rank read against the folder's count."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from _parallel_common import SPECIAL, make_cfg, write_result

from unmask.engines import build_components
from unmask.export.hf import write_model
from unmask.model.build import build_model
from unmask.model.hf.init import init_from, with_model
from unmask.parallel.dims import setup_parallel
from unmask.parallel.tensor import TP_PLAN, merge_tensor_parallel

LAYOUTS = {"tp2": {"tp": 2, "engine": "deepspeed"}, "zero3": {"zero_stage": 3, "engine": "deepspeed"}}


def full_weights(engine, layout: str) -> dict[str, torch.Tensor]:
    module = engine.ds.module
    if layout == "zero3":
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(module.parameters())):
            return {k: v.detach().clone() for k, v in module.state_dict().items()}
    shards = [None] * dist.get_world_size()
    dist.all_gather_object(shards, {k: v.detach() for k, v in module.state_dict().items()
                                    if isinstance(v, torch.Tensor)})  # megatron's extra state is None
    return merge_tensor_parallel(shards, TP_PLAN)


def write_bert(folder: Path) -> None:
    from transformers import BertConfig, BertForMaskedLM

    config = BertConfig(vocab_size=98, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=96, max_position_embeddings=64, pad_token_id=0)
    config.mask_token_id, config.unk_token_id, config.cls_token_id, config.sep_token_id = 96, 3, 5, 6
    model = BertForMaskedLM(config)
    with torch.no_grad():  # biases and LayerNorms away from their (0, 1) defaults: a misplaced one shows
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(folder)


def main() -> None:
    layout, bert = sys.argv[2], sys.argv[3:] == ["bert"]
    cfg = make_cfg(parallel=LAYOUTS[layout])
    folder = Path(sys.argv[1]).parent / "export"
    dims = setup_parallel(cfg)
    if dims.rank == 0:
        torch.manual_seed(123)  # not the run's seed: the weights must come from the folder
        if bert:
            write_bert(folder)
        else:
            exported = build_model(cfg.model).state_dict()
            folder.mkdir()
            write_model(folder, cfg, exported, SPECIAL)
    dist.barrier()
    state, fields = init_from(folder, cfg)
    cfg = with_model(cfg, fields)
    assert state.reads == 0
    engine = build_components(cfg, dims, torch.device("cpu"), SPECIAL, init_state=state).engine
    reads = [None] * dist.get_world_size()
    dist.all_gather_object(reads, state.reads)
    got = full_weights(engine, layout)
    from unmask.model.hf.init import read_folder

    lazy = read_folder(folder)[1]
    stored = {src for src in lazy.sources.values() if isinstance(src, tuple)}  # a tied or held tensor: no read
    want = dict(lazy.items())
    write_result({"keys": sorted(got) == sorted(want), "diff": max(float((got[k] - want[k]).abs().max()) for k in want),
                  "reads": reads, "tensors": len(stored), "arch": cfg.model.arch})


if __name__ == "__main__":
    main()
