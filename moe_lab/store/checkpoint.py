"""Checkpoints: safetensors for tensors, JSON for everything else, never pickle; written atomically.

A checkpoint is a directory ``checkpoints/step-00000100/`` holding ``model.safetensors``,
``optimizer.safetensors`` + ``optimizer.json``, ``state.json`` (step, tokens, data position, RNG
states, detector windows) and, written last, ``COMPLETE``. Everything is first written into a hidden
temporary directory that is renamed into place, so a crash mid-write leaves the previous checkpoints
intact and no partial one is ever listed.

A ``parallel.dp=fsdp2`` run never gathers its weights for a checkpoint: every rank writes its shards
of the weights and optimizer state with ``torch.distributed.checkpoint`` (DCP) into ``sharded/``
instead of the two safetensors files, inside the same temporary directory, before rank 0 adds the
rest and renames it. :func:`load_checkpoint` reads such a checkpoint's weights in one process, and
:func:`convert_checkpoint` (``moe-lab convert``) writes them out as ``model.safetensors``.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from moe_lab import checksums
from moe_lab.checksums import ChecksumError
from moe_lab.config import ConfigError, load_config
from moe_lab.data.tokenizer import load_tokenizer
from moe_lab.nn.model import build_model
from moe_lab.store.weights import WeightsMismatchError, load_weights

__all__ = [
    "capture_rng",
    "checkpoint_dir",
    "checkpoint_step",
    "convert_checkpoint",
    "drop_optimizer_states",
    "find_checkpoint",
    "has_optimizer_state",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "load_run",
    "read_json",
    "read_optimizer_state",
    "read_safetensors",
    "read_training_state",
    "restore_rng",
    "save_checkpoint",
    "staging_dir",
    "write_json",
    "write_safetensors",
]

_STEP_DIR = re.compile(r"step-(\d{8})")
MARKER = "COMPLETE"
SHARDED = "sharded"  # a sharded (FSDP2) checkpoint's directory (moe_lab.store.sharded_format)


def read_json(path: Path) -> object:
    """A JSON file's content; a missing, unreadable or damaged file is an error naming it."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}): damaged or cut short?") from None


def write_json(path: Path, obj: object) -> None:
    """Write ``obj`` as JSON atomically: readers see the old file or the new one, never a part."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    tmp.rename(path)


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Write ``tensors`` as one safetensors file atomically (see :func:`write_json`), its
    checksum recorded for :func:`read_safetensors`."""
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, tmp)
    tmp.rename(path)
    checksums.add(path)


def read_safetensors(path: Path, device="cpu") -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file the library wrote, checked: against its recorded
    checksum, readable, and finite (weights holding NaN or inf are refused, not evaluated).

    Raises:
        ChecksumError: the file is missing, damaged or cut short, or holds non-finite values.
    """
    path = Path(path)
    checksums.verify(path.parent, [path.name])
    try:
        tensors = load_file(path, device=str(device))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} does not exist") from None
    except (SafetensorError, OSError) as e:
        raise ChecksumError(f"{path} cannot be read ({e}): damaged or cut short?") from None
    bad = next(
        (k for k, v in tensors.items() if v.is_floating_point() and not v.isfinite().all()), None
    )
    if bad is not None:
        raise ChecksumError(f"{path} holds non-finite values (NaN or inf) in {bad}")
    return tensors


def checkpoint_dir(directory: Path, step: int) -> Path:
    """Where checkpoint ``step`` of a run's ``checkpoints`` directory lives."""
    return Path(directory) / f"step-{step:08d}"


def checkpoint_step(path: Path) -> int:
    """The step of checkpoint directory ``path`` (``step-00000100`` -> 100)."""
    return int(_STEP_DIR.fullmatch(Path(path).name).group(1))


def list_checkpoints(directory: Path) -> list[Path]:
    """Complete checkpoints in ``directory``, oldest first."""
    if not directory.is_dir():
        return []
    found = [
        p for p in directory.iterdir() if _STEP_DIR.fullmatch(p.name) and (p / MARKER).is_file()
    ]
    return sorted(found, key=checkpoint_step)


def latest_checkpoint(directory: Path) -> Path | None:
    found = list_checkpoints(directory)
    return found[-1] if found else None


def find_checkpoint(path: Path) -> Path | None:
    """``path`` if it is a complete checkpoint, else the latest one of the run directory ``path``
    (None when there is neither)."""
    return path if (path / MARKER).is_file() else latest_checkpoint(path / "checkpoints")


def capture_rng() -> tuple[dict, dict[str, torch.Tensor]]:
    """Python, numpy and torch (CPU and every CUDA device) RNG states as JSON + tensors."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    meta = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, keys.tolist(), pos, has_gauss, cached],
    }
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = state
    return meta, tensors


def restore_rng(meta: dict, tensors: dict[str, torch.Tensor]) -> None:
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda.")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def _optimizer_parts(sd: dict) -> tuple[dict, dict[str, torch.Tensor]]:
    """Split an optimizer state dict into JSON (groups, scalars) and tensors."""
    tensors, scalars = {}, {}
    for pid, state in sd["state"].items():
        for name, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{pid}.{name}"] = value.detach().contiguous()
            else:
                scalars[f"{pid}.{name}"] = value
    return {"param_groups": sd["param_groups"], "scalars": scalars}, tensors


def _optimizer_state(meta: dict, tensors: dict[str, torch.Tensor]) -> dict:
    state: dict[int, dict] = {}
    for key, value in [*tensors.items(), *meta["scalars"].items()]:
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def staging_dir(directory: Path, step: int, create: bool = False) -> Path:
    """The hidden directory checkpoint ``step`` is written into before it is renamed into place;
    with ``create``, a new empty one (any leftover of an interrupted write is removed)."""
    tmp = directory / f".tmp-step-{step:08d}"
    if create:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    return tmp


def save_checkpoint(
    directory: Path,
    step: int,
    model: torch.nn.Module | None,
    optimizer: torch.optim.Optimizer | dict | None,
    state: dict,
    keep: int,
    weights: dict[str, torch.Tensor] | None = None,
    staged: bool = False,
) -> Path:
    """Write checkpoint ``step`` atomically; keep only the newest ``keep`` complete checkpoints.

    ``state`` must be JSON-serialisable; RNG states are added here. ``weights`` replaces
    ``model.state_dict()`` and a state dict may stand for ``optimizer``: the full tensors gathered
    from the ranks of a sharded run (moe_lab.train.distributed). With ``staged``, the ranks have
    already written the sharded weights and optimizer state into :func:`staging_dir` (``model`` and
    ``optimizer`` are then None).
    """
    directory.mkdir(parents=True, exist_ok=True)
    final = checkpoint_dir(directory, step)
    tmp = staging_dir(directory, step, create=not staged)
    try:
        if model is not None:
            weights = weights if weights is not None else model.state_dict()
            weights = {k: v.detach().contiguous() for k, v in weights.items()}
            save_file(weights, tmp / "model.safetensors")
        rng_meta, rng_tensors = capture_rng()
        if optimizer is not None:
            if isinstance(optimizer, torch.optim.Optimizer):
                optimizer = optimizer.state_dict()
            opt_meta, opt_tensors = _optimizer_parts(optimizer)
            save_file(opt_tensors, tmp / "optimizer.safetensors")
            (tmp / "optimizer.json").write_text(json.dumps(opt_meta))
        save_file(rng_tensors, tmp / "rng.safetensors")
        (tmp / "state.json").write_text(json.dumps({**state, "rng": rng_meta}))
        checksums.record(tmp)
        (tmp / MARKER).write_text(str(step))
        _fsync_dir(tmp)
        if final.exists():  # a re-run of the same step replaces its older copy
            shutil.rmtree(final)
        tmp.rename(final)
        _fsync_dir(directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(directory)[:-keep]:
        shutil.rmtree(old)
    return final


def load_checkpoint(
    path: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    restore_rng_state: bool = True,
) -> dict:
    """Load weights (and optimizer and RNG state) from checkpoint ``path``; return its state dict.

    Raises:
        FileNotFoundError: ``path`` is not a complete checkpoint.
        WeightsMismatchError: the weights do not fit ``model``.
    """
    _require_complete(path)
    device = next(model.parameters()).device
    if (path / "model.safetensors").is_file():
        weights = read_safetensors(path / "model.safetensors", device)
        load_weights(model, weights, source=str(path / "model.safetensors"), assign=False)
    else:
        checksums.verify(path)
        model.load_state_dict(_sharded_weights(path, model))
    if optimizer is not None:
        optimizer.load_state_dict(read_optimizer_state(path))
    return read_training_state(path, restore_rng_state)


def has_optimizer_state(path: Path) -> bool:
    """Whether checkpoint ``path`` holds an optimizer state (``train.keep_optimizer=false`` drops
    it once a run has finished)."""
    return (path / "optimizer.json").is_file()


def read_optimizer_state(path: Path) -> dict:
    """The optimizer state dict of checkpoint ``path``, on CPU (the optimizer moves its moments
    to their parameters when it loads them)."""
    _require_complete(path)
    if not has_optimizer_state(path):
        raise ConfigError(
            f"{path} holds no optimizer state (its run finished with train.keep_optimizer=false): "
            "it can be evaluated, exported or branched from with train.init_from, not resumed"
        )
    checksums.verify(path, ["optimizer.json"])
    return _optimizer_state(
        read_json(path / "optimizer.json"), read_safetensors(path / "optimizer.safetensors")
    )


def drop_optimizer_states(directory: Path) -> None:
    """Delete the optimizer state of every checkpoint in ``directory`` (``train.keep_optimizer=
    false``); the weights, RNG and training state stay. Sharded checkpoints keep theirs: there
    it is interleaved with the weights."""
    names = ("optimizer.safetensors", "optimizer.json")
    for checkpoint in list_checkpoints(directory):
        checksums.forget(checkpoint, names)
        # The JSON half goes last: a checkpoint has optimizer state exactly while it is there.
        for name in names:
            (checkpoint / name).unlink(missing_ok=True)


def read_training_state(path: Path, restore_rng_state: bool = True) -> dict:
    """Checkpoint ``path``'s ``state.json`` (step, data position, ...); optionally restore RNGs."""
    _require_complete(path)
    checksums.verify(path, ["state.json"])
    state = read_json(path / "state.json")
    if restore_rng_state:
        restore_rng(state["rng"], read_safetensors(path / "rng.safetensors"))
    return state


def _sharded_weights(path: Path, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The full weights of a sharded checkpoint, read by this process alone, shaped by ``model``."""
    # DCP takes ~0.6 s to import, and only sharded checkpoints need it: not at start-up.
    from torch.distributed.checkpoint.api import CheckpointException

    from moe_lab.store.sharded import UnsafeCheckpointError
    from moe_lab.store.sharded_format import load_sharded

    if not (path / SHARDED).is_dir():
        raise FileNotFoundError(f"{path} has neither model.safetensors nor {SHARDED}/")
    template = {"model": {k: torch.empty_like(v) for k, v in model.state_dict().items()}}
    try:
        load_sharded(template, path / SHARDED, no_dist=True)
    except UnsafeCheckpointError:
        raise
    except (Exception, CheckpointException) as e:  # DCP reports a mismatch deep in its planner
        raise WeightsMismatchError(f"{path / SHARDED} does not fit the model: {e}") from e
    return template["model"]


def convert_checkpoint(path: Path | str) -> Path:
    """Write a sharded checkpoint's weights as ``model.safetensors`` next to them; return it.

    ``path`` is a checkpoint directory or a run directory (its latest checkpoint).
    """
    found = find_checkpoint(Path(path))
    if found is None:
        raise FileNotFoundError(f"{path} is neither a checkpoint nor a run with one")
    path, out = found, found / "model.safetensors"
    if out.is_file():
        return out
    config = path.parent.parent / "config.yaml"
    if not config.is_file():
        raise FileNotFoundError(f"{config} (the run's config, for the model's shape) is missing")
    model = build_model(load_config(config).model, device="meta").to_empty(device="cpu")
    write_safetensors(out, _sharded_weights(path, model))
    return out


def _require_complete(path: Path) -> None:
    if not (path / MARKER).is_file():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no {MARKER} marker)")


def load_run(run_dir: Path | str, overrides: list[str] | tuple[str, ...] = (), device="cpu"):
    """The config, model (latest checkpoint, eval mode) and tokenizer of a training run.

    Args:
        run_dir: a directory written by ``moe-lab train``.
        overrides: ``key=value`` changes to the saved config (e.g. other ``data.valid_files``).
    """
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise FileNotFoundError(f"{run_dir} is not a run directory: no config.yaml")
    ckpt = latest_checkpoint(run_dir / "checkpoints")
    if ckpt is None:
        raise FileNotFoundError(f"{run_dir} has no complete checkpoint yet")
    cfg = load_config(run_dir / "config.yaml", overrides)
    model = build_model(cfg.model, device=device)
    load_checkpoint(ckpt, model, restore_rng_state=False)
    return cfg, model.eval(), load_tokenizer(run_dir / "tokenizer")
