"""Distributed whole-dataset steps on 2 gloo processes (CPU) equal one process.

The ranks are separate interpreters (tests/distributed_worker.py) that meet
through a file:// rendezvous in tmp_path and talk over the loopback interface
only; this process computes the single-process results and compares.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from sourcefree.engine import distributed as dist
from sourcefree.errors import DistributedError
from sourcefree.kernels import sinkhorn_codes, swav_loss
from sourcefree.ops.clustering import KMeansConfig, cluster_purity, kmeans
from sourcefree.ops.pseudo_labels import (
    ClusterPseudoLabelConfig,
    centroid_pseudo_labels,
    cluster_pseudo_labels,
)

WORKER = Path(__file__).with_name("distributed_worker.py")
WORLD = 2
N = 203  # uneven shards: 101 and 102


def launch(script: Path, args: list[str], world: int, timeout: float = 300) -> None:
    """Run ``world`` ranks of ``script`` (args: INIT_FILE RANK WORLD + ``args``) to completion."""
    init = Path(args[-1]) / "rendezvous"
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(init), str(r), str(world), *args],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(world)
    ]
    failures = []
    try:
        for r, p in enumerate(procs):
            _, err = p.communicate(timeout=timeout)
            if p.returncode != 0:
                failures.append(f"rank {r} exited {p.returncode}:\n{err[-3000:]}")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert not failures, "\n".join(failures)


def _inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(5, 8, generator=g) * 4
    which = torch.randint(5, (N,), generator=g)
    points = centers[which] + torch.randn(N, 8, generator=g)
    bad_init = centers.clone()
    bad_init[4] = 1e3
    b, k = 24, 10
    feats = torch.randn(N, 6, generator=g) + which.unsqueeze(1).float()
    logits = torch.randn(N, 3, generator=g) + torch.nn.functional.one_hot(which % 3, 3) * 2
    return {
        "points": points,
        "bad_init": bad_init,
        "cluster_labels": torch.randint(6, (N,), generator=g),
        "class_labels": torch.randint(3, (N,), generator=g),
        "scores": torch.randn(b, k, generator=g),
        "crop0": torch.randn(b, k, generator=g),
        "crop1": torch.randn(b, k, generator=g),
        "crop2": torch.randn(b, k, generator=g),
        "queue0": torch.randn(16, k, generator=g),
        "queue1": torch.randn(16, k, generator=g),
        "features": feats,
        "probs": torch.softmax(logits, dim=1),
    }


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict[str, Any]], list[Any]]:
    """Run the worker on 2 processes once; (tensors per rank, meta per rank)."""
    root = tmp_path_factory.mktemp("dist")
    save_file(_inputs(), root / "inputs.st")
    launch(WORKER, [str(root / "inputs.st"), str(root)], WORLD)
    tensors = [load_file(root / f"rank{r}.st") for r in range(WORLD)]
    meta = [json.loads((root / f"rank{r}.json").read_text()) for r in range(WORLD)]
    return tensors, meta


def _cat(ranks: list[dict[str, torch.Tensor]], key: str) -> torch.Tensor:
    return torch.cat([r[key] for r in ranks])


@pytest.mark.parametrize("name", ["full", "subsample"])
def test_kmeans_equals_one_process(
    ranks: tuple[list[dict[str, Any]], list[Any]], name: str
) -> None:
    tensors, meta = ranks
    configs = {
        "full": KMeansConfig(n_init=2, max_iter=50, seed=3, max_points_per_centroid=None),
        "subsample": KMeansConfig(n_init=2, max_iter=50, seed=4, max_points_per_centroid=20),
    }
    one = kmeans(_inputs()["points"], 5, configs[name])
    for r in range(WORLD):  # every rank holds the same centroids
        torch.testing.assert_close(tensors[r][f"{name}.centroids"], one.centroids)
        assert torch.equal(tensors[r][f"{name}.sizes"], one.cluster_sizes)
        assert meta[r][name]["n_iter"] == one.n_iter
        assert meta[r][name]["n_train"] == one.n_train
        assert meta[r][name]["inertia"] == pytest.approx(one.inertia, rel=1e-5)
    assert torch.equal(_cat(tensors, f"{name}.labels"), one.labels)


def test_kmeans_empty_cluster_repair_uses_every_rank(
    ranks: tuple[list[dict[str, Any]], list[Any]],
) -> None:
    tensors, _ = ranks
    x = _inputs()
    one = kmeans(x["points"], 5, KMeansConfig(n_init=1, max_iter=5, tol=0.0), init=x["bad_init"])
    torch.testing.assert_close(tensors[0]["repair.centroids"], one.centroids)
    assert torch.equal(_cat(tensors, "repair.labels"), one.labels)
    assert float(tensors[0]["repair.centroids"].abs().max()) < 100  # the far centroid moved


def test_purity_from_all_reduced_counts(ranks: tuple[list[dict[str, Any]], list[Any]]) -> None:
    tensors, _ = ranks
    x = _inputs()
    one = cluster_purity(x["cluster_labels"], x["class_labels"], 6, 3)
    for r in range(WORLD):
        assert torch.equal(tensors[r]["purity.table"], one.table)
        assert torch.equal(tensors[r]["purity.purity"], one.purity)


def test_sinkhorn_over_the_global_batch(ranks: tuple[list[dict[str, Any]], list[Any]]) -> None:
    tensors, _ = ranks
    x = _inputs()
    one = sinkhorn_codes(x["scores"], epsilon=0.05, iterations=3)
    torch.testing.assert_close(_cat(tensors, "sinkhorn.codes"), one)
    # Rank 0's rows alone would give other codes: the global marginals matter.
    half = x["scores"].shape[0] // WORLD
    alone = sinkhorn_codes(x["scores"][:half], epsilon=0.05, iterations=3)
    assert not torch.allclose(tensors[0]["sinkhorn.codes"], alone)


def test_swav_loss_and_gradients_over_the_global_batch(
    ranks: tuple[list[dict[str, Any]], list[Any]],
) -> None:
    tensors, _ = ranks
    x = _inputs()
    crops = [x[f"crop{i}"].clone().requires_grad_(True) for i in range(3)]
    one = swav_loss(crops[:2], crops[2:], [x["queue0"], x["queue1"]])
    one.backward()  # type: ignore[no-untyped-call]
    mean = sum(float(t["swav.loss"]) for t in tensors) / WORLD
    assert mean == pytest.approx(float(one.detach()), rel=1e-5)
    for i, c in enumerate(crops):
        # Each rank's loss is its own mean; the trainer averages gradients over ranks.
        assert c.grad is not None
        torch.testing.assert_close(_cat(tensors, f"swav.grad{i}") / WORLD, c.grad)


def test_shot_centroids_from_all_reduced_sums(
    ranks: tuple[list[dict[str, Any]], list[Any]],
) -> None:
    tensors, meta = ranks
    x = _inputs()
    one = centroid_pseudo_labels(x["features"], x["probs"])
    assert torch.equal(_cat(tensors, "shot.labels"), one.labels)
    for r in range(WORLD):
        torch.testing.assert_close(tensors[r]["shot.centroids"], one.centroids)
        assert meta[r]["shot"]["counts"] == list(one.counts)
        assert meta[r]["shot"]["agreement"] == pytest.approx(one.agreement)


def test_cluster_pseudo_labels_select_the_same_samples(
    ranks: tuple[list[dict[str, Any]], list[Any]],
) -> None:
    tensors, meta = ranks
    x = _inputs()
    cfg = ClusterPseudoLabelConfig(n_clusters=12, keep_fraction=0.3, kmeans=KMeansConfig(n_init=2))
    one = cluster_pseudo_labels(x["features"], x["probs"], cfg)
    for r in range(WORLD):  # global indices, the same on every rank
        assert torch.equal(tensors[r]["clup.indices"], one.indices)
        assert torch.equal(tensors[r]["clup.labels"], one.labels)
        assert meta[r]["clup"]["selected_per_class"] == list(one.selected_per_class)
    # The paper's rule: the kept clusters come from the all-reduced purity table.
    whole = cluster_pseudo_labels(
        x["features"], x["probs"], dataclasses.replace(cfg, selection="clusters")
    )
    assert not torch.equal(whole.indices, one.indices)
    for r in range(WORLD):
        assert torch.equal(tensors[r]["clup_clusters.indices"], whole.indices)
        assert torch.equal(tensors[r]["clup_clusters.labels"], whole.labels)


def test_primitives(ranks: tuple[list[dict[str, Any]], list[Any]]) -> None:
    tensors, meta = ranks
    for r in range(WORLD):
        assert meta[r]["world"] == WORLD and meta[r]["rank"] == r
        assert torch.equal(tensors[r]["gather"], torch.tensor([[0.0, 0], [1, 1], [1, 1]]))
        assert meta[r]["bytes"] == "hello from rank 0"
        # (1 * 1 + 2 * 2) / 3: weighted by each rank's batch size.
        torch.testing.assert_close(tensors[r]["avg_grad"], torch.full((3,), 5 / 3))
        assert meta[r]["unused_grad_is_none"]
        assert "read other target images than another rank" in meta[r]["different_data"]


def test_single_process_helpers_are_no_ops(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert not dist.is_distributed() and dist.rank() == 0 and dist.world_size() == 1
    assert dist.is_main()
    assert dist.init_from_env() is False
    t = torch.arange(4.0)
    assert dist.all_reduce_sum(t) is t and torch.equal(t, torch.arange(4.0))
    assert dist.all_gather_cat(t) is t
    assert dist.broadcast_bytes(b"x") == b"x"
    dist.barrier()
    assert torch.equal(dist.batch_shard(t), t)


def test_sharding_is_disjoint_and_covers_everything() -> None:
    for n in (0, 1, 7, 64, 203):
        for w in (1, 2, 3, 8):
            parts = [dist.shard_indices(n, r, w) for r in range(w)]
            assert torch.equal(torch.cat(parts), torch.arange(n))
            sizes = [int(p.numel()) for p in parts]
            assert max(sizes) - min(sizes) <= 1
    batch = torch.tensor([9, 4, 7, 1, 3])
    halves = [dist.batch_shard(batch, r, 2) for r in range(2)]
    assert torch.equal(torch.cat(halves), batch)
    assert torch.equal(dist.batch_shard(batch[:1], 1, 2), batch[:1])  # tiny batch: whole


def test_init_from_env_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    for name in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(DistributedError, match="RANK, MASTER_ADDR, MASTER_PORT is not set"):
        dist.init_from_env("cpu")
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(DistributedError, match="is not an integer"):
        dist.init_from_env("cpu")


def test_broadcast_framed_round_trips_head_and_body_in_one_process() -> None:
    assert dist.broadcast_framed({"sequence": 3, "meta": {"a": [1, 2]}}, b"\x00body", what="t") == (
        {"sequence": 3, "meta": {"a": [1, 2]}},
        b"\x00body",
    )
    assert dist.broadcast_framed(None, what="t") is None


def test_broadcast_framed_refuses_a_frame_cut_short(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dist, "broadcast_bytes", lambda data, src=0: (999).to_bytes(8, "little"))
    with pytest.raises(DistributedError, match="cut short"):
        dist.broadcast_framed({"a": 1}, what="checkpoint")
