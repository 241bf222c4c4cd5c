"""Every tensor handed to torch.distributed during a 2-rank DeepSpeed run (training steps, validation, save,
preemption check, resume verification) lives on the device unmask declares for its group's collectives."""

from _parallel_common import launch


def test_every_collective_tensor_is_on_the_declared_device(tmp_path):
    got = launch("_record_collectives.py", 2, tmp_path, str(tmp_path / "run"))
    for rank, r in enumerate(got["ranks"]):
        assert r["calls"] > 0, rank
        assert r["wrong"] == [], f"rank {rank}: (collective, tensor device, declared device) {r['wrong']}"
