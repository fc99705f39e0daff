"""Atomic, verified checkpoints in a run directory: save, list, load the newest, clean up.

Layout (inside a :class:`~sourcefree.engine.rundir.RunDir`, mode 0700)::

    checkpoints/
      ckpt-00000007/     state.safetensors, state.json, MANIFEST.json (sha256 of both)
      ckpt-00000008/

A checkpoint is written into a hidden temporary directory (each file fsynced),
then renamed into place and the parent fsynced; ``MANIFEST.json`` is written
last. The newest :data:`KEEP` are kept. Loading verifies the manifest and falls
back to the previous checkpoint with a warning when the newest is damaged. No
pickle: tensors go to safetensors, everything else to strict JSON. What a
checkpoint holds is the trainer's business (:mod:`sourcefree.engine.checkpoint_state`).
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import shutil
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sourcefree.engine.rundir import guarded_write
from sourcefree.errors import CheckpointError
from sourcefree.fsutil import FileRefusedError, fsync_dir, read_regular_file
from sourcefree.package import strictjson

CHECKPOINTS = "checkpoints"
TENSORS_NAME = "state.safetensors"
META_NAME = "state.json"
MANIFEST_NAME = "MANIFEST.json"
FORMAT = "sourcefree-checkpoint-v1"
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
    """A regular file's bytes (not a link); ValueError when it holds more than ``limit``."""
    try:
        return read_regular_file(path, limit, follow_links=False)
    except FileRefusedError:
        raise ValueError(f"{path.name} is not a regular file of at most {limit} bytes") from None


class CheckpointStore:
    """The ``checkpoints/`` folder of an open (private, locked) run directory.

    Args:
        run_dir: the run directory (a :class:`~sourcefree.engine.rundir.RunDir`, open);
            the store opens itself at its first save unless :meth:`open` ran.
    """

    def __init__(self, run_dir: str | os.PathLike[str]) -> None:
        self.run_dir = Path(run_dir).absolute()
        self.root = self.run_dir / CHECKPOINTS
        self._sequence: int | None = None

    def open(self) -> CheckpointStore:
        """Create the folder, drop temporaries of a crashed write, continue the numbering."""
        self.root.mkdir(mode=0o700, exist_ok=True)
        for entry in os.scandir(self.root):
            if entry.name.startswith(".tmp-"):
                shutil.rmtree(entry.path, ignore_errors=True)
        existing = self.sequences()
        self._sequence = existing[-1] if existing else 0
        return self

    def sequences(self) -> list[int]:
        """Sequence numbers of the checkpoints on disk, oldest first."""
        out = []
        if self.root.is_dir():
            for entry in os.scandir(self.root):
                match = _CKPT_RE.match(entry.name)
                if match and entry.is_dir(follow_symlinks=False):
                    out.append(int(match.group(1)))
        return sorted(out)

    def has_checkpoints(self) -> bool:
        """Whether any checkpoint folder exists (verified or not)."""
        return bool(self.sequences())

    def save(self, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> Path:
        """Write a new checkpoint atomically and keep the newest :data:`KEEP`.

        Raises:
            CheckpointError: a write failed (full disk, I/O error). The temporary
                directory is removed and earlier checkpoints are untouched.
        """
        from safetensors.torch import save as save_safetensors

        if self._sequence is None:
            self.open()
        sequence = (self._sequence or 0) + 1
        final = self.root / f"ckpt-{sequence:08d}"
        tmp = self.root / f".tmp-{sequence:08d}-{secrets.token_hex(4)}"
        plain = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
        blobs = {
            TENSORS_NAME: save_safetensors(plain),
            META_NAME: strictjson.dumps({"sequence": sequence, **dict(meta)}),
        }
        files = {
            name: {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
            for name, data in blobs.items()
        }
        manifest = {"format": FORMAT, "sequence": sequence, "files": files}

        def write() -> None:
            try:
                os.mkdir(tmp, 0o700)
                for name, data in blobs.items():
                    _write_file(tmp / name, data)
                _write_file(tmp / MANIFEST_NAME, strictjson.dumps(manifest))
                fsync_dir(tmp)
                os.replace(tmp, final)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            fsync_dir(self.root)

        guarded_write(self.run_dir, write)
        self._sequence = sequence
        for old in self.sequences()[:-KEEP]:
            shutil.rmtree(self.root / f"ckpt-{old:08d}", ignore_errors=True)
        return final

    def read(self, sequence: int) -> Checkpoint:
        """Checkpoint ``sequence``, verified against its manifest.

        Raises:
            ValueError, OSError: a file is missing, too large or does not match.
        """
        from safetensors.torch import load as load_safetensors

        folder = self.root / f"ckpt-{sequence:08d}"
        manifest = strictjson.loads(
            _read_bounded(folder / MANIFEST_NAME, 1 << 20), what=MANIFEST_NAME, max_bytes=1 << 20
        )
        if (
            not isinstance(manifest, dict)
            or manifest.get("format") != FORMAT
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
        sequences = self.sequences()
        problems = []
        for sequence in reversed(sequences):
            try:
                return self.read(sequence)
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


def broadcast_checkpoint(ckpt: Checkpoint | None) -> Checkpoint | None:
    """Rank 0's checkpoint on every rank (one framed broadcast, no pickle).

    Other ranks' ``ckpt`` is ignored; with one process it is returned as it is.
    """
    from sourcefree.engine import distributed as dist

    if dist.world_size() == 1:
        return ckpt
    from safetensors.torch import load as load_safetensors
    from safetensors.torch import save as save_safetensors

    sent: dict[str, Any] | None = None
    blob = b""
    if ckpt is not None:
        sent = {"sequence": ckpt.sequence, "meta": ckpt.meta}
        blob = save_safetensors({k: v.contiguous() for k, v in ckpt.tensors.items()})
    framed = dist.broadcast_framed(sent, blob, what="checkpoint")
    if framed is None:
        return None
    head, blob = framed
    return Checkpoint(int(head["sequence"]), load_safetensors(blob), head["meta"])
