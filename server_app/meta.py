"""The meta model: learns how to combine the experts' logits into one prediction.

It reads the ``E x C`` matrix of expert logits as ``E`` tokens (one per expert), as the
released code does, and adds a parameter-free prior to its output: by default the label-share
mixture of the client models' probabilities (``server_app.moe.ProbabilityMixture``), else the
mean of the experts' log-softmax. The prior is also one more token of the gate's input, so the
gate sees what the label counts already say. The final layer starts at zero, so an untrained
meta model *is* its prior and training only has to learn a correction: a meta model fitted on
a few prototypes cannot end up far below the simple ensemble it starts from.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from common.config import MetaTraining
from common.models import Classifier
from server_app.moe import ExpertEnsemble, ProbabilityMixture


class MetaModel(nn.Module):
    """Expert logits ``[B, E, C]`` -> class logits ``[B, C]``.

    Linear ``C -> d_model`` per expert token (``d_model = C^2`` by default, as in the released
    code), plus a learned embedding per expert position: without it the transformer and the sum
    over tokens are blind to which expert said what, and "trust the expert of class c about
    class c" could not be learned. Then a 1-encoder/1-decoder ``nn.Transformer`` (the tokens
    are both source and target), a sum over tokens, and a Linear ``d_model -> C``. ``d_model``
    must be a multiple of ``C`` (``nhead = C``); pass e.g. ``10 * C`` for 100 classes, where
    ``C^2`` would make the model enormous. ``dim_feedforward`` (``meta-feedforward``) defaults
    to the ``nn.Transformer`` default the released code keeps, 2048; at that width its two
    feed-forward layers are most of the meta model's training time on a CPU.
    """

    def __init__(
        self,
        num_experts: int,
        num_classes: int,
        dropout: float = 0.2,
        prior: bool = True,
        d_model: int | None = None,
        dim_feedforward: int = 2048,
    ) -> None:
        super().__init__()
        d_model = d_model or num_classes * num_classes
        if num_experts < 1 or num_classes < 2 or d_model % num_classes:
            raise ValueError(
                f"need num_experts >= 1, num_classes >= 2 and d_model divisible by num_classes,"
                f" got {num_experts}, {num_classes}, {d_model}"
            )
        self.num_experts = num_experts
        self.num_classes = num_classes
        self.prior = prior
        self.expand = nn.Linear(num_classes, d_model)
        # Unit scale (as nn.Embedding): expert identity must be visible next to the logits.
        # With a prior, its log-probabilities are one more token (the last embedding row).
        self.expert_embedding = nn.Parameter(torch.randn(num_experts + int(prior), d_model))
        self.transformer = nn.Transformer(
            d_model=d_model,
            nhead=num_classes,
            num_encoder_layers=1,
            num_decoder_layers=1,
            dim_feedforward=dim_feedforward,
            dropout=dropout,
            batch_first=True,
        )
        self.out = nn.Linear(d_model, num_classes)
        if prior:
            nn.init.zeros_(self.out.weight)
            nn.init.zeros_(self.out.bias)

    def forward(self, expert_logits: Tensor, prior: Tensor | None = None) -> Tensor:
        """``[B, E, C]`` expert logits (and a ``[B, C]`` log-probability prior) -> logits.

        Without ``prior``, a model built with ``prior=True`` uses the mean of the experts'
        log-softmax; a model built with ``prior=False`` refuses one.
        """
        if expert_logits.shape[1:] != (self.num_experts, self.num_classes):
            raise ValueError(
                f"expected [B, {self.num_experts}, {self.num_classes}] expert logits,"
                f" got {tuple(expert_logits.shape)}"
            )
        if not self.prior:
            if prior is not None:
                raise ValueError("this meta model was built without a prior")
            tokens = self.expand(expert_logits) + self.expert_embedding
            return self.out(self.transformer(tokens, tokens).sum(dim=1))
        if prior is None:
            prior = F.log_softmax(expert_logits, dim=-1).mean(dim=1)
        elif prior.shape != (expert_logits.shape[0], self.num_classes):
            raise ValueError(f"expected a [B, {self.num_classes}] prior, got {tuple(prior.shape)}")
        # Normalised, so the token reads the same whatever constant the prior carries.
        prior = F.log_softmax(prior, dim=-1)
        sequence = torch.cat([expert_logits, prior.unsqueeze(1)], dim=1)
        tokens = self.expand(sequence) + self.expert_embedding
        return prior + self.out(self.transformer(tokens, tokens).sum(dim=1))


@dataclass
class MetaTrainResult:
    """What :func:`train_meta_model` selected and how it got there."""

    model: MetaModel
    train_accuracy: float
    val_accuracy: float
    epochs_run: int
    history: list[dict[str, float]] = field(default_factory=list)


def _split(
    targets: Tensor, val_fraction: float, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """Stratified train/val indices: each class gives ``round(val_fraction * n_c)`` samples to
    validation but always keeps one for training. Empty val if nothing can be held out."""
    train, val = [], []
    for c in targets.unique():
        members = (targets == c).nonzero().squeeze(1)
        members = members[torch.randperm(len(members), generator=generator)]
        n_val = min(round(val_fraction * len(members)), len(members) - 1)
        val.append(members[:n_val])
        train.append(members[n_val:])
    return torch.cat(train), torch.cat(val)


@torch.no_grad()
def _evaluate(
    model: nn.Module, inputs: Tensor, priors: Tensor | None, targets: Tensor
) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) in eval mode."""
    model.eval()
    logits = model(inputs, priors)
    accuracy = (logits.argmax(1) == targets).float().mean().item()
    return accuracy, F.cross_entropy(logits, targets).item()


def train_meta_model(
    meta: MetaModel,
    inputs: Tensor,
    targets: Tensor,
    settings: MetaTraining,
    *,
    priors: Tensor | None = None,
    seed: int = 0,
    device: torch.device | str,
    progress: Callable[[str], None] | None = None,
) -> MetaTrainResult:
    """Fit the meta model on precomputed expert logits of prototypes, with early stopping.

    The bank holds only a few prototypes per class, so a held-out share (stratified, seeded)
    picks the epoch with the best validation accuracy (ties: lower validation loss). Training
    stops after ``patience`` epochs that improve neither that accuracy nor the lowest validation
    loss: starting from the prior, accuracy can sit on a plateau while the loss already falls.
    The untrained model (the prior) is a candidate too, so the result is never worse on
    validation than the plain ensemble. With ``ema_decay > 0`` the model that is
    validated and kept is an exponential moving average of the weights (the released code's
    teacher). If no sample can be held out, training uses everything and "validation" is the
    training set.

    Parameters
    ----------
    meta
        The model to train; it is trained in place and returned (in eval mode) with the
        selected weights loaded.
    inputs, targets
        Expert logits ``[N, E, C]`` (``ensemble.heads(prototypes)``) and classes ``[N]``.
    priors
        ``[N, C]`` prior log-probabilities of the same prototypes (``prior.heads(...)``), or
        None for the meta model's default prior (or none, if it was built without one).
    progress
        Receives one short line per epoch (the strategy routes it to Flower's logger).
    """
    epochs, batch_size, patience = settings.epochs, settings.batch_size, settings.patience
    val_fraction, ema_decay = settings.val_fraction, settings.ema_decay
    if inputs.ndim != 3 or targets.shape != inputs.shape[:1] or inputs.shape[0] == 0:
        raise ValueError(
            f"expected inputs [N, E, C] and targets [N] with N > 0, got {tuple(inputs.shape)}"
            f" and {tuple(targets.shape)}"
        )
    if priors is not None and priors.shape != (inputs.shape[0], inputs.shape[2]):
        raise ValueError(
            f"expected priors [N, C] = {(inputs.shape[0], inputs.shape[2])},"
            f" got {tuple(priors.shape)}"
        )
    if epochs < 0 or batch_size < 1 or patience < 1:
        raise ValueError("need epochs >= 0, batch_size >= 1 and patience >= 1")
    if not (0.0 <= val_fraction < 1.0 and 0.0 <= ema_decay < 1.0):
        raise ValueError("val_fraction and ema_decay must lie in [0, 1)")
    generator = torch.Generator().manual_seed(seed)
    inputs, targets = inputs.detach().float().cpu(), targets.detach().long().cpu()
    train_idx, val_idx = _split(targets, val_fraction, generator)
    if len(val_idx) == 0:
        val_idx = train_idx
    meta.to(device)
    train_x, train_y = inputs[train_idx].to(device), targets[train_idx].to(device)
    val_x, val_y = inputs[val_idx].to(device), targets[val_idx].to(device)
    if priors is not None:
        priors = priors.detach().float().cpu()
        train_p, val_p = priors[train_idx].to(device), priors[val_idx].to(device)
    else:
        train_p = val_p = None

    optimizer = torch.optim.Adam(meta.parameters(), lr=settings.lr)
    ema = AveragedModel(meta, multi_avg_fn=get_ema_multi_avg_fn(ema_decay)) if ema_decay else None
    selected = ema.module if ema is not None else meta  # the weights validated and kept
    best_accuracy, best_loss = _evaluate(selected, val_x, val_p, val_y)
    best_state = copy.deepcopy(selected.state_dict())
    lowest_loss = best_loss
    history: list[dict[str, float]] = []
    epoch, stale = 0, 0
    for epoch in range(1, epochs + 1):
        meta.train()
        train_loss = 0.0
        for batch in torch.randperm(len(train_y), generator=generator).split(batch_size):
            batch_prior = None if train_p is None else train_p[batch]
            loss = F.cross_entropy(meta(train_x[batch], batch_prior), train_y[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if ema is not None:
                ema.update_parameters(meta)
            train_loss += loss.item() * len(batch) / len(train_y)
        val_accuracy, val_loss = _evaluate(selected, val_x, val_p, val_y)
        history.append(
            {
                "epoch": epoch,
                "train_loss": train_loss,
                "val_loss": val_loss,
                "val_accuracy": val_accuracy,
            }
        )
        if progress is not None:
            progress(
                f"meta epoch {epoch}/{epochs}: train loss {train_loss:.4f},"
                f" val loss {val_loss:.4f}, val acc {val_accuracy:.3f}"
            )
        # Few prototypes make accuracy ties common; the lower loss breaks them.
        if (val_accuracy, -val_loss) > (best_accuracy, -best_loss):
            best_accuracy, best_loss = val_accuracy, val_loss
            best_state = copy.deepcopy(selected.state_dict())
            stale = 0
        elif val_loss < lowest_loss:
            stale = 0  # still learning: accuracy lags the loss on the way out of the prior
        else:
            stale += 1
            if stale >= patience:
                break
        lowest_loss = min(lowest_loss, val_loss)

    meta.load_state_dict(best_state)
    train_accuracy, _ = _evaluate(meta, train_x, train_p, train_y)
    val_accuracy, _ = _evaluate(meta, val_x, val_p, val_y)
    return MetaTrainResult(meta, train_accuracy, val_accuracy, epoch, history)


class HeadsOnFeatures(nn.Module):
    """``model.heads(body.features(x))``: an expert ensemble or mixture read on one body.

    With ``meta-features = global`` the teacher reads its prior this way, so this is the prior
    a trained meta model has to beat, at one body per image instead of every client model in
    full. Frozen and always in eval mode, like the teacher.
    """

    def __init__(self, model: ExpertEnsemble | ProbabilityMixture, body: Classifier) -> None:
        super().__init__()
        self.model = model
        self.body = body.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> HeadsOnFeatures:
        return super().train(False)

    def forward(self, x: Tensor) -> Tensor:
        return self.model.heads(self.body.features(x))


class MosaicTeacher(nn.Module):
    """The distillation teacher: the meta model over the experts' logits on images.

    ``prior`` (the label-share mixture of the client models) runs beside the experts when the
    meta model takes one from outside. With ``body`` (a classifier: the global model the
    prototypes were taken under), experts and prior apply only their heads to
    ``body.features(x)``, as they did to the prototypes the meta model was trained on; without
    it every expert runs in full, as in the paper's code. The teacher stays in eval mode
    whatever ``train()`` is called with: dropout in the meta model or batch statistics in the
    experts would make its targets noisy.
    """

    def __init__(
        self,
        ensemble: ExpertEnsemble,
        meta: MetaModel,
        prior: ProbabilityMixture | None = None,
        body: Classifier | None = None,
    ) -> None:
        super().__init__()
        if prior is not None and not meta.prior:
            raise ValueError("a prior was given but the meta model was built without one")
        if meta.num_experts != ensemble.num_experts:
            raise ValueError(
                f"meta model expects {meta.num_experts} experts, ensemble has"
                f" {ensemble.num_experts}"
            )
        self.ensemble = ensemble
        self.meta = meta
        self.prior = prior
        self.body = None if body is None else body.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> MosaicTeacher:
        return super().train(False)

    def forward(self, x: Tensor) -> Tensor:
        if self.body is None:
            return self.meta(self.ensemble(x), None if self.prior is None else self.prior(x))
        features = self.body.features(x)
        prior = None if self.prior is None else self.prior.heads(features)
        return self.meta(self.ensemble.heads(features), prior)
