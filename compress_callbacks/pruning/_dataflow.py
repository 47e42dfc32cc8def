"""The tracer behind :mod:`compress_callbacks.pruning.groups`: an interpreter over a
``torch.export`` graph that runs every op on real values and, side by side, on channel labels and
on two "may be nonzero" bit-maps, and records where channels join, enter layers or get mixed.

Each value's state is ``(real, labels, nz_now, nz_pruned)``: ``labels`` (int64, -1 = no channel)
name the producer channel each element belongs to; ``nz_now`` marks elements that may be nonzero
with the current weights, ``nz_pruned`` those that may be nonzero once every unit is pruned.

>>> components(4, [torch.tensor([[0, 2], [1, 3]])]).tolist()
[0, 0, 2, 2]
"""

from __future__ import annotations

import math
import operator
from typing import Any

import torch
from torch.utils import _pytree as pytree

__all__ = ["Flow", "Interpreter", "any_but", "components"]

# params / buffers with one dimension of at most this size get per-channel labels (biases, norms, scales)
_ELEMENT_LABEL_LIMIT = 1 << 20
_SHAPE_OPS = {
    "view", "_unsafe_view", "reshape", "transpose", "permute", "t", "expand", "unsqueeze", "squeeze",
    "slice", "select", "cat", "stack", "clone", "contiguous", "alias", "flatten", "unflatten", "split",
    "split_with_sizes", "chunk", "unbind", "repeat", "narrow", "movedim", "detach", "lift_fresh_copy",
    "expand_as", "view_as", "index", "index_select", "gather", "_to_copy", "to", "type_as", "roll",
    "constant_pad_nd", "pad", "flip", "repeat_interleave", "tensor_split", "swapaxes", "unfold",
}
_IDENTITY_OPS = {"dropout", "native_dropout", "feature_dropout", "alpha_dropout", "_assert_tensor_metadata"}
_ADD_LIKE = {"add", "sub", "rsub", "maximum", "minimum", "where", "hypot"}
_MUL_LIKE = {"mul", "div", "logical_and", "bitwise_and", "_masked_scale"}
_NORMS = {"layer_norm", "native_layer_norm", "rms_norm", "group_norm", "native_group_norm", "instance_norm"}
_SOFTMAX = {"softmax", "_softmax", "log_softmax", "_log_softmax", "cumsum", "cumprod", "logcumsumexp"}
_REDUCTIONS = {"mean", "sum", "amax", "amin", "max", "min", "var", "std", "var_mean", "std_mean", "logsumexp",
               "linalg_vector_norm", "norm", "prod", "any", "all", "argmax", "argmin", "nansum", "nanmean"}
_SPATIAL = {"max_pool1d", "max_pool2d", "max_pool3d", "max_pool2d_with_indices", "max_pool3d_with_indices",
            "avg_pool1d", "avg_pool2d", "avg_pool3d", "adaptive_avg_pool1d", "adaptive_avg_pool2d",
            "adaptive_avg_pool3d", "_adaptive_avg_pool2d", "adaptive_max_pool1d", "adaptive_max_pool2d",
            "upsample_nearest1d", "upsample_nearest2d", "upsample_nearest3d", "upsample_bilinear2d",
            "upsample_linear1d", "upsample_bicubic2d", "reflection_pad1d", "reflection_pad2d",
            "replication_pad1d", "replication_pad2d", "_upsample_nearest_exact2d", "lp_pool2d"}
_CONVS = {"conv1d", "conv2d", "conv3d", "convolution", "_convolution"}
_BATCH_NORMS = {"batch_norm", "_native_batch_norm_legit_no_training", "native_batch_norm",
                "_native_batch_norm_legit_functional", "cudnn_batch_norm"}
_MATMULS = {"matmul", "bmm", "mm"}
_SDPA = {"scaled_dot_product_attention", "_scaled_dot_product_flash_attention_for_cpu",
         "_scaled_dot_product_efficient_attention", "_scaled_dot_product_flash_attention"}



class Flow:
    """Labels, zero bit-maps and joins for one traced graph (the interpreter's state)."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = tensors
        self.ranges: dict[tuple[str, int], int] = {}
        self.range_info: list[tuple[int, str, int]] = []  # (base id, name, dim)
        self.next_id = 0
        self.edges: list[torch.Tensor] = []
        self.columns: list[tuple[str, int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = []  # name, dim, labels, index, ok now / pruned
        self.zero_checks: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.mixing: list[tuple[torch.Tensor, str]] = []
        self.blocked: list[tuple[torch.Tensor, str]] = []
        self.unsupported: list[tuple[torch.Tensor, str]] = []
        self.heads: list[torch.Tensor] = []
        self.producer_ranges: set[tuple[str, int]] = set()
        self.records: list[tuple[str, torch.Tensor, list[torch.Tensor], int | None]] = []

    # ---------------------------------------------------------------- ids
    def slots(self, name: str, dim: int) -> torch.Tensor:
        """Ids of the slices of tensor ``name`` along ``dim`` (allocated once)."""
        key = (name, dim)
        if key not in self.ranges:
            self.ranges[key] = self.next_id
            self.range_info.append((self.next_id, name, dim))
            self.next_id += self.tensors[name].shape[dim]
        base = self.ranges[key]
        return torch.arange(base, base + self.tensors[name].shape[dim])

    def join(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """Join the labels pairwise (elements of equal position; -1 is no channel)."""
        a, b = torch.broadcast_tensors(a, b)
        both = (a >= 0) & (b >= 0) & (a != b)
        if both.any():
            self.edges.append(torch.unique(torch.stack([a[both], b[both]]), dim=1))

    def join_all(self, labels: torch.Tensor) -> int:
        """Join every label in ``labels``; returns one of them (-1 if none)."""
        found = torch.unique(labels[labels >= 0])
        if found.numel() == 0:
            return -1
        if found.numel() > 1:
            self.edges.append(torch.stack([found[:1].expand(found.numel() - 1), found[1:]]))
        return int(found[0])

    def element_labels(self, name: str) -> torch.Tensor:
        """Per-channel labels of a small parameter / buffer used elementwise (-1 where it has none)."""
        value = self.tensors[name]
        big = [d for d, n in enumerate(value.shape) if n > 1]
        if len(big) != 1 or value.shape[big[0]] > _ELEMENT_LABEL_LIMIT or not value.is_floating_point():
            return torch.full(value.shape, -1, dtype=torch.int64)
        shape = [1] * value.ndim
        shape[big[0]] = -1
        return self.slots(name, big[0]).view(shape).expand(value.shape).clone()


def _channel_labels(labels: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per index along ``dim``: its label if every element of that slice has the same one (else -1),
    and whether the slice is mixed."""
    moved = labels.movedim(dim, 0).reshape(labels.shape[dim], -1)
    if moved.shape[1] == 0:
        return torch.full((labels.shape[dim],), -1, dtype=torch.int64), torch.zeros(labels.shape[dim], dtype=torch.bool)
    first = moved[:, 0]
    mixed = (moved != first[:, None]).any(1)
    return torch.where(mixed, torch.full_like(first, -1), first), mixed


def any_but(t: torch.Tensor, dim: int) -> torch.Tensor:
    """``t.any()`` over every dim except ``dim``."""
    return t.movedim(dim, 0).reshape(t.shape[dim], -1).any(1)


def _dims(value: Any, ndim: int) -> list[int]:
    if value is None:
        return list(range(ndim))
    dims = [value] if isinstance(value, int) else list(value)
    return sorted(d % ndim for d in dims) if dims else list(range(ndim))


def _name(target: Any) -> str:
    return getattr(target, "_opname", getattr(target, "__name__", str(target)))


class Interpreter:
    """Runs the exported graph on real values, labels and the two zero bit-maps side by side."""

    def __init__(self, ep, flow: Flow, names: dict[str, str], user_values: list[Any]):
        self.ep, self.flow, self.names = ep, flow, names
        self.env: dict[str, tuple] = {}
        self.user_values = user_values

    # state of one value: (real, labels, nz_now, nz_pruned); lists/tuples hold one state per item
    def state(self, arg: Any):
        if isinstance(arg, torch.fx.Node):
            return self.env[arg.name]
        if isinstance(arg, (list, tuple)):
            return type(arg)(self.state(a) for a in arg)
        return arg

    def real(self, arg: Any):
        if isinstance(arg, torch.device):  # everything runs on CPU, whatever device the graph names
            return torch.device("cpu")
        if isinstance(arg, torch.fx.Node):
            value = self.env[arg.name]
            if _is_state(value):
                return value[0]
            return [v[0] if _is_state(v) else v for v in value] if isinstance(value, (list, tuple)) else value
        if isinstance(arg, (list, tuple)):
            return type(arg)(self.real(a) for a in arg)
        if isinstance(arg, dict):
            return {k: self.real(v) for k, v in arg.items()}
        return arg

    def run(self) -> None:
        users = iter(self.user_values)
        for node in self.ep.graph.nodes:
            if node.op == "placeholder":
                if node.name in self.names:
                    name = self.names[node.name]
                    value = self.flow.tensors[name]
                    labels = self.flow.element_labels(name)
                    nz = value != 0
                    self.env[node.name] = (value, labels, nz, nz & (labels < 0))
                else:
                    value = next(users)
                    self.env[node.name] = _fresh(value) if isinstance(value, torch.Tensor) else value
            elif node.op == "call_function":
                self.env[node.name] = self.call(node)
            elif node.op == "output":
                outputs = [a for a in pytree.tree_leaves(node.args) if isinstance(a, torch.fx.Node)]
                for out in outputs:
                    value = self.env[out.name]
                    for item in (value,) if _is_state(value) else value:
                        if _is_state(item):
                            self.flow.blocked.append((item[1], "reaches the model's output"))

    def call(self, node: torch.fx.Node):
        target, name = node.target, _name(node.target)
        args, kwargs = node.args, node.kwargs
        real_args = self.real(args)
        real_kwargs = {k: ("cpu" if k == "device" and v is not None else self.real(v)) for k, v in kwargs.items()}
        if target is operator.getitem:
            return self.state(args[0])[args[1]]
        real = target(*real_args, **real_kwargs)
        if not isinstance(real, torch.Tensor) and not (isinstance(real, (tuple, list)) and any(isinstance(r, torch.Tensor) for r in real)):
            return real
        inputs = [s for s in pytree.tree_leaves(self.state(args), is_leaf=_is_state) if _is_state(s)]
        labelled = [s for s in inputs if (s[1] >= 0).any()]
        if not labelled and name not in _CONVS | {"linear", "addmm"} | _BATCH_NORMS:
            return _unlabelled(real, inputs)
        if name == "linear":
            return self.linear(node, real, args)
        if name == "addmm":
            return self.addmm(node, real, args)
        if name in _SHAPE_OPS:
            return self.shape_op(target, real, args, kwargs)
        if name in _IDENTITY_OPS:
            first = self.state(args[0])
            return _like(real, first) if isinstance(real, torch.Tensor) else tuple(_like(r, first) for r in real)
        if name in _BATCH_NORMS:
            return self.batch_norm(node, real, args)
        if name in _CONVS:
            return self.conv(node, real, args, kwargs)
        if name in _NORMS | _SOFTMAX:
            return self.normalisation(node, name, real, args, kwargs)
        if name in _REDUCTIONS:
            return self.reduction(node, name, real, args, kwargs)
        if name in _SPATIAL:
            return self.spatial(target, real, args, kwargs)
        if name in _MATMULS:
            return self.matmul(node, real, args)
        if name in _SDPA:
            return self.attention(node, real, args, kwargs)
        if torch.Tag.pointwise in getattr(target, "tags", ()):
            return self.pointwise(node, name, real, args, kwargs)
        for s in labelled:
            self.flow.unsupported.append((s[1], f"op {name} ({node.name})"))
        return _unlabelled(real, inputs)

    # ---------------------------------------------------------------- structure-only ops
    def shape_op(self, target, real, args, kwargs):
        data = self.state(args[0])
        rest = self.real(args[1:])
        kw = {k: v for k, v in self.real(kwargs).items() if k not in ("dtype", "device", "layout", "memory_format")}

        def apply(i, fill=None):
            part = data[i] if _is_state(data) else [d[i] for d in data]
            if _name(target) in ("_to_copy", "to", "type_as"):
                return part
            extra = list(rest)
            if fill is not None and _name(target) in ("constant_pad_nd", "pad"):
                if len(extra) >= 2:
                    extra[1] = fill
                else:
                    kw["value"] = fill
            out = target(part, *extra, **kw) if _name(target) not in ("view", "_unsafe_view") else part.reshape(extra[0])
            return out

        labels = apply(1, -1)
        pad_value = (rest[1] if len(rest) >= 2 else kwargs.get("value", 0)) if _name(target) in ("constant_pad_nd", "pad") else 0
        now = apply(2, bool(pad_value != 0))
        pruned = apply(3, bool(pad_value != 0))
        if isinstance(real, torch.Tensor):
            return (real, labels, now, pruned)
        return tuple((r, lab, n, p) for r, lab, n, p in zip(real, labels, now, pruned))

    def spatial(self, target, real, args, kwargs):
        data = self.state(args[0])
        out = real[0] if isinstance(real, (tuple, list)) else real
        channel_dim = 1 if data[0].ndim >= 3 else 0
        lead = data[1].reshape(*data[1].shape[:channel_dim + 1], -1)
        first = lead[..., 0]
        mixed = (lead != first[..., None]).any(-1)
        if mixed.any():
            self.flow.unsupported.append((lead[mixed], f"op {_name(target)} mixing channels"))
        labels = torch.where(mixed, -1, first).reshape(*first.shape, *([1] * (out.ndim - first.ndim))).expand(out.shape).clone()
        rest = self.real(args[1:])
        maps = []
        for nz in (data[2], data[3]):
            result = target(nz.to(real_dtype(out)), *rest, **self.real(kwargs))
            result = result[0] if isinstance(result, (tuple, list)) else result
            maps.append(result != 0)
        state = (out, labels, maps[0], maps[1])
        return (state,) + tuple(_unlabelled(r, []) for r in real[1:]) if isinstance(real, (tuple, list)) else state

    # ---------------------------------------------------------------- elementwise
    def pointwise(self, node, name, real, args, kwargs):
        operands = [(i, self.state(a)) for i, a in enumerate(args) if isinstance(a, torch.fx.Node) and _is_state(self.state(a))]
        if name == "where" and operands and operands[0][0] == 0:
            cond = operands.pop(0)[1]
            if (cond[1] >= 0).any():
                self.flow.unsupported.append((cond[1], f"a condition from channels ({node.name})"))
        shape = real.shape
        labels = torch.full(shape, -1, dtype=torch.int64)
        tensors = [s for _, s in operands]
        if len(tensors) == 1:
            only = tensors[0]
            labels = only[1].expand(shape).clone()
            zero = torch.zeros((), dtype=real_dtype(only[0]))
            scalar_args = [zero if i == operands[0][0] else self.real(a) for i, a in enumerate(args)]
            try:
                keeps_zero = bool((node.target(*scalar_args, **self.real(kwargs)) == 0).all())
            except Exception:  # noqa: BLE001 - an op that cannot take a 0-d zero: assume it does not keep zeros
                keeps_zero = False
            now = only[2].expand(shape) if keeps_zero else torch.ones(shape, dtype=torch.bool)
            pruned = only[3].expand(shape) if keeps_zero else torch.ones(shape, dtype=torch.bool)
            self.flow.records.append((node.name, labels, [only[1]], None))
            return (real, labels, now.clone(), pruned.clone())
        broadcast = [torch.broadcast_to(s[1], shape) for s in tensors]
        for other in broadcast[1:]:
            self._join_elementwise(broadcast[0], other)
        for lab in broadcast:
            labels = torch.where(labels >= 0, labels, lab)
        nows = [torch.broadcast_to(s[2], shape) for s in tensors]
        pruneds = [torch.broadcast_to(s[3], shape) for s in tensors]
        if name in _ADD_LIKE:
            now, pruned = _reduce_or(nows), _reduce_or(pruneds)
        elif name in _MUL_LIKE:
            now, pruned = (nows[0] & nows[1], pruneds[0] & pruneds[1]) if name == "mul" else (nows[0], pruneds[0])
        else:
            now = pruned = torch.ones(shape, dtype=torch.bool)
        self.flow.records.append((node.name, labels, [s[1] for s in tensors], None))
        return (real, labels, now.clone(), pruned.clone())

    def _join_elementwise(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """Join labels met elementwise; a parameter's channel met by several channels (a norm weight
        broadcast over attention heads) is shared by them, not owned: it is not joined."""
        both = (a >= 0) & (b >= 0)
        if not both.any():
            return
        pairs = torch.unique(torch.stack([a[both], b[both]]), dim=1)
        keep = torch.ones(pairs.shape[1], dtype=torch.bool)
        for row in (0, 1):
            values, counts = torch.unique(pairs[row], return_counts=True)
            met_by_several = values[counts > 1]
            if met_by_several.numel():
                shared = met_by_several[self._is_param_slot(met_by_several)]
                keep &= ~torch.isin(pairs[row], shared)
        pairs = pairs[:, keep]
        if pairs.numel():
            self.flow.edges.append(pairs)

    def _is_param_slot(self, ids: torch.Tensor) -> torch.Tensor:
        """Whether each id is a channel of a small parameter used elementwise (not a layer's output)."""
        out = torch.zeros(ids.shape, dtype=torch.bool)
        for base, name, dim in self.flow.range_info:
            if (name, dim) in self.flow.producer_ranges:
                continue
            size = self.flow.tensors[name].shape[dim]
            out |= (ids >= base) & (ids < base + size)
        return out

    # ---------------------------------------------------------------- layers
    def _consume(self, node, weight: str, dim: int, x, channel_dim: int, columns=None) -> None:
        """Record that the input channels of ``x`` (along ``channel_dim``) enter ``weight`` at ``dim``."""
        labels, mixed = _channel_labels(x[1], channel_dim)
        if mixed.any():
            self.flow.unsupported.append((x[1], f"channels mixed before {self.layer(weight)}"))
        w = self.flow.tensors[weight]
        index = torch.arange(labels.numel()) if columns is None else columns
        column_zero = any_but(w != 0, dim).logical_not()[index]
        ok_now = column_zero | ~any_but(x[2], channel_dim)
        ok_pruned = column_zero | ~any_but(x[3], channel_dim)
        self.flow.columns.append((weight, dim, labels, index, ok_now, ok_pruned))
        self.flow.records.append((node.name, None, [x[1]], channel_dim))

    def layer(self, weight: str) -> str:
        return weight.rsplit(".", 1)[0]

    def _produce(self, weight: str, dim: int, bias: str | None) -> torch.Tensor:
        self.flow.producer_ranges.add((weight, dim))
        rows = self.flow.slots(weight, dim)
        if bias is not None:
            self.flow.join(rows, self.flow.slots(bias, 0))
        return rows

    def _param(self, arg) -> str | None:
        """The parameter a weight argument is, or is computed from elementwise (fake-quantized: QAT)."""
        for _ in range(16):
            if not isinstance(arg, torch.fx.Node):
                return None
            if arg.name in self.names:
                return self.names[arg.name]
            source = arg.args[0] if arg.op == "call_function" and arg.args else None
            same_shape = isinstance(source, torch.fx.Node) and _shape(source) is not None and _shape(source) == _shape(arg)
            arg = source if same_shape else None
        return None

    def linear(self, node, real, args):
        x, weight = self.state(args[0]), self._param(args[1])
        bias = self._param(args[2]) if len(args) > 2 and args[2] is not None else None
        if weight is None:
            return self.matmul(node, real, (args[0], args[1]))
        self._consume(node, weight, 1, x, x[1].ndim - 1)
        return self._output(real, weight, 0, bias, x, lambda nz, w: nz.float() @ w.float().t(), out_dim=real.ndim - 1)

    def addmm(self, node, real, args):  # Transformers' Conv1D: bias + x @ W, W stored [in, out]
        x, weight, bias = self.state(args[1]), self._param(args[2]), self._param(args[0])
        if weight is None:
            for s in (self.state(args[1]), self.state(args[2])):
                self.flow.unsupported.append((s[1], f"op addmm ({node.name})"))
            return _unlabelled(real, [])
        self._consume(node, weight, 0, x, 1)
        return self._output(real, weight, 1, bias, x, lambda nz, w: nz.float() @ w.float(), out_dim=1)

    def _output(self, real, weight, dim, bias, x, combine, out_dim):
        w = self.flow.tensors[weight]
        rows = self._produce(weight, dim, bias)
        shape = [1] * real.ndim
        shape[out_dim] = -1
        labels = rows.view(shape).expand(real.shape).clone()
        bias_nz = (self.flow.tensors[bias] != 0).view(shape) if bias else torch.zeros((), dtype=torch.bool)
        now = (combine(x[2], (w != 0)) > 0) | bias_nz
        return (real, labels, now.expand(real.shape).clone(), torch.zeros(real.shape, dtype=torch.bool))

    def conv(self, node, real, args, kwargs):
        x, weight = self.state(args[0]), self._param(args[1])
        bias = self._param(args[2]) if len(args) > 2 and args[2] is not None else None
        name = _name(node.target)
        if name in ("convolution", "_convolution"):
            transposed, groups = bool(args[6]), int(args[8])
        else:
            transposed, groups = False, int(args[6]) if len(args) > 6 else int(kwargs.get("groups", 1))
        if transposed:
            self.flow.unsupported.append((x[1], f"transposed convolution {self.layer(weight or '')}"))
            return _unlabelled(real, [x])
        if weight is None:
            self.flow.unsupported.append((x[1], f"convolution with a computed weight ({node.name})"))
            return _unlabelled(real, [x])
        w = self.flow.tensors[weight]
        c_in, c_out = x[0].shape[1], w.shape[0]
        per_group_in, per_group_out = c_in // groups, c_out // groups
        rows = self._produce(weight, 0, bias)
        if groups > 1 and per_group_in == 1:  # depthwise: output channel o reads input channel o // multiplier
            channels, mixed = _channel_labels(x[1], 1)
            source = channels[torch.arange(c_out) // per_group_out]
            self.flow.join(rows, source)
            if (source < 0).any():
                self.flow.blocked.append((rows[source < 0], f"depthwise {self.layer(weight)} reads channels that cannot be removed"))
            self.flow.records.append((node.name, None, [x[1]], 1))
        elif groups > 1:  # grouped: the i-th channel of every group goes together (groups stay equal)
            channels, _ = _channel_labels(x[1], 1)
            by_position = channels.view(groups, per_group_in)
            for i in range(per_group_in):
                self.flow.join_all(by_position[:, i])
            self.flow.edges.append(torch.stack([rows.view(groups, per_group_out)[0].repeat(groups - 1),
                                                rows.view(groups, per_group_out)[1:].reshape(-1)]))
            self._consume(node, weight, 1, x, 1, columns=torch.arange(c_in) % per_group_in)
        else:
            self._consume(node, weight, 1, x, 1)
        shape = [1, -1] + [1] * (real.ndim - 2)
        labels = rows.view(shape).expand(real.shape).clone()
        rest = self.real(args[3:])
        bias_nz = (self.flow.tensors[bias] != 0).view(shape) if bias else torch.zeros((), dtype=torch.bool)
        now = (node.target(x[2].float(), (w != 0).float(), None, *rest) > 0) | bias_nz
        return (real, labels, now.expand(real.shape).clone(), torch.zeros(real.shape, dtype=torch.bool))

    def batch_norm(self, node, real, args):
        x = self.state(args[0])
        out = real[0] if isinstance(real, (tuple, list)) else real
        names = [self._param(a) if a is not None else None for a in args[1:5]]
        channels, mixed = _channel_labels(x[1], 1)
        if mixed.any():
            self.flow.unsupported.append((x[1], f"channels mixed before a BatchNorm ({node.name})"))
        for name in names:
            if name is not None:
                self.flow.join(channels, self.flow.slots(name, 0))
        weight, bias, mean = (self.flow.tensors[n] if n else None for n in names[:3])
        shape = [1, -1] + [1] * (x[0].ndim - 2)
        gamma_nz = (weight != 0).view(shape) if weight is not None else torch.ones((), dtype=torch.bool)
        beta_nz = (bias != 0).view(shape) if bias is not None else torch.zeros((), dtype=torch.bool)
        mean_nz = (mean != 0).view(shape) if mean is not None else torch.zeros((), dtype=torch.bool)
        now = ((x[2] | mean_nz) & gamma_nz) | beta_nz
        # once pruned, a channel's gamma and beta are zero with it: the channel is zero
        pruned = (((x[3] | mean_nz) & gamma_nz) | beta_nz) & (channels < 0).view(shape)
        state = (out, x[1].clone(), now.expand(out.shape).clone(), pruned.expand(out.shape).clone())
        self.flow.records.append((node.name, state[1], [x[1]], None))
        if isinstance(real, (tuple, list)):
            return (state,) + tuple(_unlabelled(r, []) for r in real[1:])
        return state

    # ---------------------------------------------------------------- mixing
    def normalisation(self, node, name, real, args, kwargs):
        x = self.state(args[0])
        out = real[0] if isinstance(real, (tuple, list)) else real
        ndim = x[1].ndim
        if name in ("layer_norm", "native_layer_norm", "rms_norm"):
            dims = list(range(ndim - len(args[1]), ndim))
        elif name in ("group_norm", "native_group_norm", "instance_norm"):
            dims = list(range(1, ndim))
        else:
            dims = [int(args[1]) % ndim]
        self._mixed_over(x[1], dims, f"{name} ({node.name})")
        state = (out, x[1].clone(), torch.ones(out.shape, dtype=torch.bool), torch.ones(out.shape, dtype=torch.bool))
        if isinstance(real, (tuple, list)):
            return (state,) + tuple(_unlabelled(r, []) for r in real[1:])
        return state

    def _mixed_over(self, labels: torch.Tensor, dims: list[int], what: str) -> None:
        """Channels taken together over ``dims`` (a norm, a softmax, a mean) must be one unit, or stay."""
        rest = [d for d in range(labels.ndim) if d not in dims]
        flat = labels.permute(*rest, *dims).reshape(-1, math.prod(labels.shape[d] for d in dims) if dims else 1)
        rows = torch.unique(flat, dim=0)
        varying = (rows != rows[:, :1]).any(1)
        if varying.any():
            self.flow.mixing.append((rows[varying], what))

    def reduction(self, node, name, real, args, kwargs):
        x = self.state(args[0])
        out = real[0] if isinstance(real, (tuple, list)) else real
        ndim = x[1].ndim
        dim_arg = args[1] if len(args) > 1 and not isinstance(args[1], bool) else kwargs.get("dim")
        if name in ("linalg_vector_norm", "norm"):
            dim_arg = args[2] if len(args) > 2 else kwargs.get("dim")
        dims = _dims(dim_arg, ndim)
        if name in ("sum", "nansum", "any"):  # zeros add nothing: removable if the channels are zero
            labels = x[1]
            varying = [d for d in dims if labels.shape[d] > 1]
            if varying:
                self.flow.zero_checks.append((labels, x[2], x[3]))
        else:
            self._mixed_over(x[1], dims, f"{name} ({node.name})")
        keep = out.ndim == ndim
        reduced = x[1].amax(dim=dims, keepdim=keep) if dims else x[1]
        low = x[1].amin(dim=dims, keepdim=keep) if dims else x[1]
        labels = torch.where(reduced == low, reduced, -1).reshape(out.shape)
        nz_now = x[2].any(dim=dims, keepdim=keep).reshape(out.shape) if dims else x[2]
        nz_pruned = x[3].any(dim=dims, keepdim=keep).reshape(out.shape) if dims else x[3]
        if name in ("var", "std", "var_mean", "std_mean", "logsumexp", "norm", "prod", "all"):
            nz_now = nz_pruned = torch.ones(out.shape, dtype=torch.bool)
        state = (out, labels, nz_now, nz_pruned)
        if isinstance(real, (tuple, list)):
            return (state,) + tuple(_unlabelled(r, []) for r in real[1:])
        return state

    # ---------------------------------------------------------------- attention
    def matmul(self, node, real, args):
        """Activation x activation: every batch slice (one attention head) becomes one unit."""
        a, b = self.state(args[0]), self.state(args[1])
        if a[1].ndim < 2 or b[1].ndim < 2:
            for s in (a, b):
                self.flow.unsupported.append((s[1], f"op {_name(node.target)} ({node.name})"))
            return _unlabelled(real, [a, b])
        batch = real.shape[:-2]
        la = torch.broadcast_to(a[1], (*batch, *a[1].shape[-2:])).reshape(-1, a[1].shape[-2] * a[1].shape[-1])
        lb = torch.broadcast_to(b[1], (*batch, *b[1].shape[-2:])).reshape(-1, b[1].shape[-2] * b[1].shape[-1])
        reps = torch.tensor([self.flow.join_all(torch.cat([x, y])) for x, y in zip(la, lb)], dtype=torch.int64)
        self.flow.heads.append(reps)
        labels = reps.view(*batch, 1, 1).expand(real.shape).clone() if batch else reps.expand(real.shape).clone()
        now = (a[2].to(torch.float32) @ b[2].to(torch.float32)) > 0
        pruned = (a[3].to(torch.float32) @ b[3].to(torch.float32)) > 0
        self.flow.records.append((node.name, labels, [], None))
        return (real, labels, now.expand(real.shape).clone(), pruned.expand(real.shape).clone())

    def attention(self, node, real, args, kwargs):
        q, k, v = (self.state(a) for a in args[:3])
        out = real[0] if isinstance(real, (tuple, list)) else real
        mask = args[3] if len(args) > 3 else kwargs.get("attn_mask")
        if isinstance(mask, torch.fx.Node) and (self.state(mask)[1] >= 0).any():
            self.flow.unsupported.append((self.state(mask)[1], f"an attention mask from channels ({node.name})"))
        heads_q, heads_kv = q[1].shape[-3], k[1].shape[-3]
        per_kv = heads_q // heads_kv
        lq = q[1].reshape(-1, heads_q, q[1].shape[-2] * q[1].shape[-1])
        lk = k[1].reshape(-1, heads_kv, k[1].shape[-2] * k[1].shape[-1])
        lv = v[1].reshape(-1, heads_kv, v[1].shape[-2] * v[1].shape[-1])
        reps = torch.empty(lq.shape[0], heads_q, dtype=torch.int64)
        for b in range(lq.shape[0]):
            for h in range(heads_q):
                kv = h // per_kv
                reps[b, h] = self.flow.join_all(torch.cat([lq[b, h], lk[b % lk.shape[0], kv], lv[b % lv.shape[0], kv]]))
        self.flow.heads.append(reps.reshape(-1))
        labels = reps.view(*out.shape[:-2], 1, 1).expand(out.shape).clone()
        maps = []
        for nz in (v[2], v[3]):
            per_head = nz.any(-2, keepdim=True)  # [.., Hkv, 1, E]: a key/value head's channel that may be nonzero
            per_head = per_head.repeat_interleave(per_kv, dim=-3) if per_kv > 1 else per_head
            maps.append(torch.broadcast_to(per_head, out.shape).clone())
        self.flow.records.append((node.name, labels, [], None))
        state = (out, labels, maps[0], maps[1])
        if isinstance(real, (tuple, list)):
            return (state,) + tuple(_unlabelled(r, []) for r in real[1:])
        return state


def _shape(node: torch.fx.Node):
    value = node.meta.get("val")
    return tuple(value.shape) if isinstance(value, torch.Tensor) else None


def real_dtype(t: torch.Tensor) -> torch.dtype:
    return t.dtype if t.is_floating_point() else torch.float32


def _is_state(value: Any) -> bool:
    return isinstance(value, tuple) and len(value) == 4 and isinstance(value[0], torch.Tensor) and isinstance(value[1], torch.Tensor) \
        and value[1].dtype == torch.int64 and value[2].dtype == torch.bool


def _fresh(value: torch.Tensor):
    ones = torch.ones(value.shape, dtype=torch.bool)
    return (value, torch.full(value.shape, -1, dtype=torch.int64), ones, ones.clone())


def _unlabelled(real, inputs=None):
    if isinstance(real, torch.Tensor):
        return _fresh(real)
    return tuple(_fresh(r) if isinstance(r, torch.Tensor) else r for r in real)


def _like(real: torch.Tensor, first) -> tuple:
    return (real, first[1].clone(), first[2].clone(), first[3].clone())


def _reduce_or(maps: list[torch.Tensor]) -> torch.Tensor:
    out = maps[0]
    for m in maps[1:]:
        out = out | m
    return out


def components(n: int, edges: list[torch.Tensor]) -> torch.Tensor:
    """Connected components of ids ``0..n-1`` joined by ``edges`` (each ``[2, E]``): the smallest id of each."""
    root = torch.arange(n)
    if not edges or n == 0:
        return root
    pairs = torch.cat(edges, dim=1)
    while True:
        low = torch.minimum(root[pairs[0]], root[pairs[1]])
        new = root.clone()
        new.scatter_reduce_(0, pairs[0], low, reduce="amin")
        new.scatter_reduce_(0, pairs[1], low, reduce="amin")
        new = new[new]  # pointer jumping
        if torch.equal(new, root):
            return root
        root = new

