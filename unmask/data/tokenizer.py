"""SentencePiece tokenizer with lossless settings and unmask's special-token ids, plus HF export.

sentencepiece's defaults normalise text (NFKC, collapsed spaces, a dummy leading space), so decode(encode(x))
is not x. The settings below keep text byte-exact (shared/DATA.md): identity normalisation, no whitespace
clean-up, no dummy prefix, and byte fallback so that any character outside the vocabulary becomes its
UTF-8 bytes rather than `<unk>`. Ids 0-4 are pad, unk, bos, eos, `<mask>` (`SpecialTokens`); pad/bos/eos
are control symbols (never produced from text), `<mask>` is a user-defined symbol (a literal "<mask>"
in the text encodes to it and decodes back to the same characters).
"""

from __future__ import annotations

import io
import random
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

import sentencepiece as spm

from unmask.data.fsutil import atomic_write_bytes, sha256_file
from unmask.data.special import SpecialTokens
from unmask.errors import DataError

MAX_LINE_CHARS = 8192  # longer training lines are cut: sentencepiece silently drops over-long lines

LOSSLESS = dict(
    normalization_rule_name="identity",
    remove_extra_whitespaces=False,
    add_dummy_prefix=False,
    byte_fallback=True,
    character_coverage=1.0,
    allow_whitespace_only_pieces=True,
    max_sentence_length=4 * MAX_LINE_CHARS,  # bytes
)
SPECIAL = SpecialTokens()
SPECIAL_ARGS = dict(
    pad_id=SPECIAL.pad, unk_id=SPECIAL.unk, bos_id=SPECIAL.bos, eos_id=SPECIAL.eos,
    pad_piece="<pad>", unk_piece="<unk>", bos_piece="<bos>", eos_piece="<eos>",
    user_defined_symbols=["<mask>"],  # placed right after the control ids, i.e. id 4
)


class Tokenizer:
    """A loaded sentencepiece model whose special ids have been checked against `SpecialTokens`."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise DataError(f"tokenizer {self.path} does not exist; run `unmask prepare-data` or pass --tokenizer")
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(self.path))
        except (RuntimeError, OSError) as e:
            raise DataError(f"{self.path}: not a sentencepiece model ({e})") from None
        self.special = SPECIAL
        for name, want in self.special.to_dict().items():
            piece = SpecialTokens.PIECES[name]
            got = self.sp.piece_to_id(piece)
            if got != want or self.sp.id_to_piece(want) != piece:
                raise DataError(
                    f"{self.path}: special token {piece} has id {got}, unmask needs {want}; "
                    "use a tokenizer trained by `unmask prepare-data`"
                )
        self.vocab_size = self.sp.get_piece_size()
        self.sha256 = sha256_file(self.path)

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.sp.encode(texts)

    def decode(self, ids: Iterable[int]) -> str:
        return self.sp.decode([int(i) for i in ids])

    def is_lossless_on(self, text: str) -> bool:
        return self.decode(self.encode(text)) == text


def sample_lines(docs: Iterable[str], max_lines: int, seed: int) -> list[str]:
    """A uniform, seeded sample of at most `max_lines` non-empty lines (reservoir sampling): bounded
    memory whatever the corpus size, and the same sample for the same corpus and seed."""
    rng = random.Random(seed)
    sample: list[str] = []
    seen = 0
    for doc in docs:
        for line in doc.split("\n"):
            if not line.strip():
                continue
            line = line[:MAX_LINE_CHARS]
            seen += 1
            if len(sample) < max_lines:
                sample.append(line)
            else:
                j = rng.randrange(seen)
                if j < max_lines:
                    sample[j] = line
    return sample


def train_tokenizer(
    lines: list[str], out_path: Path, *, vocab_size: int, model_type: str = "bpe", seed: int = 0,
    num_threads: int = 1,
) -> Tokenizer:
    """Train on `lines` and write the model atomically to `out_path`."""
    if model_type not in ("bpe", "unigram"):
        raise DataError(f"tokenizer type {model_type!r} is not supported; use bpe or unigram")
    minimum = 5 + 256 + 1  # specials, byte fallback, at least one learned piece
    if vocab_size < minimum:
        raise DataError(f"--vocab-size {vocab_size} is too small: byte fallback needs at least {minimum}")
    if not lines:
        raise DataError("no training text for the tokenizer: every training document is empty")
    spm.set_random_generator_seed(seed)
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_writer=model, model_type=model_type, vocab_size=vocab_size,
            num_threads=num_threads, minloglevel=2, **LOSSLESS, **SPECIAL_ARGS,
        )
    except RuntimeError as e:
        raise DataError(
            f"sentencepiece could not train a {vocab_size}-piece {model_type} vocabulary on {len(lines)} "
            f"lines ({str(e).strip()}); change --vocab-size (see the hint) or add text"
        ) from None
    atomic_write_bytes(out_path, model.getvalue())
    return Tokenizer(out_path)


def export_hf_tokenizer(model_path: str | Path, out_dir: str | Path) -> Path:
    """Write `tokenizer.json` (and `tokenizer_config.json`) for Hugging Face into `out_dir`; returns the
    tokenizer.json path. Ids equal sentencepiece's for BPE models. An imported model's tokenizer.json
    (`prepare-data --tokenizer FOLDER`, hf_tokenizer.py) is copied as it is. Two known differences: a literal
    "<pad>"/"<bos>"/"<eos>"/"<unk>" in text is parsed as that special token by HF (sentencepiece spells
    it out), and unigram models can split differently where two segmentations score exactly the same.
    """
    from transformers import TokenizersBackend  # slow import, only needed here

    if Path(model_path).suffix == ".json":
        from unmask.data.hf_tokenizer import copy_hf_tokenizer

        return copy_hf_tokenizer(model_path, out_dir)
    tok = Tokenizer(model_path)  # checks the special ids first
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".hf-export-") as tmp:
        src = Path(tmp) / "src"
        src.mkdir()
        shutil.copyfile(tok.path, src / "tokenizer.model")  # the converter reads <dir>/tokenizer.model
        pieces = {name: SpecialTokens.PIECES[name] for name in ("pad", "unk", "bos", "eos", "mask")}
        hf = TokenizersBackend.from_pretrained(str(src), **{f"{k}_token": v for k, v in pieces.items()})
        for name, piece in pieces.items():
            if hf.convert_tokens_to_ids(piece) != getattr(tok.special, name):
                raise DataError(f"{model_path}: HF conversion gave {piece} id {hf.convert_tokens_to_ids(piece)}")
        saved = Path(tmp) / "out"
        hf.save_pretrained(str(saved))
        for name in ("tokenizer_config.json", "tokenizer.json"):  # tokenizer.json last: it marks completion
            atomic_write_bytes(out_dir / name, (saved / name).read_bytes())
    return out_dir / "tokenizer.json"
