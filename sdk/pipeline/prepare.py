"""Stage 1 of ``adapt``: config, packages, data, device and run directory.

Everything here is checked before any training, and everything but the images
before any image is decoded: the vendor keys and each source package's signature
(:func:`preflight`, first of all), the evaluation labels, the method's config and
the candidates' overrides, the output directory, the number and agreement of the
source packages, the listing of the data, the free disk space
(:func:`check_disk_space`, the decoded-image cache included), each model.onnx
against its weights, and (rank 0) the run directory: opened, locked and checked
against the interrupted run when resuming. Then the target images are decoded
into the run directory's cache, or read from it (:mod:`sourcefree.data.cache`).
Importing this module does not import torch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sourcefree._version import __version__
from sourcefree.errors import (
    ConfigError,
    DatasetError,
    PackageError,
    ResumeError,
    SignatureError,
    WorkdirError,
    WriteError,
)
from sourcefree.fsutil import check_output_dir, shown
from sourcefree.package import signing, strictjson
from sourcefree.package.inspect import size_text
from sourcefree.package.loader import Package, load_package
from sourcefree.pipeline.report import SampleInfo
from sourcefree.pipeline.request import AdaptRequest, KeySource, PackageSource

if TYPE_CHECKING:
    import numpy as np
    import torch

    from sourcefree.data.cache import CacheInfo
    from sourcefree.data.dataset import Fingerprint, ImageDataset
    from sourcefree.engine.method import Method, TargetData
    from sourcefree.engine.models import Classifier
    from sourcefree.engine.workdir import Workdir
    from sourcefree.pipeline import selection


def default_workdir(out: str | os.PathLike[str]) -> Path:
    """The run directory used when none is given: ``.<OUT>.work`` beside OUT."""
    target = Path(out).absolute()
    return target.with_name(f".{target.name}.work")


def load_packages(
    packages: PackageSource | Sequence[PackageSource],
    keys: Sequence[KeySource] = (),
    require_signature: bool = False,
) -> list[Package]:
    """The packages of a request, loaded and verified (loaded ones are kept as they are).

    ``keys``: vendor public keys, all read before any package; each package must
    carry a signature that verifies with one of them (``Package.signer`` names it).
    A loaded package not verified by one of them is verified again from its folder,
    pinned to its sha256. ``require_signature``: as ``sourcefree verify``.

    Raises:
        SignatureError: a key file is unreadable or not an Ed25519 public key, a
            package is unsigned, or its signature verifies with none of ``keys``.
        PackageError, IntegrityError: see :func:`~sourcefree.package.loader.load_package`.
    """
    single = isinstance(packages, (str, os.PathLike, Package))
    items: list[Any] = [packages] if single else list(packages)  # type: ignore[arg-type]
    vendor = [(key, signing.fingerprint(signing.load_public_key(key))) for key in keys]
    pkgs = []
    for item in items:
        pkg = _verified(item, vendor, require_signature)
        pkgs.append(pkg)
        # The key that verified this package is tried first for the next one.
        vendor = [e for e in vendor if e[1] == pkg.signer] + [
            e for e in vendor if e[1] != pkg.signer
        ]
    for pkg in pkgs:
        record = pkg.manifest.optimization
        if pkg.manifest.onnx.precision == "int8" and record is not None:
            raise PackageError(
                f"package {pkg.manifest.name!r} is an int8 deployment variant",
                "its graph is quantised, so it cannot be trained or compared with its weights",
                f"adapt the fp32 package you optimised from (sha256 {record.from_sha256[:16]}...), "
                "then optimize again",
            )
    return pkgs


def _verified(
    item: PackageSource, keys: Sequence[tuple[KeySource, str]], require_signature: bool
) -> Package:
    """One package, verified with one of ``keys`` (key source, fingerprint) when any.

    The check is :func:`~sourcefree.package.loader.load_package`'s (``sourcefree verify``'s),
    tried with each key in turn.
    """
    if isinstance(item, Package):
        trusted = item.signer in {fp for _, fp in keys}
        if trusted or not (keys or require_signature):
            return item
        path: str | os.PathLike[str] = item.path
        pin: str | None = item.sha256
    else:
        path, pin = item, None
    if not keys:
        return load_package(path, require_signature=require_signature, expected_sha256=pin)
    failed: SignatureError | None = None
    for key, _ in keys:
        try:
            return load_package(
                path, public_key=key, require_signature=require_signature, expected_sha256=pin
            )
        except SignatureError as exc:
            failed = exc
    if failed is None or len(keys) == 1:
        raise failed or SignatureError(f"package {shown(path)} was not verified")
    tried = ", ".join(fp for _, fp in keys)
    raise SignatureError(
        f"{failed.what} (package {shown(path)}; tried each of the {len(keys)} keys given: {tried})",
        failed.why,
        failed.fix,
    )


def fresh_model(pkg: Package, dev: Any, *, check: bool = False) -> Classifier:
    """A fresh copy of a package's model on ``dev`` (methods may train theirs in place).

    ``check``: first refuse a package whose model.onnx computes another function
    (done once per package, at its first load; later copies reuse the same bytes).
    """
    from sourcefree.engine.models import load_classifier
    from sourcefree.export.onnx import check_package_agreement

    model = load_classifier(pkg.manifest.architecture, pkg.weights_bytes)
    if check:
        check_package_agreement(pkg, model)
    return model.to(dev).eval()


def _check_sources(pkgs: Sequence[Package], method: str, lo: int, hi: int) -> None:
    if not lo <= len(pkgs) <= hi:
        want = str(lo) if lo == hi else f"{lo} to {hi}"
        raise ConfigError(
            f"method {method!r} takes {want} source package(s), got {len(pkgs)}",
            "each method declares how many source models it adapts",
            "pass the right number of packages before DATA"
            + (" (la-cmfer takes several)" if hi == 1 else ""),
        )
    first = pkgs[0].manifest
    for other in pkgs[1:]:
        m = other.manifest
        if m.labels != first.labels or m.input != first.input:
            raise ConfigError(
                f"source packages {first.name!r} and {m.name!r} do not match",
                "several sources must share labels (same order) and input spec",
                "use packages exported for the same classes and preprocessing",
            )


def read_data(request: AdaptRequest) -> ImageDataset:
    """The target images as the request's format lists them, without labels (nothing decoded).

    The one listing of ``request.data`` (:func:`sourcefree.data.sources.open_unlabelled`):
    ``folder`` is :func:`~sourcefree.data.readers.read_image_folder`'s; a format's labels
    are removed, so no stage can choose by them.
    """
    from sourcefree.data.sources import open_unlabelled

    return open_unlabelled(request.data, request.data_format, request.format_options)


@dataclass(frozen=True)
class EvalLabels:
    """Evaluation labels, checked before anything starts: the listed data and its labels."""

    folder: ImageDataset
    """The data as listed once (unlabelled); the target images are read from this listing."""
    lookup: dict[str, int]
    """Label index of each labelled image, by its key (path relative to the data folder)."""


def check_eval_labels(request: AdaptRequest, pkgs: Sequence[Package]) -> EvalLabels | None:
    """Parse and check ``request.eval_labels`` (or the format's labels) once.

    With ``eval_format_labels`` the labels are the format's own, in the packages'
    label order (:func:`sourcefree.runtime.evaluation.format_labelled`).

    Raises:
        DatasetError: see :func:`sourcefree.runtime.evaluation.labelled_keys` and
            :func:`~sourcefree.runtime.evaluation.format_labelled`.
    """
    if request.eval_labels is None and not request.eval_format_labels:
        return None
    from sourcefree.runtime.evaluation import format_labelled, labelled_keys

    folder = read_data(request)
    names = pkgs[0].manifest.labels
    if request.eval_labels is not None:
        lookup = labelled_keys(folder, request.eval_labels, names)
    else:
        labelled = format_labelled(request.data, request.data_format, request.format_options, names)
        lookup = {s.key: s.label for s in labelled.samples}
    return EvalLabels(folder, lookup)


@dataclass(frozen=True)
class Preflight:
    """What ``adapt`` checks first, before it claims OUT: the source packages and the labels."""

    packages: tuple[Package, ...]
    """Verified (with the request's keys, when given)."""
    labels: EvalLabels | None


def preflight(request: AdaptRequest) -> Preflight:
    """The vendor keys and every package's signature, then ``--eval-labels`` (nothing decoded).

    Raises:
        SignatureError, PackageError: see :func:`load_packages`.
        DatasetError: a bad labels CSV (:func:`check_eval_labels`).
    """
    pkgs = load_packages(request.packages, request.key_sources, request.require_signature)
    return Preflight(tuple(pkgs), check_eval_labels(request, pkgs))


#: One checkpoint holds the modules' weights and at most two optimizer moments per
#: parameter (Adam and AdamW; SGD's momentum is one): about this many times the weights.
CHECKPOINT_WEIGHTS_FACTOR = 3
#: report.json and report.html beside the adapted package (a generous bound).
REPORT_BYTES = 4 << 20


@dataclass(frozen=True)
class DiskNeed:
    """What one part of a run writes, where, and roughly how much."""

    where: Path
    """The folder written into (it may not exist yet)."""
    bytes: int
    what: str


def disk_needs(
    request: AdaptRequest, pkgs: Sequence[Package], target: Path, images: int = 0
) -> list[DiskNeed]:
    """The run's writes, estimated before it starts: the package, checkpoints, decoded images.

    The adapted package is about the size of the source package(s), staged beside
    OUT. A single run's checkpoints (:mod:`sourcefree.engine.checkpoints`) hold
    about :data:`CHECKPOINT_WEIGHTS_FACTOR` times the weights each; the newest
    ``KEEP`` are kept and a new one is written before the oldest is removed, so
    ``KEEP + 1`` are on disk at the peak (resuming: one more, the others are there).
    ``-m auto`` / ``--select auto`` write no checkpoint. ``images``: the listed
    target images, decoded into the run directory's cache
    (:func:`sourcefree.data.cache.cache_bytes`; a cache file already there counts
    as written); 0: not counted.
    """
    from sourcefree.data.cache import cache_bytes, cache_path
    from sourcefree.engine.checkpoints import KEEP

    package = sum(
        len(p.manifest_bytes) + sum(e.size for e in p.manifest.files.values()) for p in pkgs
    )
    needs = [DiskNeed(target.parent, package + REPORT_BYTES, "the adapted package beside OUT")]
    run_dir = run_dir_path(request, target)
    if not request.multi:
        count = 1 if request.resume else KEEP + 1
        one = CHECKPOINT_WEIGHTS_FACTOR * sum(len(p.weights_bytes) for p in pkgs)
        what = f"{count} checkpoint(s) of the weights and optimizer state in the run directory"
        needs.append(DiskNeed(run_dir, count * one, what))
    if images > 0:
        try:
            there = os.lstat(cache_path(run_dir)).st_size
        except OSError:
            there = 0
        size = max(0, cache_bytes(images, pkgs[0].manifest.input) - there)
        what = f"the {images} decoded target images in the run directory"
        needs.append(DiskNeed(run_dir, size, what))
    return needs


def run_dir_path(request: AdaptRequest, target: Path) -> Path:
    """The run directory: ``request.workdir``, or ``.<OUT>.work`` beside OUT (absolute)."""
    work = request.workdir
    return (Path(work) if work is not None else default_workdir(target)).absolute()


def _existing(path: Path) -> Path:
    """``path`` or its nearest existing ancestor (the disk it will be written on)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_disk_space(needs: Sequence[DiskNeed]) -> None:
    """Refuse a run whose writes do not fit the free space of their disks.

    Writes on the same file system are added up.

    Raises:
        WriteError: names the space needed, the space free and the fix.
    """
    disks: dict[int, list[DiskNeed]] = {}
    for need in needs:
        disks.setdefault(os.stat(_existing(need.where)).st_dev, []).append(need)
    for group in disks.values():
        total = sum(n.bytes for n in group)
        where = _existing(group[0].where)
        free = shutil.disk_usage(where).free
        if total > free:
            parts = "; ".join(
                f"{n.what} {shown(n.where)}: about {size_text(n.bytes)}" for n in group
            )
            need_text, free_text = size_text(total), size_text(free)
            if need_text == free_text:  # rounded alike: the exact numbers
                need_text, free_text = f"{total:,} bytes", f"{free:,} bytes"
            raise WriteError(
                f"not enough free space on the disk of {shown(where)}: this run writes about "
                f"{need_text} there and {free_text} is free",
                f"checked before any image is decoded ({parts})",
                "free space on that disk, or pass another -o OUT (and --workdir for the "
                "checkpoints) on a disk with more room",
            )


def load_target(
    data: str | os.PathLike[str],
    spec: Any,
    *,
    max_bad_fraction: float = 0.05,
    strict: bool = False,
    data_format: str = "folder",
    format_options: Mapping[str, Any] | None = None,
    workers: int | None = None,
) -> TargetData:
    """Read every image of ``data`` (unlabelled) at the package's input size.

    ``data_format``, ``format_options``: as :func:`sourcefree.data.sources.open_dataset`;
    ``workers``: decoding processes (:meth:`sourcefree.data.dataset.ImageDataset.load`).

    Raises:
        ConfigError: an unknown format or a bad option.
        DatasetError: no image, too many unreadable images, or one with ``strict``.
    """
    from sourcefree.data.sources import open_unlabelled

    folder = open_unlabelled(data, data_format, format_options)
    return read_target(
        folder, spec, max_bad_fraction=max_bad_fraction, strict=strict, workers=workers
    )[0]


def read_target(
    folder: ImageDataset,
    spec: Any,
    *,
    max_bad_fraction: float,
    strict: bool,
    progress: bool = False,
    workers: int | None = None,
    cache: Path | None = None,
    fingerprint: Fingerprint | None = None,
) -> tuple[TargetData, list[str], CacheInfo | None]:
    """The images of a listed folder as :class:`TargetData`, the key of each image kept,
    and how the decoded-image cache was used.

    ``cache``: the cache file in a private run directory
    (:func:`sourcefree.data.cache.read_cached`): the images are decoded into it, or
    read from it when it is valid, and memory-mapped; None: decoded into memory.
    ``fingerprint``: ``folder.fingerprint()`` when the caller has it.
    The keys stay in the pipeline to match evaluation labels after the run;
    they never reach a method or a report. The summary names the reader
    (``format``: ``folder``, ``expw``, ...), never a path.
    """
    from sourcefree.data.cache import read_cached
    from sourcefree.engine.method import TargetData
    from sourcefree.runtime.evaluation import load_images

    fp = folder.fingerprint() if fingerprint is None else fingerprint
    info = None
    if cache is None:
        loaded = load_images(
            folder,
            spec,
            max_bad_fraction=max_bad_fraction,
            strict=strict,
            progress=progress,
            workers=workers,
        )
        images, indices, report = loaded.images, loaded.indices, loaded.report
        digest = None
    else:
        read = read_cached(
            folder,
            spec,
            cache,
            fingerprint=fp,
            max_bad_fraction=max_bad_fraction,
            strict=strict,
            progress=progress,
            workers=workers,
        )
        images, indices, report, info = read.images, read.indices, read.report, read.info
        digest = read.pixel_sha256  # the cache hashed them once: no second full read
    summary = {
        "total": report.total,
        "ok": report.ok,
        "bad": report.bad,
        "reasons": dict(sorted(report.reasons.items())),
        "ignored": report.ignored,
        "dropped": report.dropped,
        "format": _FORMAT_OF_KIND.get(folder.kind, folder.kind),
    }
    if spec.faces.mode != "none":  # counts only: which images had no face stays on site
        summary["faces"] = {
            "mode": spec.faces.mode,
            "no_face": report.no_face,
            "no_face_skipped": report.no_face_skipped,
            "no_eyes": report.no_eyes,
        }
    target = TargetData(
        images=images,
        spec=spec,
        fingerprint=strictjson.dumps(
            {"digest": fp.digest, "files": fp.files, "bytes": fp.bytes}
        ).decode(),
        read_summary=summary,
        pixel_sha256=digest,
    )
    return target, [folder.samples[int(i)].key for i in indices], info


#: The format name of a reader's ``kind`` where they differ.
_FORMAT_OF_KIND = {"labels-csv": "csv", "labeled-folder": "folder"}


def _eval_truth(labels: EvalLabels, target: TargetData, keys: Sequence[str]) -> np.ndarray:
    """Evaluation label of every kept target image (-1: unlabelled), before any training.

    Raises:
        DatasetError: no labelled image was readable (all were skipped at load).
    """
    from sourcefree.runtime.evaluation import labels_of

    truth = labels_of(labels.lookup, keys)
    if not (truth >= 0).any():
        raise DatasetError(
            "no image that the labels CSV labels could be read",
            f"its {len(labels.lookup)} labelled images were all skipped as unreadable "
            f"({len(target)} target images read)",
            "label readable images, or replace the unreadable ones",
        )
    return truth


@dataclass(frozen=True)
class Prepared:
    """What the later stages run on: the request and everything read and checked for it."""

    request: AdaptRequest
    target: Path
    """OUT, absolute."""
    pkgs: list[Package]
    method_cls: type[Method] | None
    """The named method; None for ``method="auto"``."""
    cfg: Any
    config: dict[str, Any]
    """The resolved config of the named method (``{}`` for ``method="auto"``)."""
    base: Mapping[str, Any] | None
    """The request's config as a mapping (the base of every candidate's config)."""
    plan: list[selection.Candidate]
    dev: torch.device
    models: list[Classifier]
    """One checked model per package (the single run and the other ranks train them)."""
    data: TargetData
    truth: np.ndarray | None
    """Evaluation labels of the target images (-1: none), with ``--eval-labels``."""
    sample: np.ndarray | None
    """The gate's subsample (indices), None: every image."""
    t0: float
    t_loaded: float
    workdir: Workdir | None = None
    """Rank 0's run directory, open and locked (it holds the decoded-image cache)."""
    cache: CacheInfo | None = None
    """How the target images were read through the decoded-image cache."""
    cache_file: Path | None = None
    """This process's cache file (a rank other than 0 removes its own at the end)."""

    def named_method(self) -> type[Method]:
        """The class of the named method (a single run, or a rank under torchrun).

        Raises:
            ConfigError: ``method="auto"`` names none.
        """
        if self.method_cls is None:
            raise ConfigError(
                "-m auto names no single method",
                "only a named method trains as one run (or under torchrun)",
                "name the method",
            )
        return self.method_cls

    @property
    def sample_info(self) -> SampleInfo:
        n = len(self.data)
        return SampleInfo(n if self.sample is None else len(self.sample), n)


def _method_config(
    request: AdaptRequest,
) -> tuple[type[Method] | None, Any, Mapping[str, Any] | None]:
    """The named method's class and resolved config, and the request's config as a base."""
    from sourcefree.engine import config as cfgmod
    from sourcefree.engine.presets import preset_layer
    from sourcefree.engine.registry import get_method

    config = request.config
    if config is not None and dataclasses.is_dataclass(config) and not isinstance(config, type):
        base: Mapping[str, Any] | None = cfgmod.to_dict(config)
    else:
        base = config
    if request.auto:
        return None, None, base
    cls = get_method(request.method)
    file, overrides = request.config_file, request.overrides
    preset = preset_layer(request.method, request.preset)  # under base, file and --set
    return (
        cls,
        cfgmod.load_config(
            cls.config_class, file=file, overrides=overrides, base=base, preset=preset
        ),
        base,
    )


def _plan(
    request: AdaptRequest, n_sources: int, cls: type[Method] | None, config: dict[str, Any]
) -> list[selection.Candidate]:
    """The candidates of ``-m auto`` / ``--select auto`` (none for a single run)."""
    from sourcefree.pipeline import selection

    if not request.multi:
        return []
    names = selection.auto_methods(n_sources) if request.auto else [request.method]
    if not names:
        raise ConfigError(
            f"-m auto: no registered method takes {n_sources} source package(s)",
            "every method declares how many source models it adapts",
            "pass one package, or name a method",
        )
    plan = selection.plan_candidates(names, grid=request.select == "auto")
    if cls is not None:
        for cand in plan:  # a --set of a grid key is refused before any training
            selection.apply_overrides(cls.config_class, config, cand.overrides)
    return plan


def prepare(request: AdaptRequest, early: Preflight) -> Prepared:
    """Config, output directory, disk space, device, checked models, then the target images.

    ``early``: the packages and labels :func:`preflight` checked.

    Raises:
        ConfigError, PackageError, DatasetError, DeviceError, SourcefreeError (OUT exists),
        WriteError (not enough free disk space: :func:`check_disk_space`).
    """
    from sourcefree.engine import config as cfgmod
    from sourcefree.engine import distributed
    from sourcefree.engine.device import resolve_device
    from sourcefree.engine.registry import load_builtin_methods
    from sourcefree.pipeline import selection

    t0 = time.perf_counter()
    load_builtin_methods()  # the methods and the architecture families they export
    if request.multi and distributed.is_distributed():
        raise ConfigError(
            f"{'-m auto' if request.auto else '--select auto'} does not run under torchrun",
            "candidates are trained one after the other in one process",
            "run it in one process, or name one method and its config",
        )
    cls, cfg, base = _method_config(request)
    config = {} if cfg is None else cfgmod.to_dict(cfg)
    target = Path(request.out).absolute()
    if distributed.is_main():
        check_output_dir(target, request.overwrite)
    pkgs, labels = list(early.packages), early.labels
    if cls is not None:
        _check_sources(pkgs, request.method, cls.min_sources, cls.max_sources)
    plan = _plan(request, len(pkgs), cls, config)
    folder = labels.folder if labels is not None else read_data(request)  # listed, not decoded
    spec = pkgs[0].manifest.input
    if distributed.is_main():  # rank 0 alone writes OUT and the checkpoints
        check_disk_space(disk_needs(request, pkgs, target, images=len(folder)))
    dev = distributed.device_for_rank(resolve_device(request.device))
    models = [fresh_model(p, dev, check=True) for p in pkgs]
    fp = folder.fingerprint()
    public = {} if cfg is None else cfgmod.public_dict(cfg)  # no private paths leave
    created = not run_dir_path(request, target).exists()
    wd, cache_file = _run_dir(request, target, _identity(request, public, fp, pkgs), created)
    try:
        data, keys, cache = read_target(
            folder,
            spec,
            max_bad_fraction=request.max_bad_fraction,
            strict=request.strict,
            progress=request.progress,
            workers=request.workers,
            cache=cache_file,
            fingerprint=fp,
        )
        truth = None if labels is None else _eval_truth(labels, data, keys)
        # The gate's subsample: one for every model and candidate of the run, and for a
        # resumed run (a pure function of N, size and seed; outputs are recomputed).
        sample = selection.sample_indices(len(data), request.sample_size, request.seed)
    except BaseException:
        _left_after_error(wd, cache_file, created)
        raise
    t_loaded = time.perf_counter()
    return Prepared(
        request=request,
        target=target,
        pkgs=pkgs,
        method_cls=cls,
        cfg=cfg,
        config=public,
        base=base,
        plan=plan,
        dev=dev,
        models=models,
        data=data,
        truth=truth,
        sample=sample,
        t0=t0,
        t_loaded=t_loaded,
        workdir=wd,
        cache=cache,
        cache_file=cache_file,
    )


def _left_after_error(wd: Workdir | None, cache_file: Path, created: bool) -> None:
    """A run directory this run created is removed when reading the target fails
    (nothing was trained: no OUT, lock or run directory is left); one that existed
    is kept, as after any later error."""
    if wd is None:  # a rank other than 0: its own folder, when it is empty
        if created:
            with contextlib.suppress(OSError):
                cache_file.parent.rmdir()
    elif created:
        wd.remove()
    else:
        wd.close()


def _run_dir(
    request: AdaptRequest, target: Path, now: Mapping[str, Any], created: bool
) -> tuple[Workdir | None, Path]:
    """This process's run directory and decoded-image cache file, before any decoding.

    Rank 0 opens (private, locked) and checks the run directory (:func:`check_run_dir`).
    Under torchrun a rank ``r > 0`` writes only its own cache file
    (``images.rank<r>.cache``) into the same path, made private but not locked: on
    local disks each node has its own directory, on a shared file system every
    rank's file sits beside rank 0's. ``created``: the directory did not exist
    before (it is removed again when the checks refuse the run).
    """
    from sourcefree.data.cache import cache_path
    from sourcefree.engine import distributed
    from sourcefree.engine.rundir import make_private
    from sourcefree.engine.workdir import Workdir

    path = run_dir_path(request, target)
    if not distributed.is_main():
        return None, cache_path(make_private(path), distributed.rank())
    wd = Workdir(path).open()
    try:
        check_run_dir(request, wd, now)
    except BaseException:
        _left_after_error(wd, cache_path(wd.path), created)
        raise
    return wd, cache_path(wd.path)


def identity(prep: Prepared) -> dict[str, Any]:
    """What a resumed run must share with the interrupted one (``Workdir`` identity)."""
    from sourcefree.data.dataset import Fingerprint

    fp = strictjson.loads(prep.data.fingerprint.encode(), what="fingerprint", max_bytes=1 << 16)
    return _identity(prep.request, prep.config, Fingerprint(**fp), prep.pkgs)


def _identity(
    request: AdaptRequest, config: Mapping[str, Any], fp: Fingerprint, pkgs: Sequence[Package]
) -> dict[str, Any]:
    return {
        "format": "sourcefree-run-v1",
        "method": request.method,
        "config": dict(config),
        "dataset": {"digest": fp.digest, "files": fp.files, "bytes": fp.bytes},
        "sources": [p.sha256 for p in pkgs],
        "seed": request.seed,
        "sdk_version": __version__,
    }


def _identity_diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    from sourcefree.data.dataset import Fingerprint
    from sourcefree.engine.config import diff

    out: list[str] = []
    if old.get("method") != new.get("method"):
        out.append(f"the method changed ({old.get('method')} -> {new.get('method')})")
    if old.get("sources") != new.get("sources"):
        before = ", ".join(s[:12] for s in old.get("sources", []))
        after = ", ".join(s[:12] for s in new.get("sources", []))
        out.append(f"the source package changed (sha256 {before}... -> {after}...)")
    if old.get("dataset") != new.get("dataset"):
        a, b = old.get("dataset", {}), new.get("dataset", {})
        try:
            change = Fingerprint(**a).describe_change(Fingerprint(**b))
        except TypeError:
            change = "its fingerprint differs"
        out.append(f"the target dataset changed ({change})")
    if old.get("config") != new.get("config"):
        changes = diff(old.get("config", {}), new.get("config", {}))
        out.append("the config changed (" + "; ".join(changes[:5]) + ")")
    if old.get("seed") != new.get("seed"):
        out.append(f"the seed changed ({old.get('seed')} -> {new.get('seed')})")
    return out


def check_run_dir(request: AdaptRequest, wd: Workdir, now: Mapping[str, Any]) -> None:
    """Refuse a resume that differs from the interrupted run, or a fresh run over checkpoints.

    ``now``: this run's identity. A fresh single run records it for a later ``--resume``.
    """
    previous = wd.read_identity()
    if request.resume:
        if previous is None or not wd.has_checkpoints():
            raise ResumeError(
                f"nothing to resume in {str(wd.path)!r}",
                "no checkpoint was written there",
                "run without --resume (or pass the --workdir of the interrupted run)",
            )
        changes = _identity_diff(previous, now)
        if changes:
            raise ResumeError(
                "cannot resume: the inputs differ from the interrupted run",
                "; ".join(changes),
                "run again with the original inputs, or start a fresh run without "
                f"--resume after removing {str(wd.path)!r}",
            )
    elif wd.has_checkpoints():
        raise WorkdirError(
            f"run directory {str(wd.path)!r} holds checkpoints of an earlier run",
            "a fresh run would overwrite them",
            "pass --resume to continue that run, or remove the directory",
        )
    elif not request.multi:
        wd.write_identity(now)
