"""SFT data: chat template, exact prompt masks, <eos> padding, overflow, malformed lines, shards and loader."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

from unmask.cli import main
from unmask.data.chat import DEFAULT_TEMPLATE, Conversation, iter_conversations, parse_conversation, render
from unmask.data.loader import ShardLoader, read_manifest
from unmask.data.sft import sft_sample
from unmask.data.special import SpecialTokens
from unmask.data.tokenizer import Tokenizer
from unmask.errors import DataError

pytestmark = pytest.mark.usefixtures("one_thread")

SP = SpecialTokens()  # bos 2, eos 3
ids = lambda *xs: np.array(xs, dtype=np.uint16)  # noqa: E731

CONVERSATIONS = [
    {"prompt": "What is the capital of France?", "response": "Paris."},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Two plus two?"},
                  {"role": "assistant", "content": "Four."}, {"role": "user", "content": "And times three?"},
                  {"role": "assistant", "content": "Twelve."}]},
    {"prompt": "Name a colour.", "response": "Blue, like the sea."},
    {"prompt": "Say hello.", "response": "Hello!"},
    {"messages": [{"role": "user", "content": "Count to three."}, {"role": "assistant", "content": "1, 2, 3."}]},
    {"prompt": "Who wrote Hamlet?", "response": "Shakespeare wrote Hamlet."},
    {"prompt": "Is ice cold?", "response": "Yes."},
    {"prompt": "Spell cat.", "response": "C-A-T."},
]


def test_prompt_mask_marks_bos_and_prompt_exactly_and_eos_padding_is_response():
    tokens, mask = sft_sample(ids(10, 11, 12), ids(20, 21), seq_len=10, special=SP)
    assert tokens.tolist() == [2, 10, 11, 12, 20, 21, 3, 3, 3, 3]
    assert mask.tolist() == [True] * 4 + [False] * 6
    assert mask.dtype == bool


def test_a_response_that_exactly_fits_keeps_its_single_eos():
    tokens, mask = sft_sample(ids(10), ids(20, 21), seq_len=5, special=SP)
    assert tokens.tolist() == [2, 10, 20, 21, 3]
    assert mask.tolist() == [True, True, False, False, False]


def test_overflow_refuse_names_the_line_the_count_and_the_fix():
    with pytest.raises(DataError) as e:
        sft_sample(ids(10, 10, 10), ids(*[20] * 10), seq_len=8, special=SP, where="chats.jsonl:7")
    msg = str(e.value)
    assert msg.startswith("chats.jsonl:7: ")
    assert "15 tokens" in msg and "--seq-len 8" in msg and "--sft-overflow truncate" in msg


def test_overflow_truncate_cuts_the_response_only_and_never_the_prompt():
    tokens, mask = sft_sample(ids(10, 11, 12), ids(*range(20, 30)), seq_len=8, special=SP, overflow="truncate")
    assert tokens.tolist() == [2, 10, 11, 12, 20, 21, 22, 23]  # no <eos>: the answer did not end
    assert mask.tolist() == [True] * 4 + [False] * 4
    for overflow in ("refuse", "truncate"):  # a prompt that leaves no room for the response is refused
        with pytest.raises(DataError, match=r"^c\.jsonl:3: the prompt alone is 8 tokens .* never cut"):
            sft_sample(ids(*[10] * 7), ids(20), seq_len=8, special=SP, overflow=overflow, where="c.jsonl:3")


def test_pair_renders_with_the_default_template():
    conv = parse_conversation(CONVERSATIONS[0], "x:1")
    assert render(conv) == ("User:\nWhat is the capital of France?\n\nAssistant:\n", "Paris.")


def test_multi_turn_is_prompt_up_to_the_last_answer():
    conv = parse_conversation(CONVERSATIONS[1], "x:2")
    prompt, response = render(conv)
    assert prompt == ("System:\nBe brief.\n\nUser:\nTwo plus two?\n\nAssistant:\nFour.\n\n"
                      "User:\nAnd times three?\n\nAssistant:\n")
    assert response == "Twelve."


def test_hand_built_conversation_masks_exactly_its_prompt_tokens(tiny_shards):
    tok = Tokenizer(tiny_shards / "tokenizer.model")
    prompt, response = render(parse_conversation(CONVERSATIONS[1], "x:2"))
    p, r = np.array(tok.encode(prompt), np.uint16), np.array(tok.encode(response), np.uint16)
    tokens, mask = sft_sample(p, r, seq_len=128, special=tok.special)
    n = 1 + len(p)
    assert mask.tolist() == [True] * n + [False] * (128 - n)
    assert tok.decode(tokens[1:n]) == prompt
    assert tok.decode(tokens[n : n + len(r)]) == response
    assert (tokens[n + len(r) :] == tok.special.eos).all()


@pytest.mark.parametrize("line, fragment", [
    ('{"prompt": "hi"}', 'needs "prompt" and "response", or "messages"'),
    ('{"prompt": "hi", "response": "  "}', "response is empty"),
    ('{"prompt": "hi", "response": 3}', "response must be a string, found int"),
    ('{"messages": [{"role": "bot", "content": "x"}, {"role": "assistant", "content": "y"}]}',
     "messages[0].role is 'bot'; use one of system, user, assistant"),
    ('{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": ""}]}',
     "messages[1].content is empty"),
    ('{"messages": [{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}]}',
     "the last turn (messages[1]) is 'user'"),
    ('{"messages": [{"role": "user", "content": "x"}, {"role": "system", "content": "s"}, '
     '{"role": "assistant", "content": "y"}]}', "messages[1] is a system turn; a system turn may only come first"),
    ('{"messages": [{"role": "user", "content": "x"}]}', "at least two turns"),
    ("not json", "not valid JSON"),
])
def test_malformed_lines_name_file_line_and_field(tmp_path, line, fragment):
    path = tmp_path / "chats.jsonl"
    path.write_text(json.dumps(CONVERSATIONS[0]) + "\n\n" + line + "\n")
    with pytest.raises(DataError) as e:
        list(iter_conversations([path]))
    assert str(e.value).startswith(f"{path}:3: ")
    assert fragment in str(e.value)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def chat_args(tiny_shards, src: Path, out: Path) -> list[str]:
    return ["prepare-data", str(src), "--out", str(out), "--format", "chat", "--seq-len", "128", "--tokenizer",
            str(tiny_shards / "tokenizer.model"), "--val-fraction", "0.3", "--workers", "1", "--shard-size-mb",
            "0.004", "--no-progress"]


def prepare_chat(tiny_shards, tmp_path) -> Path:
    src = write_jsonl(tmp_path / "chats.jsonl", CONVERSATIONS)
    assert main(chat_args(tiny_shards, src, tmp_path / "sft")) == 0
    return tmp_path / "sft"


def expected_samples(tiny_shards) -> list[tuple[np.ndarray, np.ndarray]]:
    tok = Tokenizer(tiny_shards / "tokenizer.model")
    out = []
    for i, row in enumerate(CONVERSATIONS):
        p, r = render(parse_conversation(row, f"x:{i}"))
        out.append(sft_sample(np.array(tok.encode(p), np.uint16), np.array(tok.encode(r), np.uint16),
                              seq_len=128, special=tok.special))
    return out


def read_split(split_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    m = read_manifest(split_dir)
    batches = list(ShardLoader(split_dir, 3, seq_len=128, model_vocab_size=m.vocab_size, loop=False, shuffle=False))
    assert all(isinstance(b, tuple) and b[0].dtype.is_floating_point is False for b in batches)
    assert all(str(b[1].dtype) == "torch.bool" and b[0].shape == b[1].shape for b in batches)
    return np.concatenate([b[0].numpy() for b in batches]), np.concatenate([b[1].numpy() for b in batches])


def test_prepare_data_chat_round_trips_tokens_and_masks(tiny_shards, tmp_path):
    out = prepare_chat(tiny_shards, tmp_path)
    want = expected_samples(tiny_shards)
    tok = Tokenizer(tiny_shards / "tokenizer.model")
    got = {s: read_split(out / s) for s in ("train", "val")}
    assert len(got["train"][0]) + len(got["val"][0]) == len(CONVERSATIONS)  # one conversation per sample
    assert len(got["val"][0]) >= 1
    for tokens, masks in got.values():  # each split holds its conversations in input order
        matched = [next(i for i, (t, _) in enumerate(want) if (t == row).all()) for row in tokens]
        assert matched == sorted(matched)
        for row_mask, i in zip(masks, matched, strict=True):
            assert (row_mask == want[i][1]).all()
            n_prompt = 1 + len(tok.encode(render(parse_conversation(CONVERSATIONS[i], "x"))[0]))
            assert row_mask.tolist() == [True] * n_prompt + [False] * (128 - n_prompt)  # independent of sft_sample
    assert len(read_manifest(out / "train").shards) >= 2  # the loader crossed a shard boundary


def test_manifest_records_the_template_and_shards_hold_the_mask(tiny_shards, tmp_path):
    out = prepare_chat(tiny_shards, tmp_path)
    raw = json.loads((out / "train" / "manifest.json").read_text())
    assert raw["sft"] == {"chat_template": DEFAULT_TEMPLATE.to_dict(), "overflow": "refuse",
                          "response_padding": "eos"}
    assert raw["sft"]["chat_template"]["name"] == "unmask-chat/1"
    assert raw["cross_document"] is False
    m = read_manifest(out / "train")
    assert m.num_documents == m.num_samples
    with tarfile.open(out / "train" / m.shards[0].name) as tar:
        names = tar.getnames()
    assert names[:2] == ["0000000000.prompt_mask.npy", "0000000000.tokens.npy"]  # webdataset sorts a sample's keys


def test_sft_loader_resumes_exactly(tiny_shards, tmp_path):
    split = prepare_chat(tiny_shards, tmp_path) / "train"
    m = read_manifest(split)
    make = lambda: ShardLoader(split, 2, seq_len=128, model_vocab_size=m.vocab_size, seed=3)  # noqa: E731
    straight = make()
    it = iter(straight)
    ref = [next(it) for _ in range(5)]
    first = make()
    it = iter(first)
    for _ in range(2):
        next(it)
    resumed = make()
    resumed.load_state_dict(first.state_dict())
    it = iter(resumed)
    for want in ref[2:]:
        got = next(it)
        assert (got[0] == want[0]).all() and (got[1] == want[1]).all()


def test_too_long_conversation_is_refused_or_truncated_in_prepare_data(tiny_shards, tmp_path, capsys):
    long = {"prompt": "Tell me a story.", "response": "Once upon a time " * 40}
    src = write_jsonl(tmp_path / "long.jsonl", CONVERSATIONS[:2] + [long])
    args = ["prepare-data", str(src), "--format", "chat", "--seq-len", "128", "--tokenizer",
            str(tiny_shards / "tokenizer.model"), "--workers", "1", "--no-progress"]
    assert main([*args, "--out", str(tmp_path / "refused")]) == 2
    err = capsys.readouterr().err
    assert f"{src}:3: the conversation is" in err and "--seq-len 128" in err
    assert main([*args, "--out", str(tmp_path / "cut"), "--sft-overflow", "truncate"]) == 0
    rows = {s: read_split(tmp_path / "cut" / s) for s in ("train", "val")}
    full = [t for s in rows.values() for t in s[0] if not (t == SP.eos).any()]
    assert len(full) == 1  # the cut answer fills the sample, no <eos>
    assert json.loads((tmp_path / "cut" / "train" / "manifest.json").read_text())["sft"]["overflow"] == "truncate"


def test_chat_format_refuses_plain_text_inputs(tiny_shards, tmp_path, capsys):
    txt = tmp_path / "notes.txt"
    txt.write_text("plain text\n")
    rc = main(["prepare-data", str(txt), "--out", str(tmp_path / "o"), "--format", "chat", "--tokenizer",
               str(tiny_shards / "tokenizer.model"), "--workers", "1", "--no-progress"])
    assert rc == 2
    assert f"{txt}: --format chat reads JSON Lines" in capsys.readouterr().err


def test_pretraining_shards_carry_no_mask_and_no_sft_key(tiny_shards):
    raw = json.loads((tiny_shards / "train" / "manifest.json").read_text())
    assert "sft" not in raw and read_manifest(tiny_shards / "train").sft is None
    with tarfile.open(tiny_shards / "train" / raw["shards"][0]["name"]) as tar:
        assert all(n.endswith(".tokens.npy") for n in tar.getnames())
    batch = next(iter(ShardLoader(tiny_shards / "train", 2, seq_len=128, model_vocab_size=512, loop=False)))
    assert not isinstance(batch, tuple) and batch.shape == (2, 128)


def test_a_mixture_of_sft_and_pretraining_splits_is_refused(tiny_shards, tmp_path):
    sft = prepare_chat(tiny_shards, tmp_path) / "train"
    with pytest.raises(DataError, match="mix SFT splits"):
        ShardLoader(None, 2, seq_len=128, model_vocab_size=512,
                    sources=[(str(sft), 1.0), (str(tiny_shards / "train"), 1.0)])


def test_conversation_is_frozen_role_content_pairs():
    conv = parse_conversation(CONVERSATIONS[0], "x:1")
    assert conv == Conversation("x:1", (("user", "What is the capital of France?"), ("assistant", "Paris.")))


def test_rerun_is_a_no_op_and_another_overflow_mode_is_refused(tiny_shards, tmp_path, capsys):
    out = prepare_chat(tiny_shards, tmp_path)
    capsys.readouterr()
    args = chat_args(tiny_shards, tmp_path / "chats.jsonl", out)
    assert main(args) == 0
    assert "already complete with these settings" in capsys.readouterr().out
    assert main([*args, "--sft-overflow", "truncate"]) == 2
    assert "sft_overflow: 'refuse' then, 'truncate' now" in capsys.readouterr().err
