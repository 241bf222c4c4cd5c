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
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from unmask.data.documents import read_text
from unmask.errors import DataError

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class ChatTemplate:
    """Text around each turn; `{content}` marks the turn's text. `response_prefix` ends every prompt."""

    name: str
    system: str
    user: str
    assistant: str  # an earlier answer, which is part of the prompt
    response_prefix: str

    def to_dict(self) -> dict[str, str]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ChatTemplate:
        return cls(**{k: str(d[k]) for k in ("name", "system", "user", "assistant", "response_prefix")})


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
    turns = [getattr(template, role).replace("{content}", text) for role, text in conv.messages[:-1]]
    return "".join(turns) + template.response_prefix, conv.messages[-1][1]


def jinja_template(template: ChatTemplate) -> str:
    """`template` as a Hugging Face chat template (tokenizer_config.json "chat_template"): what `render` makes of
    the turns, after the tokenizer's bos_token, with `add_generation_prompt` adding the response prefix. Literal
    text is written as Jinja string literals, so no character of the template can be read as Jinja syntax."""

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
