"""Labels CSV paths: relative to the CSV (anywhere) or to the data folder."""

from __future__ import annotations

from pathlib import Path

from sourcefree.runtime.evaluation import evaluate


def test_csv_beside_the_data_with_csv_relative_paths(
    source_pkg: Path, target_dir: Path, eval_csv: Path, tmp_path: Path
) -> None:
    rows = eval_csv.read_text().splitlines()
    beside = target_dir.parent / "beside.csv"
    beside.write_text("\n".join([rows[0], *(f"{target_dir.name}/{r}" for r in rows[1:])]) + "\n")
    as_data_relative = evaluate(source_pkg, target_dir, eval_csv, device="cpu")
    as_csv_relative = evaluate(source_pkg, target_dir, beside, device="cpu")
    assert as_csv_relative.images == as_data_relative.images == len(rows) - 1
    assert as_csv_relative.confusion == as_data_relative.confusion
