"""What a trainer checkpoint holds, written without pickle and checked before it is trusted.

Writing: optimizer state and the RNG states (torch, CUDA, numpy, Python) are split
into tensors (safetensors) and plain JSON (:func:`flatten_optimizer`,
:func:`rng_state`); tuples and non-finite floats get tagged JSON (:func:`jsonable`).
Reading: the manifest proves a checkpoint is intact, not that this run wrote it;
anyone who can write the run directory can forge consistent hashes. So every
field the trainer restores is bounded first (:func:`check_trainer_checkpoint`,
:func:`check_optimizer_state`), and a forged or foreign one is one typed error.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeGuard

import numpy as np
import torch

from sourcefree.engine.checkpoints import Checkpoint
from sourcefree.errors import CheckpointError

TRAINER_FORMAT = "sourcefree-trainer-v1"
_MT_WORDS = 624  # Mersenne Twister state words (numpy and Python)
_CUDA_RNG = re.compile(r"^rng\.cuda\.\d{1,3}$")
#: Errors of restoring malformed state that verified (turned into a CheckpointError).
RESTORE_ERRORS = (KeyError, TypeError, ValueError, AttributeError, IndexError, RuntimeError)


# -- flattening (no pickle) ---------------------------------------------------------------


def jsonable(value: Any) -> Any:
    """``value`` as strict JSON: tuples and non-finite floats tagged (see :func:`unjson`).

    Raises:
        CheckpointError: a value that is neither JSON nor a tuple.
    """
    if isinstance(value, tuple):
        return {"__tuple__": [jsonable(v) for v in value]}
    if isinstance(value, list):
        return [jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, float) and not math.isfinite(value):
        return {"__float__": repr(value)}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise CheckpointError(
        f"cannot store a {type(value).__name__} in a checkpoint",
        "checkpoints hold tensors and plain JSON only (no pickle)",
        "report a bug",
    )


def unjson(value: Any) -> Any:
    """Inverse of :func:`jsonable`."""
    if isinstance(value, dict):
        if set(value) == {"__tuple__"}:
            return tuple(unjson(v) for v in value["__tuple__"])
        if set(value) == {"__float__"}:
            return float(value["__float__"])
        return {k: unjson(v) for k, v in value.items()}
    if isinstance(value, list):
        return [unjson(v) for v in value]
    return value


def flatten_optimizer(
    opt: torch.optim.Optimizer, prefix: str = "optim."
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer state dict into tensors and JSON (no pickle)."""
    state = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    per_param: dict[str, dict[str, Any]] = {}
    for pid, entries in state["state"].items():
        meta: dict[str, Any] = {}
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{prefix}{pid}.{key}"] = value
                meta[key] = {"__tensor__": True}
            else:
                meta[key] = jsonable(value)
        per_param[str(pid)] = meta
    return tensors, {"param_groups": jsonable(state["param_groups"]), "state": per_param}


def unflatten_optimizer(
    opt: torch.optim.Optimizer,
    tensors: Mapping[str, torch.Tensor],
    meta: Mapping[str, Any],
    prefix: str = "optim.",
    run_dir: Path | None = None,
) -> None:
    """Inverse of :func:`flatten_optimizer`, loaded into ``opt``, then checked.

    Raises:
        CheckpointError: the state is malformed or does not fit ``opt``'s parameters.
    """
    state: dict[int, dict[str, Any]] = {}
    try:
        for pid, entries in meta["state"].items():
            restored: dict[str, Any] = {}
            for key, value in entries.items():
                if value == {"__tensor__": True}:
                    restored[key] = tensors[f"{prefix}{pid}.{key}"]
                else:
                    restored[key] = unjson(value)
            state[int(pid)] = restored
        opt.load_state_dict({"state": state, "param_groups": unjson(meta["param_groups"])})
    except RESTORE_ERRORS as exc:
        why = f"its optimizer state does not load ({type(exc).__name__})"
        raise damaged_checkpoint(run_dir, why) from None
    check_optimizer_state(opt, run_dir)


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The global RNG states (torch, CUDA when in use, numpy, Python) as tensors and JSON."""
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    tensors["rng.numpy"] = torch.from_numpy(np.asarray(keys, dtype=np.int64))
    py = random.getstate()
    meta = {
        "numpy": [str(name), int(pos), int(has_gauss), float(gauss)],
        "python": [py[0], list(py[1]), py[2]],
    }
    return tensors, meta


def set_rng_state(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> None:
    """Inverse of :func:`rng_state` (check it first: :func:`check_trainer_checkpoint`)."""
    torch.set_rng_state(tensors["rng.torch"])
    cuda = sorted(k for k in tensors if k.startswith("rng.cuda."))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda])
    name, pos, has_gauss, gauss = meta["numpy"]
    keys = tensors["rng.numpy"].numpy().astype(np.uint32)
    np.random.set_state((name, keys, pos, has_gauss, gauss))
    version, internal, gauss_next = meta["python"]
    random.setstate((version, tuple(internal), gauss_next))


# -- checks before resume -----------------------------------------------------------------


class _DamagedError(Exception):
    """Internal: why a checkpoint's contents are refused."""


def damaged_checkpoint(run_dir: Path | None, why: str) -> CheckpointError:
    """The error for a checkpoint that verifies but cannot be this run's state."""
    where = f"in {str(run_dir)[:200]!r}" if run_dir is not None else "in the run directory"
    return CheckpointError(
        f"the checkpoint {where} is damaged or was not written by this run",
        why,
        "start again without --resume, in another --workdir (or delete this run directory)",
    )


def _is_int(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_num(value: Any) -> TypeGuard[int | float]:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _nums(value: Any, most: int) -> bool:
    return isinstance(value, list) and len(value) <= most and all(_is_num(v) for v in value)


def check_trainer_checkpoint(
    ckpt: Checkpoint, run_dir: Path | None, phases: Sequence[tuple[str, int, int]]
) -> None:
    """Refuse a trainer checkpoint whose contents do not fit this run.

    Args:
        ckpt: a checkpoint whose files verified.
        run_dir: the run directory (named in the error).
        phases: ``(name, epochs, steps per epoch)`` of every phase of this run.

    Raises:
        CheckpointError: a position, history, RNG state or sum is malformed or
            out of range.
    """
    meta = ckpt.meta
    try:
        if meta.get("format") != TRAINER_FORMAT:
            raise _DamagedError(f"its state is not a {TRAINER_FORMAT} state")
        spe = _check_position(meta.get("position"), phases)
        _check_history(meta.get("history"), phases)
        _check_rng(ckpt.tensors, meta.get("rng"))
        sums = meta.get("epoch_sums", {})
        if not isinstance(sums, dict) or not all(_nums(v, spe) for v in sums.values()):
            raise _DamagedError(f"its epoch sums are not lists of at most {spe} numbers")
        if not isinstance(meta.get("method", {}), dict):
            raise _DamagedError("its method state is not an object")
        opt = meta.get("optimizer")
        if opt is not None and not (
            isinstance(opt, dict)
            and isinstance(opt.get("state"), dict)
            and isinstance(opt.get("param_groups"), list)
        ):
            raise _DamagedError("its optimizer state is malformed")
    except _DamagedError as exc:
        raise damaged_checkpoint(run_dir, str(exc)) from None


def _check_position(position: Any, phases: Sequence[tuple[str, int, int]]) -> int:
    """Check the position; return the steps per epoch of its phase (0 past the last)."""
    keys = ("phase", "epoch", "step", "global_step")
    if not isinstance(position, dict) or not all(_is_int(position.get(k)) for k in keys):
        raise _DamagedError("its position is not four integers")
    phase, epoch, step, global_step = (position[k] for k in keys)
    if not 0 <= phase <= len(phases):
        raise _DamagedError(f"its phase index is outside 0..{len(phases)}")
    epochs, spe = phases[phase][1:] if phase < len(phases) else (0, 0)
    if not (0 <= epoch <= epochs and 0 <= step < max(spe, 1) and (epoch < epochs or step == 0)):
        raise _DamagedError(f"its epoch and step are outside {epochs} epochs of {spe} steps")
    if global_step != epoch * spe + step:
        raise _DamagedError("its global step does not match its epoch and step")
    return spe


def _check_history(history: Any, phases: Sequence[tuple[str, int, int]]) -> None:
    if not isinstance(history, list) or len(history) != len(phases):
        raise _DamagedError(f"its history does not list the {len(phases)} phases of this run")
    for log, (name, epochs, spe) in zip(history, phases, strict=True):
        if not isinstance(log, dict) or (
            log.get("name"),
            log.get("epochs"),
            log.get("steps_per_epoch"),
        ) != (name, epochs, spe):
            raise _DamagedError(f"its history does not describe phase {name!r} of this run")
        curve, metrics = log.get("loss_curve"), log.get("epoch_metrics")
        seconds, images = log.get("seconds"), log.get("images")
        well_formed = (
            isinstance(log.get("trains"), bool)
            and isinstance(log.get("done"), bool)
            and _nums(log.get("epoch_loss"), epochs)
            and isinstance(curve, list)
            and len(curve) <= epochs * spe
            and all(_nums(p, 2) and len(p) == 2 and _is_int(p[0]) for p in curve)
            and isinstance(metrics, list)
            and len(metrics) <= epochs
            and all(isinstance(m, dict) and _nums(list(m.values()), len(m)) for m in metrics)
            and _is_num(seconds)
            and seconds >= 0
            and _is_int(images)
            and images >= 0
        )
        if not well_formed:
            raise _DamagedError(f"its history of phase {name!r} holds malformed values")


def _check_rng(tensors: Mapping[str, torch.Tensor], meta: Any) -> None:
    state = tensors.get("rng.torch")
    if state is None or state.dtype != torch.uint8 or state.shape != torch.get_rng_state().shape:
        raise _DamagedError("its torch RNG state has the wrong type or length")
    keys = tensors.get("rng.numpy")
    if (
        keys is None
        or keys.dtype != torch.int64
        or tuple(keys.shape) != (_MT_WORDS,)
        or int(keys.min()) < 0
        or int(keys.max()) >= 1 << 32
    ):
        raise _DamagedError("its numpy RNG state has the wrong type, length or values")
    for name, value in tensors.items():
        if name.startswith("rng.cuda.") and (
            not _CUDA_RNG.match(name) or value.dtype != torch.uint8 or value.dim() != 1
        ):
            raise _DamagedError("its CUDA RNG state has the wrong type")
    np_state = meta.get("numpy") if isinstance(meta, dict) else None
    if not (
        isinstance(np_state, list)
        and len(np_state) == 4
        and np_state[0] == "MT19937"
        and _is_int(np_state[1])
        and 0 <= np_state[1] <= _MT_WORDS
        and np_state[2] in (0, 1)
        and _is_int(np_state[2])
        and _is_num(np_state[3])
    ):
        raise _DamagedError("its numpy RNG position is malformed")
    py = meta.get("python")
    if not (
        isinstance(py, list)
        and len(py) == 3
        and py[0] == random.Random.VERSION
        and isinstance(py[1], list)
        and len(py[1]) == _MT_WORDS + 1
        and all(_is_int(w) and 0 <= w < 1 << 32 for w in py[1])
        and py[1][-1] <= _MT_WORDS
        and (py[2] is None or _is_num(py[2]))
    ):
        raise _DamagedError("its Python RNG state is malformed")


def check_optimizer_state(opt: torch.optim.Optimizer, run_dir: Path | None = None) -> None:
    """Refuse optimizer state, just loaded into ``opt``, that does not fit its parameters.

    Each group's settings must build and step this optimizer (a probe on a
    spare tensor), and every per-parameter entry must hold exactly the keys the
    optimizer keeps, with tensors of the parameter's shape and dtype.

    Raises:
        CheckpointError: the state is malformed or belongs to other parameters.
    """
    try:
        for group in opt.param_groups:
            lr = group.get("lr")
            if not (_is_num(lr) and 0 <= lr < float("inf")):
                raise _DamagedError("its optimizer learning rate is not a finite number >= 0")
            expected = _probe_state(type(opt), group)
            for param in group["params"]:
                entries = opt.state.get(param, {})
                if entries and set(entries) != set(expected):
                    raise _DamagedError(
                        "its optimizer state has other entries than this optimizer's"
                    )
                for key, value in entries.items():
                    _check_entry(value, expected[key], param)
    except _DamagedError as exc:
        raise damaged_checkpoint(run_dir, str(exc)) from None


def _probe_state(
    kind: Callable[..., torch.optim.Optimizer], group: Mapping[str, Any]
) -> dict[str, str]:
    """The entries ``kind`` keeps per parameter: ``param``/``scalar`` tensors or ``value``."""
    probe = torch.zeros(2, requires_grad=True)
    settings = {k: v for k, v in group.items() if k != "params"}
    try:
        opt = kind([{**settings, "params": [probe]}])
        probe.grad = torch.zeros(2)
        opt.step()
    except (TypeError, ValueError, RuntimeError, KeyError) as exc:
        raise _DamagedError(f"its optimizer settings do not work ({type(exc).__name__})") from None
    out = {}
    for key, value in opt.state[probe].items():
        if not isinstance(value, torch.Tensor):
            out[key] = "value"
        else:
            out[key] = "scalar" if value.dim() == 0 else "param"
    return out


def _check_entry(value: Any, kind: str, param: torch.Tensor) -> None:
    if kind == "value":
        if value is not None and not _is_num(value):
            raise _DamagedError("its optimizer state holds a malformed value")
        return
    if not isinstance(value, torch.Tensor):
        raise _DamagedError("its optimizer state lacks a tensor")
    if kind == "param" and (value.shape != param.shape or value.dtype != param.dtype):
        raise _DamagedError(
            f"its optimizer state holds a {str(tuple(value.shape))[:60]} {value.dtype} "
            f"tensor for a {tuple(param.shape)} {param.dtype} parameter"
        )
    if kind == "scalar" and (
        value.dim() != 0 or not value.is_floating_point() or not 0 <= float(value) < float("inf")
    ):
        raise _DamagedError("its optimizer step counter is not a finite scalar >= 0")
