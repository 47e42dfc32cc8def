"""Feature distillation: pull student hidden states / activations towards the teacher's.

A layer is a **module name** (its output is captured by a forward hook; any model) or an **int**, a
hidden-state index of a Transformers model (``hidden_states[i]``: 0 = embeddings, ``i`` = output of
block ``i``, -1 = last; the hook asks for ``output_hidden_states=True`` itself). A layer mapping pairs
a student and a teacher of different depth; a learned bias-free linear projection maps the student's
width to the teacher's. The loss is the mean over pairs of the MSE or ``1 - cosine``, averaged over
the positions the attention mask counts, optionally after pooling the tokens into one sentence
embedding (``pooling="mean"`` or ``"cls"``).

The projections are created at the right widths in ``__init__`` and are the *only* parameters and
state of this module (student and teacher are referenced, not registered): add
``features.parameters()`` to the optimizer, keep ``features.state_dict()`` in checkpoints, and under
DDP pass ``features`` to ``accelerator.prepare`` and call the prepared object (DDP broadcasts rank 0's
initial projections and averages their gradients). Widths come from ``widths=``, else one forward on
``example_inputs`` (exact), else the modules' attributes (``out_features``, ...) or the config
(``hidden_size``), else one forward on a Transformers model's ``dummy_inputs`` (a block such as
``encoder.layer.2`` has no width attribute: its output tells); a probing forward runs under
``no_grad`` in eval mode and restores every module's mode.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..targets import unwrap_model
from .losses import position_weights

__all__ = ["FeatureDistillation", "feature_loss", "hidden_states_of", "module_width", "pool_features"]

Layer = str | int  # a module name (forward hook) or a hidden-state index (Transformers)

_LOSSES = ("mse", "cosine")
_POOLINGS = (None, "mean", "cls")
_WIDTH_ATTRIBUTES = ("out_features", "out_channels", "embedding_dim", "num_features", "hidden_size", "nf")


# ---------------------------------------------------------------------------------- pure functions
def module_width(module: nn.Module) -> int | None:
    """The feature width a module outputs, read from its attributes (None when unknown).

    >>> import torch.nn as nn
    >>> module_width(nn.Conv2d(3, 32, 3)), module_width(nn.LayerNorm(48)), module_width(nn.ReLU())
    (32, 48, None)
    """
    for attribute in _WIDTH_ATTRIBUTES:
        value = getattr(module, attribute, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    shape = getattr(module, "normalized_shape", None)
    if isinstance(shape, (tuple, list)) and shape:
        return int(shape[-1])
    return None


def pool_features(
    features: torch.Tensor, pooling: str, mask: torch.Tensor | None = None, feature_dim: int = -1
) -> torch.Tensor:
    """One vector per sample ``[B, H]``: the masked mean over the positions, or the first position.

    ``"mean"`` averages over every dim except the batch (0) and ``feature_dim``, counting only the
    positions where ``mask`` (``[B, positions...]``, 1 = real token) is non-zero; ``"cls"`` takes
    position 0 of ``[B, T, H]`` features (BERT's ``[CLS]``).

    >>> import torch
    >>> x = torch.tensor([[[1.0], [3.0], [100.0]]])               # [B=1, T=3, H=1], last token is padding
    >>> pool_features(x, "mean", mask=torch.tensor([[1, 1, 0]])).tolist()
    [[2.0]]
    >>> pool_features(x, "cls").tolist()
    [[1.0]]
    """
    if pooling not in ("mean", "cls"):
        raise ValueError(f"`pooling` must be 'mean' or 'cls', got {pooling!r}")
    moved = features.movedim(feature_dim, -1)
    if pooling == "cls":
        if moved.dim() != 3:
            raise ValueError(f"`pooling='cls'` needs token features [B, T, H], got shape {tuple(features.shape)}")
        return moved[:, 0]
    flat = moved.reshape(moved.shape[0], -1, moved.shape[-1])
    if mask is None:
        return flat.mean(dim=1)
    if mask.shape != moved.shape[:-1]:
        raise ValueError(f"`attention_mask` must have shape {tuple(moved.shape[:-1])}, got {tuple(mask.shape)}")
    weights = (mask.reshape(mask.shape[0], -1, 1) != 0).to(flat.dtype)
    return (flat * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)


def feature_loss(
    student_features: torch.Tensor,
    teacher_features: torch.Tensor,
    loss: str = "mse",
    mask: torch.Tensor | None = None,
    feature_dim: int = -1,
) -> torch.Tensor:
    """MSE or ``1 - cosine`` per position (along ``feature_dim``), averaged over the counted positions.

    A position counts where ``mask`` (the features' shape without ``feature_dim``; 1 = real token,
    0 = padding) is non-zero; ``mask=None`` counts all. Without a mask this equals
    ``mse_feature_loss`` / ``cosine_feature_loss``. The teacher is a constant target; computed in
    float32. With no counted position the loss is 0 (and its gradient too).

    >>> import torch
    >>> s, t = torch.tensor([[[1.0, 1.0], [5.0, 5.0]]]), torch.zeros(1, 2, 2)
    >>> float(feature_loss(s, t, "mse", mask=torch.tensor([[1, 0]])))   # the padded position is ignored
    1.0
    """
    if loss not in _LOSSES:
        raise ValueError(f"`loss` must be one of {list(_LOSSES)}, got {loss!r}")
    if student_features.shape != teacher_features.shape:
        raise ValueError(
            f"student and teacher features differ in shape: {tuple(student_features.shape)} vs "
            f"{tuple(teacher_features.shape)}; use `projection=True` (or 'auto') when only the widths differ"
        )
    student = student_features.float().movedim(feature_dim, -1)
    teacher = teacher_features.detach().float().movedim(feature_dim, -1)
    if loss == "mse":
        errors = F.mse_loss(student, teacher, reduction="none").mean(dim=-1)
    else:
        errors = 1.0 - F.cosine_similarity(student, teacher, dim=-1)
    weights, _ = position_weights(errors.shape, errors.device, mask=mask)
    return (errors.reshape(-1) * weights).sum()


def hidden_states_of(model: nn.Module) -> tuple[int | None, int | None]:
    """``(number of hidden states, their width)`` from a Transformers model's config, None where unknown.

    >>> from transformers import BertConfig, BertModel
    >>> hidden_states_of(BertModel(BertConfig(hidden_size=16, num_hidden_layers=3, num_attention_heads=2,
    ...                                       intermediate_size=32, vocab_size=30)))
    (4, 16)
    """
    config = getattr(model, "config", None)
    layers, width = getattr(config, "num_hidden_layers", None), getattr(config, "hidden_size", None)
    count = layers + 1 if isinstance(layers, int) else None
    return count, (width if isinstance(width, int) else None)


# ---------------------------------------------------------------------------------- helpers
def _first_tensor(output: Any) -> torch.Tensor | None:
    if isinstance(output, torch.Tensor):
        return output
    hidden = getattr(output, "last_hidden_state", None)
    if isinstance(hidden, torch.Tensor):
        return hidden
    values = output.values() if isinstance(output, Mapping) else output if isinstance(output, (tuple, list)) else ()
    for value in values:
        found = _first_tensor(value)
        if found is not None:
            return found
    return None


def _is_layer(value: Any) -> bool:
    return isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool))


def _layer_key(layer: Layer) -> str:
    """The projection's key (ModuleDict keys may not contain dots) and the name in ``log_values``."""
    return f"hidden_states_{layer}" if isinstance(layer, int) else layer.replace(".", "__")


def _move(inputs: Any, device: torch.device) -> Any:
    if isinstance(inputs, torch.Tensor):
        return inputs.to(device)
    if isinstance(inputs, Mapping):
        return {key: _move(value, device) for key, value in inputs.items()}
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(_move(value, device) for value in inputs)
    return inputs


def _call(model: nn.Module, inputs: Any, **kwargs: Any) -> Any:
    if isinstance(inputs, Mapping):
        return model(**inputs, **kwargs)
    if isinstance(inputs, tuple):
        return model(*inputs, **kwargs)
    return model(inputs, **kwargs)


def _device_of(model: nn.Module) -> torch.device:
    tensor = next(model.parameters(), None)
    if tensor is None:
        tensor = next(model.buffers(), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def _probe(model: nn.Module, role: str, inputs: Any, names: list[str], hidden: bool, feature_dim: int, source: str):
    """Run ``model`` once on ``inputs`` (no_grad, eval, modes restored): widths of ``names`` and of its hidden states."""
    modules = dict(model.named_modules())
    widths: dict[str, int] = {}

    def hook(name):
        def capture(module, args, output):
            tensor = _first_tensor(output)
            if tensor is not None:
                widths[name] = int(tensor.shape[feature_dim])

        return capture

    handles = [modules[name].register_forward_hook(hook(name)) for name in names]
    modes = {module: module.training for module in model.modules()}
    kwargs = {"output_hidden_states": True} if hidden else {}
    try:
        model.eval()
        inputs = _move(inputs, _device_of(model))
        with torch.no_grad():
            output = _call(model, inputs, **kwargs)
    except Exception as error:  # any failure of the user's forward: say what to pass instead
        raise ValueError(
            f"`example_inputs`: running the {role} on {source} to read the feature widths failed ({error}); pass "
            "inputs both models accept as `example_inputs=`, or the widths as `widths=`"
        ) from error
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes.items():
            module.train(training)
    hidden_widths = None
    states = getattr(output, "hidden_states", None)
    if hidden and isinstance(states, (tuple, list)):
        hidden_widths = [int(state.shape[feature_dim]) for state in states]
    return widths, hidden_widths


class _Side:
    """What one model (student or teacher) contributes: its layers, their widths, the capture hooks."""

    def __init__(self, model: nn.Module, role: str) -> None:
        self.role = role
        self.root = unwrap_model(model)
        self.modules = dict(self.root.named_modules())
        self.hidden_count, self.config_width = hidden_states_of(self.root)
        self.is_transformers = hasattr(getattr(self.root, "config", None), "output_hidden_states")
        self.hidden_widths: list[int] | None = None
        self.probed: dict[str, int] = {}
        self.features: dict[Layer, torch.Tensor] = {}
        self.mask: torch.Tensor | None = None

    # ---- checks and widths, before anything is touched
    def check(self, layer: Layer) -> Layer:
        """``layer`` validated; hidden-state indices made non-negative."""
        if isinstance(layer, str):
            if layer not in self.modules:
                raise ValueError(f"`layers`: the {self.role} has no module named {layer!r}")
            return layer
        if not self.is_transformers or getattr(self.root.config, "is_encoder_decoder", False):
            raise ValueError(
                f"`layers`: hidden-state index {layer} needs a Transformers (encoder-only or decoder-only) "
                f"{self.role} returning `hidden_states`; name its modules instead"
            )
        count = self.count()
        if count is not None and not -count <= layer < count:
            raise ValueError(
                f"`layers`: hidden-state index {layer} is out of range for the {self.role}, which has {count} "
                f"hidden states (0 = embeddings, {count - 1} = last block)"
            )
        return layer % count if count is not None else layer

    def count(self) -> int | None:
        return len(self.hidden_widths) if self.hidden_widths is not None else self.hidden_count

    def width(self, layer: Layer) -> int | None:
        if isinstance(layer, int):
            return self.hidden_widths[layer] if self.hidden_widths is not None else self.config_width
        return self.probed.get(layer, module_width(self.modules[layer]))

    def dummy_inputs(self) -> Any:
        try:
            return getattr(self.root, "dummy_inputs", None) if self.is_transformers else None
        except Exception:  # a model whose dummy_inputs property fails simply has none
            return None

    def probe(self, inputs: Any, names: list[str], hidden: bool, feature_dim: int, source: str) -> None:
        self.probed, hidden_widths = _probe(self.root, self.role, inputs, names, hidden, feature_dim, source)
        if hidden_widths is not None:
            self.hidden_widths = hidden_widths

    # ---- capture while training
    def attach(self, layers: list[Layer]) -> list:
        names = [layer for layer in layers if isinstance(layer, str)]
        indices = sorted({layer for layer in layers if isinstance(layer, int)})
        handles = [self.modules[name].register_forward_hook(self._module_hook(name)) for name in dict.fromkeys(names)]
        positional = [
            p.name for p in inspect.signature(self.root.forward).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
        handles.append(self.root.register_forward_pre_hook(self._pre_hook(positional, bool(indices)), with_kwargs=True))
        if indices:
            handles.append(self.root.register_forward_hook(self._hidden_hook(indices)))
        return handles

    def _module_hook(self, name: str):
        def hook(module, args, output):
            tensor = _first_tensor(output)
            if tensor is not None:
                self.features[name] = tensor

        return hook

    def _pre_hook(self, positional: list[str], hidden: bool):
        where = positional.index("attention_mask") if "attention_mask" in positional else None

        def hook(module, args, kwargs):
            mask = kwargs.get("attention_mask")
            if mask is None and where is not None and where < len(args):
                mask = args[where]
            self.mask = mask if isinstance(mask, torch.Tensor) else None
            if hidden and "output_hidden_states" not in positional[: len(args)]:
                return args, {**kwargs, "output_hidden_states": True}
            return None

        return hook

    def _hidden_hook(self, indices: list[int]):
        def hook(module, args, output):
            states = getattr(output, "hidden_states", None)
            if states is None and isinstance(output, Mapping):
                states = output.get("hidden_states")
            if not isinstance(states, (tuple, list)):
                raise ValueError(
                    f"`layers`: the {self.role}'s output carries no `hidden_states` (call it with return_dict=True)"
                )
            if indices[-1] >= len(states):
                raise ValueError(f"`layers`: hidden-state index {indices[-1]} is out of range ({len(states)} hidden states)")
            for index in indices:
                self.features[index] = states[index]

        return hook


def _parse_layers(layers: Any) -> list[tuple[Layer, Layer]] | Callable[[int], Any]:
    if isinstance(layers, Mapping):
        pairs = list(layers.items())
    elif callable(layers):
        return layers
    elif isinstance(layers, Sequence) and not isinstance(layers, str):
        pairs = [(layer, layer) for layer in layers]
    else:
        raise TypeError(
            "`layers` must be a {student_layer: teacher_layer} dict, a list of layers shared by both, or a "
            f"callable from student hidden-state index to teacher index; got {type(layers).__name__}"
        )
    for pair in pairs:
        if not all(_is_layer(layer) for layer in pair):
            raise TypeError(f"`layers`: a layer is a module name (str) or a hidden-state index (int), got {pair!r}")
    if not pairs:
        raise ValueError("`layers` must name at least one pair of layers")
    return pairs


class FeatureDistillation(nn.Module):
    """Match student layers to teacher layers (module outputs or hidden states), projecting widths.

    >>> import torch, torch.nn as nn
    >>> student = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    >>> teacher = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 4))
    >>> features = FeatureDistillation(student, teacher, layers={"0": "0"})   # 16 -> 64: learned projection
    >>> optimizer = torch.optim.SGD([*student.parameters(), *features.parameters()], lr=0.1)
    >>> x = torch.randn(5, 8)
    >>> logits = student(x)
    >>> with torch.no_grad():
    ...     _ = teacher(x)
    >>> loss = features()
    >>> loss.backward()
    >>> features.projections["0"].weight.shape
    torch.Size([64, 16])

    Args:
        student: the student model (may be wrapped by DDP/``accelerator.prepare``; names are on the
            unwrapped model).
        teacher: the teacher model (names on the unwrapped model).
        layers: ``{student_layer: teacher_layer}``, a list of layers shared by both, or a callable
            ``student_index -> teacher_index | None`` called for every student hidden-state index
            ``0..num_hidden_layers`` (``lambda i: 2 * i`` pairs a student of half the teacher's depth
            with every other teacher layer, embeddings with embeddings and last with last; ``None``
            skips an index). A layer is a module name (str) or a hidden-state index (int, Transformers).
        loss: ``"mse"`` or ``"cosine"`` (``1 - cosine similarity`` along the feature dim).
        projection: ``"auto"`` (a learned bias-free linear map where widths differ), ``True``
            (always) or ``False`` (never: differing widths raise).
        feature_dim: the dim holding the features (``-1`` for Linear/Transformer outputs, ``1`` for
            Conv outputs ``[B, C, H, W]``).
        widths: ``{student_layer: (student_width, teacher_width)}``, overriding what is read.
        pooling: ``None`` (compare every counted position), ``"mean"`` (masked mean over the tokens:
            a sentence embedding) or ``"cls"`` (the first token), applied to both sides first.
        example_inputs: what both models accept (a tensor, a tuple of positional arguments or a dict
            of keyword arguments): one forward on it reads every width exactly.

    Call ``features(attention_mask=None)`` after the student and the teacher ran on the batch (e.g.
    the teacher through ``DistillationLoss(..., inputs=batch)``): it returns the mean over pairs of
    the loss and releases the captured features. The attention mask defaults to the one the student
    (else the teacher) was called with; positions where it is 0 never count. ``log_values()`` gives
    the last per-pair losses; ``remove()`` takes the hooks off.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        layers: Mapping[Layer, Layer] | Sequence[Layer] | Callable[[int], int | None],
        loss: str = "mse",
        projection: bool | str = "auto",
        feature_dim: int = -1,
        widths: Mapping[Layer, tuple[int, int]] | None = None,
        *,
        pooling: str | None = None,
        example_inputs: Any = None,
    ) -> None:
        super().__init__()
        if not isinstance(student, nn.Module) or not isinstance(teacher, nn.Module):
            raise TypeError("`student` and `teacher` must be nn.Module instances")
        if loss not in _LOSSES:
            raise ValueError(f"`loss` must be one of {list(_LOSSES)}, got {loss!r}")
        if not (projection == "auto" or projection is True or projection is False):
            raise ValueError(f"`projection` must be 'auto', True or False, got {projection!r}")
        if isinstance(feature_dim, bool) or not isinstance(feature_dim, int):
            raise TypeError(f"`feature_dim` must be an int, got {feature_dim!r}")
        if pooling not in _POOLINGS:
            raise ValueError(f"`pooling` must be one of {list(_POOLINGS)}, got {pooling!r}")
        if widths is not None and not isinstance(widths, Mapping):
            raise TypeError(f"`widths` must be a {{student_layer: (student_width, teacher_width)}} dict, got {widths!r}")
        for key, value in (widths or {}).items():
            if not (isinstance(value, (tuple, list)) and len(value) == 2 and all(isinstance(v, int) and v > 0 for v in value)):
                raise ValueError(f"`widths`: {key!r} must map to (student_width, teacher_width), positive ints; got {value!r}")
        s_side, t_side = _Side(student, "student"), _Side(teacher, "teacher")
        pairs = _parse_layers(layers)
        if not callable(pairs):  # names, kinds and (where the configs tell) ranges, before anything runs
            pairs = [(s_side.check(s), t_side.check(t)) for s, t in pairs]
        probe_inputs = {side: example_inputs for side in (s_side, t_side)} if example_inputs is not None else None
        if probe_inputs is not None:
            self._probe_sides(pairs, s_side, t_side, probe_inputs, feature_dim, "`example_inputs`")
        if callable(pairs):
            pairs = self._pairs_from_callable(pairs, s_side)
        pairs = [(s_side.check(s), t_side.check(t)) for s, t in pairs]

        given = self._student_keyed(widths or {}, pairs, s_side)
        unknown = [pair for pair in pairs if pair[0] not in given and None in (s_side.width(pair[0]), t_side.width(pair[1]))]
        counts_unknown = any(isinstance(layer, int) and side.count() is None for pair in pairs for side, layer in zip((s_side, t_side), pair))
        if probe_inputs is None and (counts_unknown or (unknown and projection is not False)):
            dummies = {side: side.dummy_inputs() for side in (s_side, t_side)}
            if all(value is not None for value in dummies.values()):
                self._probe_sides(pairs, s_side, t_side, dummies, feature_dim, "its `dummy_inputs`")
                pairs = [(s_side.check(s), t_side.check(t)) for s, t in pairs]  # ranges known now
                given = self._student_keyed(widths or {}, pairs, s_side)
        if len({_layer_key(s) for s, _ in pairs}) != len(pairs):
            raise ValueError(f"`layers`: each student layer may appear once, got {[s for s, _ in pairs]}")
        planned = self._plan_projections(pairs, given, projection, s_side, t_side)

        self.loss_name = loss
        self.feature_dim = feature_dim
        self.pooling = pooling
        self.pairs = pairs
        self._models = (student, teacher)  # referenced, not registered: never in parameters() or state_dict()
        self._sides = (s_side, t_side)
        device = _device_of(s_side.root)
        self.projections = nn.ModuleDict(
            {key: nn.Linear(s_width, t_width, bias=False, device=device) for key, (s_width, t_width) in planned.items()}
        )
        self._handles = s_side.attach([s for s, _ in pairs]) + t_side.attach([t for _, t in pairs])
        self._last: dict[str, torch.Tensor] = {}

    # ------------------------------------------------------------------ construction helpers
    @staticmethod
    def _probe_sides(pairs, s_side: _Side, t_side: _Side, inputs: dict, feature_dim: int, source: str) -> None:
        hidden = callable(pairs)
        for index, side in enumerate((s_side, t_side)):
            layers = [] if callable(pairs) else [pair[index] for pair in pairs]
            names = [layer for layer in layers if isinstance(layer, str)]
            uses_hidden = hidden or any(isinstance(layer, int) for layer in layers)
            side.probe(inputs[side], names, uses_hidden and side.is_transformers, feature_dim, source)

    @staticmethod
    def _pairs_from_callable(mapping: Callable[[int], Any], s_side: _Side) -> list[tuple[Layer, Layer]]:
        count = s_side.count()
        if not s_side.is_transformers or count is None:
            raise ValueError(
                "`layers`: a callable maps the student's hidden-state indices, so the student must be a Transformers "
                "model whose config gives num_hidden_layers (or pass `example_inputs=`)"
            )
        pairs = []
        for index in range(count):
            target = mapping(index)
            if target is None:
                continue
            if isinstance(target, bool) or not isinstance(target, int):
                raise TypeError(f"`layers`: the callable must return a teacher hidden-state index (int) or None, got {target!r} for {index}")
            pairs.append((index, target))
        if not pairs:
            raise ValueError("`layers`: the callable returned None for every student index")
        return pairs

    @staticmethod
    def _student_keyed(widths: Mapping, pairs: list, s_side: _Side) -> dict:
        """``widths`` with hidden-state indices made non-negative; each key must be a paired student layer."""
        keyed, students = {}, [s for s, _ in pairs]
        for key, value in widths.items():
            try:
                layer = s_side.check(key) if _is_layer(key) else None
            except ValueError:
                layer = None
            if layer is None or layer not in students:
                raise ValueError(f"`widths`: {key!r} is not a student layer of `layers` ({students})")
            keyed[layer] = tuple(value)
        return keyed

    @staticmethod
    def _plan_projections(pairs, widths, projection, s_side: _Side, t_side: _Side) -> dict[str, tuple[int, int]]:
        """``{key: (student_width, teacher_width)}`` of the projections to create; raises where widths do not fit."""
        planned: dict[str, tuple[int, int]] = {}
        for s_layer, t_layer in pairs:
            s_width, t_width = widths.get(s_layer) or (s_side.width(s_layer), t_side.width(t_layer))
            if projection is False:
                if None not in (s_width, t_width) and s_width != t_width:
                    raise ValueError(
                        f"`projection=False`, but the student's {s_layer!r} is {s_width} wide and the teacher's "
                        f"{t_layer!r} {t_width}: use projection='auto' (a learned linear map)"
                    )
                continue
            if s_width is None or t_width is None:
                raise ValueError(
                    f"`widths`: cannot read the feature widths of {s_layer!r}/{t_layer!r}; pass "
                    f"widths={{{s_layer!r}: (student_width, teacher_width)}} or `example_inputs=` for one forward"
                )
            if projection is True or s_width != t_width:
                planned[_layer_key(s_layer)] = (s_width, t_width)

        return planned

    # ------------------------------------------------------------------ properties
    @property
    def student(self) -> nn.Module:
        """The student model (not a submodule of this one)."""
        return self._models[0]

    @property
    def teacher(self) -> nn.Module:
        """The teacher model (not a submodule of this one)."""
        return self._models[1]

    def extra_repr(self) -> str:
        return f"pairs={self.pairs}, loss={self.loss_name!r}, pooling={self.pooling!r}"

    # ------------------------------------------------------------------ the loss
    def project(self, student_layer: Layer, features: torch.Tensor, feature_dim: int | None = None) -> torch.Tensor:
        """Apply the learned projection of ``student_layer`` (identity when there is none; -1 is the last hidden state)."""
        key = _layer_key(self._sides[0].check(student_layer))
        if key not in self.projections:
            return features
        feature_dim = self.feature_dim if feature_dim is None else feature_dim
        projection = self.projections[key]
        if features.shape[feature_dim] != projection.in_features:
            raise ValueError(
                f"`widths`: the student's {student_layer!r} outputs features {features.shape[feature_dim]} wide "
                f"(dim {feature_dim}), but its projection was built for {projection.in_features}"
            )
        moved = features.movedim(feature_dim, -1)
        return projection(moved.to(projection.weight.dtype)).movedim(-1, feature_dim)

    def forward(self, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The feature loss for the batch both models just ran on (mean over the pairs)."""
        s_side, t_side = self._sides
        missing = [s for s, _ in self.pairs if s not in s_side.features] + [t for _, t in self.pairs if t not in t_side.features]
        if missing:
            raise ValueError(
                f"no captured features for {missing}: run the student and the teacher on the batch "
                "(e.g. DistillationLoss with `inputs=`) before calling FeatureDistillation"
            )
        explicit = attention_mask is not None
        mask = attention_mask if explicit else s_side.mask if s_side.mask is not None else t_side.mask
        losses = {}
        for s_layer, t_layer in self.pairs:
            student, teacher = s_side.features.pop(s_layer), t_side.features.pop(t_layer)
            positions = student.movedim(self.feature_dim, -1).shape[:-1]
            pair_mask = mask if mask is not None and mask.shape == positions else None
            if explicit and pair_mask is None:
                raise ValueError(f"`attention_mask` must have shape {tuple(positions)} (the features without their width), got {tuple(mask.shape)}")
            feature_dim = self.feature_dim
            if self.pooling is not None:
                student = pool_features(student, self.pooling, pair_mask, feature_dim)
                teacher = pool_features(teacher, self.pooling, pair_mask, feature_dim)
                pair_mask, feature_dim = None, -1
            student = self.project(s_layer, student, feature_dim)
            losses[_layer_key(s_layer)] = feature_loss(student, teacher, self.loss_name, pair_mask, feature_dim)
        s_side.mask = t_side.mask = None
        total = torch.stack(list(losses.values())).mean()
        self._last = {**{f"feature/{k}": v.detach() for k, v in losses.items()}, "feature/total": total.detach()}
        return total

    def log_values(self) -> dict[str, float]:
        """The last call's per-pair losses and their mean, as floats."""
        return {key: float(value) for key, value in self._last.items()}

    def remove(self) -> None:
        """Take the hooks off the student and the teacher."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for side in self._sides:
            side.features.clear()
            side.mask = None
