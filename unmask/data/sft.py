"""SFT shards (`prepare-data --format chat`): one conversation per sample, its prompt marked.

A sample, as LLaDA's GUIDELINES.md lays it out: `<bos> prompt response <eos> <eos> ...`, padded with <eos> (not
<pad>) to `seq_len`. Its prompt mask is True on <bos> and the prompt, False on the response and every <eos>
after it: the padding <eos> are part of the response, so the model learns where an answer ends. Two
conversations never share a sample. The manifest's token counts therefore include the padding <eos>: all are trained.

A conversation longer than `seq_len` is refused (`--sft-overflow refuse`, the default: the error names the line)
or has its response cut to fit (`truncate`; no <eos> then, since the answer did not end). The prompt is never
cut: a prompt that leaves no room for a response is refused in both modes.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
from tqdm import tqdm

from unmask.data.chat import DEFAULT_TEMPLATE, ChatTemplate, Conversation, iter_conversations, render
from unmask.data.documents import JSONL_SUFFIXES, document_digest
from unmask.data.hf_tokenizer import HFTokenizer
from unmask.data.shards import Manifest, SplitWriter, token_dtype
from unmask.data.special import SpecialTokens
from unmask.data.tokenizer import Tokenizer
from unmask.errors import DataError

OVERFLOW = ("refuse", "truncate")


def sft_sample(prompt: np.ndarray, response: np.ndarray, *, seq_len: int, special: SpecialTokens,
               overflow: str = "refuse", where: str = "") -> tuple[np.ndarray, np.ndarray]:
    """(tokens [seq_len], prompt_mask bool [seq_len]) of one conversation's prompt and response ids."""
    n_prompt = 1 + len(prompt)  # with <bos>
    need = n_prompt + len(response) + 1  # with the closing <eos>
    if n_prompt >= seq_len:
        raise DataError(f"{where}: the prompt alone is {n_prompt} tokens (with <bos>), leaving no room for the "
                        f"response in --seq-len {seq_len}; prompts are never cut: raise --seq-len or drop the line")
    if need > seq_len:
        if overflow != "truncate":
            raise DataError(f"{where}: the conversation is {need} tokens (with <bos> and <eos>), more than --seq-len "
                            f"{seq_len}; raise --seq-len, drop the line, or pass --sft-overflow truncate to cut "
                            "its response")
        response = response[: seq_len - n_prompt]
    tokens = np.full(seq_len, special.eos, dtype=np.result_type(prompt.dtype, response.dtype))
    tokens[0] = special.bos
    tokens[1:n_prompt] = prompt
    tokens[n_prompt : n_prompt + len(response)] = response
    mask = np.zeros(seq_len, dtype=bool)
    mask[:n_prompt] = True
    return tokens, mask


def conversation_texts(files: list[Path], template: ChatTemplate = DEFAULT_TEMPLATE) -> Iterator[str]:
    """Each conversation as rendered text (prompt + response): what the scan hashes for the split and samples
    tokenizer lines from."""
    for conv in _conversations(files):
        prompt, response = render(conv, template)
        yield prompt + response


def write_sft_splits(out: Path, files: list[Path], tok: Tokenizer | HFTokenizer, is_val, *, seq_len: int, overflow: str,
                     shard_bytes: int, total_bytes: int, progress: bool,
                     template: ChatTemplate = DEFAULT_TEMPLATE) -> dict[str, Manifest]:
    """Encode every conversation and write OUT/train and OUT/val; `is_val(digest)` is the scan's split.
    Encoding is in-process: SFT sets are small next to pretraining corpora."""
    sft = dict(chat_template=template.to_dict(), overflow=overflow, response_padding="eos")
    writers = {s: SplitWriter(out / s, split=s, seq_len=seq_len, vocab_size=tok.vocab_size, special=tok.special,
                              tokenizer_sha256=tok.sha256, cross_document=False, shard_bytes=shard_bytes, sft=sft)
               for s in ("train", "val")}
    dtype = token_dtype(tok.vocab_size)
    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="tokenize", disable=not progress,
               dynamic_ncols=True)
    truncated = 0
    for conv in _conversations(files):
        prompt, response = render(conv, template)
        text = prompt + response
        p_ids, r_ids = tok.encode_batch([prompt, response])
        tokens, mask = sft_sample(np.asarray(p_ids, dtype), np.asarray(r_ids, dtype), seq_len=seq_len,
                                  special=tok.special, overflow=overflow, where=conv.where)
        truncated += len(p_ids) + len(r_ids) + 2 > seq_len
        writer = writers["val" if is_val(document_digest(text)) else "train"]
        writer.write(tokens, mask)
        writer.num_documents += 1
        bar.update(len(text.encode("utf-8", "surrogatepass")))
    bar.close()
    if truncated:
        print(f"--sft-overflow truncate: cut the response of {truncated} conversation(s) to --seq-len {seq_len}")
    return {s: w.close() for s, w in writers.items()}


def _conversations(files: list[Path]) -> Iterator[Conversation]:
    for f in files:
        if f.suffix.lower() not in JSONL_SUFFIXES:
            raise DataError(f"{f}: --format chat reads JSON Lines (.jsonl/.json) of conversations; leave it out or "
                            "prepare it with --format text")
    return iter_conversations(files)
