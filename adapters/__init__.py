"""Adaptation methods, one file each; importing a module registers its method."""

from __future__ import annotations

from sourcefree.adapters import adabn as adabn
from sourcefree.adapters import adafer as adafer
from sourcefree.adapters import clup as clup
from sourcefree.adapters import difc as difc
from sourcefree.adapters import la_cmfer as la_cmfer
from sourcefree.adapters import pocan as pocan
from sourcefree.adapters import shot as shot
from sourcefree.adapters import tent as tent

__all__ = ["adabn", "adafer", "clup", "difc", "la_cmfer", "pocan", "shot", "tent"]
