"""Two torchrun ranks (gloo) x two loader workers: each shard is read once per epoch by one worker of one rank,
each sample of the epoch is seen once across ranks (up to the dealt slots' ragged epoch boundary), and a mid-epoch
resume continues the very same streams."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from tests.support.runs import HANG_GUARD_S
from unmask.data.loader import ShardLoader, read_manifest

pytestmark = pytest.mark.distributed

BATCH, WORLD = 16, 2

SCRIPT = textwrap.dedent("""
    import hashlib, itertools, json, sys
    import torch.distributed as dist
    from unmask.data.loader import ShardLoader

    split, steps, cut, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()

    def make():
        return ShardLoader(split, %(batch)d, seq_len=128, model_vocab_size=512, dp_rank=rank, dp_world=world,
                           seed=7, num_workers=2, mix_shards=2)

    def digests(batches):
        return [[hashlib.sha1(row.numpy().tobytes()).hexdigest() for row in b] for b in batches]

    whole = make()
    full = digests(itertools.islice(iter(whole), steps))
    reads = [[list(k), v] for k, v in whole.shard_reads.items()]
    first = make()
    head = digests(itertools.islice(iter(first), cut))
    state = first.state_dict()
    resumed = make()
    resumed.load_state_dict(state)
    tail = digests(itertools.islice(iter(resumed), steps - cut))
    mine = {"rank": rank, "full": full, "resumed": head + tail, "state": state, "reads": reads,
            "bytes": whole.bytes_read}
    gathered = [None] * world
    dist.all_gather_object(gathered, mine)  # through gloo: the parent reads rank 0's file only
    if rank == 0:
        with open(out, "w") as f:
            json.dump(gathered, f)
    dist.destroy_process_group()
""") % {"batch": BATCH}


def test_each_sample_once_across_ranks_and_workers(tiny_shards, tmp_path):
    import hashlib

    split = tiny_shards / "train"
    n = read_manifest(split).num_samples
    reference = [hashlib.sha1(row.numpy().tobytes()).hexdigest()
                 for b in ShardLoader(split, 64, seq_len=128, model_vocab_size=512, loop=False, shuffle=False)
                 for row in b]
    assert len(set(reference)) == n  # distinct samples, so digests identify them
    step = BATCH * WORLD
    steps = -(-n // step) + 12  # the whole epoch and some of the next (the slots' epochs are ragged)
    cut = steps // 2  # resume mid-epoch
    script, out = tmp_path / "ranks.py", tmp_path / "ranks.json"
    script.write_text(SCRIPT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}",
           str(script), str(split), str(steps), str(cut), str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=HANG_GUARD_S, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = json.loads(out.read_text())

    assert ranks[0]["state"]["position"] == ranks[1]["state"]["position"] == cut * step
    m = read_manifest(split)
    reads: dict[str, int] = {}
    for r in ranks:
        assert r["resumed"] == r["full"]  # the resumed stream is the uninterrupted one
        assert all(len(b) == BATCH for b in r["full"])
        for (_, epoch, shard), count in r["reads"]:
            if epoch == 0:
                reads[shard] = reads.get(shard, 0) + count
    assert reads == {s.name: 1 for s in m.shards}  # each shard once per epoch, by one worker of one rank
    per_rank = [r["bytes"] for r in ranks]
    assert sum(per_rank) <= sum(s.bytes for s in m.shards) * (steps * step) / n + 4 * 2 * max(s.bytes for s in m.shards)
    consumed = [d for k in range(steps) for r in ranks for d in r["full"][k]]  # global consumption order
    slack = 4 * 2 * max(s.samples for s in m.shards) + step
    assert len(set(consumed[: n - slack])) == n - slack  # no sample twice within the epoch
    assert set(consumed[: n + slack]) == set(reference)  # and none skipped
