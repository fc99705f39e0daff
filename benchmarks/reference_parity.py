"""Parity with the authors' reference code: SHOT's centroid labels and IM loss, CluP's selection.

Runs the reference repositories' own functions next to ours on the same seeded
features and logits (issue 20, point 7); no training, no images:

- **SHOT** (``tim-learn/SHOT``, ``object/image_target.py``): ``obtain_label``
  (softmax-weighted centroids, cosine distance, the second round with one-hot
  weights, the class-count ``threshold``) against
  :func:`sourcefree.ops.pseudo_labels.centroid_pseudo_labels`; the IM loss from
  ``object/loss.py``'s ``Entropy`` (both terms) plus ``0.3 * CrossEntropyLoss``, as
  the training loop of ``image_target.py`` combines them, against
  :func:`sourcefree.kernels.margin_ce_im` with :class:`adapters.shot.ShotConfig`'s
  defaults, on every batch of 64 rows.
- **CluP** (``altndrr/clup``): the ``clup`` command (``cli/commands/clup.py``: its
  per-class ``torch.topk`` of ``int(q n_c)`` samples) with ``src/systems/utils.py``'s
  ``predict_classes`` (cluster purity, ``purity`` mode; source confidence, ``normal``
  mode) against :func:`sourcefree.ops.pseudo_labels.cluster_pseudo_labels`
  (``selection="samples"``). Both get the same clusters: K-means itself is not
  compared (the reference calls scikit-learn's, not installed here); its
  ``KMeans`` is replaced by one that returns the labels of our
  :func:`sourcefree.ops.clustering.kmeans` run and records the features it was
  given, which are compared with :func:`sourcefree.ops.pseudo_labels.prepare_features`.

The reference code is imported from the given checkouts at run time and never
copied. What is replaced while it loads (restored afterwards): imports that are
missing here or that would load images, build networks or train (SHOT: ``cv2``
and ``sklearn.metrics`` when absent; CluP: the ``cli`` package's docopt entry
point, ``cli.config`` (toml), ``rich``, ``pytorch_lightning``, ``src.data``,
``src.datasets``, ``src.models``, the two training systems and ``sklearn``). The
reference functions receive the features and logits through a loader, networks
and a ``Trainer.predict`` that hand out the seeded arrays; the results list the
replaced imports (``stubbed_imports``).

Cases (``--n`` x ``--dim`` features, 7 classes, ``--seeds``): ``random`` (Gaussian
features, independent Gaussian logits), ``clustered`` (imbalanced Gaussian class
blobs, logits of a linear head), ``rare-class`` (clustered, the last class predicted
by 5 samples: with SHOT's ``threshold`` 0 and 10) and ``missing-class`` (clustered,
the last class predicted by none).

    python benchmarks/reference_parity.py --shot-repo DIR --clup-repo DIR
    python benchmarks/reference_parity.py --quick            # ours only, a smoke run

Writes ``benchmarks/results/reference_parity.json`` (aggregates only: no features,
labels or paths; ``--quick`` writes ``reference_parity-quick.json``).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.machinery
import importlib.util
import io
import json
import math
import subprocess
import sys
import types
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sourcefree.adapters.shot import ShotConfig
from sourcefree.errors import InputError, SourcefreeError, exception_summary
from sourcefree.fsutil import atomic_write_bytes, replace_marked_block
from sourcefree.kernels import margin_ce_im
from sourcefree.ops.clustering import KMeansConfig, cluster_purity, kmeans, member_labels_and_scores
from sourcefree.ops.pseudo_labels import (
    CentroidPseudoLabels,
    ClusterPseudoLabelConfig,
    centroid_pseudo_labels,
    cluster_pseudo_labels,
    prepare_features,
)

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
CASES = ("random", "clustered", "rare-class", "missing-class")
#: SHOT's class-count thresholds per case (0: closed set; 10: run.sh's partial-set value).
THRESHOLDS: Mapping[str, tuple[int, ...]] = {"rare-class": (0, 10)}
#: Samples that still predict the last class in ``rare-class``.
RARE = 5
#: Logit scales of the IM comparison (10: near one-hot rows, where the epsilon matters).
LOGIT_SCALES = (1.0, 10.0)
#: Rows per IM batch (SHOT's batch size).
IM_BATCH = 64
SHOT_REPO = "tim-learn/SHOT"
CLUP_REPO = "altndrr/clup"
Array = np.ndarray[Any, np.dtype[Any]]


# --- the seeded inputs -------------------------------------------------------------------


def make_case(kind: str, seed: int, n: int, dim: int, n_classes: int) -> tuple[Array, Array]:
    """(N, D) float32 features and (N, C) float32 logits of one case."""
    g = torch.Generator().manual_seed(seed)
    if kind == "random":
        feats = torch.randn(n, dim, generator=g)
        return feats.numpy(), (2.0 * torch.randn(n, n_classes, generator=g)).numpy()
    prior = torch.tensor([0.7**k for k in range(n_classes)], dtype=torch.float64)
    y = torch.multinomial(prior / prior.sum(), n, replacement=True, generator=g)
    means = torch.randn(n_classes, dim, generator=g)
    feats = 0.12 * means[y] + torch.randn(n, dim, generator=g)
    head = means / means.norm(dim=1, keepdim=True)
    logits = 2.0 * feats @ head.T + 0.5 * torch.randn(n, n_classes, generator=g)
    if kind in ("rare-class", "missing-class"):
        margin = logits[:, -1] - logits[:, :-1].max(dim=1).values
        top = torch.sort(margin, descending=True).values
        shift = top[0] + 1.0 if kind == "missing-class" else (top[RARE - 1] + top[RARE]) / 2
        logits[:, -1] -= shift
    elif kind != "clustered":
        raise InputError(f"case {kind!r} is unknown", "", f"use one of {', '.join(CASES)}")
    return feats.numpy(), logits.numpy()


def softmax(logits: Array) -> torch.Tensor:
    """The probabilities every side uses: ``torch.softmax`` of the float32 logits."""
    return torch.softmax(torch.from_numpy(logits), dim=1)


# --- loading the reference code ----------------------------------------------------------


def _module(name: str, package: Path | None = None, **attrs: Any) -> types.ModuleType:
    """A stand-in module (a package over ``package`` when given) with ``attrs``."""
    mod = types.ModuleType(name)
    mod.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=package is not None)
    if package is not None:
        mod.__path__ = [str(package)]
    for key, value in attrs.items():
        setattr(mod, key, value)
    return mod


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


@contextlib.contextmanager
def _imports_from(path: Path, stubs: Mapping[str, types.ModuleType]) -> Iterator[None]:
    """Import from ``path`` with ``stubs`` in place; afterwards sys.path and sys.modules are
    as before, except for third-party modules loaded meanwhile (the loaded reference
    modules keep working through their own references)."""
    before = dict(sys.modules)
    local = {p.stem for p in path.iterdir() if p.suffix == ".py" or (p / "__init__.py").exists()}
    local |= {p.name for p in path.iterdir() if p.is_dir()}
    for name in list(sys.modules):
        if name.split(".")[0] in local:
            del sys.modules[name]
    sys.modules.update(stubs)
    sys.path.insert(0, str(path))
    try:
        yield
    finally:
        sys.path.remove(str(path))
        for name in list(sys.modules):
            if name.split(".")[0] in local or name in stubs:
                del sys.modules[name]
        sys.modules.update({k: v for k, v in before.items() if k not in sys.modules})


def _check_checkout(repo: Path, files: Sequence[str], name: str) -> None:
    for rel in files:
        if not (repo / rel).is_file():
            raise InputError(
                f"the {name} checkout has no {rel}",
                f"the comparison runs {name}'s own {rel}",
                f"pass the root of a checkout of github.com/{name}",
            )


def commit_of(repo: Path) -> str | None:
    """The checkout's commit (``git rev-parse HEAD``), None when it is not a git work tree."""
    try:
        done = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    text = done.stdout.strip()
    return text if done.returncode == 0 and len(text) == 40 else None


class _Rows:
    """A batch of row indices with the ``.cuda()`` SHOT calls on its inputs (a no-op here)."""

    def __init__(self, idx: torch.Tensor) -> None:
        self.idx = idx

    def cuda(self) -> _Rows:
        return self


class _OldIterator:
    """SHOT calls ``iter(loader).next()`` (the Python 2 spelling)."""

    def __init__(self, batches: list[tuple[_Rows, torch.Tensor]]) -> None:
        self._it = iter(batches)

    def __iter__(self) -> _OldIterator:
        return self

    def __next__(self) -> tuple[_Rows, torch.Tensor]:
        return next(self._it)

    def next(self) -> tuple[_Rows, torch.Tensor]:
        return next(self._it)


class _Loader:
    """Batches of row indices; the dummy labels (zeros) only feed SHOT's log line."""

    def __init__(self, n: int, batch: int) -> None:
        self.batches = [
            (_Rows(torch.arange(s, min(s + batch, n))), torch.zeros(min(batch, n - s)))
            for s in range(0, n, batch)
        ]

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> _OldIterator:
        return _OldIterator(self.batches)


class _Lookup:
    """netB then netC of SHOT: the features of the batch's rows, then their logits."""

    def __init__(self, features: Array, logits: Array) -> None:
        self.features = torch.from_numpy(features)
        self.logits = torch.from_numpy(logits)
        self.last = torch.zeros(0, dtype=torch.int64)

    def bottleneck(self, rows: _Rows) -> torch.Tensor:
        self.last = rows.idx
        return self.features[rows.idx]

    def classifier(self, _feats: torch.Tensor) -> torch.Tensor:
        return self.logits[self.last]


@dataclass
class ShotReference:
    """SHOT's ``obtain_label`` and ``Entropy``, loaded from a checkout."""

    obtain_label: Callable[..., Any]
    entropy: Callable[[torch.Tensor], torch.Tensor]
    stubbed: tuple[str, ...]

    def labels(self, features: Array, logits: Array, threshold: int) -> Array:
        """``obtain_label`` on these arrays (its accuracy line, on dummy labels, is dropped)."""
        nets = _Lookup(features, logits)
        args = types.SimpleNamespace(
            epsilon=1e-5,  # image_target.py's argparse defaults
            class_num=logits.shape[1],
            distance="cosine",
            threshold=threshold,
            out_file=io.StringIO(),
        )
        with contextlib.redirect_stdout(io.StringIO()):
            out = self.obtain_label(
                _Loader(len(features), 192), lambda x: x, nets.bottleneck, nets.classifier, args
            )
        return np.asarray(out, dtype=np.int64)

    def loss_terms(self, logits: torch.Tensor, target: torch.Tensor) -> tuple[float, ...]:
        """(entropy, diversity, IM, SHOT loss) as image_target.py's training step adds them."""
        probs = torch.nn.Softmax(dim=1)(logits)
        ent = torch.mean(self.entropy(probs))
        div = self.entropy(probs.mean(dim=0, keepdim=True))[0]
        im = ent - div
        total = 0.3 * torch.nn.CrossEntropyLoss()(logits, target) + 1.0 * im
        return float(ent), float(div), float(im), float(total)

    def smoke(self) -> None:
        """One tiny call of each function: raises if the code cannot run here."""
        feats, logits = make_case("clustered", 0, 200, 8, 3)
        self.labels(feats, logits, 0)
        self.loss_terms(torch.from_numpy(logits), torch.zeros(200, dtype=torch.int64))


def load_shot(repo: Path) -> ShotReference:
    """Import ``object/image_target.py`` and ``object/loss.py`` from a SHOT checkout."""
    _check_checkout(repo, ("object/image_target.py", "object/loss.py"), SHOT_REPO)
    stubs: dict[str, types.ModuleType] = {}
    if not _importable("cv2"):  # data_list.py reads images with it
        stubs["cv2"] = _module("cv2")
    if not _importable("sklearn"):  # image_target.py imports confusion_matrix (unused here)
        stubs["sklearn"] = _module("sklearn", Path("sklearn"))
        stubs["sklearn.metrics"] = _module("sklearn.metrics", confusion_matrix=None)
    with _imports_from(repo / "object", stubs):
        target = importlib.import_module("image_target")
        loss = importlib.import_module("loss")
    return ShotReference(target.obtain_label, loss.Entropy, tuple(sorted(stubs)))


@dataclass
class _ClupFeed:
    """What the stand-ins hand to the CluP command and what they capture from it."""

    batches: list[dict[str, torch.Tensor]] = field(default_factory=list)
    clusters: Array | None = None
    class_names: list[str] = field(default_factory=list)
    kmeans_input: torch.Tensor | None = None
    predicted: dict[str, torch.Tensor] = field(default_factory=dict)
    subset: list[int] = field(default_factory=list)


def _clup_stubs(repo: Path, feed: _ClupFeed) -> dict[str, types.ModuleType]:
    """Stand-ins for the imports of the clup command that load data, models or train."""

    class KMeans:
        def __init__(self, n_clusters: int) -> None:
            self.n_clusters = n_clusters

        def fit(self, x: torch.Tensor) -> KMeans:
            feed.kmeans_input = torch.as_tensor(x).clone()
            self.labels_ = np.asarray(feed.clusters, dtype=np.int32)  # sklearn's dtype
            return self

    class Trainer:
        def __init__(self, **_: Any) -> None:
            pass

        def predict(self, *_: Any) -> list[dict[str, torch.Tensor]]:
            return feed.batches

        def fit(self, *_: Any) -> None:
            pass

    class DataModule:
        def __init__(self, *_: Any, **__: Any) -> None:
            self.predict_set = types.SimpleNamespace(labels=feed.class_names)

        def setup(self) -> None:
            pass

        def predict_dataloader(self) -> None:
            return None

    def clup_system(_model: Any, _labels: torch.Tensor, **kw: Any) -> None:
        feed.subset = list(kw["labeled_samples"])

    nothing = type("Nothing", (), {"__init__": lambda self, *a, **k: None})
    ds = types.SimpleNamespace(labels=feed.class_names)
    return {
        "cli": _module("cli", repo / "cli"),  # skips cli/__init__.py, the docopt entry point
        "cli.config": _module("cli.config", get={"deterministic": True}.get),
        "rich": _module("rich", Path("rich")),
        "rich.console": _module("rich.console", Console=nothing),
        "pytorch_lightning": _module("pytorch_lightning", Path("pl"), Trainer=Trainer),
        "pytorch_lightning.callbacks": _module(
            "pytorch_lightning.callbacks", RichModelSummary=nothing, RichProgressBar=nothing
        ),
        "pytorch_lightning.loggers": _module("pytorch_lightning.loggers", WandbLogger=nothing),
        "src.data": _module("src.data", repo / "src" / "data"),
        "src.data.image": _module("src.data.image", ImageDataModule=DataModule),
        "src.datasets": _module("src.datasets", DATASETS={"parity": ds}),
        "src.models": _module("src.models", repo / "src" / "models"),
        "src.models.utils": _module("src.models.utils", make_model=lambda *a, **k: None),
        "src.systems.classification": _module(
            "src.systems.classification", ClassificationSystem=nothing
        ),
        "src.systems.clup": _module("src.systems.clup", CluPSystem=clup_system),
        "sklearn": _module("sklearn", Path("sklearn")),
        "sklearn.cluster": _module("sklearn.cluster", KMeans=KMeans),
    }


@dataclass
class ClupReference:
    """The clup command and its ``predict_classes``, loaded from a checkout."""

    command: Any
    feed: _ClupFeed
    stubbed: tuple[str, ...]

    def select(
        self, features: Array, logits: Array, clusters: Array | None, k: int, q: float
    ) -> dict[str, Any]:
        """Run the command's selection: per-sample labels and scores, the kept indices."""
        feed, n = self.feed, len(features)
        c = logits.shape[1]
        feed.class_names[:] = [f"class{i}" for i in range(c)]  # read by the stand-ins
        feed.clusters = clusters
        feed.kmeans_input = None
        feed.batches = [
            {
                "embeddings": torch.from_numpy(features[s : s + 64]),
                "outputs": torch.from_numpy(logits[s : s + 64]),
                "labels": torch.zeros(len(features[s : s + 64]), dtype=torch.int64),
                "indices": torch.arange(s, min(s + 64, n)),
            }
            for s in range(0, n, 64)
        ]
        purity = clusters is not None
        options: dict[str, Any] = {
            "network": "resnet18",
            "teacher": "resnet18",
            "dataset": "parity",
            "labeled_samples_size": q,
            "labeled_samples_mode": "purity" if purity else "normal",
            "labeled_samples_mode_kw": {"num_classes": c, "num_prototypes": k} if purity else {},
            "criterion_kw": {},
        }
        module = self.command
        real = module.predict_classes

        def recorded(out: dict[str, torch.Tensor], **kw: Any) -> dict[str, torch.Tensor]:
            result: dict[str, torch.Tensor] = real(out, **kw)
            feed.predicted = result
            return result

        module.predict_classes = recorded
        try:
            module.CluP(options, types.SimpleNamespace(print=lambda *a, **k: None)).run()
        finally:
            module.predict_classes = real
        pred = feed.predicted
        return {
            "labels": pred["pseudo_labels"].to(torch.int64).numpy(),
            "scores": pred["pseudo_labels_confidences"].to(torch.float32).numpy(),
            "subset": np.asarray(sorted(feed.subset), dtype=np.int64),
            "kmeans_input": feed.kmeans_input,
        }

    def smoke(self) -> None:
        """One tiny selection in each mode: raises if the code cannot run here."""
        feats, logits = make_case("clustered", 0, 200, 8, 3)
        self.select(feats, logits, np.arange(200) % 10, 10, 0.5)
        self.select(feats, logits, None, 0, 0.5)


def load_clup(repo: Path) -> ClupReference:
    """Import ``cli/commands/clup.py`` and ``src/systems/utils.py`` from a CluP checkout."""
    _check_checkout(repo, ("cli/commands/clup.py", "src/systems/utils.py"), CLUP_REPO)
    feed = _ClupFeed()
    stubs = _clup_stubs(repo, feed)
    with _imports_from(repo, stubs):
        command = importlib.import_module("cli.commands.clup")
    return ClupReference(command, feed, tuple(sorted(stubs)))


# --- our side and the comparisons --------------------------------------------------------


def label_agreement(ours: Array, ref: Array) -> dict[str, Any]:
    """Fraction of equal labels and how many differ."""
    if ours.shape != ref.shape:
        raise InputError(
            f"label arrays have shapes {ours.shape} and {ref.shape}",
            "both sides label the same samples",
            "pass one label per sample from each side",
        )
    same = ours == ref
    return {
        "agreement": float(same.mean()) if same.size else math.nan,
        "n_differ": int((~same).sum()),
    }


def nearest_gap(feats: Array, res: CentroidPseudoLabels) -> float | None:
    """Smallest gap over samples between the cosine distances (float64) to the two nearest
    assignable centroids of the last round: how close the labelling came to a tie."""
    if len(res.assignable) < 2:
        return None
    z = prepare_features(torch.from_numpy(feats)).double()
    cent = res.centroids.double()[list(res.assignable)]
    dist = 1.0 - z @ (cent / cent.norm(dim=1, keepdim=True)).T
    two = dist.topk(2, dim=1, largest=False).values
    return float((two[:, 1] - two[:, 0]).min())


def shot_row(
    case: str, seed: int, threshold: int, feats: Array, logits: Array, ref: ShotReference | None
) -> tuple[dict[str, Any], Array]:
    """SHOT's centroid labels, ours and the reference's; returns the row and the labels
    the loss comparison trains against (the reference's when it ran)."""
    probs = softmax(logits)
    res = centroid_pseudo_labels(torch.from_numpy(feats), probs, threshold=threshold)
    ours = res.labels.numpy()
    row: dict[str, Any] = {
        "case": case,
        "seed": seed,
        "threshold": threshold,
        "n": len(ours),
        "classes_assignable": len(res.assignable),
        "changed_from_argmax": round(1.0 - res.agreement, 6),
        "min_nearest_gap": nearest_gap(feats, res),
        "agreement": None,
        "n_differ": None,
    }
    if ref is None:
        return row, ours
    theirs = ref.labels(feats, logits, threshold)
    row.update(label_agreement(ours, theirs))
    return row, theirs


def ours_loss_terms(logits: torch.Tensor, target: torch.Tensor) -> tuple[float, ...]:
    """(entropy, diversity, IM, SHOT loss) of one batch as adapters/shot.py computes them."""
    cfg = ShotConfig()
    t = margin_ce_im(logits, target, entropy_eps=cfg.entropy_eps)
    return (
        float(t.entropy),
        float(t.diversity),
        float(t.entropy - t.diversity),
        float(t.loss(cfg.beta, cfg.im_weight)),
    )


LOSS_TERMS = ("entropy", "diversity", "im", "shot_loss")


def im_row(
    case: str, seed: int, scale: float, logits: Array, target: Array, ref: ShotReference | None
) -> dict[str, Any]:
    """Largest absolute difference of each loss term over the batches of ``IM_BATCH`` rows."""
    x = torch.from_numpy(logits) * scale
    y = torch.from_numpy(target)
    worst = [0.0] * len(LOSS_TERMS)
    worst_rel = worst_64 = 0.0
    mean_loss = 0.0
    starts = range(0, len(x), IM_BATCH)
    for s in starts:
        xb, yb = x[s : s + IM_BATCH], y[s : s + IM_BATCH]
        ours = ours_loss_terms(xb, yb)
        mean_loss += ours[-1] / len(starts)
        if ref is not None:
            theirs = ref.loss_terms(xb, yb)
            worst = [max(w, abs(a - b)) for w, a, b in zip(worst, ours, theirs, strict=True)]
            rel = (abs(a - b) / max(1.0, abs(b)) for a, b in zip(ours, theirs, strict=True))
            worst_rel = max(worst_rel, *rel)
            x64 = xb.double()
            pairs = zip(ours_loss_terms(x64, yb), ref.loss_terms(x64, yb), strict=True)
            worst_64 = max(worst_64, *(abs(a - b) for a, b in pairs))
    return {
        "case": case,
        "seed": seed,
        "logit_scale": scale,
        "batches": len(starts),
        "mean_shot_loss": round(mean_loss, 6),
        "max_abs_diff": None if ref is None else dict(zip(LOSS_TERMS, worst, strict=True)),
        "max_rel_diff": None if ref is None else worst_rel,
        "max_abs_diff_float64": None if ref is None else worst_64,
    }


def _ceil_quota(q: float, n: int) -> int:
    frac = Fraction(q).limit_denominator(1_000_000)
    return -((-n * frac.numerator) // frac.denominator)


def selection_agreement(
    labels: Array, scores: Array, keep: Array, ref: Mapping[str, Any], n_classes: int, q: float
) -> dict[str, Any]:
    """Compare per-sample labels and scores, then the kept sets class by class.

    A sample kept by one side only is *explained* when it is a tie at the other
    side's cut (its score equals the lowest score that side kept in its class) or
    lies at or below the reference's cut (our ``ceil`` quota keeps one more than
    ``int(q n_c)``); anything else counts as ``unexplained``.
    """
    lab_r, sc_r, keep_r = ref["labels"], ref["scores"], ref["subset"]
    out = label_agreement(labels, lab_r)
    out = {"label_agreement": out["agreement"], "labels_differ": out["n_differ"]}
    out["score_max_abs_diff"] = float(np.abs(scores.astype(np.float64) - sc_r).max())
    ours_set, ref_set = set(keep.tolist()), set(keep_r.tolist())
    counts = np.bincount(labels, minlength=n_classes)
    unexplained, ref_top, floor_ok, ceil_ok = 0, True, True, True
    for c in range(n_classes):
        members = np.flatnonzero(labels == c)
        o = [i for i in members if i in ours_set]
        r = [i for i in members if i in ref_set]
        cut_o = min((scores[i] for i in o), default=math.inf)
        cut_r = min((scores[i] for i in r), default=math.inf)
        rest = [scores[i] for i in members if i not in ref_set]
        ref_top &= not r or not rest or cut_r >= max(rest)
        floor_ok &= len(r) == int(q * counts[c])  # the reference's quota expression
        ceil_ok &= len(o) == _ceil_quota(q, int(counts[c]))
        unexplained += sum(1 for i in r if i not in ours_set and scores[i] != cut_o)
        unexplained += sum(1 for i in o if i not in ref_set and r and scores[i] > cut_r)
    both = len(ours_set & ref_set)
    union = len(ours_set | ref_set)
    out.update(
        {
            "selected_ours": len(ours_set),
            "selected_ref": len(ref_set),
            "selected_both": both,
            "jaccard": both / union if union else 1.0,
            "ours_only": len(ours_set - ref_set),
            "ref_only": len(ref_set - ours_set),
            "unexplained": unexplained,
            "ref_keeps_top_scores": bool(ref_top),
            "ref_quota_is_int_q_n": bool(floor_ok),
            "ours_quota_is_ceil_q_n": bool(ceil_ok),
        }
    )
    return out


def clup_row(
    case: str,
    seed: int,
    score: str,
    k: int | None,
    q: float,
    feats: Array,
    logits: Array,
    ref: ClupReference | None,
) -> dict[str, Any]:
    """CluP's labels, scores and selection, ours (the whole pipeline) and the reference's."""
    probs = softmax(logits)
    f = torch.from_numpy(feats)
    c = probs.shape[1]
    km_cfg = KMeansConfig(n_init=1, seed=seed)  # K-means is not compared: one run is enough
    purity = score == "purity"
    cfg = ClusterPseudoLabelConfig(
        n_clusters=k, keep_fraction=q, score="purity" if purity else "confidence", kmeans=km_cfg
    )
    sel = cluster_pseudo_labels(f, probs, cfg)
    conf, predicted = probs.to(torch.float32).max(dim=1)
    clusters: Array | None = None
    labels, scores = predicted, conf
    if purity and k is not None:
        km = kmeans(prepare_features(f), k, km_cfg)
        labels, scores = member_labels_and_scores(
            km.labels, cluster_purity(km.labels, predicted, k, c)
        )
        clusters = km.labels.numpy()
    row: dict[str, Any] = {
        "case": case,
        "seed": seed,
        "score": score,
        "k": k,
        "keep_fraction": q,
        "n": len(feats),
        "selected_ours": int(sel.indices.numel()),
        "ours_consistent": bool(torch.equal(labels[sel.indices], sel.labels)),
    }
    if ref is None:
        return row
    theirs = ref.select(feats, logits, clusters, k or 0, q)
    row.update(
        selection_agreement(labels.numpy(), scores.numpy(), sel.indices.numpy(), theirs, c, q)
    )
    given = theirs["kmeans_input"]
    row["feature_max_abs_diff"] = (
        None if given is None else float((given - prepare_features(f)).abs().max())
    )
    return row


# --- the run -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ParityConfig:
    """Sizes and grid of a run."""

    n: int = 2000
    dim: int = 256
    n_classes: int = 7
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    cases: tuple[str, ...] = CASES
    cluster_counts: tuple[int, ...] = (70, 250)
    keep_fractions: tuple[float, ...] = (0.1, 0.3)

    def __post_init__(self) -> None:
        bad = [c for c in self.cases if c not in CASES]
        small = self.n <= max(self.cluster_counts, default=0) or self.n < 2 * IM_BATCH
        if bad or small or self.dim < 1 or self.n_classes < 2 or not self.seeds:
            raise InputError(
                f"n={self.n}, dim={self.dim}, classes={self.n_classes}, cases={list(self.cases)}",
                f"cases must be among {', '.join(CASES)}; n must exceed every K and "
                f"{2 * IM_BATCH - 1}; dim >= 1; at least 2 classes and one seed",
                "use the defaults, or --quick",
            )


def run_parity(
    cfg: ParityConfig, shot: ShotReference | None, clup: ClupReference | None
) -> dict[str, list[dict[str, Any]]]:
    """Every comparison of the grid; a reference that is None leaves its fields None."""
    rows: dict[str, list[dict[str, Any]]] = {"shot_labels": [], "im_loss": [], "clup": []}
    for seed in cfg.seeds:
        for case in cfg.cases:
            feats, logits = make_case(case, seed, cfg.n, cfg.dim, cfg.n_classes)
            labelled = [
                shot_row(case, seed, t, feats, logits, shot) for t in THRESHOLDS.get(case, (0,))
            ]
            rows["shot_labels"].extend(row for row, _ in labelled)
            target = labelled[0][1]
            for scale in LOGIT_SCALES:
                rows["im_loss"].append(im_row(case, seed, scale, logits, target, shot))
            for q in cfg.keep_fractions:
                for k in cfg.cluster_counts:
                    rows["clup"].append(clup_row(case, seed, "purity", k, q, feats, logits, clup))
                rows["clup"].append(
                    clup_row(case, seed, "confidence", None, q, feats, logits, clup)
                )
    return rows


def _max(values: list[Any]) -> float | None:
    vals = [float(v) for v in values if v is not None]
    return max(vals) if vals else None


def _min(values: list[Any]) -> float | None:
    vals = [float(v) for v in values if v is not None]
    return min(vals) if vals else None


def summarise(rows: Mapping[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Worst cases over the grid (None where the reference did not run)."""
    shot, im, clup = rows["shot_labels"], rows["im_loss"], rows["clup"]
    diffs = [r["max_abs_diff"] for r in im if r["max_abs_diff"] is not None]
    ran = [r for r in clup if "label_agreement" in r]
    return {
        "shot_min_label_agreement": _min([r["agreement"] for r in shot]),
        "shot_labels_differing": sum(r["n_differ"] or 0 for r in shot),
        "shot_min_nearest_gap": _min([r["min_nearest_gap"] for r in shot]),
        "im_max_abs_diff": {t: _max([d[t] for d in diffs]) for t in LOSS_TERMS},
        "im_max_rel_diff": _max([r["max_rel_diff"] for r in im]),
        "im_max_abs_diff_float64": _max([r["max_abs_diff_float64"] for r in im]),
        "clup_min_label_agreement": _min([r["label_agreement"] for r in ran]),
        "clup_score_max_abs_diff": _max([r["score_max_abs_diff"] for r in ran]),
        "clup_feature_max_abs_diff": _max([r["feature_max_abs_diff"] for r in ran]),
        "clup_min_jaccard": _min([r["jaccard"] for r in ran]),
        "clup_unexplained": sum(r["unexplained"] for r in ran) if ran else None,
        "clup_ours_consistent": all(r["ours_consistent"] for r in clup),
    }


def _fmt(v: float | None, spec: str) -> str:
    return "n/a" if v is None else format(v, spec)


def markdown(payload: Mapping[str, Any]) -> str:
    """The per-seed table of docs/methods.md ("Parity with the reference code")."""
    rows = payload["rows"]
    seeds = sorted({r["seed"] for r in rows["shot_labels"]})
    lines = [
        "| seed | SHOT labels equal | IM loss: max abs diff | SHOT loss: max abs diff "
        "(relative) | losses in float64: max abs diff | CluP labels equal (score max abs "
        "diff) | CluP kept by both / by the reference | extra kept by our ceil quota "
        "| swapped at a tied cut | unexplained |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in seeds:
        sh = [r for r in rows["shot_labels"] if r["seed"] == s]
        im = [r for r in rows["im_loss"] if r["seed"] == s and r["max_abs_diff"]]
        cl = [r for r in rows["clup"] if r["seed"] == s and "label_agreement" in r]
        n_sh = sum(r["n"] for r in sh)
        differ = sum(r["n_differ"] or 0 for r in sh)
        terms = [r["max_abs_diff"] for r in im]
        im_diff = _max([max(d["entropy"], d["diversity"], d["im"]) for d in terms])
        loss = _max([d["shot_loss"] for d in terms])
        rel = _max([r["max_rel_diff"] for r in im])
        d64 = _max([r["max_abs_diff_float64"] for r in im])
        n_cl = sum(r["n"] for r in cl)
        same = n_cl - sum(r["labels_differ"] for r in cl)
        score = _max([r["score_max_abs_diff"] for r in cl])
        both = sum(r["selected_both"] for r in cl)
        ref = sum(r["selected_ref"] for r in cl)
        swapped = sum(r["ref_only"] for r in cl)
        extra = sum(r["ours_only"] - r["ref_only"] for r in cl)
        lines.append(
            f"| {s} | {n_sh - differ} / {n_sh} | {_fmt(im_diff, '.1e')} | "
            f"{_fmt(loss, '.1e')} ({_fmt(rel, '.1e')}) | {_fmt(d64, '.0e')} | "
            f"{same} / {n_cl} ({_fmt(score, '.0f')}) | {both} / {ref} | {extra} | {swapped} | "
            f"{sum(r['unexplained'] for r in cl)} |"
        )
    return "\n".join(lines)


START = "<!-- reference-parity:start -->"
END = "<!-- reference-parity:end -->"
DOCS = ROOT / "docs" / "methods.md"


def _load(
    name: str, repo: Path | None, loader: Callable[[Path], Any]
) -> tuple[Any, dict[str, Any]]:
    """Load one reference; a failure inside its code is recorded, not raised."""
    info: dict[str, Any] = {"repository": name, "commit": None, "status": "skipped", "why": None}
    if repo is None:
        info["why"] = "no checkout given"
        return None, info
    if not repo.is_dir():
        raise InputError(
            f"the {name} checkout is not a directory",
            "the comparison imports the reference code from a local checkout",
            f"clone github.com/{name} and pass its root",
        )
    info["commit"] = commit_of(repo)
    try:
        ref = loader(repo)
        ref.smoke()
    except SourcefreeError:
        raise
    except Exception as exc:  # their code failing to import here is a result, not a crash
        why = exception_summary(exc).replace(str(repo), "<checkout>")  # no paths in results
        info.update(status="failed", why=why)
        return None, info
    info.update(status="ran", stubbed_imports=list(ref.stubbed))
    return ref, info


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--shot-repo", type=Path, default=None, help=f"checkout of {SHOT_REPO}")
    p.add_argument("--clup-repo", type=Path, default=None, help=f"checkout of {CLUP_REPO}")
    p.add_argument("--n", type=int, default=2000, help="samples per case")
    p.add_argument("--dim", type=int, default=256, help="feature dimension")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--quick", action="store_true", help="300 x 32, seed 0, K 20: a smoke run")
    p.add_argument("--out", type=Path, default=None, help="JSON output path")
    p.add_argument("--no-docs", action="store_true", help="do not rewrite the docs table")
    p.add_argument("--docs", type=Path, default=DOCS, help="markdown file of the table")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    try:
        if args.quick:
            cfg = ParityConfig(n=300, dim=32, seeds=(0,), cluster_counts=(20,))
        else:
            cfg = ParityConfig(n=args.n, dim=args.dim, seeds=tuple(args.seeds))
        torch.set_num_threads(max(1, args.threads))
        shot, shot_info = _load(SHOT_REPO, args.shot_repo, load_shot)
        clup, clup_info = _load(CLUP_REPO, args.clup_repo, load_clup)
        rows = run_parity(cfg, shot, clup)
        payload: dict[str, Any] = {
            "config": {
                "n": cfg.n,
                "dim": cfg.dim,
                "classes": cfg.n_classes,
                "seeds": list(cfg.seeds),
                "cases": list(cfg.cases),
                "cluster_counts": list(cfg.cluster_counts),
                "keep_fractions": list(cfg.keep_fractions),
                "im_batch": IM_BATCH,
                "logit_scales": list(LOGIT_SCALES),
            },
            "references": {"shot": shot_info, "clup": clup_info},
            "summary": summarise(rows),
            "rows": rows,
        }
        name = "reference_parity-quick.json" if args.quick else "reference_parity.json"
        out = args.out or RESULTS / name
        atomic_write_bytes(out, (json.dumps(payload, indent=2) + "\n").encode())
        table = markdown(payload)
        print(table)
        print(json.dumps(payload["summary"], indent=2))
        both_ran = shot is not None and clup is not None
        if both_ran and not (args.quick or args.no_docs):
            replace_marked_block(args.docs, START, END, table, "Parity with the reference code")
    except SourcefreeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    failed = [i["repository"] for i in (shot_info, clup_info) if i["status"] == "failed"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
