"""Every dataset reader by format name: the one entry of ``--format`` and ``--format-option``.

:data:`FORMATS` maps a format name to its reader, what its PATH is and the
options it takes; :func:`open_dataset` reads one. The options are checked
before anything is read (:func:`check_options`): an unknown format, an option
the format does not take, or a bad value is a :class:`~sourcefree.errors.ConfigError`
that lists the valid ones. Face boxes from a format (ExpW, AffectNet) stay on
the samples and are cropped in :meth:`ImageDataset.decode`, the one decode path.
Labels from a format are for evaluation only: :func:`open_unlabelled` is what
``adapt`` trains on (every sample of the format, no label).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, TypeAlias

from sourcefree.data.dataset import ImageDataset
from sourcefree.data.formats import (
    SPLITS,
    read_affectnet,
    read_ckplus,
    read_expw,
    read_fer2013,
    read_ferplus,
    read_jaffe,
    read_rafdb,
)
from sourcefree.data.labels import FER8
from sourcefree.data.readers import read_image_folder, read_labeled_folder, read_labels_csv
from sourcefree.errors import ConfigError

#: The default format: every image under a folder, unlabelled (``read_image_folder``).
DEFAULT_FORMAT = "folder"

OptionValue: TypeAlias = "str | int | float | bool"
Options: TypeAlias = "Mapping[str, Any] | Iterable[str | tuple[str, Any]] | None"
"""Format options: a mapping, ``KEY=VALUE`` strings (the CLI's), or (key, value) pairs."""

_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")
_KINDS = {
    "bool": "true or false",
    "int": "a whole number",
    "float": "a number",
    "path": "a path",
    "choice": "one of",
}


@dataclass(frozen=True)
class FormatOption:
    """One option of a format: its kind, help and (for ``choice``) its accepted values."""

    kind: str
    """``bool``, ``int``, ``float``, ``path`` or ``choice``."""
    help: str
    choices: tuple[str, ...] = ()
    """Accepted values of a ``choice`` (matched case-insensitively, ``-``/``_`` ignored)."""
    minimum: float | None = None


@dataclass(frozen=True)
class DataFormat:
    """A dataset format: its reader, what its PATH is, and its options."""

    name: str
    path: str
    """What the PATH argument is (help text)."""
    reader: Callable[..., ImageDataset]
    """``reader(path, labels=..., **options)``."""
    options: Mapping[str, FormatOption] = field(default_factory=dict)
    all_labels: tuple[str, ...] | None = FER8
    """The label set that drops no sample for a missing class (what ``adapt`` reads with)."""
    labelled: bool = True
    """Carries labels (``folder`` only with ``classes=true``)."""

    def carries_labels(self, options: Mapping[str, Any]) -> bool:
        """Whether this format, with these (checked) options, carries labels."""
        return self.labelled or bool(options.get("classes", False))


def _folder(
    path: str | os.PathLike[str], *, labels: Sequence[str] | None = None, classes: bool = False
) -> ImageDataset:
    return read_labeled_folder(path, labels) if classes else read_image_folder(path)


def _csv(path: str | os.PathLike[str], *, labels: Sequence[str] | None = None) -> ImageDataset:
    return read_labels_csv(path, labels=labels)


_FER_SPLIT = FormatOption("choice", "train, val or test: FER2013's Usage column", tuple(SPLITS))
_IMAGES_ROOT = "folder the listed image names are relative to"

#: Every format by name: the registry ``--format`` chooses from.
FORMATS: dict[str, DataFormat] = {
    f.name: f
    for f in (
        DataFormat(
            "folder",
            "a folder of images (read recursively)",
            _folder,
            {"classes": FormatOption("bool", "one subfolder per class, named by its label")},
            all_labels=None,
            labelled=False,
        ),
        DataFormat(
            "csv",
            "a labels CSV of path,label rows (images relative to the CSV's folder)",
            _csv,
            all_labels=None,
        ),
        DataFormat(
            "fer2013", "fer2013.csv (48x48 pixels in the CSV)", read_fer2013, {"split": _FER_SPLIT}
        ),
        DataFormat(
            "ferplus",
            "fer2013new.csv (beside fer2013.csv), or a FER2013Train/-style folder",
            read_ferplus,
            {
                "split": _FER_SPLIT,
                "fer2013_csv": FormatOption("path", "the fer2013.csv the votes join to"),
            },
        ),
        DataFormat(
            "rafdb",
            "the RAF-DB basic/ folder (or its parent)",
            read_rafdb,
            {
                "split": FormatOption("choice", "train or test", ("train", "test")),
                "aligned": FormatOption("bool", "aligned 100x100 faces, default true"),
            },
        ),
        DataFormat(
            "affectnet",
            "an AffectNet CSV (training.csv) or a train_set/ folder",
            read_affectnet,
            {
                "images_root": FormatOption("path", _IMAGES_ROOT),
                "crop": FormatOption("bool", "crop the CSV's face box, default true"),
            },
        ),
        DataFormat(
            "expw",
            "ExpW's label/label.lst (faces cropped from their boxes)",
            read_expw,
            {
                "images_root": FormatOption("path", _IMAGES_ROOT),
                "min_confidence": FormatOption("float", "skip faces below this detector score"),
            },
        ),
        DataFormat(
            "ckplus",
            "the CK+ folder (cohn-kanade-images/ and Emotion/)",
            read_ckplus,
            {
                "last_frames": FormatOption("int", "frames per sequence, default 3", minimum=1),
                "neutral_first": FormatOption("bool", "first frame as neutral, default true"),
            },
        ),
        DataFormat("jaffe", "the JAFFE folder (code in each file name)", read_jaffe),
    )
}


def get_format(name: str) -> DataFormat:
    """The format called ``name``.

    Raises:
        ConfigError: no such format (the message lists them).
    """
    found = FORMATS.get(name) if isinstance(name, str) else None
    if found is None:
        raise ConfigError(
            f"--format {str(name)[:40]!r} is not known",
            f"the formats are {', '.join(FORMATS)}",
            "pass one of them (docs/data.md, 'From the CLI'), or leave --format out for a "
            "folder of images",
        )
    return found


def _pairs(given: Options) -> list[tuple[str, Any]]:
    if given is None:
        return []
    if isinstance(given, Mapping):
        return [(str(k), v) for k, v in given.items()]
    if isinstance(given, (str, bytes)):
        raise ConfigError(
            f"format options {str(given)[:40]!r} are one string",
            "options are a mapping, or a sequence of KEY=VALUE strings",
            f"pass [{str(given)[:40]!r}]",
        )
    out: list[tuple[str, Any]] = []
    for item in given:
        if isinstance(item, tuple) and len(item) == 2:
            out.append((str(item[0]), item[1]))
            continue
        text = str(item)
        key, sep, value = text.partition("=")
        if not sep or not key.strip():
            raise ConfigError(
                f"--format-option {text[:60]!r} is not KEY=VALUE",
                "each format option is a key, '=', and its value",
                "write e.g. --format-option split=test",
            )
        out.append((key.strip(), value.strip()))
    return out


def _bad_value(fmt: DataFormat, key: str, value: Any, opt: FormatOption) -> ConfigError:
    kind = _KINDS.get(opt.kind, opt.kind)
    if opt.choices:
        kind += " " + ", ".join(opt.choices)
    elif opt.minimum is not None:
        kind += f" of at least {opt.minimum:g}"
    return ConfigError(
        f"--format-option {key}={str(value)[:60]!r} is not valid for the {fmt.name} format",
        f"{key} is {kind} ({opt.help})",
        f"pass --format-option {key}=VALUE with a valid value",
    )


def _fold(text: str) -> str:
    return text.replace("-", "").replace("_", "").lower()


def _coerce(fmt: DataFormat, key: str, value: Any, opt: FormatOption) -> OptionValue:
    """``value`` (a CLI string or a Python value) as the option's type."""
    text = value.strip().lower() if isinstance(value, str) else None
    result: OptionValue | None = None
    if opt.kind == "bool":
        if isinstance(value, bool):
            result = value
        elif text in _TRUE or text in _FALSE:
            result = text in _TRUE
    elif opt.kind == "int":
        if isinstance(value, int) and not isinstance(value, bool):
            result = value
        elif text is not None and text.lstrip("-").isdigit() and len(text) <= 12:
            result = int(text)
    elif opt.kind == "float":
        try:
            number = float(value) if not isinstance(value, bool) else math.nan
        except (TypeError, ValueError):
            number = math.nan
        result = number if math.isfinite(number) else None
    elif opt.kind == "path":
        if isinstance(value, (str, os.PathLike)) and os.fspath(value):
            result = str(os.fspath(value))
    elif opt.kind == "choice" and text is not None:
        folded = {_fold(c): c for c in opt.choices}
        result = folded.get(_fold(text))
    if result is None or (
        opt.minimum is not None and not isinstance(result, str) and result < opt.minimum
    ):
        raise _bad_value(fmt, key, value, opt)
    return result


def check_options(fmt: str, given: Options = None) -> dict[str, OptionValue]:
    """The options of format ``fmt``, typed and checked (nothing is read).

    ``given``: a mapping, ``KEY=VALUE`` strings (keys may use ``-`` for ``_``),
    or (key, value) pairs; values are strings (parsed) or values of the option's type.

    Raises:
        ConfigError: an unknown format, an option it does not take, a value of the
            wrong type, or an option given twice.
    """
    spec = get_format(fmt)
    out: dict[str, OptionValue] = {}
    for raw_key, value in _pairs(given):
        key = raw_key.replace("-", "_")
        opt = spec.options.get(key)
        if opt is None:
            takes = ", ".join(spec.options) if spec.options else "no options"
            raise ConfigError(
                f"--format-option {raw_key[:40]!r}: the {spec.name} format has no such option",
                f"the {spec.name} format takes {takes}",
                "drop it, or pass one of those (docs/data.md, 'From the CLI')",
            )
        if key in out:
            raise ConfigError(
                f"--format-option {key} is given twice",
                "each option has one value",
                "keep one of them",
            )
        out[key] = _coerce(spec, key, value, opt)
    return dict(sorted(out.items()))


def option_text(value: OptionValue) -> str:
    """An option value as ``--format-option`` writes it (booleans as true/false)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def open_dataset(
    path: str | os.PathLike[str],
    fmt: str = DEFAULT_FORMAT,
    options: Options = None,
    *,
    labels: Sequence[str] | None = None,
) -> ImageDataset:
    """Read ``path`` as format ``fmt`` (a name of :data:`FORMATS`) with its options.

    Args:
        path: what the format reads (``FORMATS[fmt].path``): a folder, a CSV, a list.
        fmt: ``folder`` (default: every image under ``path``, unlabelled), ``csv``,
            ``fer2013``, ``ferplus``, ``rafdb``, ``affectnet``, ``expw``, ``ckplus``
            or ``jaffe``.
        options: the format's options (:func:`check_options`), e.g. ``{"split": "test"}``.
        labels: the label order the native labels are mapped to (a package's labels);
            samples of other classes are dropped and counted. None: the reader's
            default (FER7; a CSV's or folder's own names).

    Raises:
        ConfigError: an unknown format or a bad option (before anything is read).
        DatasetError: the data cannot be read (see each reader).

    Examples:
        >>> from sourcefree.data import open_dataset
        >>> faces = open_dataset("ExpW/label/label.lst", "expw", {"min_confidence": 50})
        >>> faces.load(size=48).images.shape  # each face cropped from its box
    """
    spec = get_format(fmt)
    checked = check_options(fmt, options)
    return spec.reader(path, labels=labels, **checked)


def without_labels(dataset: ImageDataset) -> ImageDataset:
    """The same samples, keys, boxes and counts with every label removed."""
    if dataset.labels is None and all(s.label < 0 for s in dataset.samples):
        return dataset
    return ImageDataset(
        [replace(s, label=-1) if s.label >= 0 else s for s in dataset.samples],
        None,
        root=dataset.root,
        kind=dataset.kind,
        sources=dataset.sources,
        ignored=dataset.ignored,
        dropped=dataset.dropped,
    )


def open_unlabelled(
    path: str | os.PathLike[str], fmt: str = DEFAULT_FORMAT, options: Options = None
) -> ImageDataset:
    """Every sample of the format, without labels: what ``adapt`` trains on.

    Read with the format's widest label set (FER8: no sample is dropped because a
    package lacks its class), then the labels are removed, so nothing downstream
    can choose by them. Which samples a format holds is its own protocol (e.g.
    CK+'s last frames of labelled sequences, AffectNet's rows that are faces).
    ``folder`` returns exactly :func:`read_image_folder`'s dataset.
    """
    spec = get_format(fmt)
    return without_labels(open_dataset(path, fmt, options, labels=spec.all_labels))


def formats_help() -> str:
    """One line per format: name, what PATH is, its options (CLI help)."""
    lines = []
    for spec in FORMATS.values():
        opts = f" [{', '.join(spec.options)}]" if spec.options else ""
        lines.append(f"{spec.name}: {spec.path}{opts}")
    return "; ".join(lines)
