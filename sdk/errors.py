"""Typed errors. Every message says what failed, why, and how to fix it."""

from __future__ import annotations


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
        parts = [what]
        if why:
            parts.append(why[:1].upper() + why[1:])
        if fix:
            parts.append(f"Fix: {fix}")
        super().__init__(" ".join(p if p.endswith((".", "?", "!")) else p + "." for p in parts))


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
