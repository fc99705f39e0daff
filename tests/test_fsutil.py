"""Atomic writes and the marked-block update the benchmarks use for their docs tables."""

from __future__ import annotations

from pathlib import Path

from sourcefree.fsutil import replace_marked_block

START, END = "<!-- t:start -->", "<!-- t:end -->"


def test_block_between_markers_is_replaced_and_the_rest_kept(tmp_path: Path) -> None:
    doc = tmp_path / "b.md"
    doc.write_text(f"# B\n\nbefore\n{START}\nold\n{END}\nafter\n", encoding="utf-8")
    replace_marked_block(doc, START, END, "new | table\n", "Ignored")
    assert doc.read_text(encoding="utf-8") == f"# B\n\nbefore\n{START}\nnew | table\n{END}\nafter\n"


def test_missing_markers_append_a_section(tmp_path: Path) -> None:
    doc = tmp_path / "b.md"
    doc.write_text(f"# B\n\n{END} stray end, no start\n", encoding="utf-8")
    replace_marked_block(doc, START, END, "rows", "Speed")
    text = doc.read_text(encoding="utf-8")
    assert text.endswith(f"\n\n## Speed\n\n{START}\nrows\n{END}\n")
    assert text.startswith(f"# B\n\n{END} stray end")
    missing = tmp_path / "new.md"
    replace_marked_block(missing, START, END, "rows", "Speed")
    assert missing.read_text(encoding="utf-8").startswith("# Benchmarks\n\n## Speed\n")
