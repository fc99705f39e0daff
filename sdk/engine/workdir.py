"""The pipeline's run directory: a :class:`RunDir` and its :class:`CheckpointStore` as one.

``Workdir`` only delegates: the lock, privacy and identity live in
:mod:`sourcefree.engine.rundir`, the atomic checkpoints in
:mod:`sourcefree.engine.checkpoints` (the on-disk layout is described there).
``workdir.run`` and ``workdir.checkpoints`` are the two parts.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from sourcefree.engine.checkpoints import Checkpoint, CheckpointStore
from sourcefree.engine.rundir import RunDir


class Workdir:
    """A :class:`RunDir` at ``path`` with its :class:`CheckpointStore`; a context manager.

    Opening raises what :meth:`RunDir.open` raises (WorkdirError).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.run = RunDir(path)
        self.path: Path = self.run.path
        self.checkpoints = CheckpointStore(self.path)

    def open(self) -> Workdir:
        """Open the run directory (private, locked), then its checkpoint store."""
        self.run.open()
        self.checkpoints.open()
        return self

    def close(self) -> None:
        """Release the lock (the directory stays)."""
        self.run.close()

    def remove(self) -> None:
        """Release the lock and delete the directory with everything in it."""
        self.run.remove()

    def __enter__(self) -> Workdir:
        return self.open()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def read_identity(self) -> dict[str, Any] | None:
        """The identity of the run that wrote this directory, or None."""
        return self.run.read_identity()

    def write_identity(self, identity: Mapping[str, Any]) -> None:
        """Record the run's identity (atomic)."""
        self.run.write_identity(identity)

    def has_checkpoints(self) -> bool:
        """Whether any checkpoint folder exists."""
        return self.checkpoints.has_checkpoints()

    def save_checkpoint(self, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> Path:
        """Write a new checkpoint atomically (see :meth:`CheckpointStore.save`)."""
        return self.checkpoints.save(tensors, meta)

    def load_latest(self) -> Checkpoint | None:
        """The newest checkpoint that verifies (see :meth:`CheckpointStore.load_latest`)."""
        return self.checkpoints.load_latest()
