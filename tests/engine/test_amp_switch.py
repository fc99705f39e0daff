"""Issue 19, point 3: the ``--amp`` switch, channels_last and uint8 batches on the GPU.

On the CPU nothing may change (autocast off, NCHW, normalised on the host); the
switch is checked before anything is written and recorded in report.json. The CUDA
behaviour is covered by the ``gpu``-marked tests at the end.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from sourcefree.cli.commands_adapt import adapt_command
from sourcefree.engine.device import AMP_MODES, amp_policy, resolve_amp
from sourcefree.engine.method import (
    Batch,
    Method,
    OptimizerSpec,
    ParamGroup,
    Phase,
    StepOutput,
    TargetData,
)
from sourcefree.engine.trainer import Trainer
from sourcefree.errors import ConfigError
from sourcefree.package.manifest import InputSpec
from sourcefree.pipeline.adaptation import AdaptRequest, adapt

SETS = ["batch_size=16", "epochs=1"]


def test_resolve_amp_modes_on_the_cpu() -> None:
    cpu = torch.device("cpu")
    assert AMP_MODES == ("auto", "bf16", "off")
    assert resolve_amp("auto", cpu) is False
    assert resolve_amp("off", cpu) is False
    with pytest.raises(ConfigError, match="(?i)bf16 autocast is used on CUDA GPUs") as err:
        resolve_amp("bf16", cpu)
    assert "--amp auto" in str(err.value)
    with pytest.raises(ConfigError, match="(?i)choose one of auto, bf16, off") as bad:
        resolve_amp("fp16" + "x" * 500, cpu)
    assert "x" * 30 not in str(bad.value), "only a short prefix of the value is quoted"
    with pytest.raises(ConfigError), amp_policy("fp8"):
        pass


def test_cli_amp_bf16_on_cpu_fails_before_writing(
    source_pkg: Path, target_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    args = [str(source_pkg), str(target_dir), "-m", "adabn", "-o", str(out), "--no-progress"]
    result = CliRunner().invoke(adapt_command, [*args, "--device", "cpu", "--amp", "bf16"])
    assert result.exit_code == 2, result.output
    assert "error: --amp bf16 was requested on cpu" in result.output
    assert "Traceback" not in result.output
    assert not out.exists() and not (tmp_path / ".out.work").exists()


def test_cpu_report_records_amp_and_layout_and_results_do_not_move(
    source_pkg: Path, target_dir: Path, tmp_path: Path
) -> None:
    common: dict[str, Any] = {"method": "tent", "overrides": SETS, "device": "cpu"}
    default = adapt(AdaptRequest(source_pkg, target_dir, out=tmp_path / "a", **common))
    off = adapt(AdaptRequest(source_pkg, target_dir, out=tmp_path / "b", amp="off", **common))
    for run in (default, off):
        assert run.report.amp == "off"
        assert run.report.memory_format == "channels_last"  # NHWC on the CPU too
    assert default.report.phases[0]["epoch_loss"] == off.report.phases[0]["epoch_loss"]
    a = (tmp_path / "a" / "package" / "model.safetensors").read_bytes()
    b = (tmp_path / "b" / "package" / "model.safetensors").read_bytes()
    assert a == b, "--amp off is the CPU default: bitwise the same weights"
    saved = json.loads((tmp_path / "a" / "report.json").read_text())
    assert saved["amp"] == "off" and saved["memory_format"] == "channels_last"


def _images(n: int = 5, channels: int = 3) -> TargetData:
    pixels = np.random.default_rng(3).integers(0, 256, (n, 6, 7, channels), dtype=np.uint8)
    spec = InputSpec(size=(6, 7), mean=(0.4, 0.5, 0.6), std=(0.2, 0.25, 0.3))
    return TargetData(pixels, spec, "t")


def _old_formula(data: TargetData, index: np.ndarray) -> torch.Tensor:
    raw = torch.from_numpy(np.ascontiguousarray(data.images[index]))
    x = raw.permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(data.spec.mean).view(1, -1, 1, 1)
    std = torch.tensor(data.spec.std).view(1, -1, 1, 1)
    return ((x - mean) / std).contiguous()


def test_target_tensor_on_cpu_is_unchanged_and_takes_a_layout() -> None:
    data = _images()
    idx = np.array([4, 0, 2])
    expected = _old_formula(data, idx)
    plain = data.tensor(torch.as_tensor(idx))
    assert torch.equal(plain, expected) and plain.is_contiguous()
    nhwc = data.tensor(idx, device=torch.device("cpu"), memory_format=torch.channels_last)
    assert torch.equal(nhwc, expected)
    assert nhwc.is_contiguous(memory_format=torch.channels_last) and not nhwc.is_contiguous()


class _Conv(Method):
    """A 3x3 conv net; its step records the batch layout and the autocast state."""

    name = "conv-amp-probe"
    config_class = dict

    def __init__(self, device: torch.device) -> None:
        super().__init__(None, cast(Any, None))
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3)
        self.net = nn.Sequential(self.conv, nn.Flatten(), nn.LazyLinear(2)).to(device)
        self.net(torch.zeros(1, 3, 6, 7, device=device))
        self.seen: list[tuple[bool, bool, bool, torch.dtype]] = []

    def _step(self, batch: Batch) -> StepOutput:
        out = self.net(batch.x)
        self.seen.append(
            (
                batch.x.is_contiguous(memory_format=torch.channels_last),
                self.conv.weight.is_contiguous(memory_format=torch.channels_last),
                torch.is_autocast_enabled(batch.x.device.type),
                out.dtype,
            )
        )
        return StepOutput(out.float().square().mean())

    def _params(self) -> list[ParamGroup]:
        return [ParamGroup(list(self.net.parameters()))]

    def phases(self) -> Sequence[Phase]:
        sgd = OptimizerSpec("sgd", lr=1e-2)
        return [Phase("fit", 1, self._step, batch_size=2, parameters=self._params, optimizer=sgd)]

    def modules(self) -> Mapping[str, nn.Module]:
        return {"net": self.net}

    def export_model(self) -> Any:
        return self.net


def test_cpu_trainer_trains_nhwc_without_autocast_and_restores_nchw() -> None:
    method = _Conv(torch.device("cpu"))
    result = Trainer(method, _images(), device=torch.device("cpu")).run()
    assert result.amp == "off" and result.memory_format == "channels_last"
    assert method.seen and all(s == (True, True, False, torch.float32) for s in method.seen)
    assert method.conv.weight.is_contiguous(), "export sees the usual NCHW layout again"


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("amp", ["auto", "off"])
def test_gpu_trainer_channels_last_and_autocast(amp: str) -> None:
    dev = torch.device("cuda")
    method = _Conv(dev)
    result = Trainer(method, _images(), device=dev, amp=amp).run()
    on = amp == "auto" and torch.cuda.is_bf16_supported()
    assert result.amp == ("bf16" if on else "off")
    assert result.memory_format == "channels_last"
    dtype = torch.bfloat16 if on else torch.float32
    assert method.seen and all(s == (True, True, on, dtype) for s in method.seen)
    assert method.conv.weight.is_contiguous(), "the usual layout again after the run (export)"


@pytest.mark.gpu
@cuda
def test_gpu_target_tensor_normalises_uint8_on_the_device() -> None:
    for channels in (3, 1):
        data = _images(channels=channels)
        idx = torch.tensor([3, 1])
        got = data.tensor(idx, device=torch.device("cuda"), memory_format=torch.channels_last)
        assert got.is_cuda and got.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(got.cpu(), data.tensor(idx), rtol=0, atol=1e-6)
