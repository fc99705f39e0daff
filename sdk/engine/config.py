"""Method configs: frozen dataclasses, serialised to YAML and ``--set`` overrides.

A config class is the one source of truth: paper defaults live in the field
defaults, and each field carries a one-line attribute docstring (read by
``sourcefree methods``). YAML files (``yaml.safe_load`` only) and dotted
``--set key=value`` overrides are checked against the fields: unknown keys get
a "did you mean", values are parsed to the field's type. Configs round-trip
through :func:`to_dict` / :func:`from_dict` for provenance and resume checks.
No torch import.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import math
import os
import textwrap
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from sourcefree.errors import ConfigError

C = TypeVar("C")

#: Largest config file read, in bytes.
MAX_CONFIG_BYTES = 1 << 20
_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def _check_class(cls: type[Any]) -> None:
    if not (dataclasses.is_dataclass(cls) and isinstance(cls, type)):
        raise ConfigError(f"{cls!r} is not a dataclass", "configs are frozen dataclasses", "")


def _hints(cls: type[Any]) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _fields(cls: type[Any]) -> dict[str, dataclasses.Field[Any]]:
    return {f.name: f for f in dataclasses.fields(cls) if f.init}


def to_dict(config: Any) -> dict[str, Any]:
    """A plain dict of JSON/YAML scalars, lists and nested dicts."""
    _check_class(type(config))
    out: dict[str, Any] = {}
    for name in _fields(type(config)):
        out[name] = _plain(getattr(config, name))
    return out


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_dict(value)
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    return value


#: What :func:`public_dict` writes for a set private field (``metadata={"private": True}``).
PRIVATE = "<private>"


def public_dict(config: Any) -> dict[str, Any]:
    """:func:`to_dict` for what leaves the machine (report, provenance, run identity).

    A field declared with ``field(metadata={"private": True})`` (a local file path)
    becomes :data:`PRIVATE` when set; None stays None. Not for rebuilding a config.
    """
    _check_class(type(config))
    out: dict[str, Any] = {}
    for name, f in _fields(type(config)).items():
        value = getattr(config, name)
        if f.metadata.get("private") and value is not None:
            out[name] = PRIVATE
        elif dataclasses.is_dataclass(value) and not isinstance(value, type):
            out[name] = public_dict(value)
        else:
            out[name] = _plain(value)
    return out


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """``"did you mean 'x'? "`` for the closest of ``choices`` (difflib), else ``""``.

    The hint that unknown config keys and unknown methods start their explanation
    with (the error message capitalises it).
    """
    close = difflib.get_close_matches(name, list(choices), n=1)
    return f"did you mean {close[0]!r}? " if close else ""


def _unknown_key(key: str, allowed: Sequence[str], where: str) -> ConfigError:
    hint = did_you_mean(key, allowed)
    return ConfigError(
        f"unknown config key {where + key!r}",
        f"{hint}valid keys: {', '.join(sorted(allowed))}",
        "fix the key (`sourcefree methods` lists every option)",
    )


def from_dict(cls: type[C], data: Mapping[str, Any], *, prefix: str = "") -> C:
    """Build ``cls`` from a (possibly partial) dict; missing keys keep their defaults.

    Raises:
        ConfigError: an unknown key or a value of the wrong type (names the key).
    """
    _check_class(cls)
    if not isinstance(data, Mapping):
        raise ConfigError(
            f"config section {prefix.rstrip('.') or '(top level)'!r} is not a mapping",
            f"got {type(data).__name__}",
            "write `key: value` pairs",
        )
    fields = _fields(cls)
    hints = _hints(cls)
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if not isinstance(key, str) or key not in fields:
            raise _unknown_key(str(key), list(fields), prefix)
        kwargs[key] = _coerce(value, hints[key], prefix + key)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(
            f"invalid config {prefix.rstrip('.') or cls.__name__}", str(exc), "fix the value"
        ) from None


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check a YAML/dict value against an annotation, converting lists to tuples."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as exc:
                errors.append(exc)
        raise errors[0] if errors else _bad(key, value, "a value")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(
                f"config key {key!r} is {value!r}",
                f"choose one of {', '.join(repr(a) for a in args)}",
                "fix the value",
            )
        return value
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if dataclasses.is_dataclass(value) and isinstance(value, tp):
            return value
        return from_dict(tp, value, prefix=key + ".")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise _bad(key, value, "a list")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if len(args) != len(value):
            raise _bad(key, value, f"a list of {len(args)} values")
        pairs = enumerate(zip(args, value, strict=True))
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (a, v) in pairs)
    if tp is bool:
        if not isinstance(value, bool):
            raise _bad(key, value, "true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _bad(key, value, "an integer")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _bad(key, value, "a number")
        if not math.isfinite(value):
            raise _bad(key, value, "a finite number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise _bad(key, value, "a string")
        return value
    raise ConfigError(
        f"config key {key!r} has an unsupported type {tp!r}",
        "configs use bool, int, float, str, Literal, tuples and nested dataclasses",
        "report a bug in the method's config class",
    )


def _bad(key: str, value: Any, expected: str) -> ConfigError:
    return ConfigError(
        f"config key {key!r} is {value!r}",
        f"expected {expected}",
        "fix the value in the YAML file or the --set override",
    )


def _field_type(cls: type[Any], dotted: str) -> Any:
    """The annotation at a dotted key, checking each part."""
    current: Any = cls
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        prefix = ".".join(parts[:i]) + "." if i else ""
        if not (dataclasses.is_dataclass(current) and isinstance(current, type)):
            raise ConfigError(
                f"config key {prefix.rstrip('.')!r} has no sub-keys",
                f"cannot set {dotted!r}",
                f"use --set {prefix.rstrip('.')}=VALUE",
            )
        fields = _fields(current)
        if part not in fields:
            raise _unknown_key(part, list(fields), prefix)
        current = _hints(current)[part]
    return current


def parse_text(text: str, tp: Any, key: str) -> Any:
    """Parse the text of a ``--set`` value to the field type ``tp``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    stripped = text.strip()
    if origin in (typing.Union, types.UnionType):
        if stripped.lower() in ("none", "null", "~") and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return parse_text(text, arg, key)
            except ConfigError:
                continue
        raise _bad(key, text, " or ".join(str(a) for a in args))
    if origin is typing.Literal:
        for choice in args:
            if str(choice) == stripped:
                return choice
        return _coerce(stripped, tp, key)
    if origin is tuple:
        body = stripped.strip("[]()")
        items = [p.strip() for p in body.split(",")] if body else []
        elem = args[0] if len(args) == 2 and args[1] is Ellipsis else None
        if elem is None and len(items) != len(args):
            raise _bad(key, text, f"{len(args)} comma-separated values")
        return tuple(
            parse_text(v, elem if elem is not None else args[i], f"{key}[{i}]")
            for i, v in enumerate(items)
        )
    if dataclasses.is_dataclass(tp):
        raise ConfigError(
            f"config key {key!r} is a section",
            "a --set override names one value",
            f"set its fields one by one: --set {key}.FIELD=VALUE",
        )
    if tp is bool:
        low = stripped.lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise _bad(key, text, "true or false")
    if tp is int:
        try:
            return int(stripped)
        except ValueError:
            raise _bad(key, text, "an integer") from None
    if tp is float:
        try:
            value = float(stripped)
        except ValueError:
            raise _bad(key, text, "a number") from None
        return _coerce(value, float, key)
    if tp is str:
        return text
    return _coerce(text, tp, key)


def set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``data[a][b][c] = value`` for ``dotted`` ``"a.b.c"``, in place.

    Missing levels, and levels that are not dicts, become new dicts. Used for
    ``--set`` overrides and for the ``--select auto`` grid entries.
    """
    parts = dotted.split(".")
    node = data
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, str]:
    """Split ``key=value``; the key may be dotted (``ssl.init=scratch``)."""
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not p for p in key.split(".")):
        raise ConfigError(
            f"override {text!r} is not key=value",
            "--set takes a dotted key, '=' and a value",
            "write e.g. --set lr=0.001 or --set ssl.init=scratch",
        )
    return key, value


def read_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a YAML mapping with ``yaml.safe_load`` (no Python object tags)."""
    import yaml

    p = Path(path)
    try:
        if p.stat().st_size > MAX_CONFIG_BYTES:
            raise ConfigError(
                f"config file {p.name!r} is too large", f"limit {MAX_CONFIG_BYTES} bytes", ""
            )
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(
            f"cannot read config file {str(p)!r}", exc.strerror or str(exc), "check the path"
        ) from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {p.name!r} is not UTF-8", "", "save it as UTF-8") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(
            f"config file {p.name!r} is not valid YAML", str(exc).splitlines()[0], "fix the syntax"
        ) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {p.name!r} does not hold a mapping",
            f"its top level is a {type(data).__name__}",
            "write one `key: value` per line",
        )
    return data


def to_yaml(config: Any) -> str:
    """YAML text of a config (readable back by :func:`load_config`)."""
    import yaml

    text: str = yaml.safe_dump(to_dict(config), sort_keys=False, default_flow_style=None)
    return text


def load_config(
    cls: type[C],
    *,
    file: str | os.PathLike[str] | None = None,
    overrides: Sequence[str] = (),
    base: Mapping[str, Any] | None = None,
    preset: Mapping[str, Any] | None = None,
) -> C:
    """Defaults, then ``preset``, then ``base``, then the YAML ``file``, then ``--set`` overrides.

    ``preset``: a ``--preset`` layer (:func:`sourcefree.engine.presets.preset_layer`).

    Raises:
        ConfigError: unknown keys ("did you mean"), wrong types, unreadable files.
    """
    _check_class(cls)
    data: dict[str, Any] = to_dict(cls())
    layers: list[Mapping[str, Any]] = []
    if preset is not None:
        layers.append(preset)
    if base is not None:
        layers.append(base)
    if file is not None:
        layers.append(read_yaml(file))
    for layer in layers:
        # Validate the layer on its own first, so errors name the layer's keys.
        from_dict(cls, layer)
        _merge(data, layer)
    for text in overrides:
        key, raw = parse_override(text)
        tp = _field_type(cls, key)
        set_dotted(data, key, _plain(parse_text(raw, tp, key)))
    return from_dict(cls, data)


def _merge(into: dict[str, Any], layer: Mapping[str, Any]) -> None:
    for key, value in layer.items():
        if isinstance(value, Mapping) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = _plain(value) if not isinstance(value, Mapping) else dict(value)


def diff(old: Mapping[str, Any], new: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Human-readable differences between two config dicts (``key: a -> b``)."""
    out: list[str] = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, "<absent>"), new.get(key, "<absent>")
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out.extend(diff(a, b, f"{prefix}{key}."))
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


def field_docs(cls: type[Any]) -> dict[str, str]:
    """The one-line attribute docstring of each field, inherited ones included."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            docs.update(_own_field_docs(klass))
    return docs


def _own_field_docs(cls: type[Any]) -> dict[str, str]:
    docs: dict[str, str] = {}
    try:
        source = textwrap.dedent(inspect.getsource(cls))
        tree = ast.parse(source)
    except (OSError, TypeError, SyntaxError):
        return docs
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    for node, following in zip(body, [*body[1:], None], strict=True):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
            and isinstance(following.value.value, str)
        ):
            docs[node.target.id] = following.value.value.strip().splitlines()[0]
    return docs


def describe(cls: type[Any], prefix: str = "", defaults: Any = None) -> list[tuple[str, str, str]]:
    """(dotted key, default as text, one-line doc) for every leaf field.

    ``defaults``: the instance whose values are shown (default ``cls()``); nested
    sections show the values of the parent's default, which may differ from the
    nested class's own defaults (e.g. SHOT-IM's optimiser).
    """
    _check_class(cls)
    docs = field_docs(cls)
    hints = _hints(cls)
    if defaults is None:
        defaults = cls()
    rows: list[tuple[str, str, str]] = []
    for name in _fields(cls):
        tp = hints[name]
        if dataclasses.is_dataclass(tp) and isinstance(tp, type):
            rows.extend(describe(tp, f"{prefix}{name}.", getattr(defaults, name)))
            continue
        value = _plain(getattr(defaults, name))
        text = ",".join(map(str, value)) if isinstance(value, list) else str(value)
        rows.append((prefix + name, text, docs.get(name, "")))
    return rows


def refuse_invalid(cfg: object, bad: list[str]) -> None:
    """Raise one :class:`ConfigError` listing every invalid field of ``cfg`` (no-op if none).

    Config dataclasses call it from ``__post_init__`` with one text per bad value.
    """
    if bad:
        raise ConfigError(
            f"{type(cfg).__name__}: " + "; ".join(bad),
            "the values are outside their valid ranges",
            "fix the values (see `sourcefree methods` for the defaults)",
        )
