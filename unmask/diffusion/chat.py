"""`unmask sample --chat` / `--chat-file`: answers of any length from an instruction-tuned (SFT) model.

Each prompt is rendered with the run's chat template (recorded in its training split's manifest by
`prepare-data --format chat`; the default template otherwise), encoded apart from the answer exactly as in
training, and followed by masks up to --length. SFT taught the model to end an answer with <eos> and pad with
<eos> (diffusion.sft_eos_padding), so generation stops at the first <eos> (stop_at_eos is forced on) and the answer
is the text before it: --length only bounds it. The prompt tokens are never changed.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from unmask.data.chat import DEFAULT_TEMPLATE, ChatTemplate, json_lines, parse_chat_prompt, render, trained_template
from unmask.diffusion.sampler import SamplerConfig, SamplingError, sample
from unmask.diffusion.sampler_template import prompt_template


@dataclass(frozen=True)
class ChatPrompt:
    question: object  # what was asked: the --chat text, or the --chat-file line's object
    prompt: str  # rendered prompt text (ends with the template's response prefix)
    reference: str | None = None  # a --chat-file line's own answer, if it had one


def read_chats(questions: list[str], chat_file: str | None, template: ChatTemplate) -> list[ChatPrompt]:
    """--chat questions (one user turn each) then every line of --chat-file (prepare-data's chat formats)."""
    rows = [_prompt({"prompt": q}, f"--chat {q!r}", template, q) for q in questions]
    if chat_file:
        rows += [_prompt(obj, where, template, obj) for obj, where in json_lines(Path(chat_file))]
    return rows


def _prompt(obj, where: str, template: ChatTemplate, question) -> ChatPrompt:
    conv, reference = parse_chat_prompt(obj, where)
    return ChatPrompt(question, render(conv, template)[0], reference)


def run_template(loaded) -> tuple[ChatTemplate, str]:
    """The chat template the checkpoint's run trained with, and where it came from. Only a training checkpoint
    knows its data; an exported folder, a moved split or a pretraining run gets the default template."""
    cfg = getattr(loaded, "config", None)
    if cfg is None:
        return DEFAULT_TEMPLATE, "the default template (no training config with this model)"
    template, source = trained_template(cfg)
    return (template, source) if template else (DEFAULT_TEMPLATE, f"the default template ({source})")


def answer(model, chats: list[ChatPrompt], cfg: SamplerConfig, special, codec, length: int, schedule,
           device: torch.device, process: str = "masked") -> list[dict]:
    """One row per chat: the answer text (before the first <eos>) and ids, with the sampling statistics."""
    cfg = replace(cfg, stop_at_eos=True)
    template, prompt_mask = prompt_template([codec.encode(c.prompt) for c in chats], length, special)
    result = sample(model, template.to(device), cfg, special, schedule, prompt_mask=prompt_mask.to(device),
                    process=process)
    kept = result.tokens.cpu()[prompt_mask]
    if not torch.equal(kept, template[prompt_mask]):  # the samplers never write a prompt position
        raise SamplingError("the sampler changed prompt tokens; report this as a bug")
    rows = []
    for chat, ids in zip(chats, result.token_lists(special, generated_only=True), strict=True):
        row = {"chat": chat.question, "prompt": chat.prompt, "text": codec.decode(ids), "tokens": ids}
        if chat.reference is not None:
            row["reference"] = chat.reference
        rows.append({**row, **result.stats(), "sampler": cfg.to_dict()})
    return rows


def note(text: str) -> None:
    print(f"unmask sample: {text}", file=sys.stderr)
