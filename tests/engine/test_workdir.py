"""Run directory and checkpoint store: privacy, lock, atomic checkpoints, fallback, full disk."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import Any

import pytest
import torch

from sourcefree.engine.checkpoint_state import flatten_optimizer, unflatten_optimizer
from sourcefree.engine.checkpoints import CheckpointStore, broadcast_checkpoint
from sourcefree.engine.rundir import RunDir
from sourcefree.engine.workdir import Workdir
from sourcefree.errors import CheckpointError, WorkdirError


def _save(wd: Workdir, value: float) -> Path:
    return wd.save_checkpoint({"w": torch.full((3,), value)}, {"value": value})


def test_private_and_locked(tmp_path: Path) -> None:
    with Workdir(tmp_path / "run") as wd:
        assert stat.S_IMODE(os.stat(wd.path).st_mode) == 0o700
        with pytest.raises(WorkdirError, match=r"is in use by another run \(pid \d+\)"):
            Workdir(tmp_path / "run").open()
    Workdir(tmp_path / "run").open().close()  # released


def test_keeps_two_and_falls_back(tmp_path: Path) -> None:
    with Workdir(tmp_path / "run") as wd:
        for v in (1.0, 2.0, 3.0):
            last = _save(wd, v)
        names = sorted(p.name for p in (wd.path / "checkpoints").iterdir())
        assert names == ["ckpt-00000002", "ckpt-00000003"]
        ckpt = wd.load_latest()
        assert ckpt is not None and ckpt.meta["value"] == 3.0
        with open(last / "state.safetensors", "r+b") as fh:
            fh.seek(-2, os.SEEK_END)
            fh.write(b"xx")
        with pytest.warns(RuntimeWarning, match="ckpt-00000003 is damaged"):
            ckpt = wd.load_latest()
        assert ckpt is not None and ckpt.meta["value"] == 2.0
        assert torch.equal(ckpt.tensors["w"], torch.full((3,), 2.0))


def test_all_damaged(tmp_path: Path) -> None:
    with Workdir(tmp_path / "run") as wd:
        folder = _save(wd, 1.0)
        (folder / "state.json").write_text("{}")
        with (
            pytest.warns(RuntimeWarning),
            pytest.raises(CheckpointError, match="no checkpoint in the run directory"),
        ):
            wd.load_latest()


@pytest.mark.parametrize("target", ["fsync", "replace", "write"])
def test_full_disk_keeps_previous(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, target: str
) -> None:
    with Workdir(tmp_path / "run") as wd:
        _save(wd, 1.0)

        def full(*args: Any, **kwargs: Any) -> Any:
            raise OSError(errno.ENOSPC, "No space left on device")

        with monkeypatch.context() as m:
            m.setattr(os, target, full)
            with pytest.raises(
                CheckpointError, match="The disk is full; nothing was half-written"
            ) as err:
                _save(wd, 2.0)
        assert "--resume" in str(err.value)
        entries = sorted(p.name for p in (wd.path / "checkpoints").iterdir())
        assert entries == ["ckpt-00000001"], "temp removed, previous intact"
        ckpt = wd.load_latest()
        assert ckpt is not None and ckpt.meta["value"] == 1.0
        _save(wd, 3.0)  # works again once space is back
        ckpt = wd.load_latest()
        assert ckpt is not None and ckpt.meta["value"] == 3.0


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_optimizer_state_round_trips_without_pickle(kind: str) -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    opt: torch.optim.Optimizer = (
        torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
        if kind == "sgd"
        else torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.8, 0.99))
    )
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(5, 4)).square().sum().backward()
        opt.step()
    tensors, meta = flatten_optimizer(opt)
    clone = torch.nn.Linear(4, 2)
    opt2: torch.optim.Optimizer = (
        torch.optim.SGD(clone.parameters(), lr=0.5)
        if kind == "sgd"
        else torch.optim.Adam(clone.parameters(), lr=0.5)
    )
    unflatten_optimizer(opt2, tensors, meta)
    a, b = opt.state_dict(), opt2.state_dict()
    assert a["param_groups"] == b["param_groups"]
    for pid, entries in a["state"].items():
        for key, value in entries.items():
            assert torch.equal(value, b["state"][pid][key])


def test_linked_checkpoint_file_is_refused_unread(tmp_path: Path) -> None:
    with Workdir(tmp_path / "run") as wd:
        _save(wd, 1.0)
        last = _save(wd, 2.0)
        (tmp_path / "elsewhere.json").write_bytes((last / "state.json").read_bytes())
        (last / "state.json").unlink()
        (last / "state.json").symlink_to(tmp_path / "elsewhere.json")
        with pytest.warns(RuntimeWarning, match="state.json is not a regular file"):
            ckpt = wd.load_latest()
        assert ckpt is not None and ckpt.meta["value"] == 1.0


def test_workdir_is_a_run_dir_and_a_store(tmp_path: Path) -> None:
    with Workdir(tmp_path / "run") as wd:
        assert isinstance(wd.run, RunDir) and isinstance(wd.checkpoints, CheckpointStore)
        assert wd.run.path == wd.checkpoints.run_dir == wd.path
        wd.write_identity({"method": "tent"})
        _save(wd, 1.0)
        _save(wd, 2.0)
    with RunDir(tmp_path / "run") as run:
        assert run.read_identity() == {"method": "tent"}
        (run.path / "checkpoints" / ".tmp-00000003-dead").mkdir()
        store = CheckpointStore(run.path)  # not opened: the first save opens it
        assert store.sequences() == [1, 2]
        folder = store.save({"w": torch.zeros(1)}, {"value": 3.0})
        assert folder.name == "ckpt-00000003"
        assert sorted(p.name for p in store.root.iterdir()) == ["ckpt-00000002", "ckpt-00000003"]
        with pytest.raises(WorkdirError, match="in use by another run"):
            Workdir(run.path).open()


def test_checkpoint_broadcast_round_trips_through_the_frame(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sourcefree.engine import distributed as dist

    with Workdir(tmp_path / "run") as wd:
        _save(wd, 1.5)
        ckpt = wd.load_latest()
    assert ckpt is not None
    assert broadcast_checkpoint(ckpt) is ckpt, "one process: nothing is sent"
    monkeypatch.setattr(dist, "world_size", lambda: 2)
    got = broadcast_checkpoint(ckpt)
    assert got is not None and got is not ckpt
    assert (got.sequence, got.meta) == (ckpt.sequence, ckpt.meta)
    assert torch.equal(got.tensors["w"], ckpt.tensors["w"])
    assert broadcast_checkpoint(None) is None
