"""The per-image decode of :meth:`ImageDataset.load` and its pool of worker processes.

:func:`decode_sample` is the one function that turns a sample into model pixels:
decode (at reduced scale for large JPEGs, :func:`sourcefree.data.imaging.draft_side`),
EXIF transpose, colour, the face of ``spec.faces`` (:func:`sourcefree.data.faces.model_face`)
and the resize. ``load(workers=1)`` calls it in this process; with more workers,
:class:`DecodePool` runs it in fresh Python processes (``python -c``, as
multiprocessing's ``spawn`` does: a new interpreter, so a parent that holds torch
or OpenMP threads is safe, and the caller's main module is never re-imported).

Parent and workers speak a framed binary protocol over the workers' stdin and
stdout: a JSON header and raw uint8 bytes, never pickle. ``workers=N`` starts N - 1
worker processes and the parent decodes too: chunks of contiguous indices go out
in order to whoever is free, a worker once it has said it is ready (so its start-up
overlaps the parent's decoding) and at most :data:`CHUNKS_IN_FLIGHT` at a time, the
parent whenever the chunk due next is a worker's and not back yet (at most
:data:`PARENT_AHEAD` ahead). Results are taken in index order whoever decoded them,
so the bad-file accounting, the strict-mode error and the pixels are the same for
any number of workers. A worker exits when its stdin closes (the parent ended or
died), ignores SIGINT (the parent stops it), and is terminated when the parent
leaves the pool on an error or a signal. No torch import.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import math
import os
import select
import signal
import struct
import subprocess
import sys
import threading
from collections import deque
from collections.abc import Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from queue import SimpleQueue
from typing import IO, TYPE_CHECKING, Any

import numpy as np
from PIL import Image

try:
    import fcntl
except ImportError:  # pragma: no cover - not on Windows
    fcntl = None  # type: ignore[assignment]

from sourcefree.data.imaging import ImageDecodeError, decode_image, resized_pixels
from sourcefree.errors import ConfigError, DatasetError, SourcefreeError, exception_summary
from sourcefree.package.manifest import FaceSpec

if TYPE_CHECKING:
    from sourcefree.data.dataset import Box, Sample

#: ``load()`` with ``workers=None`` decodes in this process below this many images
#: (starting a worker costs about half a second).
POOL_MIN_IMAGES = 1024
#: Chunks each worker may hold at once (sent ahead, or decoded and not yet taken back).
CHUNKS_IN_FLIGHT = 2
#: Chunks the parent may decode ahead of the one it returns next, while that one is a
#: worker's and not back yet; 0: the parent decodes nothing and starts N workers.
PARENT_AHEAD = 2
#: Bytes each worker pipe asks the kernel for (Linux ``F_SETPIPE_SZ``; 1 MiB is the
#: default ``/proc/sys/fs/pipe-max-size``). A 64 KiB pipe made a worker wait, blocked
#: in its write, until the parent read the whole chunk (2 workers on 2 cores, 16,000
#: 64 px PNGs: 1.50x one worker with 64 KiB pipes, 1.70x with 1 MiB; docs/data.md).
PIPE_BYTES = 1 << 20
#: At most this many images, and this many pixel bytes, in one chunk (a chunk's
#: result frame then fits in a worker's enlarged pipe).
MAX_CHUNK_IMAGES = 64
MAX_CHUNK_BYTES = PIPE_BYTES - (64 << 10)
#: Seconds a worker gets to exit after its stdin closed (or after SIGTERM) before SIGKILL.
EXIT_WAIT_S = 5.0

_FRAME = struct.Struct("<II")  # header length, blob length
_MAX_HEADER = 64 << 20
_WORKER_CODE = (
    "import sys\n"
    "if sys.path and sys.path[0] in ('', '.'): del sys.path[0]\n"
    "from sourcefree.data.decode import worker_main\n"
    "raise SystemExit(worker_main())\n"
)

_DECODE_REASONS = (
    ("is empty", "empty"),
    ("not a regular file", "not_regular"),
    ("could not be read", "unreadable"),
    ("too large", "too_large"),
    ("decompression bomb", "bomb"),
    ("not a supported image", "not_image"),
    ("corrupt or truncated", "corrupt"),
)


class DecodeWorkerError(DatasetError):
    """A decoding worker process could not start, died, or failed unexpectedly."""


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity where known)."""
    affinity = getattr(os, "sched_getaffinity", None)
    if affinity is not None:
        return max(1, len(affinity(0)))
    return max(1, os.cpu_count() or 1)


def check_workers(workers: Any, flag: str = "--workers") -> int | None:
    """``workers`` checked: None (the default) or a count of at least 1.

    Raises:
        ConfigError: 0, a negative count, or not an integer.
    """
    if workers is None:
        return None
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ConfigError(
            f"{flag} {workers!r}",
            "the number of decoding processes is a whole number of at least 1",
            f"pass {flag} 1 to decode in this process, or leave it out to use every usable core",
        )
    return workers


def resolve_workers(workers: int | None, images: int) -> int:
    """The worker count :meth:`ImageDataset.load` uses for ``images`` images.

    An explicit count is kept; None is the usable cores (shared among the ranks a
    ``torchrun`` starts on this machine, ``LOCAL_WORLD_SIZE``), or 1 below
    :data:`POOL_MIN_IMAGES` images.
    """
    given = check_workers(workers, "workers")
    if given is not None:
        return given
    if images < POOL_MIN_IMAGES:
        return 1
    return max(1, usable_cores() // local_ranks())


def local_ranks() -> int:
    """Processes ``torchrun`` starts on this machine (``LOCAL_WORLD_SIZE``; 1 when unset)."""
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        return 1


@dataclass(frozen=True)
class DecodePlan:
    """How every sample is decoded: size, colour, filter, faces and reduced-scale decoding."""

    size: tuple[int, int]
    """(height, width) of the output."""
    color: str
    interpolation: str
    faces: FaceSpec
    reduce_to: int | None = None
    """Short side a large JPEG keeps when decoded at reduced scale; None: full scale."""

    @property
    def channels(self) -> int:
        return 3 if self.color == "rgb" else 1

    @property
    def image_bytes(self) -> int:
        return self.size[0] * self.size[1] * self.channels

    def to_dict(self) -> dict[str, Any]:
        return {
            "size": list(self.size),
            "color": self.color,
            "interpolation": self.interpolation,
            "faces": self.faces.to_dict(),
            "reduce_to": self.reduce_to,
        }

    @classmethod
    def from_dict(cls, value: dict[str, Any]) -> DecodePlan:
        faces = value["faces"]
        height, width = value["size"]
        return cls(
            (int(height), int(width)),
            str(value["color"]),
            str(value["interpolation"]),
            FaceSpec(faces["mode"], faces["margin"], faces["no_face"], faces["detector"]),
            value["reduce_to"],
        )


@dataclass(frozen=True)
class Decoded:
    """What decoding one sample gave: pixels, or the reason it was skipped."""

    pixels: np.ndarray | None
    """uint8 (H, W, C) at the plan's size; None when skipped."""
    reason: str | None = None
    """A reason from :data:`sourcefree.data.dataset.REASONS` when unreadable."""
    no_face: bool = False
    """No face was found (kept whole when ``pixels`` is set, else skipped by policy)."""
    no_eyes: bool = False
    """``align`` found the face but not its eyes (the ``detect`` crop was used)."""


def decode_reason(exc: ImageDecodeError) -> str:
    """The :data:`~sourcefree.data.dataset.REASONS` key of a decoding error."""
    for needle, reason in _DECODE_REASONS:
        if needle in exc.what:
            return reason
    return "unreadable"


def clamp_box(img: Image.Image, box: Box) -> Box:
    """``box`` clamped to the image; DatasetError when less than 2x2 pixels overlap it."""
    left, top, right, bottom = box
    left, top = max(0, left), max(0, top)
    right, bottom = min(img.width, right), min(img.height, bottom)
    if right - left < 2 or bottom - top < 2:
        raise DatasetError(
            "a face box lies outside its image",
            f"box {box} on a {img.width}x{img.height} image",
            "check the annotation file",
        )
    return (left, top, right, bottom)


def open_sample(
    sample: Sample, color: str, *, crop: bool = True, reduce_to: int | None = None
) -> Image.Image:
    """Decode one sample (its box cropped unless ``crop`` is False) as ``RGB`` or ``L``.

    Raises:
        ImageDecodeError: the file cannot be decoded safely.
        DatasetError: the sample was refused at scan time, or its box is empty.
    """
    from sourcefree.data.dataset import REASONS, hashed_id

    if sample.error is not None:
        raise DatasetError(
            f"sample {hashed_id(sample.key)} is skipped",
            REASONS.get(sample.error, sample.error),
            "see the local log for the file",
        )
    if sample.pixels is not None:
        img = decode_image(Image.fromarray(sample.pixels), color)
    elif sample.path is not None:
        img = decode_image(sample.path, color, reduce_to=reduce_to)
    else:  # pragma: no cover - readers always set one of them
        raise DatasetError("a sample has neither a file nor pixels", "", "report a bug")
    if sample.box is not None:
        clamped = clamp_box(img, sample.box)
        img = img.crop(clamped) if crop else img
    return img


def open_or_reason(
    sample: Sample, color: str, *, crop: bool = True, reduce_to: int | None = None
) -> Image.Image | str:
    """:func:`open_sample`, or the reason the sample is skipped (robust decoding rules)."""
    if sample.error is not None:
        return sample.error
    try:
        return open_sample(sample, color, crop=crop, reduce_to=reduce_to)
    except ImageDecodeError as exc:
        return decode_reason(exc)
    except DatasetError:
        return "bad_box"
    except OSError:  # permission or I/O errors the decoder did not wrap
        return "unreadable"


def decode_sample(sample: Sample, plan: DecodePlan) -> Decoded:
    """One sample -> the model's uint8 pixels, or why it is skipped (see the module docstring).

    A sample with a face box from its format (ExpW, AffectNet) is decoded at full
    scale (its box is in the photo's pixels).

    Raises:
        FaceDetectorError: the plan detects faces and OpenCV is missing.
    """
    faces = plan.faces
    reduce_to = plan.reduce_to if sample.box is None else None
    img = open_or_reason(sample, plan.color, crop=not faces.active, reduce_to=reduce_to)
    if isinstance(img, str):
        return Decoded(None, img)
    no_face = no_eyes = False
    if faces.active:
        from sourcefree.data.faces import model_face

        face = model_face(img, faces, sample.box)
        if face is None:
            return Decoded(None, None, no_face=True)
        no_face = not face.found
        no_eyes = face.found and faces.mode == "align" and not face.aligned
        img = face.image
    return Decoded(resized_pixels(img, plan.size, plan.interpolation), None, no_face, no_eyes)


def chunk_size(images: int, workers: int, image_bytes: int) -> int:
    """Images per chunk: about 4 chunks per worker, at most 64 images and 960 KiB of pixels."""
    by_bytes = max(1, MAX_CHUNK_BYTES // max(1, image_bytes))
    return max(1, min(MAX_CHUNK_IMAGES, by_bytes, math.ceil(images / (4 * workers))))


# -- framing -----------------------------------------------------------------------------


def _write_all(out: IO[bytes], data: bytes) -> None:
    """Write every byte (an unbuffered pipe may take fewer than asked)."""
    view = memoryview(data)
    while view:
        view = view[out.write(view) or 0 :]


def _write_frame(out: IO[bytes], header: dict[str, Any], blob: bytes = b"") -> None:
    head = json.dumps(header, separators=(",", ":")).encode()
    _write_all(out, _FRAME.pack(len(head), len(blob)) + head)
    if blob:
        _write_all(out, blob)
    out.flush()


def _read_exact(inp: IO[bytes], n: int) -> bytearray | None:
    """Exactly ``n`` bytes, or None at the end of the stream (reads until it has them)."""
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = inp.readinto(view[got:])  # type: ignore[attr-defined]
        if not k:
            return None
        got += k
    return buf


def _read_frame(inp: IO[bytes]) -> tuple[dict[str, Any], bytearray] | None:
    """The next frame, or None at the end of the stream (or a cut one)."""
    prefix = _read_exact(inp, _FRAME.size)
    if prefix is None:
        return None
    head_len, blob_len = _FRAME.unpack(prefix)
    if head_len > _MAX_HEADER:
        return None
    head = _read_exact(inp, head_len)
    blob = _read_exact(inp, blob_len)
    if head is None or blob is None:
        return None
    try:
        header = json.loads(head)
    except ValueError:  # not the protocol (UnicodeDecodeError is a ValueError too)
        return None
    return (header, blob) if isinstance(header, dict) else None


def _encode_samples(samples: Sequence[Sample]) -> tuple[list[Any], bytes]:
    """Chunk items for a worker: path bytes (hex), box, scan-time error, pixels shape."""
    items: list[Any] = []
    blobs: list[bytes] = []
    for s in samples:
        pixels = None
        if s.pixels is not None:
            arr = np.ascontiguousarray(s.pixels)
            pixels = [list(arr.shape), arr.dtype.str]
            blobs.append(arr.tobytes())
        path = None if s.path is None else os.fsencode(s.path).hex()
        box = None if s.box is None else [int(v) for v in s.box]
        items.append([path, box, s.error, pixels])
    return items, b"".join(blobs)


def _decode_samples(items: list[Any], blob: bytes | bytearray) -> list[Sample]:
    from sourcefree.data.dataset import Sample

    out, offset = [], 0
    for path, box, error, pixels in items:
        arr = None
        if pixels is not None:
            shape, dtype = tuple(pixels[0]), np.dtype(pixels[1])
            size = math.prod(shape) * dtype.itemsize
            arr = np.frombuffer(blob, dtype, math.prod(shape), offset).reshape(shape)
            offset += size
        out.append(
            Sample(
                key="",
                path=None if path is None else Path(os.fsdecode(bytes.fromhex(path))),
                box=None if box is None else (box[0], box[1], box[2], box[3]),
                pixels=arr,
                error=error,
            )
        )
    return out


def _error_header(exc: BaseException) -> dict[str, Any]:
    if isinstance(exc, SourcefreeError):
        kind = type(exc)
        return {"module": kind.__module__, "name": kind.__qualname__,
                "what": exc.what, "why": exc.why, "fix": exc.fix}  # fmt: skip
    return {"module": "", "name": type(exc).__name__, "what": exception_summary(exc)}


def _rebuild_error(err: dict[str, Any]) -> SourcefreeError:
    """The worker's typed error as the same class here; anything else as DecodeWorkerError."""
    module, name = str(err.get("module", "")), str(err.get("name", ""))
    if module == "sourcefree" or module.startswith("sourcefree."):
        try:
            kind = getattr(importlib.import_module(module), name)
            if isinstance(kind, type) and issubclass(kind, SourcefreeError):
                return kind(str(err["what"]), str(err["why"]), str(err["fix"]))
        except (ImportError, AttributeError, KeyError, TypeError):
            pass
    return DecodeWorkerError(
        "a decoding worker failed",
        str(err.get("what", name)),
        "run again with --workers 1 (decodes in this process, where the error shows in "
        "full), and report it if it persists",
    )


# -- the pool ----------------------------------------------------------------------------


class DecodePool:
    """``workers - 1`` worker processes running :func:`decode_sample`, and this process.

    This process decodes chunks too while it waits for the workers' (see the module
    docstring); with :data:`PARENT_AHEAD` = 0 it starts ``workers`` processes and only
    takes their results. Use it as a context manager.

    Examples:
        >>> with DecodePool(plan, 4) as pool:
        ...     for index, decoded in pool.imap(samples, chunk_size(len(samples), 4, nbytes)):
        ...         ...
    """

    def __init__(self, plan: DecodePlan, workers: int) -> None:
        self.plan = plan
        self.workers = check_workers(workers, "workers") or 1
        self._procs: list[subprocess.Popen[bytes]] = []
        self.chunks_by_workers = 0
        """Chunks the started processes decoded (the others were decoded here)."""

    def __enter__(self) -> DecodePool:
        started = self.workers - 1 if PARENT_AHEAD > 0 else self.workers
        try:
            for _ in range(max(1, started)):
                self._start()
        except BaseException:
            self.close(kill=True)
            raise
        return self

    def __exit__(self, kind: type[BaseException] | None, *_: Any) -> None:
        self.close(kill=kind is not None)

    def _start(self) -> None:
        try:  # unbuffered pipes: select() then sees every byte a worker wrote
            proc = subprocess.Popen(
                [sys.executable, "-c", _WORKER_CODE],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                bufsize=0,
            )
        except OSError as exc:
            raise DecodeWorkerError(
                "a decoding worker process could not start",
                exception_summary(exc),
                "run again with --workers 1 (decodes in this process)",
            ) from None
        self._procs.append(proc)
        for pipe in (proc.stdin, proc.stdout):
            if pipe is not None:
                _grow_pipe(pipe.fileno())
        self._send(proc, {"plan": self.plan.to_dict()})

    def _send(
        self, proc: subprocess.Popen[bytes], header: dict[str, Any], blob: bytes = b""
    ) -> None:
        if proc.stdin is None:  # pragma: no cover - always a pipe
            raise self._died(proc)
        try:
            _write_frame(proc.stdin, header, blob)
        except (BrokenPipeError, ValueError, OSError):
            raise self._died(proc) from None

    def _died(self, proc: subprocess.Popen[bytes]) -> SourcefreeError:
        """The error a worker sent before it exited, or what its exit says."""
        try:
            code = proc.wait(timeout=EXIT_WAIT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait()
        last = None if proc.stdout is None else _read_frame(proc.stdout)
        if last is not None and isinstance(last[0].get("error"), dict):
            return _rebuild_error(last[0]["error"])
        how = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
        return DecodeWorkerError(
            f"a decoding worker process stopped ({how})",
            "it was killed (out of memory?) or crashed while decoding",
            "run again with --workers 1 (decodes in this process), or with fewer workers",
        )

    def imap(self, samples: Sequence[Sample], chunk: int) -> Iterator[tuple[int, Decoded]]:
        """``(index, decoded)`` for every sample, in index order (see the module docstring).

        A worker that stops before it said it is ready while this process decodes
        every chunk itself is no error: its results were not needed.

        Raises:
            DecodeWorkerError: a worker died; a worker's typed error, re-raised as its class.
        """
        run = _Schedule(self, samples, chunk)
        for c, (lo, _hi) in enumerate(run.bounds):
            results, error = run.take(c)
            yield from zip(range(lo, lo + len(results)), results, strict=False)
            if error is not None:
                raise error

    def _ready_frame(self, proc: subprocess.Popen[bytes]) -> None:
        """Read a worker's first answer: ready, or the error it met loading the plan."""
        frame = None if proc.stdout is None else _read_frame(proc.stdout)
        if frame is None:
            raise self._died(proc)
        if isinstance(frame[0].get("error"), dict):
            raise _rebuild_error(frame[0]["error"])
        if frame[0].get("ready") is not True:
            raise DecodeWorkerError(
                "a decoding worker sent a malformed answer",
                "expected its ready message",
                "run again with --workers 1 (decodes in this process), and report it",
            )

    def _receive(
        self, proc: subprocess.Popen[bytes], count: int
    ) -> tuple[list[Decoded], SourcefreeError | None]:
        frame = None if proc.stdout is None else _read_frame(proc.stdout)
        if frame is None:
            raise self._died(proc)
        header, blob = frame
        items = header.get("items", [])
        size = self.plan.image_bytes
        shape = (*self.plan.size, self.plan.channels)
        out: list[Decoded] = []
        offset = 0
        try:
            for reason, no_face, no_eyes, has_pixels in items[:count]:
                pixels = None
                if has_pixels:
                    pixels = np.frombuffer(blob, np.uint8, size, offset).reshape(shape)
                    offset += size
                out.append(Decoded(pixels, reason, bool(no_face), bool(no_eyes)))
        except (ValueError, TypeError):
            out = []
        error = header.get("error")
        if error is None and len(out) != count:
            raise DecodeWorkerError(
                "a decoding worker sent a malformed result",
                f"expected {count} images",
                "run again with --workers 1 (decodes in this process), and report it",
            )
        self.chunks_by_workers += 1
        return out, None if error is None else _rebuild_error(error)

    def close(self, *, kill: bool = False) -> None:
        """End every worker: close its stdin (it exits), or terminate it (``kill``)."""
        for proc in self._procs:
            if kill:
                proc.terminate()
            if proc.stdin is not None:
                with contextlib.suppress(OSError):
                    proc.stdin.close()
        for proc in self._procs:
            try:
                proc.wait(timeout=EXIT_WAIT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
        self._procs = []


def _grow_pipe(fd: int) -> bool:
    """Ask for a :data:`PIPE_BYTES` pipe buffer; False where the system says no.

    Speed only: a smaller pipe works the same, with the worker waiting more.
    """
    op = getattr(fcntl, "F_SETPIPE_SZ", None) if fcntl is not None else None
    if op is None:
        return False
    try:
        fcntl.fcntl(fd, op, PIPE_BYTES)
    except OSError:  # above the system's pipe-max-size, or not a pipe
        return False
    return True


def _readable(procs: Sequence[subprocess.Popen[bytes]], timeout: float | None) -> list[int]:
    """Indices of the processes whose stdout has bytes to read (within ``timeout`` s)."""
    fds = {p.stdout.fileno(): i for i, p in enumerate(procs) if p.stdout is not None}
    ready, _, _ = select.select(list(fds), [], [], timeout)
    return [fds[fd] for fd in ready]


class _Schedule:
    """Which process decodes which chunk, for one :meth:`DecodePool.imap`."""

    def __init__(self, pool: DecodePool, samples: Sequence[Sample], chunk: int) -> None:
        self.pool, self.samples = pool, samples
        n = len(samples)
        self.bounds = [(lo, min(lo + chunk, n)) for lo in range(0, n, chunk)]
        self.owner: list[int] = []
        """Per assigned chunk (in order): the worker's index, or -1 for this process."""
        self.local: dict[int, tuple[list[Decoded], SourcefreeError | None]] = {}
        self.queued: list[deque[int]] = [deque() for _ in pool._procs]
        self.ready = [False] * len(pool._procs)

    def take(self, c: int) -> tuple[list[Decoded], SourcefreeError | None]:
        """Chunk ``c``'s results (the next in order), decoding others here meanwhile."""
        while True:
            self._poll_ready(0.0)
            self._top_up()
            here = PARENT_AHEAD > 0 and len(self.local) < PARENT_AHEAD
            if c < len(self.owner) and self.owner[c] < 0:
                return self.local.pop(c)
            if c < len(self.owner):
                w = self.owner[c]
                procs = self.pool._procs
                if not here or len(self.owner) == len(self.bounds) or _readable([procs[w]], 0):
                    if self.queued[w].popleft() != c:  # pragma: no cover - assigned in order
                        raise DecodeWorkerError("chunks out of order", "", "report a bug")
                    return self.pool._receive(procs[w], self.bounds[c][1] - self.bounds[c][0])
            if here and len(self.owner) < len(self.bounds):
                self._decode_here()
            elif c >= len(self.owner):
                self._poll_ready(None)  # nobody may take chunk c yet: wait for a worker

    def _poll_ready(self, timeout: float | None) -> None:
        waiting = [i for i, r in enumerate(self.ready) if not r]
        if not waiting:
            return
        procs = [self.pool._procs[i] for i in waiting]
        for j in _readable(procs, timeout):
            self.pool._ready_frame(procs[j])
            self.ready[waiting[j]] = True

    def _top_up(self) -> None:
        for w, queued in enumerate(self.queued):
            while self.ready[w] and len(queued) < CHUNKS_IN_FLIGHT:
                c = len(self.owner)
                if c == len(self.bounds):
                    return
                lo, hi = self.bounds[c]
                items, blob = _encode_samples(self.samples[lo:hi])
                self.pool._send(self.pool._procs[w], {"items": items}, blob)
                self.owner.append(w)
                queued.append(c)

    def _decode_here(self) -> None:
        c = len(self.owner)
        lo, hi = self.bounds[c]
        results, error = _decode_items(self.samples[lo:hi], self.pool.plan)
        self.owner.append(-1)
        self.local[c] = (results, None if error is None else _rebuild_error(error))


def decode_all(
    samples: Sequence[Sample], plan: DecodePlan, workers: int
) -> Generator[tuple[int, Decoded], None, None]:
    """``(index, decoded)`` of every sample in order: in this process, or in a pool.

    The caller must exhaust or close the iterator (the pool's workers end then); use
    it inside a ``with contextlib.closing(...)`` block.
    """
    if workers <= 1 or len(samples) <= 1:
        for i, sample in enumerate(samples):
            yield i, decode_sample(sample, plan)
        return
    chunk = chunk_size(len(samples), workers, plan.image_bytes)
    workers = min(workers, math.ceil(len(samples) / chunk))
    with DecodePool(plan, workers) as pool:
        yield from pool.imap(samples, chunk)


# -- the worker --------------------------------------------------------------------------


def _decode_items(
    samples: Iterable[Sample], plan: DecodePlan
) -> tuple[list[Decoded], dict[str, Any] | None]:
    """Decode samples in order up to the first error (as a header; raised at its sample)."""
    out: list[Decoded] = []
    try:
        for sample in samples:
            out.append(decode_sample(sample, plan))
    except Exception as exc:
        return out, _error_header(exc)
    return out, None


def _decode_chunk(
    header: dict[str, Any], blob: bytes | bytearray, plan: DecodePlan
) -> tuple[dict[str, Any], bytes]:
    try:
        samples = _decode_samples(header["items"], blob)
    except Exception as exc:  # a malformed chunk: sent to the parent, raised there
        return {"items": [], "error": _error_header(exc)}, b""
    decoded, error = _decode_items(samples, plan)
    items = [[d.reason, int(d.no_face), int(d.no_eyes), int(d.pixels is not None)] for d in decoded]
    pixels = [
        np.ascontiguousarray(d.pixels, dtype=np.uint8).tobytes()
        for d in decoded
        if d.pixels is not None
    ]
    return {"items": items, "error": error}, b"".join(pixels)


def worker_main() -> int:
    """A decoding worker: read the plan, then decode chunks until stdin closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops its workers
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # anything a library prints goes to stderr, never into the protocol
    sys.stdout = sys.stderr
    inp = sys.stdin.buffer
    first = _read_frame(inp)
    if first is None:
        return 0
    try:
        plan = DecodePlan.from_dict(first[0]["plan"])
        if plan.faces.active:
            from sourcefree.data.faces import load_detectors

            load_detectors(plan.faces.detector)
    except Exception as exc:
        _write_frame(out, {"items": [], "error": _error_header(exc)})
        return 1
    _write_frame(out, {"ready": True})  # the parent sends chunks from now on
    queue: SimpleQueue[tuple[dict[str, Any], bytearray]] = SimpleQueue()

    def read() -> None:  # drains stdin so the parent never blocks on a full pipe
        while True:
            frame = _read_frame(inp)
            if frame is None:
                os._exit(0)  # the parent closed stdin: no result is wanted any more
            queue.put(frame)

    threading.Thread(target=read, daemon=True).start()
    try:
        while True:
            header, blob = queue.get()
            _write_frame(out, *_decode_chunk(header, blob, plan))
    except OSError:  # a broken pipe: the parent is gone, nobody wants the result
        os._exit(0)
