"""Typed errors. Every message says what failed, why, and how to fix it."""

from __future__ import annotations

import signal


class SourcefreeError(Exception):
    """Base class of every error the SDK raises on purpose.

    Args:
        what: what failed, naming the file, field or value.
        why: why it is refused.
        fix: what the user can do about it.
    """

    exit_code = 2

    def __init__(self, what: str, why: str = "", fix: str = "") -> None:
        self.what = what
        self.why = why
        self.fix = fix
        super().__init__(_message(what, why, fix))


def exception_summary(exc: BaseException, limit: int = 200) -> str:
    """``Type: first line of the message`` (at most ``limit`` characters of it), for the
    "why" of an error that wraps a third-party exception."""
    text = str(exc)
    return f"{type(exc).__name__}: {text.splitlines()[0][:limit] if text else ''}"


def _message(what: str, why: str, fix: str) -> str:
    """``What. Why. Fix: fix.`` (empty parts left out)."""
    parts = [what]
    if why:
        parts.append(why[:1].upper() + why[1:])
    if fix:
        parts.append(f"Fix: {fix}")
    return " ".join(p if p.endswith((".", "?", "!")) else p + "." for p in parts)


class PackageError(SourcefreeError):
    """A package is malformed: manifest schema, file layout or model contents."""


class IntegrityError(PackageError):
    """A package file does not match the size or sha256 in its manifest."""


class SignatureError(PackageError):
    """A signature is missing, malformed, or was made by another key."""


class RequirementError(SourcefreeError):
    """A method or tool needs something the package does not carry (an auxiliary
    model such as an action-unit detector, or a source statistic)."""


class ExportError(SourcefreeError):
    """A model could not be exported; nothing was written."""


class InputError(SourcefreeError, ValueError):
    """An input array or image handed to the runtime is unusable."""


class DeviceError(SourcefreeError):
    """A requested device or execution provider is not available."""


class ConfigError(SourcefreeError, ValueError):
    """A configuration value or override is invalid."""


class DatasetError(SourcefreeError):
    """A dataset cannot be read, or holds too many unreadable files."""


class WorkdirError(SourcefreeError):
    """A run directory cannot be created, locked or used."""


class CheckpointError(SourcefreeError):
    """A checkpoint could not be written or read; the previous one is kept."""


class ResumeError(SourcefreeError):
    """``--resume`` was refused: nothing to resume, or the inputs changed."""


class TrainingError(SourcefreeError):
    """Adaptation diverged (a non-finite loss) or a method broke its contract."""


class DistributedError(SourcefreeError):
    """A multi-process run (torchrun) cannot start or its ranks disagree."""


#: Exit code of a run stopped by SIGINT/SIGTERM after writing a checkpoint
#: (EX_TEMPFAIL: run the same command again with ``--resume``).
EXIT_RESUMABLE = 75


class RunInterruptedError(SourcefreeError):
    """A signal stopped the run after a checkpoint; ``--resume`` continues it."""

    exit_code = EXIT_RESUMABLE


class WriteError(SourcefreeError):
    """An output could not be written (full disk, read-only or missing folder).

    Nothing half-written is left: temporary files and staging folders are removed.
    """


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped a command; what it was writing was removed.

    A ``KeyboardInterrupt`` (not a :class:`SourcefreeError`), so that no
    ``except SourcefreeError`` takes it for a failure and carries on; ``except
    BaseException`` cleanups run. Exit code: 128 + the signal number (130 for
    SIGINT, 143 for SIGTERM).
    """

    def __init__(self, signum: int) -> None:
        self.signum = signum
        self.signal_name = signal.Signals(signum).name
        self.exit_code = 128 + signum
        self.what = f"interrupted by {self.signal_name}"
        self.why = "nothing half-written was left: temporary files and staging folders were removed"
        self.fix = "run the command again"
        super().__init__(_message(self.what, self.why, self.fix))
