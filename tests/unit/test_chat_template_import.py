"""SFT with an imported tokenizer's own Jinja chat template: prepare-data picks it up (--chat-template), samples mask
exactly its prompt, the manifest records it, render equals apply_chat_template, and export writes it back."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from unmask.cli import main
from unmask.data.chat import DEFAULT_TEMPLATE, ChatTemplate, jinja_template, parse_conversation, render
from unmask.data.hf_tokenizer import HFTokenizer, copy_hf_tokenizer
from unmask.data.loader import ShardLoader, read_manifest
from unmask.data.prepare import PrepareOptions, _chat_template
from unmask.errors import DataError

# ChatML after the bos text, as Llama-style templates start: render must drop that leading "<s>"
CHATML = ("{{ bos_token }}{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
          "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CHATS = [
    {"prompt": "What is two plus three?", "response": "Five."},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                  {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Colour of snow?"},
                  {"role": "assistant", "content": "White."}]},
    {"prompt": "Name a fruit.", "response": "An apple."},
]
SEQ = 96


def byte_tokenizer(folder: Path, chat_template: str | None) -> Path:
    """A byte-level BPE without merges (lossless: one token per byte) with <s>, <|im_start|>, <|im_end|> special."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {c: i for i, c in enumerate(bytes_to_unicode().values())}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="<|im_end|>",
                                  additional_special_tokens=["<|im_start|>"])
    if chat_template:
        tok.chat_template = chat_template
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def chatml_tok(tmp_path_factory) -> Path:
    return byte_tokenizer(tmp_path_factory.mktemp("chatml"), CHATML)


def prepare(tmp_path: Path, tokenizer: Path, *extra: str, name: str = "sft", rc: int = 0) -> Path:
    src = tmp_path / "chats.jsonl"
    src.write_text("".join(json.dumps(c) + "\n" for c in CHATS))
    out = tmp_path / name
    assert main(["prepare-data", str(src), "--out", str(out), "--format", "chat", "--seq-len", str(SEQ),
                 "--tokenizer", str(tokenizer), "--val-fraction", "0", "--workers", "1", "--no-progress",
                 *extra]) == rc
    return out


def samples(split: Path) -> list[tuple[np.ndarray, np.ndarray]]:
    loader = ShardLoader(split, 1, seq_len=SEQ, model_vocab_size=read_manifest(split).vocab_size, loop=False,
                         shuffle=False)
    return [(t[0].numpy(), m[0].numpy()) for t, m in loader]


def test_render_equals_apply_chat_template_less_the_leading_bos(chatml_tok):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(chatml_tok)
    template = ChatTemplate(name="tokenizer:x", jinja=CHATML, special_tokens=hf.special_tokens_map)
    conv = parse_conversation(CHATS[1], "x:1")
    msgs = [{"role": r, "content": c} for r, c in conv.messages[:-1]]
    want = hf.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert want.startswith("<s><|im_start|>system\n")
    assert render(conv, template) == (want.removeprefix("<s>"), "White.")
    assert jinja_template(template) == CHATML  # export writes the original
    from unmask.diffusion.chat import read_chats  # `unmask sample --chat` renders with the recorded template

    asked = hf.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False)
    assert read_chats(["Hi"], None, template)[0].prompt == asked.removeprefix("<s>")
    assert ChatTemplate.from_dict(json.loads(json.dumps(template.to_dict()))) == template
    assert set(DEFAULT_TEMPLATE.to_dict()) == {"name", "system", "user", "assistant", "response_prefix"}  # as before


def test_prepare_uses_the_tokenizers_template_with_exact_prompt_masks(chatml_tok, tmp_path, capsys):
    out = prepare(tmp_path, chatml_tok)
    assert f"chat template: tokenizer:{chatml_tok.name}" in capsys.readouterr().out
    tok = HFTokenizer(out / "tokenizer.json")
    start, end = tok.hf.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    assert tok.special.eos == end and tok.special.bos != start
    sft = read_manifest(out / "train").sft
    assert sft["chat_template"]["jinja"] == CHATML and sft["chat_template"]["special_tokens"]["bos_token"] == "<s>"
    assert json.loads((out / ".prepare-data.json").read_text())["chat_template"]["jinja"] == CHATML
    rows = samples(out / "train")
    assert len(rows) == len(CHATS)
    by_prompt = {tok.decode(t[m]): (t, m) for t, m in rows}
    for chat in CHATS:
        conv = parse_conversation(chat, "x")
        turns = "".join(f"<|im_start|>{r}\n{c}<|im_end|>\n" for r, c in conv.messages[:-1])
        tokens, mask = by_prompt[f"<s>{turns}<|im_start|>assistant\n"]  # the mask covers exactly <bos> ... assistant\n
        n = int(mask.sum())
        assert mask.tolist() == [True] * n + [False] * (SEQ - n)
        assert tokens[0] == tok.special.bos and start in tokens[:n] and end in tokens[:n]  # single special ids
        answer = tok.encode(conv.messages[-1][1])
        assert tokens[n:n + len(answer)].tolist() == answer
        assert (tokens[n + len(answer):] == end).all()  # <eos> padding, part of the response
    # the exported model's chat() (modeling_unmask) renders the same prompt tokens from the exported folder
    from transformers import AutoTokenizer

    export = tmp_path / "export"
    export.mkdir()
    copy_hf_tokenizer(out / "tokenizer.json", export)
    config = json.loads((export / "tokenizer_config.json").read_text())
    config["chat_template"] = jinja_template(ChatTemplate.from_dict(sft["chat_template"]))
    (export / "tokenizer_config.json").write_text(json.dumps(config))
    hf = AutoTokenizer.from_pretrained(export)
    conv = parse_conversation(CHATS[1], "x")
    text = hf.apply_chat_template([{"role": r, "content": c} for r, c in conv.messages[:-1]],
                                  add_generation_prompt=True, tokenize=False)
    prompt = [tok.special.bos] + hf.encode(text.removeprefix(hf.bos_token), add_special_tokens=False)
    assert any(t[m].tolist() == prompt for t, m in rows)


def test_default_and_tokenizer_choices(chatml_tok, tmp_path, capsys):
    out = prepare(tmp_path, chatml_tok, "--chat-template", "default")
    assert read_manifest(out / "train").sft["chat_template"] == DEFAULT_TEMPLATE.to_dict()
    bare = byte_tokenizer(tmp_path / "bare", None)
    prepare(tmp_path, bare, "--chat-template", "tokenizer", name="bare-out", rc=2)
    assert f"--chat-template tokenizer: the tokenizer {bare} has no chat_template" in capsys.readouterr().err
    with pytest.raises(DataError, match="needs --tokenizer"):
        _chat_template(PrepareOptions(inputs=[], out=tmp_path, format="chat", chat_template="tokenizer"))
    out = prepare(tmp_path, bare, name="auto-out")  # auto without one: unmask's
    assert read_manifest(out / "train").sft["chat_template"]["name"] == DEFAULT_TEMPLATE.name


@pytest.mark.slow
def test_smollm2_gguf_template_is_picked_up(tmp_path, smollm2_gguf):
    from transformers import AutoTokenizer

    out = prepare(tmp_path, smollm2_gguf)
    sft = read_manifest(out / "train").sft
    assert sft["chat_template"]["name"] == f"tokenizer:{smollm2_gguf.name}"
    hf = AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name, local_files_only=True)
    rows = samples(out / "train")
    conv = parse_conversation(CHATS[0], "x")
    want = hf.apply_chat_template([{"role": "user", "content": CHATS[0]["prompt"]}], add_generation_prompt=True,
                                  tokenize=False)  # with SmolLM2's default system turn
    prompts = [t[m].tolist() for t, m in rows]
    ids = hf.encode(want, add_special_tokens=False)
    assert ids[0] == 1 and ids.count(1) == 3 and ids.count(2) == 2  # <|im_start|> x3, <|im_end|> x2: single ids
    assert ids in prompts  # bos <|im_start|> (id 1) then the rest of the template's text
    assert render(conv, ChatTemplate.from_dict(sft["chat_template"]))[1] == CHATS[0]["response"]
