"""User-facing errors: bad input that the CLI prints as one line (no traceback) and exits non-zero on."""


class UnmaskError(Exception):
    """Something the user can fix: say what was wrong, where (file, field, value) and how to fix it."""


class ConfigError(UnmaskError, ValueError):
    """A config problem: names the key, the value given and what is allowed."""


class DataError(UnmaskError):
    """A corpus, shard, manifest or tokenizer problem: names the file."""


class CheckpointError(UnmaskError):
    """A missing, corrupted or incompatible checkpoint: names the path."""
