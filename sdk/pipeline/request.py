"""``AdaptRequest``: the one frozen request that the CLI and the Python API build for ``adapt``.

Its checks are pure (no file, no device, no environment): a bad value is refused
when the request is built, before anything is read or written. Importing this
module does not import torch (building a request does, lazily).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import KW_ONLY, dataclass
from typing import TYPE_CHECKING, Any, TypeAlias, cast

from sourcefree.errors import ConfigError, ResumeError
from sourcefree.package.loader import Package

if TYPE_CHECKING:
    from sourcefree.engine.trainer import StepInfo

PackageSource: TypeAlias = "str | os.PathLike[str] | Package"
"""A package folder or a loaded (verified) :class:`~sourcefree.package.loader.Package`."""
KeySource: TypeAlias = "str | os.PathLike[str] | bytes"
"""A vendor's public key: a PEM file (``sourcefree keygen``'s ``.pub``) or its bytes."""
FormatOptions: TypeAlias = "Mapping[str, Any] | Sequence[str] | Sequence[tuple[str, Any]]"
"""A format's options: a mapping, ``KEY=VALUE`` strings, or (key, value) pairs."""
SELECT_MODES = ("none", "auto")


@dataclass(frozen=True)
class AdaptRequest:
    """What :func:`sourcefree.adapt` adapts, where it writes, and how (checked when built).

    Args:
        packages: one source package (or several, for methods that take them).
        data: the target images: a folder (read recursively), or what ``data_format``
            reads (a CSV, a label list, a dataset folder).
        method: registered method name (``sourcefree methods``), or ``auto``: every
            method that takes this many packages, cheapest first; the best by
            label-free score is kept.
        out: output directory (package + report); must not exist unless ``overwrite``.
        config: a config instance or a dict of overrides of the method's defaults.
        config_file: YAML file of overrides.
        overrides: ``key=value`` strings (dotted keys for nested sections).
        preset: ``cpu`` (the method's defaults) or ``paper`` (the paper's schedule,
            for a GPU: :mod:`sourcefree.engine.presets`); the first layer over the
            defaults, under ``config``, ``config_file`` and ``overrides``. Not with
            ``method="auto"`` or ``select="auto"``.
        resume: continue from the newest checkpoint in the run directory.
        workdir: private run directory (default ``.<OUT>.work`` beside OUT).
        keep_workdir: keep the run directory after success.
        device: ``auto``, ``cpu`` or ``cuda``.
        eval_labels: labels CSV for reporting source vs adapted metrics only.
        seed: seed of all randomness.
        max_bad_fraction: tolerated fraction of unreadable images.
        strict: stop at the first unreadable image.
        overwrite: replace an existing ``out``.
        progress: progress bars on stderr.
        checkpoint_every_s: interval of timer checkpoints.
        on_step: callback after each training step (tests, custom progress).
        select: ``none``, or ``auto``: run the method's ``selection_grid`` and keep
            the candidate with the best label-free score (docs/selection.md).
        gate: run the do-no-harm gate: export the source model instead when the
            adapted one is estimated worse without labels (``report["gate"]``).
        force: export the adapted model even when the gate estimates it worse.
        budget_s: wall-clock budget of ``-m auto`` / ``--select auto`` candidates
            (checked before each candidate and after every training step).
        amp: bf16 autocast of the training steps: ``auto`` (on for CUDA GPUs with
            bf16, off on the CPU), ``bf16`` or ``off``; losses stay fp32 (``report["amp"]``).
        gate_sample: how many target images the gate and the label-free scores
            look at (a seeded random subsample, the same for every model of the
            run): a count, ``0`` or ``"all"`` (every image); None: 2,048
            (``selection.GATE_SAMPLE``, docs/selection.md "Cost and subsample").
        keys: vendor public keys (one, or several for several sources): every
            source package must carry a signature that verifies with one of them,
            checked before anything else (``report["sources"][i]["signer"]``: the
            fingerprint of the key that verified it).
        require_signature: refuse unsigned source packages (needs ``keys``).
        plan_probe: time a few forward/backward passes of a copy of the model to
            estimate the training time in the run's plan (``report["plan"]``);
            False: the plan has no estimate. Results are identical either way.
        data_format: how ``data`` is read: ``folder`` (default), ``csv``, ``fer2013``,
            ``ferplus``, ``rafdb``, ``affectnet``, ``expw``, ``ckplus`` or ``jaffe``
            (:data:`sourcefree.data.sources.FORMATS`). Labels a format carries are
            removed before training; faces are cropped from a format's boxes.
        format_options: the format's options, a mapping or ``KEY=VALUE`` strings
            (e.g. ``{"split": "test"}``); checked here, kept as sorted (key, value) pairs.
        eval_format_labels: report source vs adapted metrics with the labels the
            format carries (as ``eval_labels`` does with a CSV; used only after the run).
        workers: processes that decode the target images (at least 1; 1: in this
            process); None: the usable cores (:meth:`sourcefree.data.dataset.ImageDataset.load`).
            Results are bitwise the same for any count, so a resumed run may change it.
        memory_budget: bytes that whole-set labelling features (N x D) may take in memory
            (``--memory-budget 8G``): above it SHOT and DIFC keep them as float16, then
            in a file in the run directory (:mod:`sourcefree.engine.feature_bank`); None: a
            quarter of the machine's memory, divided among the ranks on the machine.

    Raises:
        ConfigError: ``gate_sample``, ``select``, ``budget_s``, ``workers`` or
            ``memory_budget`` out of range,
            an unknown ``preset``, or a preset other than ``cpu`` with ``-m auto`` /
            ``--select auto``,
            ``overrides`` given as one string, a config with ``method="auto"``,
            ``require_signature`` without ``keys``, an unknown ``data_format`` or an
            option it does not take, or ``eval_format_labels`` with ``eval_labels`` or
            with a format that carries no labels.
        ResumeError: ``resume`` with ``method="auto"`` or ``select="auto"``.

    Examples:
        >>> from sourcefree import AdaptRequest, adapt
        >>> request = AdaptRequest("vendor-pkg/", "faces/", method="tent", out="adapted/")
        >>> request.seed, request.gate, request.select
        (0, True, 'none')
        >>> AdaptRequest("vendor-pkg/", "faces/", method="tent", out="a/", gate_sample=-1)
        Traceback (most recent call last):
        sourcefree.errors.ConfigError: --gate-sample -1. The gate's subsample is ...
        >>> import dataclasses
        >>> result = adapt(dataclasses.replace(request, resume=True))  # after an interruption
    """

    packages: PackageSource | Sequence[PackageSource]
    data: str | os.PathLike[str]
    _: KW_ONLY
    method: str
    out: str | os.PathLike[str]
    config: Any = None
    config_file: str | os.PathLike[str] | None = None
    overrides: Sequence[str] = ()
    preset: str = "cpu"
    resume: bool = False
    workdir: str | os.PathLike[str] | None = None
    keep_workdir: bool = False
    device: str = "auto"
    eval_labels: str | os.PathLike[str] | None = None
    seed: int = 0
    max_bad_fraction: float = 0.05
    strict: bool = False
    overwrite: bool = False
    progress: bool = False
    checkpoint_every_s: float = 600.0
    on_step: Callable[[StepInfo], None] | None = None
    select: str = "none"
    gate: bool = True
    force: bool = False
    budget_s: float | None = None
    amp: str = "auto"
    gate_sample: int | str | None = None
    keys: KeySource | Sequence[KeySource] = ()
    require_signature: bool = False
    plan_probe: bool = True
    data_format: str = "folder"
    format_options: FormatOptions = ()
    eval_format_labels: bool = False
    workers: int | None = None
    memory_budget: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.overrides, (str, bytes)):
            raise ConfigError(
                f"overrides {self.overrides[:40]!r} is one string",
                "overrides are a sequence of key=value strings",
                f"pass [{str(self.overrides)[:40]!r}]",
            )
        object.__setattr__(self, "overrides", tuple(self.overrides))
        from sourcefree.engine.presets import check_preset

        check_preset(self.preset)
        if not isinstance(self.packages, (str, os.PathLike, Package)):
            object.__setattr__(self, "packages", tuple(self.packages))
        object.__setattr__(self, "keys", self.key_sources)
        if self.require_signature and not self.keys:
            raise ConfigError(
                "--require-signature without --key",
                "a signature proves nothing until it is checked with the vendor's public key",
                "pass --key VENDOR.pub (repeat it for sources signed by several keys)",
            )
        _ = self.sample_size  # --gate-sample is refused before anything starts
        from sourcefree.data.decode import check_workers

        check_workers(self.workers)
        if self.memory_budget is not None:
            from sourcefree.engine.feature_bank import check_memory_budget

            check_memory_budget(self.memory_budget)
        if self.select not in SELECT_MODES:
            raise ConfigError(
                f"--select {self.select!r} is not known",
                "selection is 'none' (the config as given) or 'auto' (the method's grid)",
                "pass --select auto or leave it out",
            )
        if self.budget_s is not None and not self.budget_s > 0:
            raise ConfigError(
                f"--budget-s {self.budget_s}",
                "the budget must be positive",
                "pass a number of seconds above 0, or no budget",
            )
        if self.multi:
            self._check_multi()
        self._check_format()

    def command(self, *, resume: bool = False) -> str:
        """The ``sourcefree adapt`` command line of this request (shell-quoted).

        Every field that has a CLI option and differs from its default is given;
        ``on_step`` and a ``config`` object or dict have none (Python only).
        ``resume``: with ``--resume``, the command that continues this run.
        """
        import shlex

        given = self.packages
        packages = [given] if isinstance(given, (str, os.PathLike, Package)) else list(given)
        words = ["sourcefree", "adapt"]
        words += [str(p.path if isinstance(p, Package) else p) for p in packages]
        words += [str(self.data), "-m", self.method, "-o", str(self.out)]
        if self.config_file is not None:
            words += ["--config", str(self.config_file)]
        for item in self.overrides:
            words += ["--set", item]
        for key in self.key_sources:
            if not isinstance(key, bytes):  # PEM bytes have no CLI form
                words += ["--key", str(key)]
        from sourcefree.data.sources import option_text

        for name, value in self.options_of_format.items():
            words += ["--format-option", f"{name}={option_text(value)}"]
        for name, flag in _OPTIONS.items():
            value = getattr(self, name)
            if value != _DEFAULTS[name]:
                words += [flag, str(value)]
        words += [flag for name, flag in _SWITCHES.items() if getattr(self, name)]
        words += [flag for name, flag in _NEGATED.items() if not getattr(self, name)]
        if resume or self.resume:
            words.append("--resume")
        return shlex.join(words)

    @property
    def key_sources(self) -> tuple[KeySource, ...]:
        """``keys`` as a tuple (one key given alone is a tuple of one)."""
        given = self.keys
        return (given,) if isinstance(given, (str, os.PathLike, bytes)) else tuple(given)

    @property
    def options_of_format(self) -> dict[str, Any]:
        """``format_options`` as a dict (checked and typed when the request was built)."""
        return dict(cast("Sequence[tuple[str, Any]]", self.format_options))

    def _check_format(self) -> None:
        """``data_format`` and its options (pure: nothing is read), and ``eval_format_labels``."""
        from sourcefree.data.sources import check_options, get_format

        spec = get_format(self.data_format)
        options = check_options(self.data_format, self.format_options)
        object.__setattr__(self, "format_options", tuple(options.items()))
        if not self.eval_format_labels:
            return
        if self.eval_labels is not None:
            raise ConfigError(
                "--eval-format-labels with --eval-labels",
                "the report is judged with one set of labels",
                "pass one of them",
            )
        if not spec.carries_labels(options):
            raise ConfigError(
                f"--eval-format-labels: the {spec.name} format carries no labels",
                "a folder of images is unlabelled (unless --format-option classes=true: "
                "one subfolder per class)",
                "pass --eval-labels CSV, or a --format that carries labels",
            )

    @property
    def auto(self) -> bool:
        """``method="auto"``: try every method that takes this many packages."""
        from sourcefree.pipeline.selection import AUTO_METHOD

        return self.method == AUTO_METHOD

    @property
    def multi(self) -> bool:
        """Several candidates are trained (``method="auto"`` or ``select="auto"``)."""
        return self.auto or self.select == "auto"

    @property
    def sample_size(self) -> int:
        """The gate's subsample size (0: every image), from ``gate_sample``."""
        from sourcefree.pipeline.selection import gate_sample_size

        return gate_sample_size(self.gate_sample)

    def _check_multi(self) -> None:
        """Refuse what ``-m auto`` / ``--select auto`` cannot honour (torchrun: at prepare)."""
        flag = "-m auto" if self.auto else "--select auto"
        if self.preset != "cpu":
            raise ConfigError(
                f"{flag} with --preset {self.preset}",
                f"{flag} tries a CPU-sized grid within a budget; the {self.preset} preset "
                "fixes the schedule the grid varies, at GPU length, for one named method",
                f"name the method and drop {flag}, or drop --preset",
            )
        if self.resume:
            raise ResumeError(
                f"{flag} cannot resume",
                "candidates run without checkpoints, one after the other",
                f"run {flag} again without --resume, or resume a run of one method",
            )
        if self.auto and (
            self.config is not None or self.config_file is not None or self.overrides
        ):
            raise ConfigError(
                "-m auto takes no config",
                "each method runs with its own defaults; --set and --config name one method's keys",
                "drop --set/--config, or name the method",
            )


#: CLI options of ``sourcefree adapt`` that take a value, by request field.
_OPTIONS = {
    "workdir": "--workdir",
    "preset": "--preset",
    "device": "--device",
    "eval_labels": "--eval-labels",
    "seed": "--seed",
    "max_bad_fraction": "--max-bad-fraction",
    "select": "--select",
    "budget_s": "--budget-s",
    "gate_sample": "--gate-sample",
    "amp": "--amp",
    "data_format": "--format",
    "workers": "--workers",
    "memory_budget": "--memory-budget",
}
#: Flags set when the field is true, and flags set when it is false.
_SWITCHES = {
    "keep_workdir": "--keep-workdir",
    "strict": "--strict",
    "overwrite": "--overwrite",
    "force": "--force",
    "require_signature": "--require-signature",
    "eval_format_labels": "--eval-format-labels",
}
_NEGATED = {"progress": "--no-progress", "gate": "--no-gate", "plan_probe": "--no-plan-probe"}
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(AdaptRequest)}
