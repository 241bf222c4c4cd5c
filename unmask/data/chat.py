"""Conversations for instruction tuning (SFT): reading them from JSON Lines and rendering them with a chat template.

Input lines (`prepare-data --format chat`), one conversation per line:
- `{"prompt": "...", "response": "..."}`: one user turn and its answer;
- `{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}`: a system turn may only come
  first, and the last turn must be the assistant's.

Which tokens are the target follows LLaDA's GUIDELINES.md (SFT section) and Appendix B.1: a sample is one prompt
followed by one response, and only the response is the target. In a multi-turn conversation everything before
the last assistant turn, earlier answers included, is the prompt; only the last answer is the response.

The default template (`unmask-chat/1`) is plain text around the tokenizer's own <bos>/<eos>, so it needs no new
special ids and any unmask tokenizer can encode it:

    <bos>System:\\n{system}\\n\\nUser:\\n{user}\\n\\nAssistant:\\n{answer}\\n\\nUser:\\n{user}\\n\\nAssistant:\\n{response}<eos>

Each role marker ends with a newline rather than a space: sentencepiece attaches a space to the word after it,
so a prompt ending in "Assistant: " would leave a lone space token that text never produces.

An imported model's tokenizer may carry its own Jinja chat template (SmolLM2's ChatML); prepare-data then uses it
(`--chat-template auto`), so SFT keeps the format the model was pretrained or instruction-tuned with. Its prompt is
the template's rendering of the turns before the answer with the generation prompt, less a leading bos_token.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from unmask.data.documents import read_text
from unmask.errors import DataError

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class ChatTemplate:
    """Text around each turn; `{content}` marks the turn's text. `response_prefix` ends every prompt.

    Or, when `jinja` is set, an imported tokenizer's own Jinja chat template (`tokenizer_template`), rendered as
    transformers renders it with `special_tokens` (the tokenizer's bos_token, eos_token, ...) as variables."""

    name: str
    system: str = ""
    user: str = ""
    assistant: str = ""  # an earlier answer, which is part of the prompt
    response_prefix: str = ""
    jinja: str = ""
    special_tokens: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict:
        # the Jinja keys only when set: a default template's record (manifest, prepare settings) stays as it was
        return {k: v for k, v in asdict(self).items() if v or k not in ("jinja", "special_tokens")}

    @classmethod
    def from_dict(cls, d: dict) -> ChatTemplate:
        text = {k: str(d[k]) for k in ("name", "system", "user", "assistant", "response_prefix")}
        return cls(**text, jinja=str(d.get("jinja", "")), special_tokens=dict(d.get("special_tokens", {})))


def tokenizer_template(jinja: str, special_tokens: dict[str, str], source: str) -> ChatTemplate:
    """The chat template of an imported tokenizer (`prepare-data --tokenizer SOURCE`), named after its file."""
    return ChatTemplate(name=f"tokenizer:{Path(source).name}", jinja=jinja, special_tokens=dict(special_tokens))


DEFAULT_TEMPLATE = ChatTemplate(
    name="unmask-chat/1",
    system="System:\n{content}\n\n",
    user="User:\n{content}\n\n",
    assistant="Assistant:\n{content}\n\n",
    response_prefix="Assistant:\n",
)


@dataclass(frozen=True)
class Conversation:
    where: str  # "file:line", for error messages
    messages: tuple[tuple[str, str], ...]  # (role, content); the last is the assistant's


def render(conv: Conversation, template: ChatTemplate = DEFAULT_TEMPLATE) -> tuple[str, str]:
    """(prompt text, response text), without <bos>/<eos>: the caller encodes the two apart so that no token
    straddles the boundary and the prompt mask is exact."""
    if template.jinja:
        return _render_jinja(conv, template), conv.messages[-1][1]
    turns = [getattr(template, role).replace("{content}", text) for role, text in conv.messages[:-1]]
    return "".join(turns) + template.response_prefix, conv.messages[-1][1]


def _render_jinja(conv: Conversation, template: ChatTemplate) -> str:
    """The turns before the answer with the generation prompt, as `tokenizer.apply_chat_template(...,
    add_generation_prompt=True, tokenize=False)` writes them, less a leading bos_token: the sample's <bos> id
    stands for it (sft.py), as in the exported model's `chat`."""
    from transformers.utils.chat_template_utils import render_jinja_template  # transformers' own renderer

    messages = [{"role": role, "content": text} for role, text in conv.messages[:-1]]
    try:
        (text,), _ = render_jinja_template([messages], chat_template=template.jinja, add_generation_prompt=True,
                                           **template.special_tokens)
    except Exception as e:  # noqa: BLE001 - a template's own raise_exception or a Jinja error
        raise DataError(f"{conv.where}: the chat template {template.name} failed on this conversation "
                        f"({type(e).__name__}: {e}); fix the conversation, or prepare the data with "
                        "--chat-template default") from None
    return text.removeprefix(template.special_tokens.get("bos_token") or "")


def jinja_template(template: ChatTemplate) -> str:
    """`template` as a Hugging Face chat template (tokenizer_config.json "chat_template"): what `render` makes of
    the turns, after the tokenizer's bos_token, with `add_generation_prompt` adding the response prefix. Literal
    text is written as Jinja string literals, so no character of the template can be read as Jinja syntax.
    A tokenizer's own template is returned as it came."""
    if template.jinja:
        return template.jinja

    def turn(role: str) -> str:
        before, _, after = getattr(template, role).partition("{content}")
        return f"{{{{ {json.dumps(before)} }}}}{{{{ message['content'] }}}}{{{{ {json.dumps(after)} }}}}"

    branches = "".join(f"{{% {'if' if i == 0 else 'elif'} message['role'] == '{role}' %}}{turn(role)}"
                       for i, role in enumerate(ROLES))
    return ("{{ bos_token }}{% for message in messages %}" + branches + "{% endif %}{% endfor %}"
            f"{{% if add_generation_prompt %}}{{{{ {json.dumps(template.response_prefix)} }}}}{{% endif %}}")


def trained_template(cfg) -> tuple[ChatTemplate | None, str]:
    """The chat template a run's training split was prepared with (`prepare-data --format chat`), or None, with
    where it came from or why there is none. Only a training config knows its data."""
    from unmask.data.shards import read_manifest

    split = cfg.data.sources[0].path if cfg.data.sources else cfg.data.train_dir
    try:
        sft = read_manifest(split).sft
    except Exception:  # noqa: BLE001 - an unreadable split (moved, remote) has no template to give
        return None, f"{split} is not readable here"
    if not sft:
        return None, f"{split} is not an SFT split: this model was not tuned"
    return ChatTemplate.from_dict(sft["chat_template"]), f"the template of {split}"


def json_lines(path: Path) -> Iterator[tuple[object, str]]:
    """(object, "file:line") of each non-blank line of a JSON Lines file; a bad line is an error naming it."""
    for lineno, line in enumerate(read_text(path).split("\n"), 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            yield json.loads(line), where
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: not valid JSON ({e.msg}); one conversation object per line") from None


def iter_conversations(paths: list[Path]) -> Iterator[Conversation]:
    """Every conversation of every JSON Lines file, in order; blank lines are skipped."""
    for path in paths:
        for obj, where in json_lines(path):
            yield parse_conversation(obj, where)


def parse_conversation(obj: object, where: str) -> Conversation:
    """A `{"prompt", "response"}` pair or a `{"messages": [...]}` list -> Conversation; errors name `where`."""
    if not isinstance(obj, dict) or not ("messages" in obj or {"prompt", "response"} <= obj.keys()):
        keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
        raise DataError(f'{where}: a conversation needs "prompt" and "response", or "messages" (found {keys})')
    if "messages" not in obj:
        pair = (("user", _text(obj, "prompt", where)), ("assistant", _text(obj, "response", where)))
        return Conversation(where, pair)
    msgs = obj["messages"]
    if not isinstance(msgs, list) or len(msgs) < 2:
        raise DataError(f'{where}: "messages" must be a list of at least two turns (a prompt and the answer)')
    out = []
    for i, m in enumerate(msgs):
        field = f"messages[{i}]"
        if not isinstance(m, dict):
            raise DataError(f'{where}: {field} must be an object with "role" and "content"')
        role = m.get("role")
        if role not in ROLES:
            raise DataError(f"{where}: {field}.role is {role!r}; use one of {', '.join(ROLES)}")
        if role == "system" and i > 0:
            raise DataError(f"{where}: {field} is a system turn; a system turn may only come first")
        out.append((role, _text(m, "content", where, field)))
    if out[-1][0] != "assistant":
        raise DataError(f"{where}: the last turn (messages[{len(msgs) - 1}]) is {out[-1][0]!r}; it must be the "
                        "assistant's answer, the sample's target")
    if all(role == "system" for role, _ in out[:-1]):
        raise DataError(f"{where}: no user turn before the answer; add the user's request")
    return Conversation(where, tuple(out))


def parse_chat_prompt(obj: object, where: str) -> tuple[Conversation, str | None]:
    """A conversation to answer (`unmask sample --chat-file`): the formats above, with the answer left out (a
    `{"prompt"}` line, or `"messages"` ending with the user's turn) or given (it is then the reference, not part
    of the prompt). Returns the conversation with a placeholder answer for `render`, and the reference."""
    if isinstance(obj, dict) and "prompt" in obj and "response" not in obj:
        return parse_conversation({**obj, "response": "-"}, where), None
    msgs = obj.get("messages") if isinstance(obj, dict) else None
    if isinstance(msgs, list) and msgs and isinstance(msgs[-1], dict) and msgs[-1].get("role") != "assistant":
        return parse_conversation({**obj, "messages": [*msgs, {"role": "assistant", "content": "-"}]}, where), None
    conv = parse_conversation(obj, where)
    return conv, conv.messages[-1][1]


def _text(obj: dict, key: str, where: str, field: str = "") -> str:
    name = f"{field}.{key}" if field else key
    value = obj.get(key)
    if not isinstance(value, str):
        raise DataError(f"{where}: {name} must be a string, found {type(value).__name__}")
    if not value.strip():
        raise DataError(f"{where}: {name} is empty; drop the line or fill it in")
    return value
