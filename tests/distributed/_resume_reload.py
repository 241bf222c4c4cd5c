"""torchrun worker: restore a checkpoint the way the train loop does (under this run's world size), then save the
restored state unchanged as a checkpoint of OUT_RUN_DIR. Comparing the two checkpoints shows what a resume
starts from: weights, optimizer moments, step counts, LR schedule and loader position.

usage: _resume_reload.py RESULT.json OUT_RUN_DIR CONFIG.toml --key=value...
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from _parallel_common import write_result

from unmask.checkpoint import Checkpointer, rng_state
from unmask.config import load_config
from unmask.engines import build_components
from unmask.parallel import collective
from unmask.parallel.dims import setup_parallel
from unmask.train.loop import make_loader, restore


def main() -> None:
    out_dir, config, overrides = Path(sys.argv[2]), sys.argv[3], sys.argv[4:]
    cfg = load_config(config, overrides)
    dims = setup_parallel(cfg)
    torch.manual_seed(cfg.train.seed)
    loader = make_loader(cfg, dims, cfg.data.train_dir, loop=True)
    special = loader.manifest.special
    engine = build_components(cfg, dims, torch.device("cpu"), special).engine
    ckpt = Checkpointer(Path(cfg.train.run_dir), cfg.checkpoint, dims.rank, dims.world_size)
    path = ckpt.find(cfg.checkpoint.resume)
    progress = restore(ckpt, path, engine, loader, cfg)
    meta = {"step": progress.step, "config": cfg.to_toml(),
            "layout": {"world": dims.world_size, "dp": dims.dp, "tp": dims.tp, "pp": dims.pp}}
    copy = Checkpointer(out_dir, cfg.checkpoint, dims.rank, dims.world_size)
    saved = copy.save(progress.step, engine, meta, {"loader": loader.state_dict(), "rng": rng_state()})
    positions = collective.gather_objects(loader.state_dict()["position"])
    write_result({"step": progress.step, "saved": str(saved), "positions": positions})


if __name__ == "__main__":
    main()
