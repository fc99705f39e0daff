"""Checkpoints written before the engine split (issue 17, point 5) still resume, same numbers.

``fixtures/pre_split_run`` is a run directory written by the code before the split
(``fixtures/make_pre_split_run.py`` tells how): the toy method below, interrupted in
its second phase, plus ``expected_final.safetensors``, the weights of the same run
left uninterrupted, also by the old code. The new trainer resumes the directory to
those exact weights, and an uninterrupted new run ends there too (bitwise, CPU).
"""

from __future__ import annotations

import random
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
import torch
from torch import nn

from sourcefree.engine.method import (
    Batch,
    EpochInfo,
    Method,
    OptimizerSpec,
    ParamGroup,
    Phase,
    ScheduleSpec,
    StepOutput,
    TargetData,
)
from sourcefree.engine.trainer import StepInfo, Trainer
from sourcefree.engine.workdir import Workdir
from sourcefree.errors import CheckpointError, RunInterruptedError
from sourcefree.package.manifest import InputSpec

FIXTURE = Path(__file__).parent / "fixtures" / "pre_split_run"
N_IMAGES = 22
#: Where the fixture run stopped: phase 1 ("fit"), after its third step.
STOP_PHASE, STOP_STEP = 1, 3
IDENTITY = {"toy": "pre-split", "seed": 3}
SEED = 3


class Toy(Method):
    """Two phases over 3x3 grey images: SGD with momentum + warm-up cosine, then Adam.

    Every RNG stream a method may use (the step generator, torch, numpy, Python) feeds
    the loss, and an epoch hook keeps state in the checkpoint (``state_tensors``).
    """

    name = "toy-pre-split"
    config_class = dict

    def __init__(self) -> None:
        super().__init__(None, cast(Any, None))
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(9, 6), nn.Tanh(), nn.Dropout(0.25), nn.Linear(6, 3))
        self.centre = torch.zeros(9)
        self.epochs_seen = 0

    def _enter(self) -> None:
        self.net.train()

    def _epoch(self, info: EpochInfo) -> None:
        self.centre = info.data.tensor().flatten(1).mean(0) + 0.01 * torch.randn(9)
        self.epochs_seen += 1

    def _step(self, batch: Batch) -> StepOutput:
        noise = torch.randn(batch.x.shape, generator=batch.generator)
        x = batch.x.flatten(1) + 0.1 * noise.flatten(1) - self.centre
        jitter = float(np.random.rand()) * 0.01 + random.random() * 0.01
        out = self.net(x)
        loss = out.square().mean() + jitter * out.mean()
        return StepOutput(loss, {"mean": out.detach().mean()})

    def _params(self) -> Sequence[ParamGroup]:
        return [
            ParamGroup(list(self.net[0].parameters()), lr_scale=0.5),
            ParamGroup(list(self.net[3].parameters()), weight_decay=0.0),
        ]

    def phases(self) -> Sequence[Phase]:
        return [
            Phase(
                "warm",
                2,
                self._step,
                batch_size=4,
                parameters=self._params,
                optimizer=OptimizerSpec("sgd", lr=0.05, nesterov=True, weight_decay=1e-4),
                schedule=ScheduleSpec("cosine", warmup_steps=2),
                on_enter=self._enter,
                on_epoch_start=self._epoch,
                amp=False,
            ),
            Phase(
                "fit",
                2,
                self._step,
                batch_size=5,
                parameters=self._params,
                optimizer=OptimizerSpec("adam", lr=1e-2, betas=(0.8, 0.99)),
                on_enter=self._enter,
                on_epoch_start=self._epoch,
                drop_last=False,
                amp=False,
            ),
        ]

    def modules(self) -> Mapping[str, nn.Module]:
        return {"net": self.net}

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {"centre": self.centre}

    def state_meta(self) -> dict[str, Any]:
        return {"epochs_seen": self.epochs_seen}

    def load_state(self, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> None:
        self.centre = tensors["centre"].clone()
        self.epochs_seen = int(meta["epochs_seen"])

    def export_model(self) -> Any:
        return self.net


def toy_data() -> TargetData:
    images = np.random.default_rng(1).integers(0, 255, (N_IMAGES, 3, 3, 1), dtype=np.uint8)
    spec = InputSpec(size=(3, 3), channels=1, color="gray", mean=(0.5,), std=(0.25,))
    return TargetData(images, spec, "toy")


def toy_trainer(workdir: Any, stop: bool = False) -> tuple[Toy, Trainer]:
    """The fixture's run; ``stop``: interrupted where the fixture was."""

    def hook(info: StepInfo) -> None:
        if stop and (info.phase_index, info.global_step) == (STOP_PHASE, STOP_STEP):
            info.request_stop()

    method = Toy()
    trainer = Trainer(
        method, toy_data(), device=torch.device("cpu"), seed=SEED, workdir=workdir, on_step=hook
    )
    return method, trainer


def _expected() -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(FIXTURE / "expected_final.safetensors"))


def _assert_weights(method: Toy, expected: Mapping[str, torch.Tensor]) -> None:
    state = method.net.state_dict()
    assert sorted(state) == sorted(k for k in expected if k != "centre")
    for key, value in state.items():
        assert torch.equal(value, expected[key]), key
    assert torch.equal(method.centre, expected["centre"])


def _copy(tmp_path: Path) -> Path:
    run = tmp_path / "pre-split"
    shutil.copytree(FIXTURE / "run", run)
    return run


def test_fixture_holds_the_interrupted_pre_split_run() -> None:
    names = sorted(p.name for p in (FIXTURE / "run" / "checkpoints").iterdir())
    assert names == ["ckpt-00000001", "ckpt-00000002"]


def test_uninterrupted_new_run_matches_the_pre_split_numbers() -> None:
    method, trainer = toy_trainer(None)
    result = trainer.run()
    assert [log.done for log in result.phases] == [True, True]
    _assert_weights(method, _expected())


def test_pre_split_checkpoint_resumes_through_workdir(tmp_path: Path) -> None:
    expected = _expected()
    with Workdir(_copy(tmp_path)) as wd:
        assert wd.read_identity() == IDENTITY
        assert wd.has_checkpoints()
        method, trainer = toy_trainer(wd)
        result = trainer.run(resume=True)
    assert result.resumed_from == 2
    assert [log.done for log in result.phases] == [True, True]
    assert method.epochs_seen == 4, "the method state came back from the checkpoint"
    _assert_weights(method, expected)
    _, fresh = toy_trainer(None)
    fresh_logs = fresh.run().phases
    for got, want in zip(result.phases, fresh_logs, strict=True):
        assert (got.epoch_loss, got.loss_curve, got.images) == (
            want.epoch_loss,
            want.loss_curve,
            want.images,
        )
        assert got.epoch_metrics == want.epoch_metrics


def test_pre_split_checkpoint_resumes_through_rundir_and_store(tmp_path: Path) -> None:
    from sourcefree.engine.checkpoints import CheckpointStore
    from sourcefree.engine.rundir import RunDir

    with RunDir(_copy(tmp_path)) as run:
        store = CheckpointStore(run.path)
        assert [c for c in store.sequences()] == [1, 2]
        method, trainer = toy_trainer(store)
        assert trainer.run(resume=True).resumed_from == 2
        assert store.sequences() == [2, 3], "the phase-end checkpoint, newest two kept"
    _assert_weights(method, _expected())


def test_new_run_interrupted_where_the_fixture_was_writes_the_same_state(
    tmp_path: Path,
) -> None:
    """The new trainer's checkpoint holds the old one's tensors and state (format unchanged)."""
    with Workdir(tmp_path / "run") as wd:
        _, trainer = toy_trainer(wd, stop=True)
        with pytest.raises(RunInterruptedError):
            trainer.run()
        new = wd.load_latest()
    with Workdir(_copy(tmp_path)) as wd:
        old = wd.load_latest()
    assert new is not None and old is not None and new.sequence == old.sequence == 2
    assert sorted(new.tensors) == sorted(old.tensors)
    for key, value in old.tensors.items():
        assert torch.equal(new.tensors[key], value), key
    for key in ("format", "position", "rng", "method", "optimizer", "epoch_sums", "sequence"):
        assert new.meta[key] == old.meta[key], key
    drop = {"seconds", "images_per_s"}
    assert [{k: v for k, v in d.items() if k not in drop} for d in new.meta["history"]] == [
        {k: v for k, v in d.items() if k not in drop} for d in old.meta["history"]
    ]


def test_checkpoint_of_an_unknown_format_is_refused_with_a_typed_error(tmp_path: Path) -> None:
    import hashlib
    import json

    run = _copy(tmp_path)
    folder = run / "checkpoints" / "ckpt-00000002"
    meta = json.loads((folder / "state.json").read_bytes())
    meta["format"] = "sourcefree-trainer-v0"
    blob = json.dumps(meta).encode()
    (folder / "state.json").write_bytes(blob)
    manifest = json.loads((folder / "MANIFEST.json").read_bytes())
    manifest["files"]["state.json"] = {
        "size": len(blob),
        "sha256": hashlib.sha256(blob).hexdigest(),
    }
    (folder / "MANIFEST.json").write_text(json.dumps(manifest))
    with Workdir(run) as wd:
        _, trainer = toy_trainer(wd)
        with pytest.raises(CheckpointError, match="not a sourcefree-trainer-v1 state"):
            trainer.run(resume=True)
