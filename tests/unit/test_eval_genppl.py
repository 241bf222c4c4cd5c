"""Generative perplexity under a real (tiny, locally built) HF Llama and under unmask's own AR model."""

import math

import pytest
import torch

from unmask.config import ModelConfig
from unmask.diffusion.autoregressive import Autoregressive
from unmask.eval import EvalError
from unmask.eval.genppl import HFCausalLM, UnmaskCausalLM, generative_perplexity, shuffled_words, windows
from unmask.model.build import build_model

WORDS = "the cat sat on a mat while one dog ran in the park and birds sang over green hills".split()
TEXT = " ".join(WORDS)


def save_tiny_llama(path, seed=0):
    """A word-level tokenizer built with `tokenizers` and a randomly initialised 1-layer Llama: no hub."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", "<bos>", "<eos>", "<pad>"] + sorted(set(WORDS)))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<bos>", eos_token="<eos>",
                            pad_token="<pad>").save_pretrained(path)
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                      bos_token_id=1, eos_token_id=2, pad_token_id=3)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(path)
    return model


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    save_tiny_llama(path)
    return path


def test_matches_a_direct_forward(llama_dir):
    ref = HFCausalLM(llama_dir)
    ids = ref.encode("the cat sat on a mat")
    assert ids[0] == 1 and len(ids) == 7  # <bos> prefix, one id per word
    logits = ref.model(torch.tensor([ids])).logits[0, :-1].double()
    expected = -logits.log_softmax(-1).gather(-1, torch.tensor(ids[1:])[:, None]).sum().item()
    res = generative_perplexity(["the cat sat on a mat"], ref)
    assert res.tokens == 6 and res.per_text[0][0] == pytest.approx(expected, rel=1e-6)
    assert res.perplexity == pytest.approx(math.exp(expected / 6), rel=1e-6)
    assert res.bits_per_byte == pytest.approx(expected / math.log(2) / len("the cat sat on a mat"), rel=1e-6)


def test_batching_and_padding_do_not_change_the_score(llama_dir):
    ref = HFCausalLM(llama_dir)
    texts = ["the cat sat", TEXT, "dog ran in the park", "birds"]
    one, many = generative_perplexity(texts, ref, batch_size=1), generative_perplexity(texts, ref, batch_size=4)
    assert one.tokens == many.tokens == 3 + len(WORDS) + 5 + 1
    for (a, n), (b, m) in zip(one.per_text, many.per_text, strict=True):
        assert n == m and a == pytest.approx(b, rel=1e-5)


def test_long_texts_are_scored_in_windows(llama_dir):
    ref = HFCausalLM(llama_dir, max_length=8)
    assert windows(list(range(20)), 8) == [list(range(0, 8)), list(range(7, 15)), list(range(14, 20))]
    res = generative_perplexity([TEXT], ref)
    assert res.tokens == len(WORDS)  # every word scored once, with at most 7 tokens of context


def test_missing_folder_or_prefix_is_a_clear_error(tmp_path, llama_dir):
    with pytest.raises(EvalError, match="does not exist"):
        HFCausalLM(tmp_path / "nope")
    with pytest.raises(EvalError, match="not in the reference tokenizer"):
        HFCausalLM(llama_dir, prefix_token="<|endoftext|>")
    assert HFCausalLM(llama_dir, prefix_token="<eos>").encode("cat")[0] == 2


@pytest.mark.slow  # trains or starts a process: tens of seconds on 2 loaded cores
def test_a_model_trained_on_a_text_prefers_it_to_its_shuffle(tmp_path):
    save_tiny_llama(tmp_path)
    ref = HFCausalLM(tmp_path)
    ids = torch.tensor([ref.encode(TEXT)])
    opt = torch.optim.Adam(ref.model.parameters(), lr=3e-2)
    ref.model.train()
    for _ in range(40):
        opt.zero_grad()
        ref.model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
    ref.model.eval()
    (shuffled,) = shuffled_words([TEXT])
    assert sorted(shuffled.split()) == sorted(WORDS) and shuffled != TEXT
    trained, mixed = generative_perplexity([TEXT], ref), generative_perplexity([shuffled], ref)
    print(f"trained text {trained.perplexity:.3f}, shuffled {mixed.perplexity:.3f}")
    assert trained.perplexity < 2 < mixed.perplexity, (trained.perplexity, mixed.perplexity)


def test_unmask_ar_reference_agrees_with_the_objective():
    torch.manual_seed(0)
    model = build_model(ModelConfig(size="tiny"), causal=True)
    encode = lambda text: [10 + ord(c) % 200 for c in text]  # noqa: E731 - a stand-in tokenizer
    ref = UnmaskCausalLM(model, encode, bos_id=2, pad_id=0)
    res = generative_perplexity(["hello world", "masked diffusion"], ref, batch_size=2)
    terms = Autoregressive(pad_id=0).eval_terms(model, torch.tensor([ref.encode("masked diffusion")]))
    nll, counts = terms.nll, terms.tokens
    assert res.per_text[1][1] == int(counts[0]) == 16
    assert res.per_text[1][0] == pytest.approx(float(nll[0]), rel=1e-5)


def test_empty_texts_are_a_clear_error(llama_dir):
    with pytest.raises(EvalError, match="no tokens"):
        generative_perplexity(["", ""], HFCausalLM(llama_dir))
