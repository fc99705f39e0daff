"""Multi-process adaptation on ``torch.distributed``: ranks, collectives, sharding.

``sourcefree adapt`` runs unchanged under ``torchrun`` (NCCL on GPUs, gloo on
CPUs). :func:`init_from_env` joins the process group that ``torchrun`` describes
in the environment (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``,
``MASTER_PORT``); without those variables nothing happens and every helper
here is a no-op for one process, so the single-process path stays as it was.

Conventions shared by the distributed whole-dataset steps
(:func:`sourcefree.ops.clustering.kmeans`, :func:`sourcefree.ops.clustering.cluster_purity`,
:func:`sourcefree.ops.pseudo_labels.cluster_pseudo_labels`,
:func:`sourcefree.ops.pseudo_labels.centroid_pseudo_labels`,
:func:`sourcefree.kernels.swav_loss`, each with ``distributed=True``):

- **Shards are contiguous and in rank order.** Rank ``r`` holds the rows
  ``[offset_r, offset_r + n_r)`` of the global array (:func:`shard_range`);
  concatenating the shards in rank order gives the array one process would see.
- **Every rank calls every collective**, in the same order, with tensors of the
  same shape (sizes are exchanged first where they may differ).
- **Sums are all-reduced; rows are assembled exactly.** Adding a zero is exact,
  so :func:`all_gather_cat` and :func:`gather_cat_to_main` return the same bits
  as one process; sums of partial sums differ from one process only in rounding.

Collectives run on the backend's device: CPU tensors go through CUDA for NCCL
and CUDA tensors through the CPU for gloo; results come back on the input's
device. Importing this module imports torch.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from sourcefree.errors import DistributedError

__all__ = [
    "TIMEOUT_ENV",
    "all_gather_cat",
    "all_reduce_max",
    "all_reduce_sum",
    "average_batchnorm_statistics",
    "average_gradients",
    "barrier",
    "batch_shard",
    "batch_starts",
    "broadcast",
    "broadcast_bytes",
    "broadcast_module_state",
    "device_for_rank",
    "env_world_size",
    "gather_cat_to_main",
    "init_from_env",
    "is_distributed",
    "is_main",
    "local_rank",
    "rank",
    "shard_indices",
    "shard_range",
    "shard_sizes",
    "shards_batches",
    "shutdown",
    "world_size",
]

#: Environment variable: seconds a rank waits in a collective before failing (default 7200).
TIMEOUT_ENV = "SOURCEFREE_DIST_TIMEOUT_S"
_DEFAULT_TIMEOUT_S = 7200.0
_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


# -- who am I --------------------------------------------------------------------------


def env_world_size() -> int:
    """``WORLD_SIZE`` from the environment (1 when unset): what ``torchrun`` asked for."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        raise DistributedError(
            f"WORLD_SIZE={os.environ.get('WORLD_SIZE')!r} is not an integer",
            "torchrun sets it to the number of processes",
            "launch with torchrun, or unset WORLD_SIZE for one process",
        ) from None


def is_distributed() -> bool:
    """Whether a process group with more than one process is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank in the initialised group (0 when there is none)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """Processes in the initialised group (1 when there is none)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def local_rank() -> int:
    """``LOCAL_RANK`` (this process's index on its node, set by torchrun); 0 when unset."""
    try:
        return int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError:
        return 0


def is_main() -> bool:
    """Whether this process writes checkpoints, reports and packages (rank 0)."""
    return rank() == 0


def _timeout() -> timedelta:
    raw = os.environ.get(TIMEOUT_ENV)
    try:
        seconds = float(raw) if raw else _DEFAULT_TIMEOUT_S
    except ValueError:
        raise DistributedError(
            f"{TIMEOUT_ENV}={raw!r} is not a number",
            "it is the collective timeout in seconds",
            f"unset it or pass e.g. {TIMEOUT_ENV}=3600",
        ) from None
    if not seconds > 0:
        raise DistributedError(f"{TIMEOUT_ENV}={raw!r}", "the timeout must be positive", "")
    return timedelta(seconds=seconds)


def init_from_env(device: str = "auto") -> bool:
    """Join the process group that ``torchrun`` describes in the environment.

    Backend: NCCL when ``device`` is not ``cpu`` and CUDA is available (each
    process then uses GPU ``LOCAL_RANK``), gloo otherwise. Does nothing when
    ``WORLD_SIZE`` is unset or 1, or when a group is already initialised.

    Returns:
        True when this call initialised a group (the caller then calls :func:`shutdown`).

    Raises:
        DistributedError: torchrun's variables are incomplete, there are fewer
            GPUs than local ranks, or the rendezvous fails.
    """
    if dist.is_available() and dist.is_initialized():
        return False
    if env_world_size() <= 1:
        return False
    if not dist.is_available():
        raise DistributedError(
            "WORLD_SIZE > 1 but this torch build has no torch.distributed",
            "multi-process adaptation runs on torch.distributed",
            "install a torch build with distributed support, or run one process",
        )
    missing = [name for name in _ENV if name not in os.environ]
    if missing:
        raise DistributedError(
            f"WORLD_SIZE is {env_world_size()} but {', '.join(missing)} is not set",
            "a multi-process run needs torchrun's rendezvous variables",
            "launch with `torchrun --nproc-per-node N -m sourcefree adapt ...`",
        )
    use_cuda = device != "cpu" and torch.cuda.is_available()
    if use_cuda:
        count = torch.cuda.device_count()
        if local_rank() >= count:
            raise DistributedError(
                f"local rank {local_rank()} has no GPU (this node has {count})",
                "each process on a node uses its own GPU",
                f"use --nproc-per-node {count} or fewer on this node",
            )
        torch.cuda.set_device(local_rank())
    backend = "nccl" if use_cuda else "gloo"
    try:
        dist.init_process_group(backend, init_method="env://", timeout=_timeout())
    except (RuntimeError, ValueError) as exc:
        raise DistributedError(
            f"could not join the {backend} process group",
            str(exc).splitlines()[0] if str(exc) else type(exc).__name__,
            "check MASTER_ADDR/MASTER_PORT (or --rdzv-endpoint) and that every node "
            "can reach it; on one machine set GLOO_SOCKET_IFNAME=lo for gloo",
        ) from None
    return True


def shutdown() -> None:
    """Leave the process group (if one is initialised)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def device_for_rank(device: torch.device) -> torch.device:
    """``cuda`` becomes ``cuda:LOCAL_RANK`` in a multi-process run; anything else is kept."""
    if device.type == "cuda" and device.index is None and is_distributed():
        return torch.device("cuda", torch.cuda.current_device())
    return device


# -- collectives -------------------------------------------------------------------------


def _comm_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _on_comm(t: torch.Tensor) -> torch.Tensor:
    dev = _comm_device()
    return t if t.device == dev else t.to(dev)


def _back(result: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    if result is not t:
        t.copy_(result)
    return t


def barrier() -> None:
    """Wait until every rank gets here (no-op for one process)."""
    if is_distributed():
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def _all_reduce(t: torch.Tensor, op: dist.ReduceOp.RedOpType) -> torch.Tensor:
    """All-reduce ``t`` with ``op`` on the communication device, back into ``t``."""
    if not is_distributed():
        return t
    work = _on_comm(t.contiguous())
    dist.all_reduce(work, op=op)
    return _back(work, t)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over ranks in place and return it (no-op for one process)."""
    return _all_reduce(t, dist.ReduceOp.SUM)


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    """Element-wise maximum of ``t`` over ranks, in place (no-op for one process)."""
    return _all_reduce(t, dist.ReduceOp.MAX)


def broadcast(t: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Overwrite ``t`` with rank ``src``'s values, in place (no-op for one process)."""
    if not is_distributed():
        return t
    work = _on_comm(t.contiguous())
    dist.broadcast(work, src=src)
    return _back(work, t)


def broadcast_bytes(data: bytes | None, src: int = 0) -> bytes:
    """Rank ``src``'s ``data`` on every rank (others pass None). No pickle: raw bytes."""
    if not is_distributed():
        if data is None:
            raise DistributedError("broadcast_bytes got no data", "one process must pass it", "")
        return data
    size = torch.tensor([len(data) if rank() == src and data is not None else 0])
    broadcast(size, src)
    buf = torch.zeros(int(size.item()), dtype=torch.uint8)
    if rank() == src and data is not None:
        buf.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    broadcast(buf, src)
    return bytes(buf.numpy().tobytes())


def broadcast_framed(
    head: Mapping[str, Any] | None, body: bytes = b"", *, what: str, src: int = 0
) -> tuple[dict[str, Any], bytes] | None:
    """Rank ``src``'s JSON ``head`` and raw ``body`` on every rank; None when it sent none.

    The frame is ``[8-byte little-endian head length][strict-JSON head][body]``; other
    ranks' arguments are ignored. No pickle.
    """
    from sourcefree.package import strictjson

    payload = None
    if rank() == src or not is_distributed():
        payload = b""
        if head is not None:
            encoded = strictjson.dumps(head)
            payload = len(encoded).to_bytes(8, "little") + encoded + body
    data = broadcast_bytes(payload, src)
    if not data:
        return None
    size = int.from_bytes(data[:8], "little")
    if len(data) < 8 or size > len(data) - 8:
        raise DistributedError(
            f"the {what} frame from rank {src} is cut short",
            f"its header claims {size} bytes, {max(len(data) - 8, 0)} arrived",
            "run again; if it repeats, check the network between the nodes",
        )
    return strictjson.loads(data[8 : 8 + size], what=what, max_bytes=size), data[8 + size :]


def shard_sizes(n_local: int) -> list[int]:
    """Every rank's local row count, in rank order (``[n_local]`` for one process)."""
    if not is_distributed():
        return [int(n_local)]
    sizes = torch.zeros(world_size(), dtype=torch.int64)
    sizes[rank()] = int(n_local)
    all_reduce_sum(sizes)
    return [int(v) for v in sizes.tolist()]


def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's ``t`` along dim 0 in rank order (shapes may differ in dim 0).

    Exact: each rank contributes its rows into a zero buffer that is summed, so
    the result holds the same bits as the shards. Returns ``t`` for one process.
    """
    if not is_distributed():
        return t
    sizes = shard_sizes(int(t.shape[0]))
    offset = sum(sizes[: rank()])
    out = torch.zeros((sum(sizes), *t.shape[1:]), dtype=t.dtype, device=t.device)
    out[offset : offset + t.shape[0]] = t
    if out.dtype == torch.bool:
        return all_reduce_sum(out.to(torch.uint8)).to(torch.bool)
    return all_reduce_sum(out)


def gather_cat_to_main(t: torch.Tensor) -> torch.Tensor | None:
    """:func:`all_gather_cat` delivered to rank 0 only (None elsewhere); less memory."""
    if not is_distributed():
        return t
    sizes = shard_sizes(int(t.shape[0]))
    biggest = max(sizes)
    padded = torch.zeros((biggest, *t.shape[1:]), dtype=t.dtype, device=t.device)
    padded[: t.shape[0]] = t
    work = _on_comm(padded)
    parts = [torch.empty_like(work) for _ in sizes] if is_main() else None
    dist.gather(work, parts, dst=0)
    if parts is None:
        return None
    return torch.cat([p[:s] for p, s in zip(parts, sizes, strict=True)]).to(t.device)


# -- sharding ------------------------------------------------------------------------------


def shard_range(n: int, rank_: int | None = None, world: int | None = None) -> tuple[int, int]:
    """Contiguous block ``[start, stop)`` of ``n`` rows for a rank (sizes differ by at most 1).

    Deterministic: depends on ``n``, the rank and the world size only.
    """
    r = rank() if rank_ is None else rank_
    w = world_size() if world is None else world
    if w < 1 or not 0 <= r < w or n < 0:
        raise DistributedError(f"rank {r} of {w} for {n} rows", "need 0 <= rank < world", "")
    return (r * n) // w, ((r + 1) * n) // w


def shard_indices(n: int, rank_: int | None = None, world: int | None = None) -> torch.Tensor:
    """int64 dataset indices of a rank's contiguous shard (see :func:`shard_range`)."""
    start, stop = shard_range(n, rank_, world)
    return torch.arange(start, stop, dtype=torch.int64)


def shards_batches(n: int, batch_size: int) -> bool:
    """Whether a whole-set pass over ``n`` rows in batches is split over the ranks.

    True in a multi-process run with at least one batch per rank; otherwise every
    rank takes every batch.
    """
    return is_distributed() and -(-n // batch_size) >= world_size()


def batch_starts(n: int, batch_size: int) -> range:
    """First row of each batch of a whole-set pass that this rank takes.

    One process: every batch of ``batch_size`` rows in dataset order. Several:
    a contiguous run of those same batches (:func:`shard_range` over the
    batches), so each rank's rows form a contiguous shard in rank order and every
    row sits in the same batch as with one process; with fewer batches than
    ranks, every batch (see :func:`shards_batches`).
    """
    batches = -(-n // batch_size)
    first, last = shard_range(batches) if shards_batches(n, batch_size) else (0, batches)
    return range(first * batch_size, last * batch_size, batch_size)


def batch_shard(
    index: torch.Tensor, rank_: int | None = None, world: int | None = None
) -> torch.Tensor:
    """This rank's disjoint slice of a global batch of dataset indices.

    The global batch is a slice of the epoch's permutation, the same on every
    rank; rank ``r`` takes its :func:`shard_range` of it. A batch smaller than the
    world size is taken whole by every rank (its gradient is then the same on
    every rank, and averaging it changes nothing), so no rank ever gets nothing.
    """
    w = world_size() if world is None else world
    m = int(index.shape[0])
    if w <= 1 or m < w:
        return index
    start, stop = shard_range(m, rank_, w)
    return index[start:stop]


# -- training --------------------------------------------------------------------------


def average_gradients(params: Sequence[nn.Parameter], weight: float, total: float) -> None:
    """Replace each gradient by ``sum_r weight_r grad_r / total`` over ranks (one all-reduce).

    With ``weight`` the rank's batch size and ``total`` the global batch size, this
    is the gradient of the mean loss over the global batch, as
    DistributedDataParallel computes it. A parameter keeps ``grad=None`` only when
    no rank produced a gradient for it (as one process would skip it).
    """
    if not is_distributed() or not params:
        return
    groups: dict[tuple[torch.device, torch.dtype], list[nn.Parameter]] = {}
    for p in params:
        groups.setdefault((p.device, p.dtype), []).append(p)
    for (dev, dtype), ps in groups.items():
        parts = [
            (p.grad.reshape(-1) * weight) if p.grad is not None else p.new_zeros(p.numel())
            for p in ps
        ]
        flags = torch.tensor([p.grad is not None for p in ps], dtype=dtype, device=dev)
        flat = all_reduce_sum(torch.cat([*parts, flags]))
        offset = 0
        for i, p in enumerate(ps):
            n = p.numel()
            if float(flat[flat.numel() - len(ps) + i]) > 0:
                g = flat[offset : offset + n].view_as(p) / total
                if p.grad is None:
                    p.grad = g.clone()
                else:
                    p.grad.copy_(g)
            offset += n


def broadcast_module_state(modules: Iterable[nn.Module], src: int = 0) -> None:
    """Copy rank ``src``'s parameters and buffers into every rank's modules."""
    if not is_distributed():
        return
    with torch.no_grad():
        for module in modules:
            for t in [*module.parameters(), *module.buffers()]:
                broadcast(t.data, src)


def average_batchnorm_statistics(modules: Iterable[nn.Module]) -> None:
    """Average BatchNorm running means and variances over ranks (no-op for one process).

    Each rank estimates the statistics on its slice of every batch; the mean of
    the per-rank estimates is the estimate over the global batches (equal-sized
    slices). ``num_batches_tracked`` is taken from rank 0.
    """
    if not is_distributed():
        return
    w = float(world_size())
    with torch.no_grad():
        for module in modules:
            for m in module.modules():
                if not isinstance(m, nn.modules.batchnorm._BatchNorm):
                    continue
                for t in (m.running_mean, m.running_var):
                    if isinstance(t, torch.Tensor):
                        all_reduce_sum(t).div_(w)
                if isinstance(m.num_batches_tracked, torch.Tensor):
                    broadcast(m.num_batches_tracked)
