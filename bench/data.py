"""Data-pipeline throughput next to what training consumes, measured in the same run on this machine.

1. prepare-data on the complete Shakespeare (~5 MB): tokenizer training time, then MB/s of text through
   tokenize (all cores) + pack + shard writing.
2. ShardLoader over the resulting train split (1 MB shards): tokens/s per loader worker over two
   shuffled epochs, every shard read, hash-checked and parsed again per epoch; only the first batch
   (worker start-up and the first group's read) is left out of the timing.
3. One training step of the `small` preset: forward + backward on a [batch, seq_len] batch, tokens/s.
The ratio loader-tokens/s-per-worker / training-tokens/s says how many training processes one loader
worker could feed (target >= 50).
4. Bytes read per rank per epoch at a simulated 64 ranks x 2 workers, computed from the read plans (no data read):
   the previous global-order loader (every worker reads every shard of every group it has a sample in) against the
   dealt slots (each shard read by one worker of one rank). Prints figures; asserts nothing.

    python bench/data.py [--batch 8] [--seq-len 256] [--epochs 2] [--steps 4]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from unmask.config import ModelConfig
from unmask.data.corpora import fetch_shakespeare
from unmask.data.loader import ShardLoader
from unmask.data.plan import ShardSequence
from unmask.data.prepare import PrepareOptions, prepare_data
from unmask.data.shards import read_manifest
from unmask.model.build import build_model

CACHE = Path(os.environ.get("UNMASK_CACHE_DIR", Path.home() / ".cache" / "unmask"))


def loader_tokens_per_s(split: Path, batch: int, seq_len: int, vocab: int, workers: int, epochs: int) -> float:
    loader = ShardLoader(split, batch, seq_len=seq_len, model_vocab_size=vocab, num_workers=workers, seed=1)
    batches = epochs * loader.manifest.num_samples // batch
    it = iter(loader)
    next(it)  # worker start-up and the first group's read are a one-off
    t0 = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batches * batch * seq_len / (time.perf_counter() - t0) / max(workers, 1)


def bytes_per_rank_per_epoch(split: Path, ranks: int, workers: int) -> tuple[float, float]:
    """(previous loader, dealt slots): mean bytes each rank reads in one epoch, from the shard lists alone."""
    m = read_manifest(split)
    sizes = [s.bytes for s in m.shards]
    # previous loader: a group of `mix` shuffled shards holds samples of every worker, and each reads all of it
    old = sum(sizes) * workers
    seq = ShardSequence([s.samples for s in m.shards], seed=0, shuffle=True)
    slots = ranks * workers  # the dealing of plan.Plan: place j goes to slot j % slots
    per_slot = [0] * slots
    for j in range(len(sizes)):  # epoch 0's places: each read by the one slot it is dealt to
        per_slot[j % slots] += sizes[seq.shard(j)]
    per_rank = [sum(per_slot[r * workers:(r + 1) * workers]) for r in range(ranks)]
    return float(old), sum(per_rank) / ranks


def train_tokens_per_s(batch: int, seq_len: int, steps: int) -> float:
    torch.manual_seed(0)
    cfg = ModelConfig(size="small")
    model = build_model(cfg)
    x = torch.randint(5, cfg.vocab_size, (batch, seq_len))

    def step():
        loss = F.cross_entropy(model(x).flatten(0, 1), x.flatten())
        loss.backward()

    step()  # warm-up
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * batch * seq_len / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--epochs", type=int, default=2, help="loader epochs timed")
    p.add_argument("--steps", type=int, default=4)
    args = p.parse_args()
    corpus = fetch_shakespeare(CACHE / "corpora")
    print(f"machine: {os.cpu_count()} CPU cores, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"load average {os.getloadavg()[0]:.1f} (figures are only comparable on an otherwise idle machine)")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "shakespeare"
        r = prepare_data(PrepareOptions(inputs=[str(corpus)], out=out, vocab_size=args.vocab_size,
                                        seq_len=args.seq_len, val_fraction=0.05, shard_size_mb=1, progress=False))
        print(f"prepare-data: {r.text_bytes / 1e6:.2f} MB of text, {r.train.num_tokens + r.val.num_tokens} "
              f"tokens; tokenizer training {r.tokenizer_seconds:.1f} s; tokenize+pack+write "
              f"{r.tokenize_seconds:.2f} s = {r.mb_per_s:.2f} MB/s ({os.cpu_count()} workers)")
        per_worker = loader_tokens_per_s(out / "train", args.batch, args.seq_len, args.vocab_size, 1, args.epochs)
        in_process = loader_tokens_per_s(out / "train", args.batch, args.seq_len, args.vocab_size, 0, args.epochs)
        total = sum(s.bytes for s in r.train.shards)
        old, new = bytes_per_rank_per_epoch(out / "train", 64, 2)
        print(f"reads at 64 ranks x 2 workers, {len(r.train.shards)} shards, {total / 1e6:.1f} MB per epoch: "
              f"previous loader {old / 1e6:.1f} MB per rank ({64 * old / total:.0f}x the data per job); dealt "
              f"slots {new / 1e6:.2f} MB per rank ({64 * new / total:.2f}x)")
    print(f"loader: {per_worker:,.0f} tokens/s per worker process ({in_process:,.0f} tokens/s in-process)")
    train = train_tokens_per_s(args.batch, args.seq_len, args.steps)
    print(f"training: `small` preset forward+backward on [{args.batch}, {args.seq_len}]: {train:,.0f} tokens/s")
    print(f"ratio: one loader worker feeds {per_worker / train:,.0f}x what one training process consumes "
          f"(target >= 50x)")


if __name__ == "__main__":
    main()
