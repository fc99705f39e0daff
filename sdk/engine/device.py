"""Where training runs: the device, bf16 autocast (AMP) and the layout of conv modules.

``resolve_device`` turns a ``--device`` name into a torch device (never a silent
fallback from an explicit ``cuda``); ``resolve_amp`` decides bf16 autocast for a
device from an ``--amp`` mode, and ``amp_policy`` sets the mode every
:class:`~sourcefree.engine.trainer.Trainer` built inside it uses by default. On CUDA
and on the CPU the trainer keeps conv modules in NHWC (``channels_last``) while it
trains (:func:`set_memory_format`).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from sourcefree.errors import ConfigError, DeviceError

DEVICES = ("auto", "cpu", "cuda")
#: bf16 autocast: ``auto`` (on for CUDA GPUs with bf16, off on the CPU), ``bf16``, ``off``.
AMP_MODES = ("auto", "bf16", "off")
_AMP_DEFAULT: contextvars.ContextVar[str] = contextvars.ContextVar("amp", default="auto")


def resolve_device(name: str) -> torch.device:
    """``auto`` (CUDA when available), ``cpu`` or ``cuda``.

    Raises:
        DeviceError: an unknown name, or ``cuda`` without a usable GPU.
    """
    if name not in DEVICES:
        raise DeviceError(
            f"unknown device {name!r}", f"choose one of {', '.join(DEVICES)}", "use --device auto"
        )
    if name == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    if name == "cuda":
        raise DeviceError(
            "device 'cuda' was requested but torch sees no CUDA GPU",
            "adaptation never falls back to the CPU silently",
            "use --device cpu, or install a CUDA build of torch (run `sourcefree doctor`)",
        )
    return torch.device("cpu")


def resolve_amp(mode: str, device: torch.device) -> bool:
    """Whether training steps run under bf16 autocast on ``device`` (see :data:`AMP_MODES`).

    Losses, Sinkhorn and the fused kernels compute in fp32 either way; on the CPU
    ``auto`` is off, so CPU runs stay bitwise what they were.

    Raises:
        ConfigError: an unknown mode, or ``bf16`` where the device has no bf16 autocast.
    """
    if mode not in AMP_MODES:
        raise ConfigError(
            f"--amp {str(mode)[:20]!r} is not known",
            f"choose one of {', '.join(AMP_MODES)}",
            "use --amp auto",
        )
    supported = device.type == "cuda" and torch.cuda.is_bf16_supported()
    if mode == "bf16" and not supported:
        raise ConfigError(
            f"--amp bf16 was requested on {device.type}",
            "bf16 autocast is used on CUDA GPUs with bf16 support only",
            "use --amp auto (or off) on this device",
        )
    return supported and mode != "off"


@contextlib.contextmanager
def amp_policy(mode: str, device: str | None = None) -> Iterator[None]:
    """Default ``amp`` of every :class:`Trainer` built inside (``adapt(amp=...)`` uses it).

    With ``device`` (a :data:`DEVICES` name) the mode is checked against it on entry,
    before any work, so ``--amp bf16 --device cpu`` fails at once.
    """
    if device is not None:
        resolve_amp(mode, resolve_device(device))
    elif mode not in AMP_MODES:
        resolve_amp(mode, torch.device("cpu"))  # raises the typed error
    token = _AMP_DEFAULT.set(mode)
    try:
        yield
    finally:
        _AMP_DEFAULT.reset(token)


def amp_default() -> str:
    """The AMP mode of the innermost :func:`amp_policy` (``auto`` outside any)."""
    return _AMP_DEFAULT.get()


def _has_conv(module: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.conv._ConvNd) for m in module.modules())


def training_memory_format(device: torch.device) -> torch.memory_format:
    """The layout conv modules and batches train in: NHWC (``channels_last``) on CUDA
    (tensor cores) and on the CPU (oneDNN, docs/engine.md), else the usual NCHW."""
    return torch.channels_last if device.type in ("cuda", "cpu") else torch.contiguous_format


def set_memory_format(modules: Sequence[nn.Module], fmt: torch.memory_format) -> None:
    """Put every module that holds a convolution in ``fmt`` (others stay as they are)."""
    for module in modules:
        if _has_conv(module):
            module.to(memory_format=fmt)
