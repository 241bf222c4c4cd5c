"""`unmask sample --chat`: the prompt rendered with the chat template comes back unchanged, and the answer is cut at
its first <eos>, whatever the sampler, block decoding or guidance."""

from __future__ import annotations

import json

import pytest
import torch

from unmask.data.chat import DEFAULT_TEMPLATE, ChatTemplate
from unmask.data.special import SpecialTokens
from unmask.diffusion.chat import answer, read_chats
from unmask.diffusion.sampler import SamplerConfig
from unmask.errors import DataError

pytestmark = pytest.mark.usefixtures("one_thread")

SP = SpecialTokens()
V, L = 64, 40
ANSWER_LEN = 5  # the fake model answers 5 tokens, then <eos>, then more text


class Codec:
    """Characters as ids 10 + (ord % 40): enough to round-trip a prompt's ids."""

    def encode(self, text: str) -> list[int]:
        return [10 + ord(c) % 40 for c in text][:20]

    def decode(self, ids) -> str:
        return " ".join(str(i) for i in ids)


class Answerer(torch.nn.Module):
    """Predicts token 50 + j at the j-th position after the prompt for j < ANSWER_LEN, then <eos>, then token 60 (text
    after the answer's end, which must be cut off), whatever it reads (a guided step stacks the unconditional rows
    under the conditional ones)."""

    def __init__(self, starts: list[int]):
        super().__init__()
        self.starts = torch.tensor(starts)  # [B] each row's first generated position

    def forward(self, x, t=None):
        B, n = x.shape
        start = self.starts.repeat(B // len(self.starts))
        j = torch.arange(n)[None] - start[:, None]  # [B, L]
        target = torch.where(j == ANSWER_LEN, SP.eos, torch.where(j > ANSWER_LEN, 60, 50 + j.clamp(0, 9)))
        return torch.nn.functional.one_hot(target, V).float() * 50.0


@pytest.mark.parametrize("options", [dict(kind="ancestral", steps=8), dict(kind="remask", steps=8, block_length=10),
                                     dict(kind="remask", steps=8, guidance=1.0)])
def test_answers_stop_at_eos_and_the_prompt_comes_back_unchanged(options):
    chats = read_chats(["What is two plus three?", "Hi"], None, DEFAULT_TEMPLATE)
    assert chats[0].prompt == "User:\nWhat is two plus three?\n\nAssistant:\n"
    starts = [1 + len(Codec().encode(c.prompt)) for c in chats]  # after <bos> and the prompt
    rows = answer(Answerer(starts), chats, SamplerConfig(**options), SP, Codec(), L, "loglinear", torch.device("cpu"))
    for row, chat in zip(rows, chats, strict=True):
        assert row["tokens"] == [50, 51, 52, 53, 54]  # the answer, cut before its <eos>; no padding after it
        assert row["prompt"] == chat.prompt and row["chat"] == chat.question
        assert row["sampler"]["stop_at_eos"] is True  # forced on


def test_chat_file_reads_prepare_data_formats_and_keeps_a_given_answer_as_reference(tmp_path):
    lines = [{"prompt": "Say hi."},
             {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Two?"}]},
             {"prompt": "Capital of France?", "response": "Paris."}]
    path = tmp_path / "chats.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    template = ChatTemplate("t", "S:{content}|", "U:{content}|", "A:{content}|", "A:")
    chats = read_chats(["Hello?"], str(path), template)
    assert [c.prompt for c in chats] == ["U:Hello?|A:", "U:Say hi.|A:", "S:Be brief.|U:Two?|A:",
                                         "U:Capital of France?|A:"]
    assert [c.reference for c in chats] == [None, None, None, "Paris."]
    path.write_text('{"messages": []}\n')
    with pytest.raises(DataError, match=f"{path}:1: "):
        read_chats([], str(path), template)


def test_exported_jinja_template_renders_as_training_does():
    from jinja2 import Template

    from unmask.data.chat import DEFAULT_TEMPLATE, Conversation, jinja_template, render

    turns = [("system", "Be brief {% raw %} \"quoted\""), ("user", "Hi?"), ("assistant", "Yo"), ("user", "And?")]
    text = Template(jinja_template(DEFAULT_TEMPLATE)).render(
        messages=[{"role": r, "content": c} for r, c in turns], bos_token="<bos>", add_generation_prompt=True)
    assert text == "<bos>" + render(Conversation("t", (*turns, ("assistant", "-"))))[0]
