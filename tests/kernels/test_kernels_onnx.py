"""Exported ONNX graphs hold only standard ops: dispatchers use the reference while exporting."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from sourcefree.kernels import dispatch, gaussian_mmd, kmeans_assign, margin_ce_im, swav_loss

STANDARD_DOMAINS = {"", "ai.onnx"}
SEEN_EXPORTING: list[bool] = []  # module-level: export may trace a copy of the module


class _AllOps(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(6, 8)
        self.centroids = torch.nn.Parameter(torch.randn(3, 8))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        SEEN_EXPORTING.append(dispatch.exporting())
        h = self.proj(x)
        labels, dist = kmeans_assign(h, self.centroids)
        terms = margin_ce_im(h[:, :7], y, scale=2.0, entropy_eps=1e-5)
        swav = swav_loss([h, 0.5 * h], [h.flip(0)])
        mmd = gaussian_mmd(h[:5], h[5:])
        return labels, dist, terms.loss(0.3), swav, mmd


def _node_domains(model: Any) -> set[str]:
    domains = set()
    graphs = [model.graph] + [f for f in model.functions]
    while graphs:
        g = graphs.pop()
        for node in g.node:
            domains.add(node.domain)
            for attr in node.attribute:
                if attr.g is not None and len(attr.g.node):
                    graphs.append(attr.g)
                graphs.extend(attr.graphs)
    return domains


def test_onnx_export_has_only_standard_ops(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("onnxscript")
    # Even with compile thresholds at zero and Triton "available", export takes the reference.
    monkeypatch.delenv(dispatch.DISABLE_COMPILE_ENV)
    for name in dispatch.COMPILE_MIN_NUMEL:
        monkeypatch.setitem(dispatch.COMPILE_MIN_NUMEL, name, 0)
    torch.manual_seed(0)
    SEEN_EXPORTING.clear()
    module = _AllOps().eval()
    x = torch.randn(10, 6)
    y = torch.tensor([0, 1, 2, 3, 4, 5, 6, 0, 1, -1])
    program = torch.onnx.export(
        module, (x, y), dynamo=True, external_data=False, opset_version=20, verbose=False
    )
    assert program is not None
    model = program.model_proto
    assert SEEN_EXPORTING
    assert all(SEEN_EXPORTING)
    assert _node_domains(model) <= STANDARD_DOMAINS
    assert {o.domain for o in model.opset_import} <= STANDARD_DOMAINS
    assert not dispatch._compiled

    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    outs = session.run(None, dict(zip(names, (x.numpy(), y.numpy()), strict=True)))
    monkeypatch.setenv(dispatch.DISABLE_COMPILE_ENV, "1")
    with torch.no_grad():
        expected = module(x, y)
    for got, exp in zip(outs, expected, strict=True):
        torch.testing.assert_close(
            torch.from_numpy(got).reshape(exp.shape), exp, atol=1e-4, rtol=1e-4
        )
