"""``OUT/report.html``: the adaptation report as one self-contained page.

Inline SVG plots drawn here (no plotting library, no JavaScript, no external
resource): loss curves per phase, the method's diagnostics (CluP: purity
histogram and selected samples per class), per-class accuracy and confusion
matrices when evaluation labels were given. Everything comes from the
aggregate ``report.json`` content; no image, path or file name is drawn, and
every string is escaped. No torch import.
"""

from __future__ import annotations

import html
import itertools
import math
from collections.abc import Mapping, Sequence
from typing import Any, TypeGuard

from sourcefree.pipeline.report import GATE_Z

REPORT_HTML_NAME = "report.html"

_COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b")
_SOURCE, _ADAPTED = "#9e9e9e", "#1f77b4"
_W, _H = 640, 260
_M = {"left": 56, "right": 16, "top": 30, "bottom": 48}

_CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:2em auto;max-width:960px;
color:#222;padding:0 1em}
h1{font-size:1.6em}h2{font-size:1.25em;margin-top:2em;border-bottom:1px solid #ddd}
h3{font-size:1.05em}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ddd;padding:.25em .6em;
text-align:left;font-size:.9em}th{background:#f5f5f5}td.n{text-align:right;
font-variant-numeric:tabular-nums}
svg{display:block;margin:.5em 0}svg text{font-size:11px;fill:#333}
.note{color:#666;font-size:.9em}
.summary{border:2px solid #2ca02c;border-radius:6px;padding:.2em 1.2em .8em;background:#f6fbf6}
.summary h2{border:0;margin-top:.6em}.summary.source,.summary.forced{border-color:#ff7f0e;
background:#fff8ef}.summary.off{border-color:#9e9e9e;background:#fafafa}
.decision{font-size:1.1em;font-weight:600}tr.flag td:last-child{color:#d62728;font-weight:600}
dl.glossary dt{font-weight:600;margin-top:.3em}dl.glossary dd{margin-left:1.5em;font-size:.9em}
"""


def _e(value: Any) -> str:
    """Escaped text of any value."""
    return html.escape(str(value), quote=True)


def fmt(value: Any, *, signed: bool = False) -> str:
    """The report's one number format, as escaped text.

    Counts with thousands separators (``12,345``); every other number with three
    decimals (``0.943``, ``+0.012`` when ``signed``), in scientific notation below
    0.001 or from a million on (``3.81e-06``); ``-`` for a missing value,
    ``yes``/``no`` for a flag.
    """
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    sign = "+" if signed else ""
    if isinstance(value, int):
        return f"{value:{sign},}"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        if value != 0 and not 1e-3 <= abs(value) < 1e6:
            return f"{value:{sign}.2e}"
        return f"{value:{sign},.3f}"
    return _e(value)


def _finite(value: Any) -> TypeGuard[int | float]:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _ticks(lo: float, hi: float, count: int = 5, integer: bool = False) -> list[float]:
    """Round tick values from at most ``lo`` to at least ``hi`` (whole steps if ``integer``)."""
    if not hi > lo:
        hi = lo + 1.0
    raw = (hi - lo) / max(1, count)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    if integer:
        step = max(1.0, round(step))
    start = math.floor(lo / step + 1e-9) * step
    stop = math.ceil(hi / step - 1e-9) * step
    return [round(start + i * step, 10) for i in range(round((stop - start) / step) + 1)]


def _fmt_tick(v: float) -> str:
    if v == int(v) and abs(v) < 1e6:
        return str(int(v))
    return f"{v:.3g}"


def _svg_open(title: str, width: int = _W, height: int = _H) -> list[str]:
    return [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="{_e(title)}">',
        f"<title>{_e(title)}</title>",
        f'<rect width="{width}" height="{height}" fill="#fff"/>',
    ]


def _axes(
    parts: list[str], xlo: float, xhi: float, ylo: float, yhi: float, xlabel: str, ylabel: str
) -> tuple[Any, Any]:
    """Draw axes with ticks; return the x and y mappings to pixels."""
    left, right, top, bottom = _M["left"], _W - _M["right"], _M["top"], _H - _M["bottom"]

    def fx(x: float) -> float:
        return left + (x - xlo) / ((xhi - xlo) or 1.0) * (right - left)

    def fy(y: float) -> float:
        return bottom - (y - ylo) / ((yhi - ylo) or 1.0) * (bottom - top)

    parts.append(
        f'<line x1="{left}" y1="{bottom}" x2="{right}" y2="{bottom}" stroke="#444"/>'
        f'<line x1="{left}" y1="{top}" x2="{left}" y2="{bottom}" stroke="#444"/>'
    )
    for t in _ticks(ylo, yhi):
        if ylo - 1e-12 <= t <= yhi + 1e-12:
            y = fy(t)
            parts.append(
                f'<line x1="{left}" y1="{y:.1f}" x2="{right}" y2="{y:.1f}" stroke="#eee"/>'
                f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{_fmt_tick(t)}</text>'
            )
    parts.append(
        f'<text x="{(left + right) / 2:.0f}" y="{_H - 10}" text-anchor="middle">{_e(xlabel)}</text>'
        f'<text x="14" y="{(top + bottom) / 2:.0f}" text-anchor="middle" '
        f'transform="rotate(-90 14 {(top + bottom) / 2:.0f})">{_e(ylabel)}</text>'
    )
    return fx, fy


def _legend(parts: list[str], items: Sequence[tuple[str, str]]) -> None:
    """Coloured keys in a row above the plot area."""
    x = float(_M["left"])
    for name, color in items:
        parts.append(
            f'<rect x="{x:.0f}" y="6" width="10" height="10" fill="{color}"/>'
            f'<text x="{x + 14:.0f}" y="15">{_e(name)}</text>'
        )
        x += 24 + 6.5 * len(name)


def line_chart(
    title: str,
    series: Sequence[tuple[str, Sequence[tuple[float, float]]]],
    xlabel: str,
    ylabel: str,
) -> str:
    """An SVG line chart of named (x, y) series (non-finite points are dropped)."""
    clean = [(n, [(x, y) for x, y in pts if _finite(x) and _finite(y)]) for n, pts in series]
    clean = [(n, pts) for n, pts in clean if pts]
    if not clean:
        return '<p class="note">no values</p>'
    xs = [x for _, pts in clean for x, _ in pts]
    ys = [y for _, pts in clean for _, y in pts]
    yt = _ticks(min(ys), max(ys))
    xlo, xhi = min(xs), max(xs)
    parts = _svg_open(title)
    fx, fy = _axes(parts, xlo, xhi if xhi > xlo else xlo + 1, yt[0], yt[-1], xlabel, ylabel)
    bottom = _H - _M["bottom"]
    for t in _ticks(xlo, xhi if xhi > xlo else xlo + 1, 6, integer=True):
        if xlo <= t <= xhi:
            parts.append(
                f'<text x="{fx(t):.1f}" y="{bottom + 16}" text-anchor="middle">'
                f"{_fmt_tick(t)}</text>"
            )
    for i, (_, pts) in enumerate(clean):
        color = _COLORS[i % len(_COLORS)]
        if len(pts) == 1:
            x, y = pts[0]
            parts.append(f'<circle cx="{fx(x):.1f}" cy="{fy(y):.1f}" r="3" fill="{color}"/>')
        else:
            path = " ".join(f"{fx(x):.1f},{fy(y):.1f}" for x, y in pts)
            parts.append(
                f'<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{path}"/>'
            )
    _legend(parts, [(n, _COLORS[i % len(_COLORS)]) for i, (n, _) in enumerate(clean)])
    parts.append("</svg>")
    return "".join(parts)


def bar_chart(
    title: str,
    categories: Sequence[str],
    groups: Sequence[tuple[str, Sequence[float | None], str]],
    ylabel: str,
    ymax: float | None = None,
) -> str:
    """An SVG grouped bar chart: one bar per (group, category); None draws no bar."""
    values = [float(v) for _, vals, _ in groups for v in vals if v is not None and _finite(v)]
    if not categories or not groups:
        return '<p class="note">no values</p>'
    top_value = ymax if ymax is not None else max([*values, 0.0]) or 1.0
    yt = _ticks(0.0, top_value)
    parts = _svg_open(title)
    fx, fy = _axes(parts, 0.0, float(len(categories)), 0.0, yt[-1], "", ylabel)
    slot = fx(1.0) - fx(0.0)
    width = slot * 0.8 / len(groups)
    bottom = _H - _M["bottom"]
    rotate = len(categories) > 8
    for c, cat in enumerate(categories):
        center = fx(c + 0.5)
        name = cat if len(cat) <= 14 else cat[:13] + "~"
        if rotate:
            parts.append(
                f'<text x="{center:.1f}" y="{bottom + 12}" text-anchor="end" '
                f'transform="rotate(-35 {center:.1f} {bottom + 12})">{_e(name)}</text>'
            )
        else:
            parts.append(
                f'<text x="{center:.1f}" y="{bottom + 16}" text-anchor="middle">{_e(name)}</text>'
            )
        for g, (gname, vals, color) in enumerate(groups):
            v = vals[c] if c < len(vals) else None
            if v is None or not _finite(v):
                continue
            x = fx(c) + slot * 0.1 + g * width
            y = fy(float(v))
            parts.append(
                f'<rect x="{x:.1f}" y="{y:.1f}" width="{max(width - 1, 1):.1f}" '
                f'height="{max(bottom - y, 0):.1f}" fill="{color}">'
                f"<title>{_e(gname)} {_e(cat)}: {fmt(v)}</title></rect>"
            )
    if len(groups) > 1:
        _legend(parts, [(gname, color) for gname, _, color in groups])
    parts.append("</svg>")
    return "".join(parts)


def heatmap_table(title: str, matrix: Sequence[Sequence[int]], labels: Sequence[str]) -> str:
    """A confusion matrix as an HTML table shaded by row share (rows: true, columns: predicted)."""
    rows = [f"<table><caption>{_e(title)}</caption><tr><th>true \\ predicted</th>"]
    rows += [f"<th>{_e(n)}</th>" for n in labels]
    rows.append("</tr>")
    for name, row in zip(labels, matrix, strict=False):
        total = sum(row) or 1
        cells = []
        for v in row:
            share = v / total
            shade = int(255 - 180 * share)
            text = "#fff" if share > 0.6 else "#222"
            cells.append(
                f'<td class="n" style="background:rgb({shade},{shade},255);color:{text}">'
                f"{int(v)}</td>"
            )
        rows.append(f"<tr><th>{_e(name)}</th>{''.join(cells)}</tr>")
    rows.append("</table>")
    return "".join(rows)


def _table(rows: Sequence[tuple[str, Any]]) -> str:
    body = "".join(f'<tr><th>{_e(k)}</th><td class="n">{fmt(v)}</td></tr>' for k, v in rows)
    return f"<table>{body}</table>"


def _flat(value: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """Scalar leaves of a JSON value as (dotted key, value); long lists are summarised."""
    if isinstance(value, Mapping):
        out: list[tuple[str, Any]] = []
        for k, v in value.items():
            out += _flat(v, f"{prefix}.{k}" if prefix else str(k))
        return out
    if isinstance(value, list):
        if len(value) <= 12 and all(not isinstance(v, (list, Mapping)) for v in value):
            return [(prefix, ", ".join(fmt(v) for v in value))]
        return [(prefix, f"[{len(value)} values]")]
    return [(prefix, value)]


#: A class whose recall changed by more than this is flagged in the summary box.
CLASS_CHANGE_FLAG = 0.1

#: One line per score of the gate and the selectors, as docs/selection.md defines them.
GLOSSARY: tuple[tuple[str, str], ...] = (
    (
        "estimated gain",
        "the adapted model's anchored accuracy estimate minus the source's ATC estimate, "
        "computed without labels; the adapted model is kept only when it is above zero by "
        "more than two standard errors",
    ),
    (
        "± (two standard errors)",
        "the uncertainty of an estimate that scored a sample of the target images",
    ),
    (
        "im",
        "information maximisation: entropy of the mean prediction minus the mean entropy "
        "of the predictions, in [0, log C]; high when confident on each image and diverse "
        "across classes",
    ),
    (
        "stability",
        "share of images whose top-1 class survives a horizontal flip and a 2-pixel shift",
    ),
    ("agreement", "share of images with the same top-1 class as the source model"),
    (
        "snd",
        "soft neighbourhood density: mean entropy of each image's softmax similarity to "
        "the other images' predictions (temperature 0.05); higher is better",
    ),
    (
        "kappa",
        "Cohen's kappa of the two models' top-1 classes: agreement corrected for chance; "
        "below 0 agrees less than chance, as permuted classes would",
    ),
    ("entropy", "mean Shannon entropy of the softmax (nats); lower is more confident"),
    (
        "atc",
        "the vendor-calibrated accuracy estimate of the source model: share of images "
        "more confident than the vendor's threshold (needs a calibration)",
    ),
    (
        "anchored",
        "accuracy estimate anchored on the calibrated source: share of images where the "
        "model keeps a source prediction ATC counts as right, plus share where it "
        "overrules one ATC counts as wrong",
    ),
)


def _what(report: Mapping[str, Any]) -> str:
    """What was adapted: method, source package(s), target images (escaped)."""
    method = _e(report.get("method"))
    sel = report.get("selection")
    if isinstance(sel, Mapping) and sel.get("chosen"):
        method += f" (chose {_e(sel['chosen'])})"
    sources = [s for s in report.get("sources") or [] if isinstance(s, Mapping)]
    names = ", ".join(f"{_e(s.get('name'))} {_e(s.get('version'))}" for s in sources)
    plural = "s" if len(sources) > 1 else ""
    target = report.get("target") or {}
    text = f"<b>{method}</b> adapted the source package{plural} {names or '-'} "
    text += f"to {fmt(target.get('images'))} target images"
    bad = (target.get("read") or {}).get("bad")
    if isinstance(bad, int) and bad:
        text += f" ({fmt(bad)} unreadable images skipped)"
    return text + "."


def _gain(gate: Mapping[str, Any]) -> str | None:
    """``+0.120 ± 0.020 (two standard errors)``, or None without an estimate."""
    gain = gate.get("estimated_gain")
    if not _finite(gain):
        return None
    se = (gate.get("standard_errors") or {}).get("estimated_gain")
    margin = f" ± {fmt(GATE_Z * se)} (two standard errors)" if _finite(se) else ""
    return fmt(float(gain), signed=True) + margin


def _plain_reason(gate: Mapping[str, Any]) -> str:
    """The gate's reason without its closing clause (the summary says what was kept)."""
    reason = str(gate.get("reason") or "")
    for tail in ("; exported anyway (--force)", "; the source model is kept"):
        reason = reason.removesuffix(tail)
    return reason.removesuffix("; the source model is exported")


def decision_text(report: Mapping[str, Any]) -> tuple[str, str]:
    """The gate's decision in plain words (escaped), and its kind: adapted, source, forced, off.

    ``("", "")`` when the report has no gate.
    """
    gate = report.get("gate")
    if not isinstance(gate, Mapping):
        return "", ""
    gain = _gain(gate)
    if gate.get("decision") == "source":
        why = (
            "the adapted model is not estimated better by more than its uncertainty: "
            f"estimated accuracy {gain} over the source"
            if gain is not None
            else _e(_plain_reason(gate))
        )
        return "source", f"Source model kept because {why}."
    if not gate.get("enabled"):
        return "off", (
            "Adapted model exported without the do-no-harm gate (--no-gate): it was not "
            "compared with the source model."
        )
    if gate.get("forced"):
        why = f"estimated accuracy {gain} over the source" if gain else _e(_plain_reason(gate))
        return "forced", (
            "Adapted model exported anyway (--force); the gate would have kept the source "
            f"model: {why}."
        )
    if gain is not None:
        return "adapted", f"Adapted model kept: estimated accuracy {gain} over the source."
    return "adapted", (
        "Adapted model kept: it passed the checks against a degenerate model (IM at least "
        "the source's, kappa at least 0); without a vendor calibration its accuracy change "
        "cannot be estimated."
    )


def _estimate_line(gate: Mapping[str, Any]) -> str:
    """The label-free accuracy change and the images it was estimated on."""
    if not gate.get("enabled") or "criterion" not in gate:
        return ""
    gain = _gain(gate)
    scored = f"{fmt(gate.get('sample_size'))} of {fmt(gate.get('target_images'))}"
    if gain is None:
        return (
            "<li>Estimated accuracy change: not available; the source package carries no "
            "vendor calibration, so accuracy cannot be estimated without labels.</li>"
        )
    return f"<li>Estimated accuracy change, without labels: {gain}, on {scored} target images.</li>"


def _labels_lines(report: Mapping[str, Any], gate: Mapping[str, Any]) -> str:
    """With evaluation labels: measured accuracy, and whether it agrees with the gate."""
    parts: list[str] = []
    ev = report.get("evaluation")
    if isinstance(ev, Mapping) and ev.get("source"):
        src = _reference(ev, gate)
        ada = ev.get("adapted") or {}
        change = ""
        if _finite(src.get("accuracy")) and _finite(ada.get("accuracy")):
            change = f", {fmt(float(ada['accuracy']) - float(src['accuracy']), signed=True)}"
        parts.append(
            f"<li>Measured with your evaluation labels on {fmt(ada.get('images'))} labelled "
            f"images: accuracy {fmt(src.get('accuracy'))} (source) &rarr; "
            f"{fmt(ada.get('accuracy'))} (exported model){change}; mean class recall "
            f"{fmt(src.get('mean_class_recall'))} &rarr; {fmt(ada.get('mean_class_recall'))}."
            "</li>"
        )
    acc = gate.get("accuracy")
    if isinstance(acc, Mapping) and _finite(acc.get("source")) and _finite(acc.get("adapted")):
        better = float(acc["adapted"]) > float(acc["source"])
        worse = float(acc["adapted"]) < float(acc["source"])
        kept_adapted = gate.get("verdict") == "adapted"
        agree = (kept_adapted and not worse) or (not kept_adapted and not better)
        parts.append(
            "<li>Judged afterwards with your labels on the images the gate scored: adapted "
            f"model {fmt(acc['adapted'])}, source {fmt(acc['source'])}; the labels "
            f"{'agree' if agree else 'disagree'} with the gate's decision.</li>"
        )
    return "".join(parts)


def _reference(ev: Mapping[str, Any], gate: Mapping[str, Any]) -> Mapping[str, Any]:
    """The evaluation of the source the gate compared with (the first one by default)."""
    sources = list(ev.get("source") or [])
    ref = gate.get("reference_source")
    index = ref if isinstance(ref, int) and 0 <= ref < len(sources) else 0
    found = sources[index] if sources else {}
    return found if isinstance(found, Mapping) else {}


def class_changes(report: Mapping[str, Any]) -> list[tuple[str, float, float]]:
    """(class, source recall, exported recall) of every class whose recall changed by more
    than :data:`CLASS_CHANGE_FLAG`, largest change first (empty without evaluation labels)."""
    ev = report.get("evaluation")
    if not isinstance(ev, Mapping) or not ev.get("source"):
        return []
    gate = report.get("gate")
    src = _reference(ev, gate if isinstance(gate, Mapping) else {}).get("per_class_recall")
    ada = (ev.get("adapted") or {}).get("per_class_recall")
    if not isinstance(src, Mapping) or not isinstance(ada, Mapping):
        return []
    rows = [
        (str(name), float(src[name]), float(value))
        for name, value in ada.items()
        if _finite(value) and _finite(src.get(name))
    ]
    flagged = [r for r in rows if abs(r[2] - r[1]) > CLASS_CHANGE_FLAG]
    return sorted(flagged, key=lambda r: -abs(r[2] - r[1]))


def _class_table(report: Mapping[str, Any]) -> str:
    if not isinstance(report.get("evaluation"), Mapping):
        return ""
    rows = class_changes(report)
    limit = fmt(CLASS_CHANGE_FLAG)
    if not rows:
        return f"<p>No class's recall changed by more than {limit} (exported model vs source).</p>"
    body = "".join(
        f'<tr class="flag"><th>{_e(name)}</th><td class="n">{fmt(s)}</td>'
        f'<td class="n">{fmt(a)}</td><td class="n">{fmt(a - s, signed=True)}</td>'
        f"<td>{'better' if a > s else 'worse'}</td></tr>"
        for name, s, a in rows
    )
    return (
        f"<table><caption>Classes whose recall changed by more than {limit} (exported model "
        "vs source)</caption><tr><th>class</th><th>source</th><th>exported</th>"
        f"<th>change</th><th>flag</th></tr>{body}</table>"
    )


def summary_box(report: Mapping[str, Any]) -> str:
    """The answer first: what was adapted, the gate's decision, the accuracy change."""
    kind, decision = decision_text(report)
    gate = report.get("gate")
    gate = gate if isinstance(gate, Mapping) else {}
    items = [f"<li>{_what(report)}</li>", _estimate_line(gate), _labels_lines(report, gate)]
    return (
        f'<section class="summary {kind}" aria-label="summary"><h2>Summary</h2>'
        + (f'<p class="decision">{decision}</p>' if decision else "")
        + "<ul>"
        + "".join(items)
        + "</ul>"
        + _class_table(report)
        + "</section>"
    )


def glossary() -> str:
    """One line per score, true to docs/selection.md."""
    rows = "".join(f"<dt>{_e(term)}</dt><dd>{_e(text)}</dd>" for term, text in GLOSSARY)
    return f'<h2>Glossary of the scores</h2><dl class="glossary">{rows}</dl>'


def _summary(report: Mapping[str, Any]) -> str:
    target = report.get("target", {})
    read = target.get("read", {})
    rows: list[tuple[str, Any]] = [
        ("method", report.get("method")),
        ("target images", target.get("images")),
        ("unreadable images skipped", read.get("bad")),
        ("device", report.get("device")),
        ("bf16 autocast", report.get("amp")),
        ("seed", report.get("seed")),
        ("resumed", report.get("resumed")),
        ("checkpoints written", report.get("checkpoints_written")),
    ]
    for i, src in enumerate(report.get("sources", [])):
        rows.append(
            (
                f"source package {i + 1}",
                f"{src.get('name')} {src.get('version')} (sha256 {str(src.get('sha256'))[:16]})",
            )
        )
    export = report.get("export", {})
    if export:
        rows += [
            ("adapted package sha256", str(export.get("sha256"))[:16]),
            ("export parity: max |logits| difference", export.get("parity_max_abs_logits")),
            ("export parity: top-1 agreement", export.get("parity_top1_agreement")),
        ]
    for key, value in report.get("timings_s", {}).items():
        rows.append((f"time: {key} (s)", value))
    config = _flat(report.get("config", {}))
    out = "<h2>Run</h2>" + _table(rows)
    if config:
        out += "<details><summary>resolved config</summary>" + _table(config) + "</details>"
    return out


def _phases(report: Mapping[str, Any]) -> str:
    parts = ["<h2>Loss per phase</h2>"]
    rows = []
    for p in report.get("phases", []):
        rows.append(
            "<tr>"
            + "".join(
                f'<td class="n">{fmt(v)}</td>' if i else f"<td>{_e(v)}</td>"
                for i, v in enumerate(
                    (
                        p.get("name"),
                        p.get("epochs"),
                        p.get("steps_per_epoch"),
                        p.get("images"),
                        p.get("seconds"),
                        p.get("images_per_s"),
                        (p.get("epoch_loss") or [None])[-1],
                    )
                )
            )
            + "</tr>"
        )
    parts.append(
        "<table><tr><th>phase</th><th>epochs</th><th>steps/epoch</th><th>images</th>"
        "<th>seconds</th><th>images/s</th><th>last epoch loss</th></tr>"
        + "".join(rows)
        + "</table>"
    )
    for p in report.get("phases", []):
        curve = [(float(x), float(y)) for x, y in p.get("loss_curve", [])]
        spe = p.get("steps_per_epoch") or 1
        means = [((e + 1) * spe, v) for e, v in enumerate(p.get("epoch_loss", []))]
        name = str(p.get("name"))
        if not curve and not means:
            continue
        parts.append(f"<h3>{_e(name)}</h3>")
        parts.append(
            line_chart(
                f"loss of phase {name}",
                [("loss per step", curve), ("epoch mean", means)],
                "step",
                "loss",
            )
        )
    return "".join(parts)


def _method(report: Mapping[str, Any], labels: Sequence[str]) -> str:
    info = report.get("method_report") or {}
    if not info:
        return ""
    parts = [f"<h2>Method: {_e(report.get('method'))}</h2>"]
    pl = info.get("pseudo_labels")
    if isinstance(pl, Mapping):
        hist = pl.get("histogram")
        if isinstance(hist, Mapping) and hist.get("bin_edges"):
            edges = list(hist["bin_edges"])
            bins = [f"{a:.2g}-{b:.2g}" for a, b in itertools.pairwise(edges)]
            kind = str(hist.get("kind", "score"))
            groups: list[tuple[str, Sequence[float | None], str]] = [
                ("images", hist.get("sample_counts") or [], _ADAPTED)
            ]
            if hist.get("cluster_counts") is not None:
                groups.append(("clusters", hist["cluster_counts"], "#ff7f0e"))
            parts.append(f"<h3>{_e(kind)} histogram</h3>")
            parts.append(bar_chart(f"{kind} histogram", bins, groups, "count"))
        per_class = pl.get("selected_per_class")
        if isinstance(per_class, list) and per_class:
            names = [str(n) for n in labels]
            if len(names) != len(per_class):
                names = [str(i) for i in range(len(per_class))]
            series: list[tuple[str, Sequence[float | None], str]] = [
                ("selected", per_class, _ADAPTED)
            ]
            if isinstance(pl.get("candidates_per_class"), list):
                series.insert(0, ("candidates", pl["candidates_per_class"], _SOURCE))
            parts.append("<h3>pseudo-labelled samples per class</h3>")
            parts.append(bar_chart("selected samples per class", names, series, "images"))
    parts.append("<details><summary>all diagnostics</summary>")
    parts.append(_table(_flat(info)) + "</details>")
    return "".join(parts)


def _evaluation(report: Mapping[str, Any]) -> str:
    ev = report.get("evaluation")
    if not isinstance(ev, Mapping):
        return ""
    sources = list(ev.get("source", []))
    adapted = ev.get("adapted", {})
    labels = list(adapted.get("labels") or (sources[0].get("labels") if sources else []))
    parts = [
        "<h2>Evaluation</h2>",
        f'<p class="note">{_e(ev.get("note", ""))}</p>',
        "<table><tr><th>model</th><th>images</th><th>accuracy</th><th>mean class recall</th></tr>",
    ]
    named = [
        (f"source {i + 1}" if len(sources) > 1 else "source", m) for i, m in enumerate(sources)
    ]
    named.append(("adapted", adapted))
    for name, m in named:
        parts.append(
            f"<tr><td>{_e(name)}</td><td class='n'>{fmt(m.get('images'))}</td>"
            f"<td class='n'>{fmt(m.get('accuracy'))}</td>"
            f"<td class='n'>{fmt(m.get('mean_class_recall'))}</td></tr>"
        )
    parts.append("</table>")
    groups: list[tuple[str, Sequence[float | None], str]] = []
    for i, (name, m) in enumerate(named):
        recall = m.get("per_class_recall", {})
        color = _ADAPTED if name == "adapted" else (_SOURCE if i == 0 else _COLORS[2 + i % 4])
        groups.append((name, [recall.get(n) for n in labels], color))
    parts.append("<h3>per-class accuracy (recall)</h3>")
    parts.append(bar_chart("per-class accuracy", labels, groups, "recall", ymax=1.0))
    for name, m in named:
        if m.get("confusion"):
            parts.append(heatmap_table(f"confusion matrix: {name}", m["confusion"], labels))
    pl = ev.get("pseudo_labels")
    if isinstance(pl, Mapping):
        parts.append("<h3>pseudo-labels against the evaluation labels</h3>")
        parts.append(
            _table(
                [
                    ("selected images", pl.get("selected")),
                    ("target images", pl.get("images")),
                    ("coverage", pl.get("coverage")),
                    ("selected images with a label", pl.get("labelled_selected")),
                    ("precision of the selected pseudo-labels", pl.get("precision")),
                    ("source accuracy on every labelled image", pl.get("source_accuracy")),
                ]
            )
        )
        precision = pl.get("precision_per_class", {})
        parts.append(
            bar_chart(
                "pseudo-label precision per class",
                labels,
                [("precision", [precision.get(n) for n in labels], _ADAPTED)],
                "precision",
                ymax=1.0,
            )
        )
    return "".join(parts)


def _selection(report: Mapping[str, Any]) -> str:
    """The do-no-harm gate and the candidates of --select auto / -m auto."""
    parts: list[str] = []
    sel = report.get("selection")
    if isinstance(sel, Mapping):
        rule = sel.get("criterion") or "nothing: no candidate finished"
        parts.append(f"<h2>Candidates (ranked by {_e(rule)})</h2>")
        if sel.get("criterion_reason"):
            parts.append(f"<p>{_e(sel['criterion_reason'])}</p>")
        if sel.get("note"):
            parts.append(f'<p class="note">{_e(sel["note"])}</p>')
        parts.append(
            "<table><tr><th>candidate</th><th>status</th><th>seconds</th><th>passes gate</th>"
            "<th>score</th><th>accuracy</th><th>chosen</th></tr>"
        )
        passes = {True: "yes", False: "no (ranked after those that pass)"}
        for row in sel.get("candidates", []):
            gate_flag = row.get("passes_gate")
            parts.append(
                f"<tr><td>{_e(row.get('candidate'))}</td><td>{_e(row.get('status'))}</td>"
                f"<td class='n'>{fmt(row.get('seconds'))}</td>"
                f"<td>{passes.get(gate_flag, '') if isinstance(gate_flag, bool) else ''}</td>"
                f"<td class='n'>{fmt(row.get('value'))}</td>"
                f"<td class='n'>{fmt(row.get('accuracy'))}</td>"
                f"<td>{'yes' if row.get('chosen') else ''}</td></tr>"
            )
        parts.append("</table>")
    gate = report.get("gate")
    if isinstance(gate, Mapping):
        parts.append(f"<h2>Do-no-harm gate: exported the {_e(gate.get('decision'))} model</h2>")
        parts.append(f'<p class="note">{_e(gate.get("reason", ""))}</p>')
        scores = gate.get("scores")
        if isinstance(scores, Mapping):
            src, ada = scores.get("source", {}), scores.get("adapted", {})
            parts.append("<table><tr><th>score</th><th>source</th><th>adapted</th></tr>")
            for key in src:
                parts.append(
                    f"<tr><th>{_e(key)}</th><td class='n'>{fmt(src.get(key))}</td>"
                    f"<td class='n'>{fmt(ada.get(key))}</td></tr>"
                )
            parts.append("</table>")
        acc = gate.get("accuracy")
        if isinstance(acc, Mapping):
            parts.append(
                _table([("source accuracy", acc.get("source")), ("adapted", acc.get("adapted"))])
            )
    return "".join(parts)


def render_report(report: Mapping[str, Any], labels: Sequence[str] = ()) -> str:
    """The HTML page of an adaptation report (``report.json`` content; class names)."""
    body = [
        f"<h1>sourcefree adaptation report: {_e(report.get('method'))}</h1>",
        '<p class="note">Aggregates only: no image, path or file name of the target data.</p>',
        summary_box(report),
        glossary(),
        _summary(report),
        _phases(report),
        _method(report, labels),
        _selection(report),
        _evaluation(report),
    ]
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>sourcefree report: {_e(report.get('method'))}</title>"
        f"<style>{_CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )
