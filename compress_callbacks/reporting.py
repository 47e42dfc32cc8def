"""The math of what compression logs and reports: pure functions over tensors and floats.

The techniques' ``log_values()`` / ``summary_rows()`` and ``CompressionManager.report()`` are built on
these (the logged keys are listed in ``docs/manager.md``). Light to import: no torchmetrics.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

__all__ = ["SUMMARY_STATISTICS", "distribution_summary", "format_value", "layer_log_values", "plain", "relative_l2_error", "report_table"]

#: the statistics ``distribution_summary`` gives, in order (p10 / p50 / p90: linear-interpolated quantiles)
SUMMARY_STATISTICS = ("min", "p10", "p50", "p90", "max", "mean")


def relative_l2_error(approximation: torch.Tensor, reference: torch.Tensor) -> float:
    """``||approximation - reference|| / ||reference||`` over all elements (in float32 at least).

    0.0 when both are all zeros; ``inf`` when only ``reference`` is.

    >>> w = torch.tensor([3.0, 4.0])
    >>> relative_l2_error(torch.tensor([3.0, 3.0]), w)   # |(0, -1)| / |(3, 4)|
    0.2
    """
    if approximation.shape != reference.shape:
        raise ValueError(f"`approximation` {tuple(approximation.shape)} and `reference` {tuple(reference.shape)} differ in shape")
    dtype = torch.promote_types(torch.promote_types(approximation.dtype, reference.dtype), torch.float32)
    reference = reference.detach().to(dtype)
    error = float(torch.linalg.vector_norm(approximation.detach().to(dtype) - reference))
    norm = float(torch.linalg.vector_norm(reference))
    if norm == 0.0:
        return 0.0 if error == 0.0 else math.inf
    return error / norm


def distribution_summary(values: Sequence[float]) -> dict[str, float]:
    """Min, 10/50/90th percentiles, max and mean of ``values`` (empty: ``{}``): a histogram in six scalars.

    >>> {key: round(value, 6) for key, value in distribution_summary([0.0, 0.5, 1.0]).items()}
    {'min': 0.0, 'p10': 0.1, 'p50': 0.5, 'p90': 0.9, 'max': 1.0, 'mean': 0.5}
    """
    if len(values) == 0:
        return {}
    data = torch.tensor([float(v) for v in values], dtype=torch.float64)
    p10, p50, p90 = torch.quantile(data, torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)).tolist()
    return {"min": float(data.min()), "p10": p10, "p50": p50, "p90": p90, "max": float(data.max()), "mean": float(data.mean())}


def layer_log_values(quantity: str, per_layer: Mapping[str, float], max_layers: int) -> dict[str, float]:
    """Log keys for one per-layer ``quantity``: ``"<quantity>/<statistic>"`` over the layers (see
    ``distribution_summary``) and, when there are at most ``max_layers`` layers, one
    ``"layer/<module>/<quantity>"`` per layer.

    >>> values = layer_log_values("sparsity", {"0": 0.5, "2": 0.7}, max_layers=2)
    >>> values["sparsity/max"], values["layer/2/sparsity"]
    (0.7, 0.7)
    >>> sorted(layer_log_values("sparsity", {"0": 0.5, "2": 0.7}, max_layers=1))   # summary only
    ['sparsity/max', 'sparsity/mean', 'sparsity/min', 'sparsity/p10', 'sparsity/p50', 'sparsity/p90']
    """
    values = {f"{quantity}/{key}": value for key, value in distribution_summary(list(per_layer.values())).items()}
    if len(per_layer) <= max_layers:
        values.update({f"layer/{module}/{quantity}": float(value) for module, value in per_layer.items()})
    return values


def plain(value: Any) -> Any:
    """``value`` as JSON-ready Python: tensors and sizes to numbers / lists, ``"-"`` (nothing to show) to None.

    >>> plain({"shape": torch.Size([2, 3]), "error": torch.tensor(0.5), "input_min": "-"})
    {'shape': [2, 3], 'error': 0.5, 'input_min': None}
    """
    if isinstance(value, Mapping):
        return {str(key): plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):  # torch.Size too
        return [plain(item) for item in value]
    if torch.is_tensor(value):
        return value.item() if value.numel() == 1 else value.tolist()
    if value == "-":
        return None
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def format_value(value: Any) -> str:
    """A table cell: floats to 4 decimals (tiny ones in scientific notation), lists as ``AxB``, None as ``-``.

    >>> [format_value(v) for v in (0.5, 0.00012, [64, 16], None, "Linear")]
    ['0.5000', '1.20e-04', '64x16', '-', 'Linear']
    """
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}" if value == 0 or abs(value) >= 1e-3 else f"{value:.2e}"
    if isinstance(value, (tuple, list, torch.Size)):
        return "x".join(str(v) for v in value)
    return str(value)


def report_table(report: Mapping[str, Any], titles: Sequence[str]) -> str:
    """``CompressionManager.report()`` as text: one table per technique (headed by ``titles``, in order),
    then the losses' last values.

    >>> report = {"step": 3, "losses": {}, "techniques": {"0:T": {"layers": {"fc": {"shape": [2, 4], "error": 0.25}}}}}
    >>> print(report_table(report, ["T()"]))
    CompressionManager: step 3, 1 callback(s)
    <BLANKLINE>
    T()
      module  shape  error
      ------  -----  ------
      fc      2x4    0.2500
    """
    lines = [f"CompressionManager: step {report['step']}, {len(titles)} callback(s)"]
    for title, technique in zip(titles, report["techniques"].values()):
        lines.append(f"\n{title}")
        layers = technique["layers"]
        if not layers:
            lines.append("  (not attached)")
            continue
        columns = ["module", *next(iter(layers.values()))]
        cells = [[format_value(module), *(format_value(row.get(c)) for c in columns[1:])] for module, row in layers.items()]
        widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
        for row in [columns, ["-" * w for w in widths], *cells]:
            lines.append(("  " + "  ".join(v.ljust(w) for v, w in zip(row, widths))).rstrip())
    for name, values in report["losses"].items():
        lines.append(f"\n{name}: " + (", ".join(f"{k}={format_value(v)}" for k, v in values.items()) or "(not called yet)"))
    return "\n".join(lines)
