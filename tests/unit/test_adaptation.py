"""AR -> diffusion adaptation (Dream, DiffuLLaMA): the shifted head of an imported causal LM and the attention mask
annealed from causal to full. Small random Llama configs saved locally (test_import_causal_lm's helpers)."""

import pytest
import torch

from tests.unit.test_import_causal_lm import WORDS, save
from unmask.config import Config, ModelConfig
from unmask.core.kv_cache import BlockCache
from unmask.data.special import SpecialTokens
from unmask.diffusion.anneal import anneal_mask
from unmask.diffusion.noise import BatchKey
from unmask.diffusion.objective import build_objective
from unmask.diffusion.sampler import SamplerConfig, sample
from unmask.diffusion.sampler_template import infill_template, prompt_template
from unmask.model.build import build_model
from unmask.model.hf.init import read_folder, with_model, with_time_conditioning
from unmask.model.hf.lazy import load_into

pytestmark = pytest.mark.usefixtures("one_thread")


def adapted(tmp_path, name="llama-gqa-untied"):
    """(source HF model, its unmask import with shift_logits on, special ids, the run config)."""
    folder, hf = save(tmp_path, name)
    fields, state, special = read_folder(folder)
    base = Config.model_validate({"model": {"shift_logits": True}, "train": {"seq_len": 48},
                                  "diffusion": {"anneal_steps": 10}})
    cfg = with_model(base, fields)
    model = build_model(cfg.model, causal=cfg.causal, block_size=cfg.block_size)
    load_into(model, state)
    return hf, model.eval(), special, cfg


def test_step_zero_of_an_adapted_model_is_the_source_models_next_token_prediction(tmp_path):
    hf, model, special, cfg = adapted(tmp_path)
    assert cfg.model.shift_logits  # --init-from keeps the run's shift (not a field of the source's weights)
    objective = build_objective(cfg.diffusion, special.mask, special.pad, seed=cfg.train.seed)
    tokens = torch.randint(4, WORDS, (2, 40), generator=torch.Generator().manual_seed(1))
    c = objective.corrupt(tokens, BatchKey(step=0, global_batch=2))
    assert torch.equal(c.attention, torch.ones(40, 40, dtype=torch.bool).tril())  # step 0: the causal mask
    with torch.no_grad():
        want = hf(tokens).logits  # [B, L, rows]: position i predicts token i + 1
        got = objective.network(model, (tokens,), c.attention)  # position i predicts token i
    torch.testing.assert_close(got[:, 1:, : want.shape[-1]], want[:, :-1], atol=1e-5, rtol=1e-5)
    unshifted = ModelConfig(**{**cfg.model.model_dump(), "shift_logits": False})
    plain = build_model(unshifted)
    plain.load_state_dict(model.state_dict())
    with torch.no_grad():  # without the shift, position i would hold i's own next-token logits: the test can fail
        assert not torch.allclose(plain.eval()(tokens, attn_mask=c.attention)[:, 1:], got[:, 1:], atol=1e-3)


def test_step_zero_of_a_duo_adapted_model_is_the_source_models_next_token_prediction_at_any_t(tmp_path):
    """Uniform-state (Duo) adaptation: the same shift and annealing, plus the time conditioning --init-from adds
    (with_time_conditioning), which leaves the source's function unchanged for every t until training moves it."""
    folder, hf = save(tmp_path, "llama-gqa-untied")
    fields, state, special = read_folder(folder)
    base = Config.model_validate({"model": {"shift_logits": True, "time_conditioning": True},
                                  "diffusion": {"objective": "duo", "anneal_steps": 10}, "train": {"seq_len": 48}})
    cfg = with_model(base, fields)
    assert cfg.model.time_conditioning and cfg.model.shift_logits
    model = load_into(build_model(cfg.model), with_time_conditioning(state, cfg)).eval()
    objective = build_objective(cfg.diffusion, special.mask, special.pad, seed=0, vocab_size=cfg.model.vocab_size)
    tokens = torch.randint(4, WORDS, (2, 40), generator=torch.Generator().manual_seed(1))
    c = objective.corrupt(tokens, BatchKey(step=0, global_batch=2))
    assert torch.equal(c.attention, torch.ones(40, 40, dtype=torch.bool).tril())  # step 0: the causal mask
    assert objective.corrupt(tokens, BatchKey(step=10, global_batch=2)).attention is None  # then full attention
    with torch.no_grad():
        want = hf(tokens).logits
        for t in (0.1, 0.9):
            got = objective.network(model, (tokens, torch.full((2,), t)), c.attention)
            torch.testing.assert_close(got[:, 1:, : want.shape[-1]], want[:, :-1], atol=1e-5, rtol=1e-5)
        loss = objective.loss(model, tokens, BatchKey(step=5, global_batch=2)).loss  # mid-anneal, uniform noise
    assert torch.isfinite(loss)


def test_anneal_masks_go_from_causal_to_full_the_same_in_every_layout():
    causal = torch.ones(128, 128, dtype=torch.bool).tril()
    assert torch.equal(anneal_mask(7, 0, 128, 100), causal)
    assert anneal_mask(7, 100, 128, 100) is None and anneal_mask(7, 500, 128, 100) is None
    off = ~causal
    for step in (25, 50, 90):
        mask = anneal_mask(7, step, 128, 100)
        assert mask[causal].all()
        assert abs(mask[off].float().mean().item() - step / 100) < 0.03, step
        assert torch.equal(mask, anneal_mask(7, step, 128, 100))  # deterministic in (seed, step)
    assert not torch.equal(anneal_mask(7, 50, 128, 100), anneal_mask(7, 51, 128, 100))
    assert not torch.equal(anneal_mask(7, 50, 128, 100), anneal_mask(8, 50, 128, 100))
    cfg = Config.model_validate({"diffusion": {"anneal_steps": 100}})
    objective = build_objective(cfg.diffusion, mask_id=4, pad_id=0, seed=7)
    x0 = torch.randint(5, 100, (8, 32))
    whole = objective.corrupt(x0, BatchKey(step=30, global_batch=8)).attention
    for dp_rank, micro in ((0, 0), (1, 0), (1, 1)):  # dp=2 ranks, 2 micro-batches of 2 samples
        key = BatchKey(step=30, micro=micro, dp_rank=dp_rank, dp_world=2, global_batch=8)
        assert torch.equal(objective.corrupt(x0[:2], key).attention, whole)
    assert torch.equal(whole, anneal_mask(7, 30, 32, 100))
    calls = []

    def network(x, **kwargs):  # validation must run the final, fully attending model
        calls.append(kwargs)
        return torch.zeros(*x.shape, 100)

    objective.eval_terms(network, x0, 2, 30)
    assert calls == [{}, {}]


def test_a_training_step_under_annealing_is_finite_and_uses_the_mask():
    cfg = Config.model_validate({"model": {"size": "tiny", "shift_logits": True}, "train": {"seq_len": 32},
                                 "diffusion": {"anneal_steps": 10}})
    torch.manual_seed(0)
    model = build_model(cfg.model, causal=cfg.causal, block_size=cfg.block_size)
    objective = build_objective(cfg.diffusion, mask_id=4, pad_id=0, seed=0)
    x0 = torch.randint(5, cfg.model.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    key = BatchKey(step=3, global_batch=4)
    out = objective.loss(model, x0, key)
    out.loss.backward()
    assert torch.isfinite(out.loss) and all(torch.isfinite(p.grad).all() for p in model.parameters())
    full = build_objective(cfg.diffusion.model_copy(update={"anneal_steps": 0}), mask_id=4, pad_id=0, seed=0)
    with torch.no_grad():  # the same masks, full attention: a different loss, so the annealed mask reached the blocks
        assert abs(full.loss(model, x0, key).loss.item() - out.loss.item()) > 1e-4


@pytest.mark.parametrize("bad, match", [
    ({"parallel": {"pp": 2}, "diffusion": {"anneal_steps": 5}}, "pipeline stages do not carry"),
    ({"diffusion": {"objective": "bd3lm", "anneal_steps": 5}}, "anneal_steps=5 anneals a diffusion model"),
    ({"model": {"shift_logits": True}, "diffusion": {"objective": "ar"}}, "reads the network unshifted"),
    ({"diffusion": {"objective": "ar", "anneal_steps": 5}}, "anneal_steps=5 anneals a diffusion model"),
    ({"model": {"arch": "bert", "shift_logits": True, "tie_embeddings": True}}, "BERT/RoBERTa MLMs"),
])
def test_adaptation_settings_that_cannot_work_are_refused_by_name(bad, match):
    with pytest.raises(ValueError, match=match):
        Config.model_validate({"train": {"seq_len": 32}, **bad})


def shifted_model():
    cfg = ModelConfig(size="tiny", shift_logits=True, n_kv_heads=2)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(std=0.2 if p.ndim > 1 else 1.0)
    return model


def test_a_kv_cached_span_of_a_shifted_model_reads_the_position_before_it():
    model = shifted_model()
    tokens = torch.randint(5, 200, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(tokens)
        for mode in ("prefix", "dual"):
            cache = BlockCache(model, mode, refresh=0)
            active = torch.zeros(2, 40, dtype=torch.bool)
            active[:, 16:24] = True
            cache.start_block(active)
            cache(tokens)  # the full forward that fills the cache
            logits, start = cache(tokens)  # the span against fresh keys: the full forward's logits
            assert start == 16
            torch.testing.assert_close(logits, full[:, 16:16 + logits.shape[1]], atol=1e-5, rtol=0)


@pytest.mark.parametrize("options", [dict(kind="ancestral", steps=16), dict(kind="remask", steps=16, block_length=8),
                                     dict(kind="threshold", threshold=0.5, block_length=8, kv_cache="dual")])
def test_samplers_fill_every_mask_of_a_shifted_model(options):
    sp, model = SpecialTokens(), shifted_model()
    prompts, _ = prompt_template([[10, 11, 12], [40, 41]], 32, sp)
    infill, _ = infill_template([[[10, 11, 12], 6, [20, 21], 9, [30, 31]], [[40], 12, [41]]], sp)
    for template in (prompts, infill):
        out = sample(model, template, SamplerConfig(**options), sp)
        assert not (out.tokens == sp.mask).any()
        fixed = template != sp.mask
        assert torch.equal(out.tokens[fixed], template[fixed])


def test_the_pipeline_stages_give_the_shifted_logits_of_one_process():
    from unmask.engines.pipeline import _BlockLayer, _EmbedLayer, _HeadLayer

    model = shifted_model()
    tokens = torch.randint(5, 200, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        x = _EmbedLayer(model)(tokens)
        for block in model.layers:
            x = _BlockLayer(block, model)(x)
        torch.testing.assert_close(_HeadLayer(model)(x), model(tokens), atol=1e-6, rtol=0)


def test_distill_refuses_anneal_steps_by_name(tmp_path):
    """A distill run takes its teacher's [diffusion]: an anneal_steps there would do nothing, so it is refused."""
    from unmask.distill.stage import prepare_config
    from unmask.errors import ConfigError

    cfg = Config.model_validate({"train": {"seq_len": 32}, "diffusion": {"anneal_steps": 5}})
    with pytest.raises(ConfigError, match=r"diffusion.anneal_steps=5 .*remove diffusion.anneal_steps"):
        prepare_config(cfg, str(tmp_path / "teacher"))
