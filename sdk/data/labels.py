"""Label sets: the canonical 7-class FER order, each format's native codes, name matching.

The canonical order is RAF-DB's (its label minus one). Any other label set
works too: readers take ``labels`` (the package's label order) and map each
sample's native label to an index in it by name; a name that is not in the
set (contempt with 7 classes, say) drops the sample and is counted.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from sourcefree.errors import DatasetError

#: Canonical FER order: surprise, fear, disgust, happiness, sadness, anger, neutral.
FER7: tuple[str, ...] = ("surprise", "fear", "disgust", "happiness", "sadness", "anger", "neutral")
#: FER7 plus contempt as index 7 (AffectNet, CK+, FERPlus carry it).
FER8: tuple[str, ...] = (*FER7, "contempt")

#: Common spellings of the FER class names, mapped to the canonical name.
SYNONYMS: dict[str, str] = {
    "surprised": "surprise",
    "surprising": "surprise",
    "su": "surprise",
    "fearful": "fear",
    "afraid": "fear",
    "scared": "fear",
    "fe": "fear",
    "disgusted": "disgust",
    "di": "disgust",
    "happy": "happiness",
    "joy": "happiness",
    "ha": "happiness",
    "sad": "sadness",
    "sa": "sadness",
    "angry": "anger",
    "an": "anger",
    "neutrality": "neutral",
    "calm": "neutral",
    "ne": "neutral",
    "contemptuous": "contempt",
}

# Native codes of each public format, as canonical names (index = native code).
FER2013_CODES: tuple[str, ...] = (
    "anger",
    "disgust",
    "fear",
    "happiness",
    "sadness",
    "surprise",
    "neutral",
)
"""FER2013 (and Kaggle's train.csv): 0 Angry 1 Disgust 2 Fear 3 Happy 4 Sad 5 Surprise 6 Neutral."""
EXPW_CODES: tuple[str, ...] = FER2013_CODES
"""ExpW ``label.lst``: same order as FER2013."""
RAFDB_CODES: tuple[str, ...] = ("", *FER7)
"""RAF-DB basic: 1 Surprise .. 7 Neutral (index 0 unused)."""
AFFECTNET_CODES: tuple[str, ...] = (
    "neutral",
    "happiness",
    "sadness",
    "surprise",
    "fear",
    "disgust",
    "anger",
    "contempt",
)
"""AffectNet: 0..7; codes 8 None, 9 Uncertain, 10 No-Face are always dropped."""
CKPLUS_CODES: tuple[str, ...] = (
    "neutral",
    "anger",
    "contempt",
    "disgust",
    "fear",
    "happiness",
    "sadness",
    "surprise",
)
"""CK+ emotion files: 0 neutral 1 anger 2 contempt 3 disgust 4 fear 5 happy 6 sadness 7 surprise."""
JAFFE_CODES: dict[str, str] = {
    "AN": "anger",
    "DI": "disgust",
    "FE": "fear",
    "HA": "happiness",
    "NE": "neutral",
    "SA": "sadness",
    "SU": "surprise",
}
"""JAFFE: the two letters after the first dot of the file name (``KA.AN1.39.tiff``)."""
FERPLUS_COLUMNS: tuple[str, ...] = (
    "neutral",
    "happiness",
    "surprise",
    "sadness",
    "anger",
    "disgust",
    "fear",
    "contempt",
    "unknown",
    "NF",
)
"""FERPlus vote columns, in file order; ``unknown`` and ``NF`` (not a face) are never labels."""


def canonical_name(name: str) -> str:
    """Lower-case, trimmed, with FER synonyms (``happy``, ``angry``, ...) resolved."""
    key = name.strip().lower()
    return SYNONYMS.get(key, key)


@dataclass(frozen=True)
class LabelMap:
    """Maps label names found in data to indices of an ordered label set."""

    labels: tuple[str, ...]
    """The label order samples are indexed in (the package's labels)."""
    _index: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if len(self.labels) < 1:
            raise DatasetError(
                "the label set is empty", "a labelled dataset needs at least one class", ""
            )
        index: dict[str, int] = {}
        for i, name in enumerate(self.labels):
            key = canonical_name(name)
            if not key or key in index:
                raise DatasetError(
                    f"label {name!r} is empty or repeated in the label set",
                    "label names must be unique, also after synonyms are resolved",
                    "pass each class once",
                )
            index[key] = i
        object.__setattr__(self, "_index", index)

    def index(self, name: str) -> int | None:
        """Index of ``name`` (exact, case-insensitive, or a FER synonym); None when absent."""
        return self._index.get(canonical_name(name))

    def codes(self, native: Sequence[str]) -> tuple[int, ...]:
        """Index in this label set of each native code (``-1`` where it is not in the set)."""
        out = []
        for name in native:
            i = self.index(name) if name else None
            out.append(-1 if i is None else i)
        return tuple(out)


def label_map(labels: Iterable[str] | None, default: Sequence[str] = FER7) -> LabelMap:
    """A LabelMap for ``labels``, or for ``default`` when None."""
    return LabelMap(tuple(default if labels is None else labels))
