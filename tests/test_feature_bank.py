"""Feature banks under a memory budget, and SHOT's chunked centroid labelling over them."""

from __future__ import annotations

import logging
import os
import shutil
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from sourcefree.engine import feature_bank as fb
from sourcefree.engine.feature_bank import (
    MAX_BUDGET_BYTES,
    FeatureBank,
    MemoryBudget,
    block_rows,
    check_memory_budget,
    choose_storage,
    default_memory_budget,
    parse_memory_size,
)
from sourcefree.errors import ConfigError, InputError, WriteError
from sourcefree.ops.pseudo_labels import centroid_pseudo_labels, centroid_pseudo_labels_chunked
from sourcefree.pipeline.request import AdaptRequest


def _blobs(n: int, d: int, c: int, seed: int, spread: float = 1.0) -> tuple[torch.Tensor, ...]:
    """(features, probabilities) of ``c`` Gaussian blobs; the logits are noisy one-hots."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(c, d, generator=g) * 4
    y = torch.randint(0, c, (n,), generator=g)
    feats = centres[y] + spread * torch.randn(n, d, generator=g)
    logits = torch.randn(n, c, generator=g) + 1.5 * torch.nn.functional.one_hot(y, c)
    return feats, torch.softmax(logits, 1)


def _filled(feats: torch.Tensor, storage: fb.Storage, folder: Path | None = None) -> FeatureBank:
    bank = FeatureBank(feats.shape[0], feats.shape[1], storage, spill_dir=folder)
    for s in range(0, feats.shape[0], 37):  # uneven writes
        bank.write(s, feats[s : s + 37])
    return bank


# --- sizes and budgets ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("512M", 512 << 20),
        ("8G", 8 << 30),
        ("1.5G", 3 << 29),
        ("123456", 123456),
        ("2k", 2048),
        (" 4 GiB ", 4 << 30),
        ("1T", 1 << 40),
    ],
)
def test_sizes_parse(text: str, want: int) -> None:
    assert parse_memory_size(text) == want


@pytest.mark.parametrize("text", ["", "abc", "-1G", "0", "0.0001", "1.5", "5X", "1e9", "2048P"])
def test_bad_sizes_are_config_errors(text: str) -> None:
    with pytest.raises(ConfigError, match="--memory-budget"):
        parse_memory_size(text)


def test_budget_bounds_and_request() -> None:
    assert check_memory_budget(1) == 1 and check_memory_budget(MAX_BUDGET_BYTES)
    for bad in (0, -5, MAX_BUDGET_BYTES + 1, True, 1.5, "8G"):
        with pytest.raises(ConfigError, match="--memory-budget"):
            check_memory_budget(bad)
    with pytest.raises(ConfigError, match="more than 1 PiB"):
        parse_memory_size("2000T")
    with pytest.raises(ConfigError, match="--memory-budget 0"):
        AdaptRequest("p", "d", method="shot", out="o", memory_budget=0)
    request = AdaptRequest("p", "d", method="shot", out="o", memory_budget=1 << 20)
    assert "--memory-budget 1048576" in request.command()
    assert "--memory-budget" not in AdaptRequest("p", "d", method="shot", out="o").command()


def test_default_budget_is_a_quarter_of_memory_per_local_rank(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(fb, "_mem_total", lambda: 64 << 30)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert default_memory_budget() == 16 << 30
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert default_memory_budget() == 4 << 30
    monkeypatch.setattr(fb, "_mem_total", lambda: None)
    assert default_memory_budget() == 1 << 30


def test_machine_memory_is_read() -> None:
    total = fb._mem_total()
    assert total is not None and total > 1 << 20


def test_storage_follows_the_budget() -> None:
    n, d = 1000, 64
    assert choose_storage(n, d, n * d * 4) == "float32"
    assert choose_storage(n, d, n * d * 4 - 1) == "float16"
    assert choose_storage(n, d, n * (2 * d + 4)) == "float16"
    assert choose_storage(n, d, n * (2 * d + 4) - 1) == "disk"
    assert choose_storage(n, d, 1, spill=False) == "float16"
    # The float32 form is gathered under torchrun: every rank's rows count.
    assert choose_storage(n, d, n * d * 4, total_rows=2 * n) == "float16"
    for rows, dim in ((-1, 4), (4, -1), (True, 4), (1 << 30, 1 << 30)):
        with pytest.raises(InputError, match="feature bank"):
            choose_storage(rows, dim, 1 << 20)


def test_scratch_blocks_take_an_eighth_of_the_budget() -> None:
    assert block_rows(8 * 12_000 * 100, 12_000, 4096) == 100  # an eighth of it: 100 rows
    assert block_rows(8 * 12_000 * 100 - 1, 12_000, 4096) == 99
    assert block_rows(1 << 40, 12_000, 4096) == 4096  # at most the cap
    assert block_rows(1, 12_000, 4096) == 1  # never fewer than one row
    with pytest.raises(ConfigError):
        block_rows(0, 1, 1)
    for row_bytes, cap in ((0, 1), (1, 0), (True, 1), (1, 2.5)):
        with pytest.raises(InputError, match="scratch block"):
            block_rows(1 << 20, row_bytes, cap)  # type: ignore[arg-type]


def test_memory_budget_reports_numbers_only(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    memory = MemoryBudget(100 * 8 * 2, spill_dir=None)
    assert memory.report() is None
    with caplog.at_level(logging.INFO, logger="sourcefree"):
        for _ in range(2):  # said once, not at every pass
            with memory.bank(100, 8) as bank:
                assert bank.storage == "float16" and not bank.within_budget
    said = [r for r in caplog.records if "over the budget" in r.getMessage()]
    assert len(said) == 1 and said[0].levelno == logging.WARNING
    report = memory.report()
    assert report == {
        "budget_bytes": 1600,
        "features": {"storage": "float16", "bytes": 100 * 20, "within_budget": False},
    }
    spilled = MemoryBudget(100, spill_dir=tmp_path)
    with spilled.bank(100, 8) as bank:
        assert bank.storage == "disk"
    assert spilled.report() == {
        "budget_bytes": 100,
        "features": {"storage": "disk", "bytes": 2000, "within_budget": True},
    }


# --- the bank ---------------------------------------------------------------------------


@pytest.mark.parametrize("storage", ["float32", "float16", "disk"])
def test_rows_round_trip(storage: fb.Storage, tmp_path: Path) -> None:
    feats, _ = _blobs(200, 12, 3, seed=0)
    feats[5] = 0.0
    feats[7] *= 1e-30  # tiny rows keep their relative precision
    with _filled(feats, storage, tmp_path) as bank:
        assert bank.storage == storage
        parts = list(bank.chunks(64))
        assert [p.shape[0] for p in parts] == [64, 64, 64, 8]
        back = torch.cat(parts)
        assert back.dtype == torch.float32
        if storage == "float32":
            assert torch.equal(back, feats) and bank.tensor() is bank.tensor()
        else:
            torch.testing.assert_close(back, feats, rtol=2**-11, atol=0)
            with pytest.raises(InputError, match="no float32 tensor"):
                bank.tensor()
        assert bank.nbytes == (200 * 12 * 4 if storage == "float32" else 200 * (24 + 4))


@pytest.mark.parametrize("storage", ["float16", "disk"])
def test_float16_never_overflows(storage: fb.Storage, tmp_path: Path) -> None:
    big = torch.tensor([[1e6, -3e5, 2.0], [7e37, 1.0, -1e38], [65504.0, 65520.0, -1e5]])
    with _filled(big, storage, tmp_path) as bank:
        back = torch.cat(list(bank.chunks(2)))
    assert torch.isfinite(back).all()
    # Each value within float16's relative step of its row's largest magnitude.
    assert ((back - big).abs() <= 2**-11 * big.abs().amax(dim=1, keepdim=True)).all()
    assert back[0, 2] == 2.0 and back[2, 0] == 65504.0


def test_bad_writes_are_refused() -> None:
    with FeatureBank(10, 4, "float16") as bank:
        with pytest.raises(InputError, match="width 4"):
            bank.write(0, torch.zeros(2, 5))
        with pytest.raises(InputError, match="inside the bank"):
            bank.write(9, torch.zeros(2, 4))
        with pytest.raises(InputError, match="inside the bank"):
            bank.write(-1, torch.zeros(1, 4))
        with pytest.raises(InputError, match="NaN or infinite"):
            bank.write(0, torch.tensor([[1.0, float("inf"), 0.0, 0.0]]))
        with pytest.raises(InputError, match="at least 1 row"):
            next(bank.chunks(0))
    with pytest.raises(InputError, match="closed"):
        bank.write(0, torch.zeros(1, 4))
    with pytest.raises(InputError, match="disk"):
        FeatureBank(4, 4, "disk")


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_disk_bank_is_private_and_leaves_no_file(tmp_path: Path) -> None:
    seen: list[tuple[str, int]] = []
    real_open = os.open

    def spy(path: object, flags: int, mode: int = 0o777) -> int:
        seen.append((str(path), mode))
        assert flags & os.O_EXCL and flags & os.O_CREAT
        return real_open(path, flags, mode)  # type: ignore[arg-type]

    feats, _ = _blobs(50, 6, 2, seed=1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "open", spy)
        bank = _filled(feats, "disk", tmp_path)
    assert len(seen) == 1 and seen[0][1] == 0o600
    assert Path(seen[0][0]).parent == tmp_path
    assert _names(tmp_path) == []  # unlinked at once: not even a killed run leaves it
    torch.testing.assert_close(torch.cat(list(bank.chunks(16))), feats, rtol=2**-11, atol=0)
    bank.close()
    bank.close()
    assert _names(tmp_path) == []
    with pytest.raises(RuntimeError, match="boom"), FeatureBank(50, 6, "disk", spill_dir=tmp_path):
        raise RuntimeError("boom")
    assert _names(tmp_path) == []


def test_disk_bank_file_is_removed_on_close_when_unlink_waits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where the early unlink fails, close() removes the file, also after an exception."""
    real_unlink = os.unlink
    calls = []

    def late(path: object) -> None:
        calls.append(path)
        if len(calls) == 1:
            raise OSError("busy")
        real_unlink(path)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "unlink", late)
    modes: list[int] = []

    def fail_while_open() -> None:
        with FeatureBank(20, 3, "disk", spill_dir=tmp_path):
            modes.extend(p.stat().st_mode & 0o777 for p in tmp_path.iterdir())
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        fail_while_open()
    assert modes == [0o600]
    assert _names(tmp_path) == [] and len(calls) == 2


def test_disk_bank_without_space_or_folder_is_a_write_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(WriteError, match="cannot write"):
        FeatureBank(10, 4, "disk", spill_dir=tmp_path / "missing")

    class Usage:
        free = 10

    monkeypatch.setattr(shutil, "disk_usage", lambda _: Usage())
    with pytest.raises(WriteError, match="Only 10 bytes are free"):
        FeatureBank(10, 4, "disk", spill_dir=tmp_path)
    assert _names(tmp_path) == []


# --- chunked centroid labelling ---------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_chunked_float32_matches_in_memory(seed: int) -> None:
    feats, probs = _blobs(500, 16, 5, seed=seed, spread=3.0)
    want = centroid_pseudo_labels(feats, probs)
    with _filled(feats, "float32") as bank:
        got = centroid_pseudo_labels_chunked(bank, probs, chunk_rows=64)
    assert torch.equal(got.labels, want.labels)
    torch.testing.assert_close(got.centroids, want.centroids, rtol=0, atol=1e-5)
    assert got.assignable == want.assignable and got.counts == want.counts
    assert got.agreement == pytest.approx(want.agreement)


def test_chunked_threshold_rounds_and_errors() -> None:
    feats, probs = _blobs(300, 8, 4, seed=3, spread=2.0)
    with _filled(feats, "float32") as bank:
        for rounds, threshold in ((1, 0), (3, 0), (2, 80)):
            want = centroid_pseudo_labels(feats, probs, rounds=rounds, threshold=threshold)
            got = centroid_pseudo_labels_chunked(
                bank, probs, rounds=rounds, threshold=threshold, chunk_rows=50
            )
            assert torch.equal(got.labels, want.labels) and got.assignable == want.assignable
        with pytest.raises(ConfigError, match="rounds=0"):
            centroid_pseudo_labels_chunked(bank, probs, rounds=0)
        with pytest.raises(ConfigError, match="chunk_rows=0"):
            centroid_pseudo_labels_chunked(bank, probs, chunk_rows=0)
        with pytest.raises(InputError, match="look like logits"):
            centroid_pseudo_labels_chunked(bank, probs * 3)
    with FeatureBank(0, 0, "float16") as empty, pytest.raises(InputError, match="shape"):
        centroid_pseudo_labels_chunked(empty, probs[:0])


@pytest.mark.parametrize("storage", ["float16", "disk"])
def test_float16_labels_agree_on_well_separated_data(storage: fb.Storage, tmp_path: Path) -> None:
    feats, probs = _blobs(2000, 32, 7, seed=4, spread=1.0)
    want = centroid_pseudo_labels(feats, probs)
    with _filled(feats, storage, tmp_path) as bank:
        got = centroid_pseudo_labels_chunked(bank, probs, chunk_rows=256)
    agree = float((got.labels == want.labels).double().mean())
    assert agree >= 0.99
    torch.testing.assert_close(got.centroids, want.centroids, rtol=0, atol=1e-3)


# --- sharded (2 gloo processes) ---------------------------------------------------------

_WORKER = textwrap.dedent(
    """
    import sys
    import torch
    import torch.distributed as tdist
    from safetensors.torch import load_file, save_file
    from sourcefree.engine import distributed as dist
    from sourcefree.engine.feature_bank import FeatureBank
    from sourcefree.ops.pseudo_labels import centroid_pseudo_labels_chunked

    init, rank, world, inputs, out = sys.argv[1:6]
    tdist.init_process_group(
        "gloo", init_method=f"file://{init}", rank=int(rank), world_size=int(world)
    )
    x = load_file(inputs)
    start, stop = dist.shard_range(x["features"].shape[0])
    with FeatureBank(stop - start, x["features"].shape[1], "float16") as bank:
        bank.write(0, x["features"][start:stop])
        got = centroid_pseudo_labels_chunked(
            bank, x["probs"][start:stop], chunk_rows=40, distributed=True
        )
    labels = dist.all_gather_cat(got.labels)
    save_file({"labels": labels, "centroids": got.centroids}, f"{out}/rank{rank}.st")
    tdist.destroy_process_group()
    """
)


def run_two_ranks(
    worker: str, feats: torch.Tensor, probs: torch.Tensor, folder: Path
) -> list[dict[str, torch.Tensor]]:
    """Run ``worker`` on 2 gloo ranks over ``features`` and ``probs``; what each rank saved."""
    from tests.test_distributed import launch

    save_file({"features": feats, "probs": probs}, folder / "inputs.st")
    script = folder / "worker.py"
    script.write_text(worker)
    launch(script, [str(folder / "inputs.st"), str(folder)], 2)
    return [load_file(folder / f"rank{r}.st") for r in range(2)]


def test_sharded_float16_bank_equals_one_process(tmp_path: Path) -> None:
    feats, probs = _blobs(203, 8, 3, seed=5, spread=2.0)
    ranks = run_two_ranks(_WORKER, feats, probs, tmp_path)
    with _filled(feats, "float16") as bank:
        one = centroid_pseudo_labels_chunked(bank, probs, chunk_rows=40)
    for got in ranks:
        assert torch.equal(got["labels"], one.labels)  # N int64 on every rank
        torch.testing.assert_close(got["centroids"], one.centroids, rtol=0, atol=1e-6)
