"""An imported model's own Hugging Face tokenizer as the run's tokenizer (`prepare-data --tokenizer FOLDER|.gguf`).

`adopt_hf_tokenizer` loads the checkpoint's tokenizer (a folder with tokenizer files, a tokenizer.json, or the
vocabulary inside a GGUF file), adds `<mask>` as a special token when it has none, and writes tokenizer.json and
tokenizer_config.json into the prepare-data output, where `HFTokenizer` reads them. The `<mask>` id is the
tokenizer's length before the addition: the embedding row unmask.model.hf.causal puts it in, so the shards' special
ids equal those `--init-from` derives from the checkpoint (and `init_from` refuses a mismatch).

Special ids: the tokenizer's own bos/eos/unk/pad; a missing bos, unk or pad takes eos's id (Qwen2 has no bos,
Llama 3 no unk, SmolLM2's pad is its eos). Padding with eos means the packer's tail padding and a document's end
share an id, so the loss ignores both; unmask packs documents across samples, so padding only ends a split.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

from unmask.data.fsutil import atomic_write_bytes, sha256_file
from unmask.data.special import SpecialTokens
from unmask.errors import DataError

MASK_PIECE = "<mask>"
FILES = ("tokenizer_config.json", "tokenizer.json")  # tokenizer.json last: it marks a complete write


def special_of(tok) -> SpecialTokens:
    """unmask's special ids of a transformers tokenizer: its mask token, else the id `<mask>` gets when added
    (len(tok)); bos, unk and pad fall back to eos."""
    eos = tok.eos_token_id
    if eos is None:
        raise DataError(f"the tokenizer {getattr(tok, 'name_or_path', '')!r} has no eos token; set eos_token in its "
                        "tokenizer_config.json")
    mask = tok.mask_token_id if tok.mask_token_id is not None else len(tok)
    ids = {"bos": tok.bos_token_id, "eos": eos, "pad": tok.pad_token_id, "unk": tok.unk_token_id, "mask": mask}
    return SpecialTokens.from_dict({k: eos if v is None else v for k, v in ids.items()})


def is_hf_source(path: str | Path) -> bool:
    """A Hugging Face tokenizer source (folder, tokenizer.json, GGUF) rather than a sentencepiece .model."""
    path = Path(path)
    return path.is_dir() or path.suffix in (".json", ".gguf")


def source_sha256(path: str | Path) -> str:
    """A digest of the tokenizer source for prepare-data's settings: the file, or a folder's tokenizer files."""
    import hashlib

    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    h = hashlib.sha256()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model"):
        if (path / name).is_file():
            h.update(name.encode() + bytes.fromhex(sha256_file(path / name)))
    return h.hexdigest()


def _load_source(path: Path):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    try:
        if path.suffix == ".json":
            return PreTrainedTokenizerFast(tokenizer_file=str(path), **_config_tokens(path.parent))
        if path.suffix == ".gguf":
            return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise DataError(f"--tokenizer {path}: no Hugging Face tokenizer there ({str(e).splitlines()[0]}); pass "
                        "a folder with tokenizer.json, a tokenizer.json, a .gguf or a sentencepiece .model") from None


def adopt_hf_tokenizer(source: str | Path, out_dir: str | Path) -> Path:
    """Write `source`'s tokenizer, with `<mask>` added when it has no mask token, as OUT/tokenizer.json and
    OUT/tokenizer_config.json; returns the tokenizer.json path."""
    tok = _load_source(Path(source))
    special = special_of(tok)
    if tok.mask_token_id is None:
        tok.add_special_tokens({"mask_token": MASK_PIECE})
        if tok.mask_token_id != special.mask:
            raise DataError(f"--tokenizer {source}: {MASK_PIECE} was added as id {tok.mask_token_id}, expected "
                            f"{special.mask} (the tokenizer's length); its vocabulary has holes")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".hf-tokenizer-") as tmp:
        tok.save_pretrained(tmp)
        for name in FILES:
            atomic_write_bytes(out_dir / name, (Path(tmp) / name).read_bytes())
    written = HFTokenizer(out_dir / "tokenizer.json")
    if written.special != special:
        raise DataError(f"--tokenizer {source}: special ids {special.to_dict()} became {written.special.to_dict()} "
                        "once saved; report this tokenizer")
    return out_dir / "tokenizer.json"


def _config_tokens(folder: Path) -> dict[str, str]:
    """bos/eos/unk/pad/mask token strings of a folder's tokenizer_config.json (strings or AddedToken dicts)."""
    file = folder / "tokenizer_config.json"
    config = json.loads(file.read_text()) if file.is_file() else {}
    out = {}
    for name in ("bos", "eos", "unk", "pad", "mask"):
        value = config.get(f"{name}_token")
        if isinstance(value, dict):
            value = value.get("content")
        if value is not None:
            out[f"{name}_token"] = value
    return out


class HFTokenizer:
    """The tokenizer.json `adopt_hf_tokenizer` wrote, with the interface of unmask.data.tokenizer.Tokenizer."""

    def __init__(self, path: str | Path):
        from transformers import PreTrainedTokenizerFast

        self.path = Path(path)
        if not self.path.is_file():
            raise DataError(f"tokenizer {self.path} does not exist; run `unmask prepare-data --tokenizer ...`")
        self.hf = PreTrainedTokenizerFast(tokenizer_file=str(self.path), **_config_tokens(self.path.parent))
        self.special = special_of(self.hf)
        if self.hf.mask_token_id is None:
            raise DataError(f"{self.path}: no mask token; write it with `unmask prepare-data --tokenizer SOURCE`")
        self.vocab_size = len(self.hf)
        self.sha256 = sha256_file(self.path)

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.hf.backend_tokenizer.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=False)

    def is_lossless_on(self, text: str) -> bool:
        return self.decode(self.encode(text)) == text


def copy_hf_tokenizer(path: str | Path, out_dir: str | Path) -> Path:
    """An adopted tokenizer's files into an export folder (its tokenizer.json is already Hugging Face's)."""
    src, out_dir = Path(path).parent, Path(out_dir)
    for name in FILES:
        shutil.copyfile(src / name, out_dir / name)
    return out_dir / "tokenizer.json"



def source_chat_template(path: str | Path) -> tuple[str | None, dict[str, str]]:
    """An imported tokenizer's own Jinja chat template (None when it has none) and its special token strings
    (bos_token, eos_token, ...: the variables `apply_chat_template` gives the template)."""
    tok = _load_source(Path(path))
    jinja = tok.chat_template
    if isinstance(jinja, dict):  # named templates (say "default" and "tool_use"): plain chat is the default one
        jinja = jinja.get("default")
    return jinja or None, {k: str(v) for k, v in tok.special_tokens_map.items() if isinstance(v, str)}
