"""Inference runtime: a verified package on onnxruntime, with numpy and Pillow only.

No torch import. The graph bytes handed to onnxruntime are the bytes whose
sha256 was verified, so a file swapped after verification is never run.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import threading
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeAlias

import numpy as np
from PIL import Image

from sourcefree.data.dataset import Box
from sourcefree.data.faces import (
    FaceInput,
    NoFaceError,
    face_inputs,
    load_detectors,
    model_face,
    no_face_error,
)
from sourcefree.data.imaging import decode_image, draft_side, preprocess
from sourcefree.errors import DeviceError, InputError, PackageError, RequirementError
from sourcefree.package.audit import _excerpt
from sourcefree.package.loader import Package, load_package
from sourcefree.package.manifest import (
    ONNX_NAME,
    InputSpec,
    check_batch_bytes,
    physical_memory_bytes,
)

_log = logging.getLogger(__name__)

#: What :meth:`Predictor.predict` takes per image: a path, a PIL image, or a uint8
#: numpy frame (H, W, 3) RGB / BGR or (H, W) grey.
ImageSource: TypeAlias = str | os.PathLike[str] | Image.Image | np.ndarray

DEVICES = ("auto", "cpu", "cuda", "tensorrt")
_PROVIDER_OF = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}


def import_onnxruntime() -> Any:
    """Import onnxruntime with telemetry off (it is on in the official wheels)."""
    os.environ["ORT_DISABLE_TELEMETRY"] = "1"
    import onnxruntime as ort

    if hasattr(ort, "disable_telemetry_events"):
        ort.disable_telemetry_events()
    return ort


def _providers(ort: Any, device: str) -> list[Any]:
    if device not in DEVICES:
        raise DeviceError(
            f"unknown device {device!r}", f"choose one of {', '.join(DEVICES)}", "use --device auto"
        )
    available = set(ort.get_available_providers())
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if device == "auto":
        chain = [p for p in ("CUDAExecutionProvider",) if p in available]
        return [*chain, "CPUExecutionProvider"]
    wanted = _PROVIDER_OF[device]
    if wanted not in available:
        raise DeviceError(
            f"device {device!r} was requested but onnxruntime has no {wanted}",
            f"available providers: {', '.join(sorted(available))}",
            "install onnxruntime-gpu (not onnxruntime) with CUDA 12/13 libraries, "
            "or use --device cpu; run `sourcefree doctor`",
        )
    if device == "tensorrt":
        return [wanted, "CUDAExecutionProvider", "CPUExecutionProvider"]
    return [wanted, "CPUExecutionProvider"]


@functools.cache
def ort_errors() -> tuple[type[BaseException], ...]:
    """What onnxruntime raises: its own types (not RuntimeError subclasses) and pybind's."""
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    own = [v for v in vars(state).values() if isinstance(v, type) and issubclass(v, Exception)]
    return (*own, RuntimeError, ValueError, MemoryError)


def ort_reason(exc: BaseException) -> str:
    """The first line of an onnxruntime message, at most 200 characters, escaped."""
    lines = str(exc).strip().splitlines()
    return _excerpt(lines[0] if lines else type(exc).__name__, 200)


#: Smallest CPU memory cap a caller may set (``memory_limit``, ``--memory-limit``).
MIN_MEMORY_LIMIT = 64 << 20
#: The cap when the machine's memory cannot be read.
FALLBACK_MEMORY_LIMIT = 8 << 30
_arena_lock = threading.Lock()
_session_cap: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()


def default_memory_limit() -> int:
    """Half of the machine's memory: the default cap on what served graphs hold on the CPU."""
    ram = physical_memory_bytes()
    return FALLBACK_MEMORY_LIMIT if ram is None else ram // 2


def check_memory_limit(memory_limit: int | None) -> int:
    """``memory_limit`` in bytes (None: :func:`default_memory_limit`), checked."""
    if memory_limit is None:
        return default_memory_limit()
    if isinstance(memory_limit, bool) or not isinstance(memory_limit, int):
        raise InputError(
            f"memory_limit is {memory_limit!r}", "it must be bytes, an int", "pass an int"
        )
    if memory_limit < MIN_MEMORY_LIMIT:
        raise InputError(
            f"memory_limit is {memory_limit} bytes",
            f"a graph needs room for its weights and one batch; the least is "
            f"{MIN_MEMORY_LIMIT >> 20} MiB",
            f"pass {MIN_MEMORY_LIMIT} bytes ({MIN_MEMORY_LIMIT >> 20} MiB) or more",
        )
    return memory_limit


def _capped_session(ort: Any, model: bytes, opts: Any, providers: list[Any], cap: int) -> Any:
    """An onnxruntime session whose CPU tensors come from its own arena of at most ``cap`` bytes.

    The static checks bound what a graph declares, not what it computes: an allowed op
    (Concat of a tensor with itself, Pad, Expand) can grow a tensor past the machine's
    memory at run time. Past the cap onnxruntime fails the allocation, and
    :func:`run_session` turns that into a typed error instead of an out-of-memory kill.
    The arena is registered with onnxruntime's environment just for this session (which
    keeps it), then replaced by a 1 MiB one, so that it is freed with the session.
    """
    info = ort.OrtMemoryInfo(
        "Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT
    )
    opts.add_session_config_entry("session.use_env_allocators", "1")
    with _arena_lock:
        # extend strategy 1: grow by what is requested, so the cap is reached exactly
        # (doubling stops short of it) and the footprint follows the graph's plan
        ort.create_and_register_allocator(
            info, ort.OrtArenaCfg({"max_mem": cap, "arena_extend_strategy": 1})
        )
        try:
            return ort.InferenceSession(model, opts, providers=providers)
        finally:
            ort.create_and_register_allocator(
                info, ort.OrtArenaCfg({"max_mem": 1 << 20, "arena_extend_strategy": 1})
            )


def open_session(
    model: bytes,
    device: str,
    threads: int,
    *,
    package: str,
    file: str = ONNX_NAME,
    memory_limit: int | None = None,
) -> tuple[Any, str]:
    """An onnxruntime session over verified graph bytes, and the device it runs on.

    ``memory_limit`` caps the bytes the session holds on the CPU (None: half of the
    RAM; see :func:`_capped_session`).

    Raises:
        PackageError: onnxruntime refuses the graph of ``file`` in ``package``.
        DeviceError: the requested provider is missing or does not start.
        InputError: ``memory_limit`` is not an int of at least :data:`MIN_MEMORY_LIMIT`.
    """
    cap = check_memory_limit(memory_limit)
    ort = import_onnxruntime()
    providers = _providers(ort, device)
    opts = ort.SessionOptions()
    # onnxruntime's own log lines quote node names of the (untrusted) graph raw, so
    # they stay off: its errors become typed errors with an escaped excerpt. "auto"
    # tries CUDA and quietly settles on CPU when the CUDA libraries are missing (the
    # wheel lists CUDA either way); the returned device says what runs.
    opts.log_severity_level = 4
    opts.intra_op_num_threads = threads
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Load and provider start-up failures are logged by the process-wide logger.
    ort.set_default_logger_severity(4)
    try:
        session = _capped_session(ort, model, opts, providers, cap)
    except ort_errors() as exc:
        raise PackageError(
            f"package {package!r}'s {file} cannot be loaded by onnxruntime: {ort_reason(exc)}",
            "the graph passed the static checks but onnxruntime refuses it "
            "(a type, shape or operator error); nothing was run",
            "ask the vendor to re-export the package with the SDK (report this message to them)",
        ) from None
    finally:
        ort.set_default_logger_severity(3)
    _session_cap[session] = cap
    active = session.get_providers()
    if device in ("cuda", "tensorrt") and active[0] != _PROVIDER_OF[device]:
        raise DeviceError(
            f"device {device!r} was requested but onnxruntime runs on {active[0]}",
            "the GPU provider failed to start (CUDA or cuDNN libraries missing or mismatched)",
            "run `sourcefree doctor`, or use --device cpu",
        )
    return session, {v: k for k, v in _PROVIDER_OF.items()}.get(active[0], active[0])


def run_session(
    session: Any, names: Sequence[str], feed: Mapping[str, np.ndarray], *, package: str, file: str
) -> list[Any]:
    """``session.run``, with onnxruntime's failures as a typed PackageError.

    The inputs were checked against the input spec before, so a failure here is
    the graph's (or, for an out-of-memory message, the batch size's).
    """
    try:
        out: list[Any] = session.run(list(names), dict(feed))
    except ort_errors() as exc:
        asked = re.search(r"BFCArena.*requested bytes of (\d{1,30})", str(exc))
        cap = _session_cap.get(session)
        if asked and cap:
            raise PackageError(
                f"package {package!r}'s {file} outgrew the memory cap of "
                f"{cap >> 20} MiB (a further {int(asked.group(1)) >> 20} MiB "
                "tensor did not fit)",
                "its tensors for this batch outgrow what served graphs may hold on the CPU "
                "(the cap keeps a hostile graph from exhausting the machine's memory)",
                "lower the batch size; if you trust the package, raise the cap "
                "(Predictor(memory_limit=BYTES), sourcefree predict --memory-limit MIB)",
            ) from None
        raise PackageError(
            f"package {package!r}'s {file} failed in onnxruntime: {ort_reason(exc)}",
            "the graph loads but cannot compute on valid input (a shape, type or memory error)",
            "if the message is about memory, lower the batch size; otherwise ask the vendor "
            "to re-export the package with the SDK",
        ) from None
    return out


def graph_output(value: Any, shape: tuple[int, int], what: str, *, package: str) -> np.ndarray:
    """A graph output checked to be a real-valued array of ``shape``, as float32.

    Raises:
        PackageError: another type, dtype or shape (the graph lies about its outputs).
    """
    if isinstance(value, np.ndarray) and value.dtype.kind in "fiu" and value.shape == shape:
        return value.astype(np.float32, copy=False)
    got = (
        f"{value.dtype} array of shape {value.shape}"[:120]
        if isinstance(value, np.ndarray)
        else type(value).__name__
    )
    raise PackageError(
        f"package {package!r} returned {got} as {what}",
        f"a real-valued array of shape {shape} is expected",
        "ask the vendor to re-export the package with the SDK",
    )


def check_input_array(x: np.ndarray, spec: InputSpec) -> None:
    """Refuse an array that is not a finite float32 (N, C, H, W) batch for ``spec``."""
    c = spec.channels
    h, w = spec.size
    if not isinstance(x, np.ndarray):
        raise InputError(
            f"expected a numpy array, got {type(x).__name__}",
            "predict_array takes preprocessed arrays",
            "use predict() for images or paths",
        )
    if x.dtype != np.float32:
        raise InputError(
            f"input dtype is {x.dtype}",
            "the model takes float32",
            "convert with x.astype(np.float32)",
        )
    if x.ndim != 4 or tuple(x.shape[1:]) != (c, h, w) or x.shape[0] == 0:
        raise InputError(
            f"input shape is {tuple(x.shape)}",
            f"the model takes (N, {c}, {h}, {w}) with N >= 1",
            "preprocess with the package's input spec (or use predict())",
        )
    if not bool(np.isfinite(x).all()):
        raise InputError(
            "input contains NaN or Inf",
            "the model's output would be meaningless",
            "check the preprocessing",
        )


@dataclass(frozen=True)
class Prediction:
    """Results for a batch: one entry per input, in input order."""

    labels: list[str]
    indices: np.ndarray
    """Argmax class indices, shape (N,)."""
    probabilities: np.ndarray
    """Softmax probabilities, shape (N, C)."""
    features: np.ndarray | None = None
    """Backbone features, shape (N, D), when requested."""


@dataclass(frozen=True)
class FacePrediction:
    """One face of a photo and its prediction (:meth:`Predictor.predict_faces`).

    The box is the application's own output: the SDK never writes it into a
    package or a report.
    """

    box: Box
    """(left, top, right, bottom) in the photo's pixels; the whole frame when ``found`` is
    False."""
    label: str
    index: int
    """Argmax class index."""
    probabilities: np.ndarray
    """Softmax probabilities, shape (C,)."""
    found: bool = True
    """False when no face was found and the package's policy predicts the whole frame."""


class Predictor:
    """Serve a package with onnxruntime.

    Args:
        package: a package directory or an already verified :class:`Package`.
        device: ``auto`` (CUDA when it really works, else CPU), ``cpu``,
            ``cuda`` or ``tensorrt``. An explicit GPU device that cannot be
            honoured raises :class:`DeviceError`; it never falls back silently.
        public_key: vendor public key; when given the signature must verify.
        require_signature: refuse unsigned packages.
        batch_size: images per onnxruntime call in :meth:`predict`.
        threads: intra-op threads (0 lets onnxruntime choose).
        memory_limit: bytes the graph may hold on the CPU (weights and tensors;
            None: half of the RAM). A graph that asks for more fails with a
            :class:`PackageError` instead of exhausting the machine.

    A package whose input spec detects faces (``input.faces``) needs OpenCV (the
    ``faces`` extra); without it the constructor raises ``FaceDetectorError``.

    Examples:
        >>> from sourcefree.runtime import Predictor
        >>> predictor = Predictor("fer-pkg", device="cpu", public_key="vendor.pub")
        >>> result = predictor.predict(["face1.jpg", "face2.png"])
        >>> result.labels, result.probabilities.shape  # (2, number of classes)
    """

    def __init__(
        self,
        package: str | os.PathLike[str] | Package,
        device: str = "auto",
        *,
        public_key: str | os.PathLike[str] | bytes | None = None,
        require_signature: bool = False,
        batch_size: int = 64,
        threads: int = 0,
        memory_limit: int | None = None,
    ) -> None:
        if batch_size < 1:
            raise InputError(f"batch_size is {batch_size}", "it must be at least 1", "pass 1+")
        cap = check_memory_limit(memory_limit)  # before the package is read
        self.package = (
            package
            if isinstance(package, Package)
            else load_package(package, public_key=public_key, require_signature=require_signature)
        )
        manifest = self.package.manifest
        check_batch_bytes(manifest.input, batch_size)
        if manifest.input.faces.active:
            load_detectors(manifest.input.faces.detector)  # a missing OpenCV fails here
        self.session, self.device = open_session(
            self.package.onnx_bytes,
            device,
            threads,
            package=manifest.name,
            memory_limit=cap,
        )
        self.providers: list[str] = list(self.session.get_providers())
        self.batch_size = batch_size
        self.labels = manifest.labels
        self.spec = manifest.input
        self._onnx = manifest.onnx
        self._feature_dim = manifest.architecture.feature_dim
        _log.debug("serving %s on %s (%s)", manifest.name, self.device, ", ".join(self.providers))

    def __repr__(self) -> str:
        return f"Predictor({self.package.manifest.name!r}, device={self.device!r})"

    def predict_array(self, x: np.ndarray, *, features: bool = False) -> Prediction:
        """Predict an already preprocessed float32 (N, C, H, W) array.

        Raises:
            InputError: the array does not fit the input spec.
            PackageError: onnxruntime fails on the graph, or the graph returns
                outputs of the wrong shape or NaN/Inf logits or features.

        Examples:
            >>> x = np.stack([predictor.preprocess("face1.jpg")])  # (1, C, H, W) float32
            >>> pred = predictor.predict_array(x, features=True)
            >>> pred.indices, pred.features.shape  # (1, feature_dim)
        """
        check_input_array(x, self.spec)
        names = [self._onnx.logits] + ([self._onnx.features] if features else [])
        name = self.package.manifest.name
        logit_parts: list[np.ndarray] = []
        feat_parts: list[np.ndarray] = []
        for start in range(0, x.shape[0], self.batch_size):
            chunk = np.ascontiguousarray(x[start : start + self.batch_size])
            out = run_session(
                self.session, names, {self._onnx.input: chunk}, package=name, file=ONNX_NAME
            )
            n = chunk.shape[0]
            logit_parts.append(graph_output(out[0], (n, len(self.labels)), "logits", package=name))
            if features:
                shape = (n, self._feature_dim)
                feat_parts.append(graph_output(out[1], shape, "features", package=name))
        logits = np.concatenate(logit_parts)
        feats = np.concatenate(feat_parts) if features else None
        broken = ~np.isfinite(logits).all(axis=1)
        if feats is not None:
            broken |= ~np.isfinite(feats).all(axis=1)
        if broken.any():
            raise PackageError(
                f"package {name!r} returned NaN or Inf logits or features for "
                f"{int(broken.sum())} of {x.shape[0]} image(s)",
                "the inputs were finite, so the graph is broken (or an array passed to "
                "predict_array is far outside the preprocessed range); a label with "
                "probability nan would be meaningless",
                "ask the vendor to re-export the package with the SDK; with predict_array, "
                "preprocess with the package's input spec",
            )
        shifted = logits - logits.max(axis=1, keepdims=True)
        probs = np.exp(shifted)
        probs /= probs.sum(axis=1, keepdims=True)
        idx = probs.argmax(axis=1)
        return Prediction(
            labels=[self.labels[i] for i in idx],
            indices=idx,
            probabilities=probs,
            features=feats,
        )

    def preprocess(self, image: ImageSource, *, channel_order: str = "rgb") -> np.ndarray:
        """Decode one image (path, PIL image or uint8 frame) into the model's (C, H, W) input.

        A numpy frame is uint8 (H, W, 3) RGB, or BGR with ``channel_order="bgr"``
        (OpenCV), or (H, W) grey; it takes the same path as a PIL image of its pixels.

        When the package's input spec detects faces (``spec.faces``), the largest
        face is cut (and aligned) first, exactly as adaptation and evaluation do
        (:func:`sourcefree.data.faces.model_face`).

        Raises:
            ImageDecodeError: a file or frame cannot be decoded or is too large.
            InputError: a frame of another dtype or shape, or an unknown channel order.
            NoFaceError: no face found and the package skips such images (``no_face = skip``).
            FaceDetectorError: the package detects faces and OpenCV is missing.

        Examples:
            >>> x = predictor.preprocess("face1.jpg")
            >>> x.shape == (predictor.spec.channels, *predictor.spec.size)
            True
            >>> x = predictor.preprocess(cv2.imread("face1.jpg"), channel_order="bgr")
        """
        reduce_to = draft_side(self.spec.size, self.spec.faces.active)  # as load() does
        img = decode_image(image, self.spec.color, channel_order=channel_order, reduce_to=reduce_to)
        if self.spec.faces.active:
            face = model_face(img, self.spec.faces)
            if face is None:
                raise no_face_error()
            img = face.image
        return preprocess(img, self.spec)

    def predict_faces(
        self, image: ImageSource, *, channel_order: str = "rgb"
    ) -> list[FacePrediction]:
        """Every face of one photo and its prediction, largest first.

        Each face is cut (and aligned) as the package's input spec says; with no face
        found, the ``whole`` policy predicts the whole frame (``found`` False) and the
        ``skip`` policy returns an empty list.

        Raises:
            InputError: the package's input spec detects no faces (mode ``none``), or
                a frame of another dtype or shape.
            ImageDecodeError: the image cannot be decoded.
            FaceDetectorError: OpenCV is missing.

        Examples:
            >>> for face in predictor.predict_faces("group.jpg"):
            ...     print(face.box, face.label, face.probabilities.max())
        """
        faces = self.spec.faces
        if not faces.active:
            raise InputError(
                f"package {self.package.manifest.name!r} does not detect faces",
                "its input spec takes images that are already face crops (input.faces "
                "mode none), so it cannot say where faces are",
                "predict the image with predict(), or ask the vendor for a package "
                "exported with --faces detect or align",
            )
        img = decode_image(image, self.spec.color, channel_order=channel_order)
        found = face_inputs(img, faces)
        if not found and faces.no_face == "whole":
            found = [FaceInput((0, 0, img.width, img.height), img, found=False)]
        if not found:
            return []
        pred = self.predict_array(np.stack([preprocess(f.image, self.spec) for f in found]))
        return [
            FacePrediction(f.box, label, int(index), probs, f.found)
            for f, label, index, probs in zip(
                found, pred.labels, pred.indices, pred.probabilities, strict=True
            )
        ]

    def predict(
        self,
        images: Sequence[ImageSource] | ImageSource,
        *,
        features: bool = False,
        channel_order: str = "rgb",
    ) -> Prediction:
        """Decode, preprocess and predict images (paths, PIL images or uint8 numpy frames).

        Args:
            images: one image or a sequence; a numpy array is one frame (see
                :meth:`preprocess`), never a batch.
            features: also return the backbone features.
            channel_order: ``rgb``, or ``bgr`` for OpenCV frames (numpy frames only).

        Raises:
            ImageDecodeError: an image cannot be decoded (wrong kind, empty,
                truncated, decompression bomb). Use :meth:`predict_paths` to skip
                such files instead.
            InputError: a frame of another dtype or shape.
            NoFaceError: an image has no face and the package skips such images
                (:meth:`predict_paths` reports them and goes on).

        Examples:
            >>> predictor.predict("face1.jpg").labels
            ['happiness']
            >>> from PIL import Image
            >>> predictor.predict([Image.open("face2.png")], features=True).features
            >>> ok, frame = cv2.VideoCapture(0).read()
            >>> predictor.predict(frame, channel_order="bgr").labels
        """
        if isinstance(images, (str, os.PathLike, Image.Image, np.ndarray)):
            images = [images]
        if len(images) == 0:
            raise InputError("no images were given", "there is nothing to predict", "pass 1+")
        arrays = [self.preprocess(img, channel_order=channel_order) for img in images]
        return self.predict_array(np.stack(arrays), features=features)

    def predict_paths(
        self, paths: Iterable[Path], *, on_file: Callable[[], None] | None = None
    ) -> tuple[list[tuple[Path, str, float]], list[tuple[Path, str]]]:
        """Predict files one batch at a time; unreadable files are skipped and returned.

        So are images without a face when the package skips them (reason ``no face
        was found in an image``): never a whole-frame prediction the model was not made for.

        ``on_file`` is called once per file handled (predicted or skipped), e.g. to
        advance a progress bar.

        Returns:
            (results as (path, label, probability), failures as (path, reason)).

        Examples:
            >>> from pathlib import Path
            >>> done, failed = predictor.predict_paths(sorted(Path("photos").glob("*.jpg")))
            >>> for path, label, probability in done:
            ...     print(path.name, label, f"{probability:.2f}")
        """
        done, failed = self.predict_files(paths, on_file=on_file)
        rows = [(p, self.labels[int(probs.argmax())], float(probs.max())) for p, probs in done]
        return rows, failed

    def predict_files(
        self, paths: Iterable[Path], *, on_file: Callable[[], None] | None = None
    ) -> tuple[list[tuple[Path, np.ndarray]], list[tuple[Path, str]]]:
        """As :meth:`predict_paths`, with every class probability of each file.

        Returns:
            (results as (path, probabilities of shape (C,) in label order),
            failures as (path, reason)).
        """
        from sourcefree.data.imaging import ImageDecodeError

        done: list[tuple[Path, np.ndarray]] = []
        failed: list[tuple[Path, str]] = []
        batch: list[tuple[Path, np.ndarray]] = []

        def flush() -> None:
            if not batch:
                return
            pred = self.predict_array(np.stack([a for _, a in batch]))
            done.extend((p, probs) for (p, _), probs in zip(batch, pred.probabilities, strict=True))
            batch.clear()

        for path in paths:
            try:
                batch.append((path, self.preprocess(path)))
            except (ImageDecodeError, NoFaceError) as exc:
                failed.append((path, exc.what))
            if on_file is not None:
                on_file()
            if len(batch) >= self.batch_size:
                flush()
        flush()
        return done, failed


class AUDetector:
    """Serve a package's action-unit detector (manifest ``auxiliary.au_detector``).

    The graph takes the classifier's input (the same preprocessing) and returns
    per-image action-unit probabilities in [0, 1], one column per name in
    :attr:`au_names`. onnxruntime receives the verified bytes.

    Args:
        package: a package directory or an already verified :class:`Package`.
        device: as for :class:`Predictor` (default ``cpu``).
        batch_size: images per onnxruntime call.
        threads: intra-op threads (0 lets onnxruntime choose).

    Raises:
        RequirementError: the package carries no action-unit detector.
    """

    def __init__(
        self,
        package: str | os.PathLike[str] | Package,
        device: str = "cpu",
        *,
        batch_size: int = 256,
        threads: int = 0,
    ) -> None:
        if batch_size < 1:
            raise InputError(f"batch_size is {batch_size}", "it must be at least 1", "pass 1+")
        self.package = package if isinstance(package, Package) else load_package(package)
        spec = self.package.au_detector
        if spec is None:
            raise RequirementError(
                f"package {self.package.manifest.name!r} carries no action-unit detector",
                "its manifest has no auxiliary.au_detector",
                "ask the vendor for a package exported with "
                "sourcefree.export.source_package(..., au_detector=...)",
            )
        self.spec = spec
        self.input_spec = self.package.manifest.input
        self.session, self.device = open_session(
            self.package.read(spec.file),
            device,
            threads,
            package=self.package.manifest.name,
            file=spec.file,
        )
        self.batch_size = batch_size

    @property
    def au_names(self) -> tuple[str, ...]:
        """Action-unit names in output order."""
        return self.spec.au_names

    @property
    def threshold(self) -> float:
        """Outputs at or above it count as an active AU (as in the vendor's frequencies)."""
        return self.spec.threshold

    def detect_array(self, x: np.ndarray) -> np.ndarray:
        """Action-unit probabilities (N, num AUs) of a preprocessed float32 (N, C, H, W) array.

        Raises:
            InputError: the array does not fit the input spec.
            PackageError: onnxruntime fails on the graph, or it returned another
                shape, or values outside [0, 1] or not finite.
        """
        check_input_array(x, self.input_spec)
        name, file = self.package.manifest.name, self.spec.file
        parts = []
        for start in range(0, x.shape[0], self.batch_size):
            chunk = np.ascontiguousarray(x[start : start + self.batch_size])
            out = run_session(
                self.session, [self.spec.output], {self.spec.input: chunk}, package=name, file=file
            )
            shape = (chunk.shape[0], len(self.spec.au_names))
            parts.append(graph_output(out[0], shape, f"{file} output", package=name))
        probs = np.concatenate(parts)
        if not bool(np.isfinite(probs).all()) or probs.min() < 0.0 or probs.max() > 1.0:
            raise PackageError(
                f"{self.spec.file} returned values outside [0, 1]",
                "an action-unit detector outputs probabilities or intensities in [0, 1]",
                "ask the vendor to export the detector with a sigmoid (or clipped) output",
            )
        return probs
