"""Label maps: each format's native codes land on the canonical order of data.md."""

from __future__ import annotations

import pytest

from sourcefree.data.labels import (
    AFFECTNET_CODES,
    CKPLUS_CODES,
    EXPW_CODES,
    FER7,
    FER8,
    FER2013_CODES,
    JAFFE_CODES,
    RAFDB_CODES,
    LabelMap,
    canonical_name,
    label_map,
)
from sourcefree.errors import DatasetError


def test_canonical_order() -> None:
    assert FER7 == ("surprise", "fear", "disgust", "happiness", "sadness", "anger", "neutral")
    assert FER8[7] == "contempt"


def test_native_codes_match_data_md() -> None:
    fer7, fer8 = LabelMap(FER7), LabelMap(FER8)
    assert fer7.codes(FER2013_CODES) == (5, 2, 1, 3, 4, 0, 6)
    assert fer7.codes(EXPW_CODES) == (5, 2, 1, 3, 4, 0, 6)
    assert fer7.codes(RAFDB_CODES)[1:] == (0, 1, 2, 3, 4, 5, 6)  # y - 1
    assert fer7.codes(AFFECTNET_CODES) == (6, 3, 4, 0, 1, 2, 5, -1)
    assert fer8.codes(AFFECTNET_CODES) == (6, 3, 4, 0, 1, 2, 5, 7)
    assert fer7.codes(CKPLUS_CODES) == (6, 5, -1, 2, 1, 3, 4, 0)
    jaffe = {code: fer7.index(name) for code, name in JAFFE_CODES.items()}
    assert jaffe == {"SU": 0, "FE": 1, "DI": 2, "HA": 3, "SA": 4, "AN": 5, "NE": 6}


def test_synonyms_and_other_orders() -> None:
    assert canonical_name(" Happy ") == "happiness"
    assert canonical_name("Angry") == "anger"
    custom = LabelMap(("neutral", "happy", "sad"))
    assert custom.index("happiness") == 1
    assert custom.index("SAD") == 2
    assert custom.index("anger") is None
    digits = label_map([str(i) for i in range(10)])
    assert digits.index("7") == 7
    assert label_map(None).labels == FER7


@pytest.mark.parametrize("labels", [(), ("happy", "happiness"), ("a", "")])
def test_bad_label_sets(labels: tuple[str, ...]) -> None:
    with pytest.raises(DatasetError, match="label set is empty|empty or repeated"):
        LabelMap(labels)
