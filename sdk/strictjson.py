"""Strict JSON: no duplicate keys, no NaN or Infinity, bounded size and depth.

The standard library accepts duplicate keys (the last wins) and the non-standard
constants ``NaN``/``Infinity`` silently; both let two readers of one manifest
disagree, so packages are parsed here instead.
"""

from __future__ import annotations

import json
from typing import Any

from sourcefree.errors import PackageError

MAX_DEPTH = 16


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


def _depth(value: Any, level: int = 1) -> int:
    if isinstance(value, dict):
        return max([level, *(_depth(v, level + 1) for v in value.values())])
    if isinstance(value, list):
        return max([level, *(_depth(v, level + 1) for v in value)])
    return level


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
    try:
        value = json.loads(text, object_pairs_hook=_pairs, parse_constant=_no_constant)
    except _DuplicateKeyError as exc:
        raise PackageError(
            f"{what} has the key {exc.key!r} twice",
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
    if _depth(value) > MAX_DEPTH:
        raise PackageError(
            f"{what} is nested deeper than {MAX_DEPTH} levels",
            "deep nesting is refused to bound parsing work",
            "re-export the package",
        )
    return value


def dumps(value: Any) -> bytes:
    """Serialise canonically: sorted keys, two-space indent, no NaN."""
    return (json.dumps(value, indent=2, sort_keys=True, allow_nan=False) + "\n").encode("utf-8")
