"""Width sub-models: cut a client's slice out of the global model, and put slices back.

A client at capacity rate ``r`` trains the global architecture built at ``model-width * r``
(so every layer keeps the channel count ``build_classifier`` would give it, rounding included).
Which of the global model's units it holds is the *window* of each layer: HeteroFL's static
slices keep the first ``k`` of ``n`` units; FedRolex's rolling slices keep ``k`` consecutive
units starting at unit ``round mod n``, wrapping around, so every unit is trained as often as
any other over the rounds. Every tensor that reads or writes a layer's units uses the same
window (the architecture's ``width_plan`` says which dimension runs over which layer), so a
slice is itself a working model.

Going back, :meth:`WidthSlicer.embed` writes a slice into a full-size state at its window and
says which coordinates it covers; :func:`average_covered` averages each coordinate over the
states that cover it and keeps the fallback (the previous global value) where none does. FedAvg
across tiers and Mosaic's per-class experts are both that average with other weights.

This module is plain PyTorch: the client slices with it too when it is sent the full model.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from common.models import Classifier, ImageShape, Units, WidthPlan, build_classifier

# Per state-dict key, per dimension: the kept entries of that dimension (None: all of them).
SliceIndex = dict[str, tuple[Tensor | None, ...]]
State = dict[str, Tensor]


class WidthSlicer:
    """Sub-models of one global architecture at capacity rates ``0 < r <= 1``."""

    def __init__(
        self,
        model: str,
        *,
        num_classes: int,
        in_shape: ImageShape,
        model_width: float = 1.0,
        rolling: bool = False,
    ) -> None:
        self.model = model
        self.num_classes = num_classes
        self.in_shape = in_shape
        self.model_width = model_width
        self.rolling = rolling
        self.full = build_classifier(
            model, num_classes=num_classes, in_shape=in_shape, width=model_width
        )
        plan = self.full.width_plan()
        if plan is None:
            raise ValueError(f"model {model!r} has no width plan: width tiers need one")
        self.plan: WidthPlan = plan
        self.units = _unit_counts(plan, self.full.state_dict())
        self._templates: dict[float, Classifier] = {1.0: self.full}

    def template(self, rate: float) -> Classifier:
        """The architecture a client at ``rate`` trains (built once per rate; copy before use)."""
        _check_rate(rate)
        if rate not in self._templates:
            self._templates[rate] = build_classifier(
                self.model,
                num_classes=self.num_classes,
                in_shape=self.in_shape,
                width=self.model_width * rate,
            )
        return self._templates[rate]

    def window_start(self, server_round: int) -> int:
        """Where each layer's kept window starts this round: 0 (static), else the round."""
        return server_round if self.rolling else 0

    def index(self, rate: float, start: int = 0) -> SliceIndex:
        """The kept entries of every tensor for a sub-model at ``rate`` whose windows start at
        unit ``start`` (mod each layer's unit count). Rate 1 keeps everything in place."""
        if rate == 1.0:
            return {key: (None,) * len(dims) for key, dims in self.plan.items()}
        sub_units = _unit_counts(self.plan, self.template(rate).state_dict())
        kept = {}
        for group, n in self.units.items():
            k = sub_units[group]
            kept[group] = (start % n + torch.arange(k)) % n
        index: SliceIndex = {}
        for key, dims in self.plan.items():
            index[key] = tuple(None if units is None else _expand(kept, units) for units in dims)
        return index

    def slice(self, state: Mapping[str, Tensor], rate: float, start: int = 0) -> State:
        """The sub-model at ``rate`` (windows from ``start``) cut out of a full-size state."""
        if rate == 1.0:
            return {key: tensor.clone() for key, tensor in state.items()}
        out = {}
        for key, dims in self.index(rate, start).items():
            tensor = state[key]
            for dim, kept in enumerate(dims):
                if kept is not None:
                    tensor = tensor.index_select(dim, kept.to(tensor.device))
            out[key] = tensor.clone() if tensor is state[key] else tensor
        return out

    def embed(
        self, sub_state: Mapping[str, Tensor], rate: float, start: int, base: Mapping[str, Tensor]
    ) -> tuple[State, dict[str, Tensor]]:
        """``base`` with the sub-model written at its window, and per key a bool mask of the
        coordinates the sub-model covers."""
        states, masks = {}, {}
        for key, dims in self.index(rate, start).items():
            full = base[key].clone()
            mask = torch.zeros(full.shape, dtype=torch.bool, device=full.device)
            grid = _grid(dims, full.shape, full.device)
            full[grid] = sub_state[key].to(full.device, full.dtype)
            mask[grid] = True
            states[key], masks[key] = full, mask
        return states, masks

    def padded(self, sub_state: Mapping[str, Tensor], rate: float, start: int = 0) -> State:
        """The sub-model as a full-size model that computes exactly what it computes: zeros
        everywhere outside its window (a unit with zero BatchNorm scale and shift outputs 0,
        and zero weights read nothing from it), so ensembles and heads treat every client's
        model alike."""
        zeros = {key: torch.zeros_like(tensor) for key, tensor in self.full.state_dict().items()}
        return self.embed(sub_state, rate, start, zeros)[0]

    def covers(self, state: Mapping[str, Tensor]) -> float | None:
        """The rate whose shapes ``state`` has among the built templates, or None."""
        shapes = {key: tuple(tensor.shape) for key, tensor in state.items()}
        for rate, template in self._templates.items():
            if shapes == {k: tuple(v.shape) for k, v in template.state_dict().items()}:
                return rate
        return None


class SlicedView(nn.Module):
    """A width sub-model whose weights are a slice of a full model's, taken on every call, so
    that a loss on its outputs trains the full model's coordinates it reads (distilling the
    tiers' sub-models together with the full model). Always in eval mode: BatchNorm reads the
    sliced running statistics, as the full model's frozen BatchNorm does."""

    def __init__(self, slicer: WidthSlicer, full: nn.Module, rate: float, start: int = 0) -> None:
        super().__init__()
        # Lists, so that neither is a submodule: the view has no weights of its own, every
        # tensor the template computes with is a slice of the full model's, passed per call.
        self._full = [full]
        self._template = [copy.deepcopy(slicer.template(rate)).eval().requires_grad_(False)]
        self.index = slicer.index(rate, start)

    def train(self, mode: bool = True) -> SlicedView:
        return super().train(False)

    def forward(self, x: Tensor) -> Tensor:
        full = self._full[0]
        tensors = {**dict(full.named_parameters()), **dict(full.named_buffers())}
        sliced = {}
        for key, dims in self.index.items():
            tensor = tensors[key]
            for dim, kept in enumerate(dims):
                if kept is not None:
                    tensor = tensor.index_select(dim, kept.to(tensor.device))
            sliced[key] = tensor
        return torch.func.functional_call(self._template[0], sliced, (x,))


def average_covered(
    states: Sequence[Mapping[str, Tensor]],
    masks: Sequence[Mapping[str, Tensor]],
    weights: Sequence[float],
    fallback: Mapping[str, Tensor],
) -> State:
    """Each coordinate's weighted mean over the states that cover it; ``fallback`` where none
    with a positive weight does.

    Floating tensors (BatchNorm running statistics included: they describe the data the weights
    were fitted on) are averaged in float64; integer tensors (``num_batches_tracked``) take the
    maximum over the covering states.
    """
    if not (len(states) == len(masks) == len(weights)) or not states:
        raise ValueError("need one mask and one weight per state, and at least one state")
    w = torch.tensor([float(x) for x in weights], dtype=torch.float64)
    out = {}
    for key, ref in fallback.items():
        stacked = torch.stack([state[key] for state in states])
        shape = (-1,) + (1,) * ref.dim()
        cover = torch.stack([mask[key] for mask in masks]) & (w > 0).view(shape)
        if ref.is_floating_point():
            weight = cover.to(torch.float64) * w.view(shape)
            total = weight.sum(dim=0)
            mean = (weight * stacked.to(torch.float64)).sum(dim=0) / total.clamp_min(1e-300)
            out[key] = torch.where(total > 0, mean.to(ref.dtype), ref)
        else:
            lowest = torch.iinfo(ref.dtype).min
            largest = torch.where(cover, stacked, torch.full_like(stacked, lowest)).amax(dim=0)
            out[key] = torch.where(cover.any(dim=0), largest, ref)
    return out


def _check_rate(rate: float) -> None:
    if not 0.0 < rate <= 1.0:
        raise ValueError(f"a capacity rate is in (0, 1], got {rate}")


def _unit_counts(plan: WidthPlan, state: Mapping[str, Tensor]) -> dict[str, int]:
    """Each group's unit count, read off the tensors' shapes (and checked to agree)."""
    if set(plan) != set(state):
        differ = sorted(set(plan) ^ set(state))
        raise ValueError(f"width plan keys differ from the state's: {differ}")
    counts: dict[str, int] = {}
    for key, dims in plan.items():
        for size, units in zip(state[key].shape, dims, strict=True):
            if units is None:
                continue
            n = size // units.block
            if counts.setdefault(units.group, n) != n or n * units.block != size:
                raise ValueError(f"{key}: {size} entries do not fit group {units.group!r}")
    return counts


def _expand(kept: Mapping[str, Tensor], units: Units) -> Tensor:
    """The entries of a dimension whose units are ``kept[units.group]``, ``block`` per unit."""
    units_kept = kept[units.group]
    if units.block == 1:
        return units_kept
    return (units_kept[:, None] * units.block + torch.arange(units.block)).reshape(-1)


def _grid(dims: tuple[Tensor | None, ...], shape: torch.Size, device: torch.device) -> tuple:
    """Broadcast index tensors selecting the kept entries of every dimension at once."""
    if not dims:
        return ()
    grid = []
    for dim, kept in enumerate(dims):
        entries = torch.arange(shape[dim]) if kept is None else kept
        view = [1] * len(dims)
        view[dim] = -1
        grid.append(entries.view(view).to(device))
    return tuple(grid)
