"""Tensor parallelism with megatron-core: a TP=2 model equals the TP=1 model of the same seed (unmask's blocks with
and without tied embeddings or Qwen2's q/k/v biases, and BERT's blocks, biases everywhere)."""

import pytest
from _parallel_common import launch

pytestmark = pytest.mark.distributed


def test_tp2_matches_tp1_logits_loss_and_every_gradient(tmp_path):
    result = launch("_parallel_tp.py", 2, tmp_path)
    # 7 projections x 2 blocks + embedding (+ head); Qwen2's q/k/v biases split with their columns (3 x 2 more);
    # BERT: 6 projections x 2 blocks + the column biases of wq, wk, wv, w1 (4 x 2) + embedding + the head's bias.
    for tied, sharded in (("untied", 16), ("tied", 15), ("qkv_bias", 22), ("bert", 22)):
        r = result[tied]
        assert r["local_vocab"] == 256, tied  # the logits really are vocab-sharded
        assert r["sharded"] == sharded, tied
        assert len(r["grads"]) == r["n_ref_params"], tied
        assert r["logits"] < 1e-5, tied
        assert r["loss"] < 1e-5, tied
        assert r["merge_keys"] and r["merge"] == 0.0, tied  # merge_tensor_parallel inverts the plan exactly
        worst = max(r["grads"].items(), key=lambda kv: kv[1])
        assert worst[1] < 1e-5, (tied, worst)
