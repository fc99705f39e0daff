"""One rank of a gloo group on the CPU, for tests/test_distributed.py (not collected by pytest).

``python tests/distributed_worker.py INIT_FILE RANK WORLD INPUTS OUT`` joins the
group through a file:// rendezvous, runs every distributed whole-dataset step on
this rank's shard of the tensors in INPUTS (safetensors) and writes what it got
to ``OUT/rank{RANK}.safetensors`` and ``OUT/rank{RANK}.json``. Only the loopback
interface is used (GLOO_SOCKET_IFNAME=lo): nothing leaves the machine.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
import torch.distributed as tdist
from safetensors.torch import load_file, save_file

from sourcefree.engine import distributed as dist
from sourcefree.engine.method import TargetData
from sourcefree.engine.trainer import Trainer
from sourcefree.errors import DistributedError
from sourcefree.kernels import sinkhorn_codes, swav_loss
from sourcefree.ops.clustering import KMeansConfig, cluster_purity, kmeans
from sourcefree.ops.pseudo_labels import (
    ClusterPseudoLabelConfig,
    centroid_pseudo_labels,
    cluster_pseudo_labels,
)
from sourcefree.package.manifest import InputSpec

KMEANS_CONFIGS = {
    "full": KMeansConfig(n_init=2, max_iter=50, seed=3, max_points_per_centroid=None),
    "subsample": KMeansConfig(n_init=2, max_iter=50, seed=4, max_points_per_centroid=20),
}
K = 5


def _shard(t: torch.Tensor) -> torch.Tensor:
    start, stop = dist.shard_range(int(t.shape[0]))
    return t[start:stop]


def run(inputs: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    out: dict[str, torch.Tensor] = {}
    meta: dict[str, Any] = {"rank": dist.rank(), "world": dist.world_size()}
    x = _shard(inputs["points"])
    for name, cfg in KMEANS_CONFIGS.items():
        km = kmeans(x, K, cfg, distributed=True)
        out[f"{name}.centroids"] = km.centroids
        out[f"{name}.labels"] = km.labels
        out[f"{name}.sizes"] = km.cluster_sizes
        meta[name] = {"inertia": km.inertia, "n_iter": km.n_iter, "n_train": km.n_train}
    # A far-away initial centroid empties its cluster: the repair uses every rank's points.
    km = kmeans(
        x, K, KMeansConfig(n_init=1, max_iter=5, tol=0.0), init=inputs["bad_init"], distributed=True
    )
    out["repair.centroids"] = km.centroids
    out["repair.labels"] = km.labels

    pur = cluster_purity(
        _shard(inputs["cluster_labels"]), _shard(inputs["class_labels"]), 6, 3, distributed=True
    )
    out["purity.table"] = pur.table
    out["purity.purity"] = pur.purity

    scores = _shard(inputs["scores"])
    out["sinkhorn.codes"] = sinkhorn_codes(scores, epsilon=0.05, iterations=3, distributed=True)
    crops = [_shard(inputs[f"crop{i}"]).requires_grad_(True) for i in range(3)]
    queue = [_shard(inputs["queue0"]), _shard(inputs["queue1"])]
    loss = swav_loss(crops[:2], crops[2:], queue, distributed=True)
    loss.backward()  # type: ignore[no-untyped-call]
    out["swav.loss"] = loss.detach().reshape(1)
    for i, c in enumerate(crops):
        assert c.grad is not None
        out[f"swav.grad{i}"] = c.grad

    feats, probs = _shard(inputs["features"]), _shard(inputs["probs"])
    shot = centroid_pseudo_labels(feats, probs, distributed=True)
    out["shot.labels"] = shot.labels
    out["shot.centroids"] = shot.centroids
    meta["shot"] = {"counts": list(shot.counts), "agreement": shot.agreement}
    sel = cluster_pseudo_labels(
        feats,
        probs,
        ClusterPseudoLabelConfig(n_clusters=12, keep_fraction=0.3, kmeans=KMeansConfig(n_init=2)),
        distributed=True,
    )
    out["clup.indices"] = sel.indices
    out["clup.labels"] = sel.labels
    meta["clup"] = {"selected_per_class": list(sel.selected_per_class)}
    whole = cluster_pseudo_labels(
        feats,
        probs,
        ClusterPseudoLabelConfig(
            n_clusters=12, keep_fraction=0.3, kmeans=KMeansConfig(n_init=2), selection="clusters"
        ),
        distributed=True,
    )
    out["clup_clusters.indices"] = whole.indices
    out["clup_clusters.labels"] = whole.labels

    # Primitives: uneven gathers, bytes, gradient averaging.
    mine = torch.full((dist.rank() + 1, 2), float(dist.rank()))
    out["gather"] = dist.all_gather_cat(mine)
    meta["bytes"] = dist.broadcast_bytes(b"hello from rank 0" if dist.is_main() else None).decode()
    p = torch.nn.Parameter(torch.zeros(3))
    unused = torch.nn.Parameter(torch.zeros(2))
    p.grad = torch.full((3,), float(dist.rank() + 1))
    dist.average_gradients([p, unused], weight=float(dist.rank() + 1), total=3.0)
    out["avg_grad"] = p.grad
    meta["unused_grad_is_none"] = unused.grad is None

    # The trainer refuses ranks that decoded different target images.
    same = np.zeros((4, 8, 8, 3), dtype=np.uint8)
    spec = InputSpec(size=(8, 8))
    data = TargetData(images=same, spec=spec, fingerprint="same")
    stub: Any = SimpleNamespace(data=data, rank=dist.rank())
    Trainer._check_same_data(stub)
    other = same.copy()
    other[0, 0, 0, 0] = dist.rank()
    stub.data = TargetData(images=other, spec=spec, fingerprint="same")
    try:
        Trainer._check_same_data(stub)
        meta["different_data"] = "accepted"
    except DistributedError as exc:
        meta["different_data"] = str(exc)
    return out, meta


def main(argv: list[str]) -> None:
    init_file, rank, world, inputs, out_dir = argv
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    tdist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=int(rank), world_size=int(world)
    )
    try:
        tensors, meta = run(load_file(inputs))
    finally:
        tdist.destroy_process_group()
    out = Path(out_dir)
    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, out / f"rank{rank}.st")
    (out / f"rank{rank}.json").write_text(json.dumps(meta))


if __name__ == "__main__":
    main(sys.argv[1:])
