"""Strict JSON: no duplicate keys, no NaN or Infinity, bounded size and depth.

The standard library accepts duplicate keys (the last wins) and the non-standard
constants ``NaN``/``Infinity`` silently; both let two readers of one manifest
disagree, so packages are parsed here instead. Nesting is measured by a linear
scan of the text before ``json.loads`` recurses into it.
"""

from __future__ import annotations

import json
import math
import re
from itertools import accumulate
from typing import Any

from sourcefree.errors import PackageError

MAX_DEPTH = 16
#: Longest integer read (sizes and offsets need 20 digits); Python's own guard can be off.
MAX_INT_DIGITS = 64
#: A JSON string, escapes included; an unterminated one runs to the end of the text
#: (``json.loads`` stops there), so a failed match never rescans the rest.
_STRING = re.compile(r'"[^"\\]*(?:\\.?[^"\\]*)*(?:"|\Z)', re.DOTALL)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_STEP = {"[": 1, "{": 1, "]": -1, "}": -1}


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKeyError(key)
        out[key] = value
    return out


class _DuplicateKeyError(Exception):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _no_constant(name: str) -> Any:
    raise _ConstantError(name)


class _ConstantError(Exception):
    pass


def _short_int(text: str) -> int:
    if len(text) > MAX_INT_DIGITS:
        raise _LongIntError
    return int(text)


class _LongIntError(Exception):
    pass


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _ConstantError(text)
    return value


def nesting(text: str) -> int:
    """Deepest ``[``/``{`` nesting outside strings: one linear pass, no recursion.

    ``json.loads`` reads nothing after its top-level value closes, so a count that
    drifts below zero past that point (invalid JSON) hides nothing it would parse.
    """
    brackets = _NOT_BRACKET.sub("", _STRING.sub("", text))
    return max(accumulate(map(_STEP.__getitem__, brackets)), default=0)


def loads(data: bytes, *, what: str, max_bytes: int) -> Any:
    """Parse ``data`` as strict UTF-8 JSON.

    Args:
        data: the raw bytes.
        what: the name shown in errors (a file name).
        max_bytes: refuse larger inputs before parsing.

    Raises:
        PackageError: oversized, not UTF-8, duplicate key, NaN/Infinity,
            too deeply nested, or not JSON at all.
    """
    if len(data) > max_bytes:
        raise PackageError(
            f"{what} is {len(data)} bytes",
            f"the limit is {max_bytes} bytes, so it was not parsed",
            "re-export the package with the SDK; manifests are small",
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PackageError(f"{what} is not UTF-8 text", str(exc), "re-export the package") from None
    if nesting(text) > MAX_DEPTH:
        raise PackageError(
            f"{what} is nested deeper than {MAX_DEPTH} levels",
            "deep nesting is refused before parsing, to bound the parser's work",
            "re-export the package",
        )
    try:
        value = json.loads(
            text,
            object_pairs_hook=_pairs,
            parse_constant=_no_constant,
            parse_float=_finite_float,
            parse_int=_short_int,
        )
    except _DuplicateKeyError as exc:
        raise PackageError(
            f"{what} has the key {exc.key[:64]!r} twice",
            "duplicate keys let two readers see different values",
            "re-export the package; do not edit manifests by hand",
        ) from None
    except _ConstantError:
        raise PackageError(
            f"{what} contains NaN or Infinity",
            "these are not JSON numbers",
            "re-export the package from finite values",
        ) from None
    except (json.JSONDecodeError, RecursionError) as exc:
        raise PackageError(f"{what} is not valid JSON", str(exc), "re-export the package") from None
    except _LongIntError:
        raise PackageError(
            f"{what} holds an integer longer than {MAX_INT_DIGITS} digits",
            "long integers are refused before they are converted",
            "re-export the package",
        ) from None
    return value


def dumps(value: Any) -> bytes:
    """Serialise canonically: sorted keys, two-space indent, no NaN."""
    return (json.dumps(value, indent=2, sort_keys=True, allow_nan=False) + "\n").encode("utf-8")
