"""Registry of adaptation methods: ``@register_method("name")`` on the class.

The built-in methods live in ``sourcefree.adapters``; :func:`load_builtin_methods`
imports that package (once), and :func:`get_method` and :func:`list_methods` call it
first. Nothing else loads methods: the engine never imports the adapters layer.
This module imports no torch itself.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from sourcefree.engine.config import did_you_mean
from sourcefree.errors import ConfigError

if TYPE_CHECKING:
    from sourcefree.engine.method import Method

M = TypeVar("M", bound="type[Method]")

_METHODS: dict[str, type[Method]] = {}
_builtins_loaded = False


def load_builtin_methods() -> None:
    """Import ``sourcefree.adapters`` once: its modules register the built-in methods
    and the architecture families of the models they export (LA-CMFER's local branch).

    Examples:
        >>> from sourcefree.engine.registry import load_builtin_methods, list_methods
        >>> load_builtin_methods()
        >>> "shot" in list_methods()
        True
    """
    global _builtins_loaded
    if not _builtins_loaded:
        _builtins_loaded = True
        importlib.import_module("sourcefree.adapters")


def register_method(name: str) -> Callable[[M], M]:
    """Class decorator: register a :class:`~sourcefree.engine.method.Method` under ``name``.

    The class must set ``description`` (one line, shown by ``sourcefree methods``)
    and ``config_class`` (a frozen dataclass of paper defaults).

    Raises:
        ConfigError: the name is taken or malformed, or the class lacks a description.
    """
    if not name or name != name.lower() or not all(c.isalnum() or c == "-" for c in name):
        raise ConfigError(
            f"method name {name!r} is not allowed",
            "method names are lower-case letters, digits and '-'",
            "rename the method",
        )

    def decorate(cls: M) -> M:
        if name in _METHODS:
            raise ConfigError(
                f"method {name!r} is registered twice",
                f"{_METHODS[name].__module__}.{_METHODS[name].__qualname__} already has it",
                "give the new method another name",
            )
        description = getattr(cls, "description", "")
        if not description or "\n" in description:
            raise ConfigError(
                f"method {name!r} has no one-line description",
                "`sourcefree methods` lists every method with its description",
                "set the class attribute `description`",
            )
        cls.name = name
        _METHODS[name] = cls
        return cls

    return decorate


def unregister_method(name: str) -> None:
    """Remove a method (for tests that register throw-away methods)."""
    _METHODS.pop(name, None)


def get_method(name: str) -> type[Method]:
    """The registered method class; unknown names get close matches and the full list.

    Raises:
        ConfigError: ``Unknown method 'shott'. Did you mean 'shot'? Available: ...``
    """
    load_builtin_methods()
    if name in _METHODS:
        return _METHODS[name]
    hint = did_you_mean(name, _METHODS)
    raise ConfigError(
        f"Unknown method {name!r}",
        f"{hint}Available: {', '.join(sorted(_METHODS)) or '(none)'}",
        "pass one of the available names (`sourcefree methods` describes them)",
    )


def list_methods() -> list[str]:
    """Names of every registered method, sorted."""
    load_builtin_methods()
    return sorted(_METHODS)
