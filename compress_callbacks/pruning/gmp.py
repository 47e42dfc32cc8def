"""Gradual magnitude pruning (Zhu & Gupta, 2017) by real optimizer updates."""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import torch
import torch.nn as nn

from .. import _dist as D
from .._native import mask_multiply_kernel
from ..callback import CompressionTechnique
from ..reporting import layer_log_values
from ..schedules import cubic_sparsity, last_grid_point
from ..targets import ModuleSpec, require_optimizer_owns_weights, select_modules, weight_output_dim
from . import masks as M
from .config import PruningConfig
from .sharded import sharded_keep_masks
from .structured import GroupSelection

__all__ = ["GradualMagnitudePruning"]

# Optimizers whose update of a parameter with zero gradient and zero state is exactly zero (also with
# weight decay, momentum, Nesterov, AMSGrad, maximize). For these, masking gradients before each
# update keeps pruned weights exactly zero with one pass; any other optimizer also gets its pruned
# weights re-zeroed after each update.
ZERO_PRESERVING_OPTIMIZERS = tuple(
    getattr(torch.optim, name)
    for name in ("SGD", "Adam", "AdamW", "Adamax", "NAdam", "RAdam", "RMSprop", "Adagrad", "Adadelta", "Adafactor", "Rprop", "ASGD")
    if hasattr(torch.optim, name)
)

# Zero-preserving optimizers whose per-weight state of a pruned weight still drifts off zero: Adamax's
# ``exp_inf`` becomes ``eps`` (a max with |g| + eps) and Rprop's ``step_size`` its ``step_size_min``
# (a clamp). That state is masked again after each update.
STATE_MASKED_AFTER_UPDATE = tuple(getattr(torch.optim, name) for name in ("Adamax", "Rprop") if hasattr(torch.optim, name))


# Id of the running backward pass (0 where torch cannot tell: then every pass looks the same).
_graph_task_id = getattr(torch._C, "_current_graph_task_id", lambda: 0)


# Masking runs between compiled graphs, never inside one: under ``torch.compile`` these entry points
# (the backward-end hooks and the optimizer-step events) run eagerly instead of being traced, so the
# native kernels and the Python bookkeeping neither break a user's graph nor recompile it each step.
_outside_graphs = torch.compiler.disable


@_outside_graphs
def _queue_end_of_backward(callback) -> None:
    """Run ``callback`` when the running backward pass ends, after the callbacks queued before it."""
    torch.autograd.Variable._execution_engine.queue_callback(callback)


class GradualMagnitudePruning(CompressionTechnique, config_class=PruningConfig):
    """Raise sparsity along the cubic schedule while training; pruned weights stay exactly zero.

    >>> import torch, torch.nn as nn
    >>> from compress_callbacks import CompressionManager
    >>> model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    >>> optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    >>> gmp = GradualMagnitudePruning(target_sparsity=0.75, start_step=2, end_step=10, update_every=2)
    >>> manager = CompressionManager(gmp)
    >>> manager.attach(model, optimizer)
    >>> for _ in range(12):
    ...     model(torch.randn(8, 16)).pow(2).mean().backward()
    ...     optimizer.step(); optimizer.zero_grad()
    >>> [round(s, 4) for s in gmp.layer_sparsities().values()]
    [0.75, 0.75]
    >>> keep = gmp.masks["0"]   # read-only views: gmp.masks, gmp.weights
    >>> keep.dtype, bool((gmp.weights["0"][~keep] == 0).all())
    (torch.bool, True)

    Args:
        target_sparsity: final fraction of zeros in [0, 1) (for ``"N:M"``: ``1 - N/M`` or None).
        start_step / end_step: real optimizer updates at which pruning starts / reaches the target.
        update_every: masks are recomputed every this many updates between start and end.
        initial_sparsity: sparsity applied at ``start_step``.
        granularity: ``"unstructured"``, ``"channel"`` (output channels by L2 norm, pruned whole:
            coupled channels together, with their biases and BatchNorm channels, so that
            ``compress_callbacks.export.shrink`` can remove them), ``"head"`` (whole attention
            heads; with grouped-query attention a key/value head with all its query heads) or
            ``"N:M"`` (e.g. ``"2:4"``: the N largest of every M consecutive input weights are kept).
        scope: ``"layer"`` (every layer reaches the target) or ``"global"`` (the target holds over
            all targeted weights together). Either way no layer loses its last weight (unstructured)
            or output channel (channel); a layer held at that minimum is named in a warning.
        modules / exclude: module names, ``"re:"`` regexes or types; default every Linear/Conv and
            Transformers Conv1D, leaving out a weight tied to an untargeted module (warned) unless named.
        mask_gradients: ``"backward"`` (default): pruned gradients are zeroed at the end of each
            backward pass, before ``backward()`` returns (and after DDP's all-reduce), so gradient
            clipping and gradient logging see only kept weights. ``"step"``: once, just before each
            real update: within noise of the default in time, but ``clip_grad_norm_`` then counts
            the pruned weights' gradients.

    Pruned weights get their gradients masked when each backward pass ends (``mask_gradients="step"``
    defers this to the update), again before the update for any gradient that was replaced after
    backward, and their optimizer state zeroed when the mask grows (Adamax's and Rprop's after every
    update too): with every built-in optimizer, they and their optimizer state stay exactly zero.
    (A gradient changed *in place* between backward and the step, e.g. by adding noise, is not
    masked again.) Weights that are already zero at ``attach`` (a sparse checkpoint) stay zero. Under DDP every rank holds the same masks; under FSDP2
    (``fully_shard``) each rank holds its block of the masks a single process would select.

    Read-only views: ``weights`` (module name -> targeted weight) and ``masks`` (module name -> bool
    keep mask, a copy) while attached.
    """

    needs_before_update = True
    supports_sharded_weights = True  # FSDP2: masks live on each rank's block of rows

    def __init__(
        self,
        target_sparsity: float | None,
        start_step: int,
        end_step: int,
        update_every: int = 100,
        initial_sparsity: float = 0.0,
        granularity: str = "unstructured",
        scope: str = "layer",
        modules: ModuleSpec = None,
        exclude: ModuleSpec = None,
        mask_gradients: str = "backward",
    ) -> None:
        super().__init__()
        self.settings = PruningConfig(
            target_sparsity=target_sparsity, start_step=start_step, end_step=end_step, update_every=update_every,
            initial_sparsity=initial_sparsity, granularity=granularity, scope=scope, modules=modules,
            exclude=exclude, mask_gradients=mask_gradients,
        )
        self._nm = self.settings.nm

        self._names: list[str] = []
        self._params: list[nn.Parameter] = []
        self._out_dims: list[int] = []  # the dim of each weight that indexes output channels
        self._keeps: list[torch.Tensor | None] = []
        self._applied_sparsity = 0.0  # schedule value the current masks implement
        self._mask_sparsity = 0.0  # fraction of targeted weights the masks prune
        self._optimizer: torch.optim.Optimizer | None = None
        self._mask_weights_after_update = False
        self._mask_state_after_update = False
        self._final_rows: list[dict[str, Any]] = []
        self._loaded: dict[str, Any] | None = None
        self._scratch_buffers: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}
        self._kernel = None
        self._grad_hooks: list[Any] = []
        self._masked_grads: list[Any] = []  # weakref to each grad tensor as masked during backward (None: not)
        self._queued_for: int | None = None  # the backward pass (graph task) whose end-of-pass masking is queued
        self._sharded = False  # FSDP2: the targeted weights are DTensors (validate: all of them, one mesh)
        self._sharded_zeros: list[int] = []  # FSDP2: zeros per weight, counted over all ranks at each mask change
        self._warned_floor: set[str] = set()  # layers reported as pruned down to their last weight / channel
        self._groups: GroupSelection | None = None  # channel / head: the model's channel groups (traced once)
        self._owned: dict[str, nn.Parameter] = {}  # other parameters pruned units own (biases, BatchNorm channels)
        self._owned_keeps: dict[str, torch.Tensor | None] = {}

    def sparsity_at(self, step: int) -> float:
        """The schedule's target sparsity after ``step`` real updates."""
        return cubic_sparsity(
            step, initial=self.initial_sparsity, final=self.target_sparsity,
            start=self.start_step, end=self.end_step, every=self.update_every,
        )

    def target_modules(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        """The ``(name, module)`` pairs whose weights this callback prunes on ``model`` (unwrapped)."""
        return select_modules(model, modules=self.modules, exclude=self.exclude, warn_shared=False)

    # ------------------------------------------------------------------ lifecycle
    def validate(self, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
        selected = select_modules(model, modules=self.modules, exclude=self.exclude)
        structured = self.granularity != "unstructured"
        for name, module in selected:
            out_dim = weight_output_dim(module)
            if structured and isinstance(module, nn.modules.conv._ConvTransposeNd) and module.groups > 1:
                raise ValueError(
                    f"`granularity` {self.granularity!r}: module {name!r} is a {type(module).__name__} with "
                    f"groups={module.groups}, whose weight [in, out/groups, ...] does not hold each output channel "
                    f"in one slice; prune it unstructured or exclude it with `exclude=[{name!r}]`"
                )
            fan_in = module.weight.numel() // max(module.weight.shape[out_dim], 1)
            if self._nm is not None and fan_in % self._nm[1]:
                raise ValueError(
                    f"`granularity` {self.granularity!r}: module {name!r} has {fan_in} inputs per output, "
                    f"not a multiple of M={self._nm[1]}; exclude it with `exclude=[{name!r}]`"
                )
        weights = [module.weight for _, module in selected]
        if any(D.is_sharded(w) for w in weights) and not all(
            D.is_sharded(w) and w.device_mesh == weights[0].device_mesh for w in weights
        ):
            raise NotImplementedError(
                "GradualMagnitudePruning on FSDP2 needs every targeted weight sharded over one mesh "
                "(fully_shard the model's root too, or leave the others out with `exclude=`)"
            )
        input_first = [name for name, module in selected if weight_output_dim(module) != 0]
        if structured and any(D.is_sharded(w) for w in weights) and input_first:
            raise NotImplementedError(
                f"GradualMagnitudePruning on FSDP2 with granularity {self.granularity!r}: {input_first[:3]} store their "
                "output channels along dim 1 (Transformers Conv1D, ConvTranspose), and FSDP2 splits dim 0 across "
                "ranks; prune them unstructured or exclude them"
            )
        require_optimizer_owns_weights(selected, optimizer)

    def on_attach(self, model: nn.Module, optimizer: torch.optim.Optimizer | None, step: int) -> None:
        selected = select_modules(model, modules=self.modules, exclude=self.exclude, warn_shared=False)  # validate warned
        self._names = [name for name, _ in selected]
        self._params = [module.weight for _, module in selected]
        self._out_dims = [weight_output_dim(module) for _, module in selected]
        self._sharded = any(D.is_sharded(p) for p in self._params)
        self._optimizer = optimizer
        self._attach_groups(model)
        # one-pass uint8-mask multiply on CPU (compiled once per machine; None: pure-PyTorch path)
        self._kernel = mask_multiply_kernel() if any(p.device.type == "cpu" for p in self._params) else None
        self._mask_weights_after_update = not (
            self.manager is not None and self.manager.has_before_update_hook
            and isinstance(optimizer, ZERO_PRESERVING_OPTIMIZERS)
        )
        self._mask_state_after_update = isinstance(optimizer, STATE_MASKED_AFTER_UPDATE)
        if self._loaded is not None:
            self._restore(self._loaded)
            self._loaded = None
        else:
            self._keeps = self._keeps_from_zeros()
            self._mask_sparsity = self._count_mask_sparsity()
        self._enforce_masks(grads=True, state=True)
        self._update_masks(step)
        self._count_sharded_zeros()
        self._masked_grads = [None] * len(self._params)
        if self.mask_gradients == "backward":
            self._install_grad_hooks()

    def _keeps_from_zeros(self) -> list[torch.Tensor | None]:
        """Masks of the zeros already in the weights (a sparse checkpoint), or None for a weight with no
        zeros (or only zeros). Under FSDP2 decided on the whole weight: every rank holds a mask (its
        block's) or none, as the collectives that follow expect."""
        blocks = [D.local(p.detach()) for p in self._params]
        if not self._sharded:
            return [M.keep_from_zeros(block) for block in blocks]
        nonzero = D.sum_over_shards(torch.stack([(b != 0).sum(dtype=torch.int64) for b in blocks]).cpu(), self._params[0])
        return [None if int(count) in (0, p.numel()) else (block != 0).to(torch.uint8)
                for block, count, p in zip(blocks, nonzero, self._params)]

    # Gradients are masked once per backward pass, when autograd has finished it and before
    # ``backward()`` returns: the first gradient accumulated in a pass queues a callback at the end of
    # the pass, which queues the masking behind every other end-of-pass callback (DDP's reducer
    # finishes its all-reduce in one). So gradient clipping and logging see only the weights that are
    # kept, and the backward GEMMs run undisturbed (masking each gradient the moment it arrives, in
    # the middle of backward, cost about 1% more per step at batch 256). Masking after DDP's
    # all-reduce equals masking before it: every rank holds the same masks. Before each real update,
    # any gradient that did not come through this (replaced by other code, or set without autograd)
    # is masked too.
    def _install_grad_hooks(self) -> None:
        self._remove_grad_hooks()
        self._queued_for = None
        for param in self._params:
            self._grad_hooks.append(param.register_post_accumulate_grad_hook(self._on_grad_accumulated))

    @_outside_graphs
    def _on_grad_accumulated(self, param: torch.Tensor) -> None:
        task = _graph_task_id()  # a pass that raised never ran its callbacks: the next pass has another id
        if self._queued_for is None or task != self._queued_for:
            self._queued_for = task
            _queue_end_of_backward(lambda: _queue_end_of_backward(self._mask_grads_after_backward))

    @_outside_graphs
    def _mask_grads_after_backward(self) -> None:
        self._queued_for = None
        masked = [(i, p.grad, keep) for i, (p, keep) in enumerate(zip(self._params, self._keeps))
                  if keep is not None and p.grad is not None]
        if masked:
            self._mask_([grad for _, grad, _ in masked], [keep for _, _, keep in masked])
        for index, grad, _ in masked:
            self._masked_grads[index] = weakref.ref(grad)

    def _remove_grad_hooks(self) -> None:
        for handle in self._grad_hooks:
            handle.remove()
        self._grad_hooks = []

    @_outside_graphs
    def on_before_update(self, step: int) -> None:
        grads, keeps = [], []
        for p, keep, ref in zip(self._params, self._keeps, self._masked_grads):
            if keep is not None and p.grad is not None and (ref is None or ref() is not p.grad):
                grads.append(p.grad)  # not the tensor the backward hook masked: mask it now
                keeps.append(keep)
        self._masked_grads = [None] * len(self._params)
        self._queued_for = None
        for name, keep in self._owned_keeps.items():  # biases / BatchNorm channels of pruned units
            if keep is not None and self._owned[name].grad is not None:
                grads.append(self._owned[name].grad)
                keeps.append(keep)
        if grads:
            self._mask_(grads, keeps)

    @_outside_graphs
    def on_update(self, step: int) -> None:
        if self._mask_weights_after_update or self._mask_state_after_update:
            self._enforce_masks(weights=self._mask_weights_after_update, state=self._mask_state_after_update)
        if step >= self.start_step and (step >= self.end_step or (step - self.start_step) % self.update_every == 0):
            self._update_masks(step)

    def finalize(self, model: nn.Module) -> None:
        self._remove_grad_hooks()
        self._enforce_masks()
        self._count_sharded_zeros()
        self._final_rows = self.summary_rows()
        self._keeps = [None] * len(self._params)
        self._params, self._optimizer = [], None
        if self._groups is not None:
            self._groups.close()
        self._groups, self._owned, self._owned_keeps = None, {}, {}
        self._scratch_buffers.clear()

    # ------------------------------------------------------------------ channel groups
    def _attach_groups(self, model: nn.Module) -> None:
        """Channel / head pruning: the groups are learnt from the first batch the model sees."""
        self._all_params = dict(model.named_parameters())
        self._owned, self._owned_keeps = {}, {}
        if self.granularity in ("channel", "head"):
            self._groups = GroupSelection(model, [f"{name}.weight" for name in self._names], self.granularity, self._out_dims)

    def _set_owned(self, keeps: dict[str, torch.Tensor | None]) -> None:
        self._owned = {name: self._all_params[name] for name in keeps}
        self._owned_keeps = dict(keeps)

    # ------------------------------------------------------------------ masks
    def _update_masks(self, step: int) -> None:
        target = self.sparsity_at(step)
        if last_grid_point(step, start=self.start_step, end=self.end_step, every=self.update_every) is None:
            return
        if target == 0.0 or target <= self._applied_sparsity:
            return
        if self._groups is not None and not self._groups.ready:  # groups come from the first batch: select then
            self._groups.on_inputs = lambda: self._update_masks(step)
            return
        if self._groups is not None:
            keeps, owned = self._groups.select([p.detach() for p in self._params], self._keeps, self._owned_keeps,
                                               target, self.scope, params=self._all_params)
            agree = (lambda k: k) if self._sharded else D.broadcast_  # FSDP2: each rank's block of one choice
            self._keeps = [None if k is None else agree(k) for k in keeps]
            self._set_owned({name: None if k is None else agree(k) for name, k in owned.items()})
        elif self._sharded:
            self._keeps = self._select_sharded(target)
        else:  # every rank computes the same masks; the broadcast guarantees it (ties, float noise)
            self._keeps = [D.broadcast_(k) for k in self._select([p.detach() for p in self._params], self._keeps, target, self.scope)]
        self._applied_sparsity = target
        self._mask_sparsity = self._count_mask_sparsity()
        self._enforce_masks(grads=True, state=True)
        self._count_sharded_zeros()
        self._warn_layers_at_their_floor()
        if self.manager is not None:
            self.manager.log({f"compress/{self.name}/{k}": v for k, v in self.log_values().items()}, step=step)

    def _select(self, weights, keeps, target: float, scope: str) -> list[torch.Tensor]:
        if self._nm is not None:
            return M.nm_keep_masks(weights, target, *self._nm, keeps=keeps, scope=scope, out_dims=self._out_dims)
        if self.granularity == "channel":
            return M.channel_keep_masks(weights, target, keeps=keeps, scope=scope, out_dims=self._out_dims)
        return M.unstructured_keep_masks(weights, target, keeps=keeps, scope=scope)

    def _warn_layers_at_their_floor(self) -> None:
        """Warn (once per layer) about a layer pruned down to the one weight / channel every layer keeps."""
        if self._nm is not None:
            return  # N:M keeps N of every group
        channel = self.granularity == "channel"
        layers = [(i, p, k) for i, (p, k) in enumerate(zip(self._params, self._keeps)) if k is not None]
        if not layers:
            return
        kept = torch.stack([
            (M.channels_first(k, self._out_dims[i]).amax(1) != 0).sum(dtype=torch.int64) if channel
            else k.sum(dtype=torch.int64) for i, _, k in layers
        ])
        if self._sharded:  # rows (output channels, for the dim-0 layouts allowed here) are split across ranks
            kept = D.sum_over_shards(kept, self._params[0])
        for (i, p, _), count in zip(layers, kept.tolist()):
            units = p.shape[self._out_dims[i]] if channel else p.numel()
            name = self._names[i]
            if count <= 1 < units and name not in self._warned_floor:
                self._warned_floor.add(name)
                unit = "output channel" if channel else "weight"
                warnings.warn(
                    f"GradualMagnitudePruning: {name!r} is pruned down to its last {unit} (of {units}); a layer's last "
                    f"{unit} is never pruned, but its output now barely depends on its input. Lower `target_sparsity`"
                    f"{', use scope=' + repr('layer') if self.scope == 'global' else ''} or leave it out with "
                    f"`exclude=[{name!r}]` if that is not intended",
                    stacklevel=2,
                )

    def _select_sharded(self, target: float) -> list[torch.Tensor]:
        """Masks of FSDP2-sharded weights: this rank's block of the masks a single process would
        compute on the whole weights (ties included). No weight leaves its rank.

        Unstructured and N:M: a radix select over the ranks' blocks with histograms summed over
        ranks, ties allotted in the whole weights' order. (Channel and head: ``GroupSelection.select``.)
        """
        first = self._params[0]
        blocks = [D.local(p.detach()) for p in self._params]
        return sharded_keep_masks(
            blocks, self._keeps, [p.numel() for p in self._params], target, self.scope,
            sum_over_ranks=lambda values: D.sum_over_shards(values, first),
            gather_over_ranks=lambda values: D.gather_over_shards(values, first),
            rank=first.device_mesh.get_local_rank(),
            nm=self._nm,
        )

    @torch.no_grad()
    def _enforce_masks(self, weights: bool = True, grads: bool = False, state: bool = False) -> None:
        """Zero what is pruned in the weights, their gradients and their optimizer state (each if asked)."""
        pairs = [(p, k) for p, k in zip(self._params, self._keeps) if k is not None]
        pairs += [(self._owned[n], k) for n, k in self._owned_keeps.items() if k is not None]
        optimizer_state = self._optimizer.state if state and self._optimizer is not None else {}
        tensors, keeps = [], []
        for p, keep in pairs:
            found = [p.data] if weights else []
            found += [p.grad] if grads and p.grad is not None else []
            found += [v for v in optimizer_state.get(p, {}).values() if torch.is_tensor(v) and v.shape == p.shape]
            tensors += found
            keeps += [keep] * len(found)
        if tensors:
            self._mask_(tensors, keeps)

    def _mask_(self, tensors: list[torch.Tensor], keeps: list[torch.Tensor]) -> None:
        """``t *= keep`` for each pair: the native kernel where it applies, else the scratch path."""
        if self._sharded:
            tensors = [D.local(t) for t in tensors]
        M.apply_keep_(tensors, keeps, None if self._kernel else self._scratch(tensors[0]), self._kernel)

    def _scratch(self, like: torch.Tensor) -> torch.Tensor | None:
        """Float buffer that uint8 masks are converted into on CPU (None elsewhere: GPUs cast on the fly)."""
        if like.device.type != "cpu":
            return None
        key = (like.dtype, like.device)
        if key not in self._scratch_buffers:
            total = sum(p.numel() for p in self._params)
            self._scratch_buffers[key] = torch.empty(min(M.MASK_SCRATCH_ELEMENTS, total), dtype=like.dtype)
        return self._scratch_buffers[key]

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {
            "applied_sparsity": self._applied_sparsity,
            "names": list(self._names),
            # whole masks (gathered from the ranks' blocks under FSDP2: every rank must call this)
            "masks": [None if k is None else D.gather_like(k.detach(), p).to("cpu", torch.bool)
                      for k, p in zip(self._keeps, self._params)],
            "owned_masks": {n: D.gather_like(k.detach(), self._owned[n]).to("cpu", torch.bool)
                            for n, k in self._owned_keeps.items() if k is not None},
        }

    def check_state(self, state: dict[str, Any], model: nn.Module | None) -> None:
        super().check_state(state, model)
        missing = [key for key in ("applied_sparsity", "names", "masks") if key not in state]
        if missing:
            raise ValueError(f"`state` of {self.name} lacks {missing}: it is not a GradualMagnitudePruning state_dict()")
        names, masks, applied = list(state["names"]), list(state["masks"]), state["applied_sparsity"]
        if isinstance(applied, bool) or not isinstance(applied, (int, float)) or not 0.0 <= applied < 1.0:
            raise ValueError(f"`state` of {self.name}: applied_sparsity must be a float in [0, 1), got {applied!r}")
        if len(masks) != len(names) or not all(m is None or torch.is_tensor(m) for m in masks):
            raise ValueError(f"`state` of {self.name}: one mask (or None) per module name is expected")
        if self._params:
            weights = dict(zip(self._names, self._params))
        elif model is not None:
            weights = {name: module.weight for name, module in select_modules(model, modules=self.modules, exclude=self.exclude, warn_shared=False)}
        else:
            return
        if names != list(weights):
            raise ValueError(
                f"`state` of {self.name} holds masks for modules {names[:4]}{'...' if len(names) > 4 else ''}, "
                f"this model's targets are {list(weights)[:4]}{'...' if len(weights) > 4 else ''}"
            )
        for name, mask in zip(names, masks):
            if mask is not None and tuple(mask.shape) != tuple(weights[name].shape):
                raise ValueError(
                    f"`state` of {self.name}: the mask of {name!r} has shape {tuple(mask.shape)}, "
                    f"its weight {tuple(weights[name].shape)}"
                )

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self._params:
            self._restore(state)
            self._enforce_masks(grads=True, state=True)
            self._count_sharded_zeros()
        else:
            self._loaded = state

    def _restore(self, state: dict[str, Any]) -> None:
        self.check_state(state, None)
        keeps = []
        for mask, p in zip(state["masks"], self._params):
            keeps.append(None if mask is None else D.local_block_of(mask.to(torch.uint8), p).to(D.local(p).device))
        self._keeps = keeps
        owned = {}
        for name, mask in state.get("owned_masks", {}).items():
            if name not in self._all_params:
                raise ValueError(f"`state` holds a mask for parameter {name!r}, which this model does not have")
            if tuple(mask.shape) != tuple(self._all_params[name].shape):
                raise ValueError(f"`state` mask of shape {tuple(mask.shape)} does not fit {name!r}")
            param = self._all_params[name]
            owned[name] = D.local_block_of(mask.to(torch.uint8), param).to(D.local(param).device)
        self._set_owned(owned)
        self._applied_sparsity = float(state["applied_sparsity"])
        self._mask_sparsity = self._count_mask_sparsity()

    # ------------------------------------------------------------------ reporting
    def _count_sharded_zeros(self) -> None:
        """FSDP2: count each weight's zeros over all ranks now, while every rank runs this (attach,
        mask updates, resume, finalize), so that reporting needs no collective later: rank 0 alone
        may call ``summary()``."""
        if self._sharded:
            counts = torch.stack([(D.local(p.detach()) == 0).sum(dtype=torch.int64) for p in self._params])
            self._sharded_zeros = [int(c) for c in D.sum_over_shards(counts, self._params[0])]

    def _zero_counts(self) -> list[int]:
        """Exact zeros in each targeted weight (under FSDP2: as counted at the last mask change)."""
        if self._sharded:
            return list(self._sharded_zeros)
        return [int((p.detach() == 0).sum()) for p in self._params]

    def layer_sparsities(self) -> dict[str, float]:
        """Measured fraction of exact zeros in each targeted weight."""
        return {name: zeros / p.numel() for name, p, zeros in zip(self._names, self._params, self._zero_counts())}

    def overall_sparsity(self) -> float:
        """Measured fraction of exact zeros over all targeted weights."""
        total = sum(p.numel() for p in self._params)
        return sum(self._zero_counts()) / total if total else 0.0

    def _count_mask_sparsity(self) -> float:
        total = sum(p.numel() for p in self._params)
        kept = [D.sum_over_shards(k.sum(dtype=torch.int64).reshape(1), p) for p, k in zip(self._params, self._keeps) if k is not None]
        pruned = sum(p.numel() for p, k in zip(self._params, self._keeps) if k is not None) - sum(int(c) for c in kept)
        return pruned / total if total else 0.0

    def log_values(self) -> dict[str, float]:
        """``target_sparsity`` (the schedule's value the masks implement), ``mask_sparsity`` (pruned by the
        masks), ``sparsity/overall`` (measured zeros over all targeted weights), ``sparsity/<statistic>``
        over the layers and ``layer/<module>/sparsity`` (up to ``max_layer_keys`` layers)."""
        if not self._params:
            return {}
        layers = self.layer_sparsities()
        total = sum(p.numel() for p in self._params)
        zeros = sum(value * p.numel() for value, p in zip(layers.values(), self._params))
        return {
            "target_sparsity": self._applied_sparsity,
            "mask_sparsity": self._mask_sparsity,
            "sparsity/overall": zeros / total if total else 0.0,
            **layer_log_values("sparsity", layers, self.max_layer_keys),
        }

    def summary_rows(self) -> list[dict[str, Any]]:
        if not self._params:
            return self._final_rows
        measured = self.layer_sparsities()
        return [
            {
                "module": name,
                "shape": tuple(p.shape),
                "params": p.numel(),
                "target": self._applied_sparsity,
                "sparsity": measured[name],
            }
            for name, p in zip(self._names, self._params)
        ]

    # ------------------------------------------------------------------ read-only views
    @property
    def weights(self) -> Mapping[str, nn.Parameter]:
        """The targeted weights by module name, in selection order (a read-only mapping).

        The live ``Parameter`` objects (under FSDP2 the sharded ones); empty before ``attach`` and
        after ``finalize``.
        """
        return MappingProxyType(dict(zip(self._names, self._params)))

    @property
    def masks(self) -> Mapping[str, torch.Tensor]:
        """The keep masks by module name (a read-only mapping): bool tensors shaped like the weights,
        ``True`` where a weight is kept.

        Copies: changing one changes no pruning. A weight with nothing pruned yet is all ``True``.
        Under FSDP2 each is this rank's block (the shape of the local shard; ``state_dict()`` holds
        the whole masks). Empty before ``attach`` and after ``finalize``.
        """
        masks = {}
        for name, param, keep in zip(self._names, self._params, self._keeps):
            block = D.local(param.detach())
            masks[name] = torch.ones(block.shape, dtype=torch.bool, device=block.device) if keep is None else keep.bool()
        return MappingProxyType(masks)
