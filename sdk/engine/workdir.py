"""Private run directory: lock, run identity, atomic checkpoints, cleanup.

Layout (mode 0700)::

    WORKDIR/
      lock                 fcntl.flock'ed by the running process (holds its pid)
      run.json             identity: method, config, dataset fingerprint, source sha256s
      checkpoints/
        ckpt-00000007/     state.safetensors, state.json, MANIFEST.json (sha256 of both)
        ckpt-00000008/

A checkpoint is written into a hidden temporary directory (each file fsynced),
then renamed into place and the parent fsynced; ``MANIFEST.json`` is written
last. The newest two are kept. Loading verifies the manifest and falls back to
the previous checkpoint with a warning when the newest is damaged. No pickle:
tensors go to safetensors, everything else to strict JSON.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import random
import re
import secrets
import shutil
import stat
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, TypeGuard

import torch

from sourcefree.errors import CheckpointError, ResumeError, WorkdirError
from sourcefree.fsutil import atomic_write_bytes, fsync_dir
from sourcefree.package import strictjson

LOCK_NAME = "lock"
IDENTITY_NAME = "run.json"
CHECKPOINTS = "checkpoints"
TENSORS_NAME = "state.safetensors"
META_NAME = "state.json"
MANIFEST_NAME = "MANIFEST.json"
KEEP = 2
MAX_META_BYTES = 256 * 1024 * 1024
#: Largest checkpoint file read back (model weights, optimizer state, queues).
MAX_FILE = 64 * 1024 * 1024 * 1024
_CKPT_RE = re.compile(r"^ckpt-(\d{8})$")


@dataclass(frozen=True)
class Checkpoint:
    """A verified checkpoint read back from disk."""

    sequence: int
    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any]


def _write_file(path: Path, data: bytes) -> None:
    """Write and fsync one new file (raises OSError on a full disk)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_bounded(path: Path, limit: int) -> bytes:
    """A regular file's bytes; ValueError when it holds more than ``limit`` (nothing read)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > limit:
            raise ValueError(f"{path.name} is not a regular file of at most {limit} bytes")
        with os.fdopen(os.dup(fd), "rb") as fh:
            return fh.read(st.st_size)
    finally:
        os.close(fd)


class Workdir:
    """A private, locked run directory. Use as a context manager.

    Args:
        path: the directory; created with mode 0700 when missing.

    Raises:
        WorkdirError: it cannot be created, is not a private directory, or
            another run holds its lock.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path).absolute()
        self._lock_fd: int | None = None
        self._sequence = 0

    # -- lifecycle --------------------------------------------------------------------

    def open(self) -> Workdir:
        try:
            self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
            st = os.lstat(self.path)
        except OSError as exc:
            raise WorkdirError(
                f"cannot create the run directory {str(self.path)!r}",
                exc.strerror or str(exc),
                "pass a writable --workdir",
            ) from None
        if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
            raise WorkdirError(
                f"run directory {str(self.path)!r} is not a directory",
                "a link or a file cannot hold private checkpoints",
                "pass another --workdir",
            )
        if st.st_uid != os.getuid():
            raise WorkdirError(
                f"run directory {str(self.path)!r} belongs to another user",
                "checkpoints must stay private to the user running the adaptation",
                "pass a --workdir you own",
            )
        os.chmod(self.path, 0o700)
        fd = os.open(self.path / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise WorkdirError(
                    f"run directory {str(self.path)!r} is in use by another run (pid {holder})",
                    "two runs must not write the same checkpoints",
                    "wait for the other run to finish, or pass another --workdir",
                ) from None
            raise WorkdirError(
                f"cannot lock the run directory {str(self.path)!r}", str(exc), ""
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd
        (self.path / CHECKPOINTS).mkdir(mode=0o700, exist_ok=True)
        self._clean_temporaries()
        existing = self._sequences()
        self._sequence = existing[-1] if existing else 0
        return self

    def close(self) -> None:
        """Release the lock (the directory stays)."""
        if self._lock_fd is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    def remove(self) -> None:
        """Release the lock and delete the directory with everything in it."""
        self.close()
        shutil.rmtree(self.path, ignore_errors=True)

    def __enter__(self) -> Workdir:
        return self.open()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- identity -----------------------------------------------------------------------

    def read_identity(self) -> dict[str, Any] | None:
        """The identity of the run that wrote this directory, or None."""
        path = self.path / IDENTITY_NAME
        if not path.exists():
            return None
        try:
            value = strictjson.loads(path.read_bytes(), what=IDENTITY_NAME, max_bytes=1 << 24)
        except Exception as exc:
            raise ResumeError(
                f"{IDENTITY_NAME} in the run directory is unreadable",
                str(exc),
                "start a fresh run in another --workdir",
            ) from None
        if not isinstance(value, dict):
            raise ResumeError(f"{IDENTITY_NAME} is not an object", "", "start a fresh run")
        return value

    def write_identity(self, identity: Mapping[str, Any]) -> None:
        """Record the run's identity (atomic)."""
        self._guard_write(
            lambda: atomic_write_bytes(
                self.path / IDENTITY_NAME, strictjson.dumps(dict(identity)), mode=0o600
            )
        )

    # -- checkpoints -------------------------------------------------------------------

    def _sequences(self) -> list[int]:
        out = []
        root = self.path / CHECKPOINTS
        if root.is_dir():
            for entry in os.scandir(root):
                match = _CKPT_RE.match(entry.name)
                if match and entry.is_dir(follow_symlinks=False):
                    out.append(int(match.group(1)))
        return sorted(out)

    def _clean_temporaries(self) -> None:
        root = self.path / CHECKPOINTS
        for entry in os.scandir(root):
            if entry.name.startswith(".tmp-"):
                shutil.rmtree(entry.path, ignore_errors=True)

    def has_checkpoints(self) -> bool:
        return bool(self._sequences())

    def _guard_write(self, action: Any) -> None:
        try:
            action()
        except OSError as exc:
            reason = "the disk is full" if exc.errno == errno.ENOSPC else "an I/O error occurred"
            raise CheckpointError(
                f"could not write to the run directory {str(self.path)!r} ({exc.strerror or exc})",
                f"{reason}; nothing was half-written and the previous checkpoint is intact",
                "free disk space (or pass a --workdir on another disk), then run again "
                "with --resume",
            ) from None

    def save_checkpoint(self, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> Path:
        """Write a new checkpoint atomically and keep the newest :data:`KEEP`.

        Raises:
            CheckpointError: a write failed (full disk, I/O error). The temporary
                directory is removed and earlier checkpoints are untouched.
        """
        from safetensors.torch import save as save_safetensors

        sequence = self._sequence + 1
        root = self.path / CHECKPOINTS
        final = root / f"ckpt-{sequence:08d}"
        tmp = root / f".tmp-{sequence:08d}-{secrets.token_hex(4)}"
        plain = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
        blob = save_safetensors(plain)
        meta_bytes = strictjson.dumps({"sequence": sequence, **dict(meta)})
        manifest = {
            "format": "sourcefree-checkpoint-v1",
            "sequence": sequence,
            "files": {
                TENSORS_NAME: {"size": len(blob), "sha256": hashlib.sha256(blob).hexdigest()},
                META_NAME: {
                    "size": len(meta_bytes),
                    "sha256": hashlib.sha256(meta_bytes).hexdigest(),
                },
            },
        }

        def write() -> None:
            try:
                os.mkdir(tmp, 0o700)
                _write_file(tmp / TENSORS_NAME, blob)
                _write_file(tmp / META_NAME, meta_bytes)
                _write_file(tmp / MANIFEST_NAME, strictjson.dumps(manifest))
                fsync_dir(tmp)
                os.replace(tmp, final)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            fsync_dir(root)

        self._guard_write(write)
        self._sequence = sequence
        for old in self._sequences()[:-KEEP]:
            shutil.rmtree(root / f"ckpt-{old:08d}", ignore_errors=True)
        return final

    def _read(self, sequence: int) -> Checkpoint:
        from safetensors.torch import load as load_safetensors

        folder = self.path / CHECKPOINTS / f"ckpt-{sequence:08d}"
        manifest = strictjson.loads(
            _read_bounded(folder / MANIFEST_NAME, 1 << 20), what=MANIFEST_NAME, max_bytes=1 << 20
        )
        if (
            not isinstance(manifest, dict)
            or manifest.get("format") != "sourcefree-checkpoint-v1"
            or manifest.get("sequence") != sequence
        ):
            raise ValueError("the checkpoint manifest is not the one of this checkpoint")
        files = manifest.get("files")
        if not isinstance(files, dict) or set(files) != {TENSORS_NAME, META_NAME}:
            raise ValueError("the checkpoint manifest lists the wrong files")
        blobs = {}
        for name, entry in files.items():
            size = entry.get("size") if isinstance(entry, dict) else None
            if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= MAX_FILE:
                raise ValueError(f"the manifest gives {name} no valid size")
            data = _read_bounded(folder / name, size)
            if len(data) != size or hashlib.sha256(data).hexdigest() != entry.get("sha256"):
                raise ValueError(f"{name} does not match its sha256")
            blobs[name] = data
        meta = strictjson.loads(blobs[META_NAME], what=META_NAME, max_bytes=MAX_META_BYTES)
        if not isinstance(meta, dict) or meta.get("sequence") != sequence:
            raise ValueError(f"{META_NAME} is not the state of this checkpoint")
        return Checkpoint(sequence, load_safetensors(blobs[TENSORS_NAME]), meta)

    def load_latest(self) -> Checkpoint | None:
        """The newest checkpoint that verifies; damaged newer ones are skipped with a warning.

        Raises:
            CheckpointError: checkpoints exist but none verifies.
        """
        sequences = self._sequences()
        problems = []
        for sequence in reversed(sequences):
            try:
                return self._read(sequence)
            except Exception as exc:
                problems.append(f"ckpt-{sequence:08d}: {exc}")
                warnings.warn(
                    f"checkpoint ckpt-{sequence:08d} is damaged ({exc}); "
                    "falling back to the previous one",
                    RuntimeWarning,
                    stacklevel=2,
                )
        if sequences:
            raise CheckpointError(
                "no checkpoint in the run directory could be read",
                "; ".join(problems),
                "start a fresh run (without --resume) in another --workdir",
            )
        return None


# -- checks of a trainer checkpoint before resume ----------------------------------------
#
# The manifest proves a checkpoint is intact, not that it was written by this run:
# anyone who can write the run directory can forge consistent hashes. Every field
# the trainer restores is bounded here first, so a forged one is one typed error.

TRAINER_FORMAT = "sourcefree-trainer-v1"
_MT_WORDS = 624  # Mersenne Twister state words (numpy and Python)
_CUDA_RNG = re.compile(r"^rng\.cuda\.\d{1,3}$")


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
