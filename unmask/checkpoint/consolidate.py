"""Full fp32 weights from any unmask checkpoint, in the plain model's key names.

A checkpoint folder (or a run dir -> its newest checkpoint that matches its manifest) is verified first, then:
- LocalEngine: `engine/engine.pt`["model"];
- a LoRA run's (lora.rank > 0) base weights and adapters: merged into plain weights (unmask.model.lora.merge_lora);
- DeepSpeed: per tensor-parallel rank, the module state (`mp_rank_XX_model_states.pt`), or DeepSpeed's own
  `zero_to_fp32` over that rank's ZeRO partitions when the module holds no full fp32 copy (ZeRO-3 placeholders,
  bf16 weights with fp32 masters); pipeline stages from their `layer_XX-model_YY-model_states.pt` files, or in
  bf16 from each stage's ZeRO optimizer files (the fp32 masters). Activation checkpointing's wrapper prefix is
  dropped from names. Tensor shards are concatenated along the dimension unmask.parallel.tensor split them on.
With `weights` "auto" (the default) or "ema", a checkpoint with an EMA of the weights gives the EMA instead,
rebuilt from its per-rank files (unmask/checkpoint/ema_weights.py).
The result is checked against the model the saved config builds, so a wrong or partial checkpoint fails here,
with the path, rather than later.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn

from unmask.checkpoint.reshard import WRAPPED
from unmask.checkpoint.store import STEP_DIR, verify
from unmask.config import Config, load_config_text
from unmask.data.special import SpecialTokens
from unmask.errors import CheckpointError
from unmask.model.build import build_model
from unmask.model.lora import is_lora_state, merge_lora

_LAYER_FILE = re.compile(r"^layer_(\d+)-model_(\d+)-model_states\.pt$")
_MP_FILE = re.compile(r"mp_rank_(\d+)")


def resolve(path: str | Path) -> Path:
    """A step folder as given, or the newest `step-*` of a run dir / its checkpoints folder; verified against its
    manifest either way."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist; pass a run dir or a checkpoints/step-* folder")
    if (path / "manifest.json").exists() or STEP_DIR.match(path.name):
        problem = verify(path)
        if problem:
            raise CheckpointError(f"checkpoint {path} is unusable: {problem}; pick an earlier step-* folder")
        return path
    root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    steps = sorted((p for p in root.iterdir() if STEP_DIR.match(p.name)), reverse=True) if root.is_dir() else []
    for step in steps:
        problem = verify(step)
        if problem is None:
            return step
        warnings.warn(f"checkpoint {step} is unusable ({problem}); trying the previous one", stacklevel=2)
    raise CheckpointError(f"no complete checkpoint under {path} (looked for checkpoints/step-* folders that match "
                          "their manifest.json); train first or pass a checkpoint folder")


WEIGHTS = ("auto", "ema", "raw")


def load_checkpoint_weights(path: str | Path, masters: bool = True,
                            weights: str = "auto") -> tuple[Config, dict[str, torch.Tensor]]:
    """(the run's config, full fp32 state dict in plain keys) of a verified checkpoint. `masters=False` reads the
    module's own weights as DeepSpeed saved them instead (bf16 values in a bf16 run; not kept under ZeRO-3), which
    the fp32 masters must round to exactly. `weights`: "ema" the run's EMA of the weights (train.ema_decay > 0),
    "raw" the trained weights themselves, "auto" the EMA when the checkpoint has one, else raw."""
    from unmask.checkpoint.ema_weights import ema_state

    step = resolve(path)
    meta = json.loads((step / "meta.json").read_text())
    cfg = load_config_text(meta["config"], where=str(step / "meta.json"))
    ema = chosen_weights(step, weights) == "ema"
    if ema and not cfg.lora.rank:
        return cfg, _checked(ema_state(step, cfg), cfg, step)
    engine = step / "engine"
    if (engine / "engine.pt").is_file():
        state = torch.load(engine / "engine.pt", map_location="cpu", weights_only=True)["model"]
    else:
        state = _deepspeed_state(engine, cfg, masters)
    if ema:  # a LoRA run averaged its adapters only: the frozen base comes from the engine state
        state = {**state, **ema_state(step, cfg)}
    return cfg, _checked(state, cfg, step)


def chosen_weights(step: Path, weights: str) -> str:
    """"ema" or "raw": what `weights` ("auto", "ema", "raw") means for this (resolved) checkpoint."""
    from unmask.checkpoint.ema_weights import has_ema

    if weights not in WEIGHTS:
        raise ValueError(f"weights={weights!r}: use one of {WEIGHTS}")
    if weights == "ema" and not has_ema(step):
        raise CheckpointError(f"checkpoint {step} has no EMA of the weights (ema/ folder; the run had "
                              "train.ema_decay=0); load its raw weights (--raw-weights, weights=\"raw\")")
    return "ema" if weights != "raw" and has_ema(step) else "raw"


def _checked(state: dict, cfg: Config, step: Path) -> dict[str, torch.Tensor]:
    """fp32 copies, LoRA adapters merged (unmask.model.lora), tied output restored, keys and shapes equal to the
    model the config builds."""
    state = {k: v.detach().to(torch.float32) for k, v in state.items() if v is not None and "_extra_state" not in k}
    if is_lora_state(state):
        try:
            state = merge_lora(state, cfg)
        except ValueError as e:
            raise CheckpointError(f"checkpoint {step}: {e}; was it written by this unmask version?") from None
    if cfg.model.tie_embeddings and "tok_embeddings.weight" in state:
        state["output.weight"] = state["tok_embeddings.weight"]
    want = {k: tuple(v.shape) for k, v in build_model(cfg.model, device="meta").state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    if want != got:
        missing, extra = sorted(want.keys() - got.keys()), sorted(got.keys() - want.keys())
        shapes = [f"{k} {got[k]} != {want[k]}" for k in sorted(want.keys() & got.keys()) if got[k] != want[k]]
        raise CheckpointError(f"checkpoint {step}: weights do not fit its config (missing {missing[:3]}, "
                              f"unexpected {extra[:3]}, shapes {shapes[:3]}); was it written by this unmask version?")
    return state


# ------------------------------------------------------------------------------------------------ DeepSpeed


def _deepspeed_state(engine: Path, cfg: Config, masters: bool = True) -> dict[str, torch.Tensor]:
    if not engine.is_dir() or not any(engine.iterdir()):
        raise CheckpointError(f"{engine} holds no engine files (neither engine.pt nor DeepSpeed shards)")
    layer_files = [p for p in engine.iterdir() if _LAYER_FILE.match(p.name)]
    if layer_files:  # pipeline: mp_rank_XX files there number stages x tensor ranks, the layer files tensor ranks
        tp = 1 + max(int(_LAYER_FILE.match(p.name).group(2)) for p in layer_files)
    else:
        tp = len({m.group(1) for p in engine.glob("*model_states.pt") if (m := _MP_FILE.search(p.name))})
    if tp != cfg.parallel.tp:
        raise CheckpointError(f"{engine} holds {tp} tensor-parallel shards but its config says parallel.tp="
                              f"{cfg.parallel.tp}: the checkpoint is incomplete")
    shards = [_pipeline_rank(engine, r, cfg, masters) if layer_files else _rank_state(engine, r, masters)
              for r in range(tp)]
    return shards[0] if tp == 1 else _merge_tp(shards)


def _load(path: Path) -> dict:
    # DeepSpeed pickles its config and version objects next to the tensors: weights_only=False (own checkpoint).
    return torch.load(path, map_location="cpu", weights_only=False)


def _rank_state(engine: Path, mp: int, masters: bool = True) -> dict[str, torch.Tensor]:
    """One tensor-parallel rank's full (data-parallel gathered) module state."""
    files = sorted(engine.glob(f"*mp_rank_{mp:02d}_model_states.pt"))
    first = _load(files[0])
    stage = first.get("ds_config", {}).get("zero_optimization", {}).get("stage", 0)
    module = {k: v for k, v in (first.get("module") or {}).items() if v is not None}
    full_fp32 = stage < 3 and module and all(v.dtype == torch.float32 for v in module.values())
    if full_fp32 or (module and stage < 3 and not masters):
        return module
    state = _zero_to_fp32(engine, mp)
    if is_lora_state(module):  # a frozen base has no fp32 master: the module's own values are the ones trained with
        state = {**{k: v for k, v in module.items() if k not in state}, **state}
    return state


def _zero_to_fp32(engine: Path, mp: int, module_in_layer_files: bool = False) -> dict[str, torch.Tensor]:
    """DeepSpeed's zero_to_fp32 over this model-parallel rank's files only (it globs a whole folder), in the
    plain module's names: activation checkpointing wraps blocks before `deepspeed.initialize`, so DeepSpeed
    records `_checkpoint_wrapped_module.` in its parameter names. A pipeline stage keeps its module in layer
    files (`module` is None in its model-states file, which zero_to_fp32 cannot read): the view gets a copy
    of that small file with an empty module, since only its parameter shapes are needed."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with tempfile.TemporaryDirectory(prefix="unmask-zero-") as tmp:
        view = Path(tmp) / "engine"
        view.mkdir()
        for f in engine.iterdir():
            if f"mp_rank_{mp:02d}_" not in f.name:
                continue
            if module_in_layer_files and f.name.endswith("model_states.pt"):
                states = _load(f)
                torch.save({**states, "module": {}, "optimizer": None}, view / f.name)
            else:
                (view / f.name).symlink_to(f.resolve())
        try:
            # It prints summaries and progress bars; the export prints its own one line.
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                state = get_fp32_state_dict_from_zero_checkpoint(tmp, tag="engine")
        except Exception as e:  # noqa: BLE001 - any failure inside DeepSpeed means the shards do not fit together
            raise CheckpointError(f"{engine}: DeepSpeed could not gather the ZeRO partitions of model-parallel "
                                  f"rank {mp} ({type(e).__name__}: {e})") from None
    return {k.replace(WRAPPED, ""): v for k, v in state.items()}


def _pipeline_rank(engine: Path, tp_rank: int, cfg: Config, masters: bool = True) -> dict[str, torch.Tensor]:
    """One tensor-parallel rank's pipeline stages -> plain keys: layer 0 the embedding, 1..n the blocks, n+1 the
    norm and head. fp32 weights come from the layer files; bf16 runs' fp32 masters from the ZeRO optimizer files
    of each stage (DeepSpeed's model-parallel rank of stage s is s * tp + tp_rank)."""
    layers: dict[str, torch.Tensor] = {}
    for f in sorted(engine.iterdir()):
        m = _LAYER_FILE.match(f.name)
        if m and int(m.group(2)) == tp_rank:
            for k, v in torch.load(f, map_location="cpu", weights_only=True).items():
                if v is not None and "_extra_state" not in k:
                    layers[f"{int(m.group(1))}.{k}"] = v
    if masters and any(v.dtype != torch.float32 for v in layers.values()):
        tp = cfg.parallel.tp
        layers = {}
        for stage in range(cfg.parallel.pp):
            mp = stage * tp + tp_rank
            if not any(engine.glob(f"*mp_rank_{mp:02d}_optim_states.pt")):
                raise CheckpointError(f"{engine}: the {cfg.train.dtype} pipeline stage {stage} (tensor rank "
                                      f"{tp_rank}) has no optimizer files with its fp32 master weights; the "
                                      "checkpoint is incomplete")
            layers.update(_zero_to_fp32(engine, mp, module_in_layer_files=True))
    return {pipeline_plain_key(key, cfg.model.n_layers): v for key, v in layers.items()}


def pipeline_plain_key(key: str, n_layers: int) -> str:
    """A pipeline layer's parameter name "<layer index>.<name in the layer>" -> the plain model's: layer 0 is the
    embedding, 1..n_layers the blocks (`layers.<i-1>.`), n_layers + 1 the norm and head."""
    idx, _, k = key.partition(".")
    k = k.replace(WRAPPED, "")
    return f"layers.{int(idx) - 1}.{k.removeprefix('block.')}" if 1 <= int(idx) <= n_layers else k


def _merge_tp(shards: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Concatenate tensor-parallel shards: the inverse of the plan that split them."""
    with warnings.catch_warnings():  # megatron warns at import about optional GPU libraries
        warnings.simplefilter("ignore")
        from unmask.parallel.tensor import TP_PLAN, merge_tensor_parallel

    return merge_tensor_parallel(shards, TP_PLAN)


# ------------------------------------------------------------------------------------------------ for users


def find_tokenizer(cfg: Config) -> Path:
    """`cfg.tokenizer_path` (where prepare-data writes it), checked to exist."""
    path = cfg.tokenizer_path
    if not path.is_file():
        raise CheckpointError(f"tokenizer {path} (next to data.train_dir={cfg.data.train_dir}) does not exist; "
                              "restore the prepare-data output folder the run was trained on")
    return path


def special_tokens(cfg: Config) -> SpecialTokens:
    """The special ids in the training shards' manifest (unmask's defaults when the shards are gone)."""
    manifest = Path(cfg.data.train_dir) / "manifest.json"
    if manifest.is_file():
        return SpecialTokens.from_dict(json.loads(manifest.read_text())["special_tokens"])
    return SpecialTokens()


def load_model(path: str | Path, device: str | torch.device = "cpu",
               weights: str = "auto") -> tuple[Config, nn.Module, SpecialTokens, Path]:
    """(config, plain model in eval mode with the checkpoint's weights, special tokens, tokenizer.model path);
    `weights` as in load_checkpoint_weights."""
    cfg, state = load_checkpoint_weights(path, weights=weights)
    tokenizer = find_tokenizer(cfg)
    model = build_model(cfg.model, causal=cfg.causal, block_size=cfg.block_size, device=device)
    model.load_state_dict(state)
    return cfg, model.eval(), special_tokens(cfg), tokenizer
