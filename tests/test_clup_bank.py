"""CluP's labelling features in a feature bank: chunked K-means, purity and selection."""

from __future__ import annotations

import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from sourcefree.adapters.clup import CluP, CluPConfig, FineTuneConfig, SSLConfig, _derive
from sourcefree.data.synthetic import generate
from sourcefree.engine import feature_bank as fb
from sourcefree.engine.feature_bank import FeatureBank, MemoryBudget
from sourcefree.engine.method import MethodContext, SourceModel, TargetData
from sourcefree.engine.models import load_classifier
from sourcefree.errors import ConfigError, InputError
from sourcefree.ops import clustering
from sourcefree.ops.clustering import KMeansConfig, kmeans
from sourcefree.ops.pseudo_labels import (
    ClusterPseudoLabelConfig,
    PseudoLabelSelection,
    _PreparedRows,
    cluster_pseudo_labels,
    cluster_pseudo_labels_chunked,
    prepare_features,
)
from sourcefree.package.loader import load_package
from sourcefree.package.manifest import InputSpec
from tests.spill_helpers import SPILLED, adapt_spilled
from tests.test_feature_bank import _blobs, _filled, run_two_ranks


def _config(selection: str = "samples", per_centroid: int | None = 30) -> ClusterPseudoLabelConfig:
    km = KMeansConfig(n_init=2, max_iter=50, seed=3, max_points_per_centroid=per_centroid)
    return ClusterPseudoLabelConfig(
        n_clusters=12,
        keep_fraction=0.3,
        kmeans=km,
        selection=selection,  # type: ignore[arg-type]
    )


def _same(got: PseudoLabelSelection, want: PseudoLabelSelection) -> None:
    assert torch.equal(got.indices, want.indices) and torch.equal(got.labels, want.labels)
    assert torch.equal(got.scores, want.scores)
    assert got.thresholds == want.thresholds and got.histogram == want.histogram
    d, e = got.diagnostics, want.diagnostics
    assert d.kmeans_inertia == pytest.approx(e.kmeans_inertia, rel=1e-9, nan_ok=True)
    assert (d.n_selected, d.n_empty_clusters, d.clusters_per_class, d.kmeans_iterations) == (
        e.n_selected,
        e.n_empty_clusters,
        e.clusters_per_class,
        e.kmeans_iterations,
    )


class _Recording:
    """:class:`_PreparedRows` that records the rows K-means gathers and the chunks it reads."""

    def __init__(self, rows: _PreparedRows) -> None:
        self.inner = rows
        self.taken: list[torch.Tensor] = []
        self.largest_chunk = 0
        self.rows, self.dim, self.device = rows.rows, rows.dim, rows.device

    def take(self, index: torch.Tensor) -> torch.Tensor:
        self.taken.append(index.clone())
        return self.inner.take(index)

    def chunks(self) -> Iterator[torch.Tensor]:
        for chunk in self.inner.chunks():
            self.largest_chunk = max(self.largest_chunk, int(chunk.shape[0]))
            yield chunk


# --- one process ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("selection", "per_centroid"), [("samples", 30), ("clusters", 30), ("samples", None)]
)
def test_float32_bank_selects_exactly_as_in_memory(
    selection: str, per_centroid: int | None
) -> None:
    feats, probs = _blobs(900, 16, 5, seed=1, spread=2.0)
    cfg = _config(selection, per_centroid)
    want = cluster_pseudo_labels(feats, probs, cfg)
    with _filled(feats, "float32") as bank:
        got = cluster_pseudo_labels_chunked(bank, probs, cfg, chunk_rows=128)
    _same(got, want)
    confidence = ClusterPseudoLabelConfig(score="confidence", keep_fraction=0.5)
    with _filled(feats, "float16") as bank:
        got = cluster_pseudo_labels_chunked(bank, probs, confidence, chunk_rows=128)
    _same(got, cluster_pseudo_labels(feats, probs, confidence))  # features unused


@pytest.mark.parametrize("storage", ["float16", "disk"])
def test_float16_bank_trains_on_the_same_subsample(storage: fb.Storage, tmp_path: Path) -> None:
    # 7 well-separated blobs, one cluster each (CluP over-clusters; there a blob's split
    # can move with float16 rounding, which docs/scaling.md states).
    feats, probs = _blobs(3000, 32, 7, seed=4)
    k, cfg = 7, KMeansConfig(n_init=2, max_iter=50, seed=11, max_points_per_centroid=40)
    want = kmeans(prepare_features(feats), k, cfg)
    draws = torch.Generator().manual_seed(cfg.seed)
    _, pick = clustering._subsample(3000, k, cfg, draws)
    assert pick is not None
    seeds = clustering.kmeans_plusplus(prepare_features(feats)[pick], k, draws)
    with _filled(feats, storage, tmp_path) as bank:
        rows = _Recording(_PreparedRows(bank, 256, torch.device("cpu")))
        got = kmeans(rows, k, cfg)
        assert len(rows.taken) == 1 and torch.equal(rows.taken[0], pick)
        assert rows.largest_chunk == 256  # the labelling pass read the bank in chunks
        draws = torch.Generator().manual_seed(cfg.seed)
        clustering._subsample(3000, k, cfg, draws)
        seeds16 = clustering.kmeans_plusplus(rows.inner.take(pick), k, draws)
        plc = ClusterPseudoLabelConfig(n_clusters=k, kmeans=cfg)
        sel = cluster_pseudo_labels_chunked(bank, probs, plc)
    torch.testing.assert_close(seeds16, seeds, rtol=0, atol=1e-3)  # the same rows drawn
    assert got.n_train == want.n_train == 40 * k
    torch.testing.assert_close(got.centroids, want.centroids, rtol=0, atol=1e-4)
    assert float((got.labels == want.labels).double().mean()) >= 0.99
    assert got.inertia == pytest.approx(want.inertia, rel=1e-4)
    one = cluster_pseudo_labels(feats, probs, plc)
    common = set(sel.indices.tolist()) & set(one.indices.tolist())
    assert len(common) >= 0.99 * one.indices.numel()
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # the disk form left no file


def test_chunked_errors() -> None:
    feats, probs = _blobs(50, 4, 3, seed=2)
    with _filled(feats, "float16") as bank:
        with pytest.raises(ConfigError, match="chunk_rows=0"):
            cluster_pseudo_labels_chunked(bank, probs, chunk_rows=0)
        with pytest.raises(InputError, match="look like logits"):
            cluster_pseudo_labels_chunked(bank, probs * 3)
        with pytest.raises(ConfigError, match="larger than the number of target samples"):
            cluster_pseudo_labels_chunked(bank, probs, ClusterPseudoLabelConfig(n_clusters=51))
        with pytest.raises(InputError, match="1-D int64"):
            bank.take(torch.tensor([0.0]))
        with pytest.raises(InputError, match=r"rows outside \[0, 50\)"):
            bank.take(torch.tensor([0, 50]))
        torch.testing.assert_close(
            bank.take(torch.tensor([3, 7])), feats[[3, 7]], rtol=1e-3, atol=0
        )
    with FeatureBank(0, 0, "float16") as empty, pytest.raises(InputError, match="shape"):
        cluster_pseudo_labels_chunked(empty, probs[:0])


# --- CluP -----------------------------------------------------------------------------------


def _clup(source_pkg: Path, memory: MemoryBudget | None) -> CluP:
    s = generate("wild-mild", 60, 32, seed=5)
    data = TargetData(images=s.images, spec=InputSpec(size=(32, 32)), fingerprint="t")
    pkg = load_package(source_pkg)
    model = load_classifier(pkg.manifest.architecture, pkg.weights_bytes)
    ctx = MethodContext((SourceModel(pkg, model),), data, torch.device("cpu"), 0, memory=memory)
    ssl = SSLConfig(epochs=1, prototypes=8, hidden_dim=16, output_dim=8, local_crops=0)
    cfg = CluPConfig(
        n_clusters=6, kmeans_n_init=2, label_batch_size=16, ssl=ssl, finetune=FineTuneConfig()
    )
    return CluP(cfg, ctx)


def test_clup_labels_through_the_budgeted_bank(source_pkg: Path, tmp_path: Path) -> None:
    # 60 images of D = 128: float32 needs 30,720 bytes, float16 60 x 260 = 15,600.
    runs = {}
    for storage, budget in (("float32", 1 << 20), ("float16", 20_000), ("disk", 1000)):
        memory = MemoryBudget(budget, spill_dir=tmp_path)
        method = _clup(source_pkg, memory)
        runs[storage] = method.compute_pseudo_labels()
        report = memory.report()
        assert report is not None and report["features"]["storage"] == storage
        assert sorted(p.name for p in tmp_path.iterdir()) == []
    with _clup(source_pkg, None).memory.bank(4, 2) as small:  # no context budget: a default one
        assert small.storage == "float32"
    # The float32 bank is the unchanged path: the same as clustering the features directly.
    method = _clup(source_pkg, None)
    bank, probs = method._source_outputs()
    assert isinstance(bank, FeatureBank) and bank.storage == "float32"
    with bank:
        feats = bank.tensor().clone()
    cfg = method.config.pseudo_label_config(seed=_derive(method.context.seed, 2))
    _same(runs["float32"], cluster_pseudo_labels(feats, probs, cfg))
    for storage in ("float16", "disk"):
        assert runs[storage].indices.tolist() == runs["float32"].indices.tolist()


def test_adapt_clup_spills_to_disk(source_pkg: Path, tmp_path: Path) -> None:
    sets = ["ssl.epochs=0", "finetune.epochs=1", "kmeans_n_init=1", "n_clusters=3"]
    sets += ["ssl.prototypes=8", "ssl.local_crops=0", "batch_size=8", "label_batch_size=8"]
    report, kept = adapt_spilled(source_pkg, tmp_path, "clup", sets)
    assert report["memory"] == {"budget_bytes": 1024, "features": SPILLED}
    assert kept and not any("features" in name or name.endswith(".f16") for name in kept), kept


# --- sharded (2 gloo processes) -------------------------------------------------------------

_WORKER = textwrap.dedent(
    """
    import sys
    import torch
    import torch.distributed as tdist
    from safetensors.torch import load_file, save_file
    from sourcefree.engine import distributed as dist
    from sourcefree.engine.feature_bank import FeatureBank
    from sourcefree.ops.clustering import KMeansConfig
    from sourcefree.ops.pseudo_labels import (
        ClusterPseudoLabelConfig,
        cluster_pseudo_labels_chunked,
    )

    init, rank, world, inputs, out = sys.argv[1:6]
    tdist.init_process_group(
        "gloo", init_method=f"file://{init}", rank=int(rank), world_size=int(world)
    )
    x = load_file(inputs)
    start, stop = dist.shard_range(x["features"].shape[0])
    km = KMeansConfig(n_init=2, max_iter=50, seed=3, max_points_per_centroid=20)
    cfg = ClusterPseudoLabelConfig(n_clusters=8, kmeans=km)
    with FeatureBank(stop - start, x["features"].shape[1], "float16") as bank:
        bank.write(0, x["features"][start:stop])
        got = cluster_pseudo_labels_chunked(
            bank, x["probs"][start:stop], cfg, chunk_rows=40, distributed=True
        )
    inertia = torch.tensor([got.diagnostics.kmeans_inertia], dtype=torch.float64)
    save_file(
        {"indices": got.indices, "labels": got.labels, "inertia": inertia},
        f"{out}/rank{rank}.st",
    )
    tdist.destroy_process_group()
    """
)


def test_sharded_float16_bank_equals_one_process(tmp_path: Path) -> None:
    feats, probs = _blobs(403, 8, 4, seed=5, spread=2.0)
    ranks = run_two_ranks(_WORKER, feats, probs, tmp_path)
    km = KMeansConfig(n_init=2, max_iter=50, seed=3, max_points_per_centroid=20)
    plc = ClusterPseudoLabelConfig(n_clusters=8, kmeans=km)
    with _filled(feats, "float16") as bank:
        one = cluster_pseudo_labels_chunked(bank, probs, plc, chunk_rows=40)
    for got in ranks:  # the same selection on every rank, in global sample indices
        assert torch.equal(got["indices"], one.indices) and torch.equal(got["labels"], one.labels)
        assert float(got["inertia"]) == pytest.approx(one.diagnostics.kmeans_inertia, rel=1e-6)
