"""Local training with DP-SGD: Poisson-sampled batches, per-record clipping, Gaussian noise.

Every step: each record joins the batch independently with probability q; every record's gradient
is clipped to L2 norm ≤ C; N(0, (σC)²) noise is added to the sum, which is divided by the expected
batch size q·n; SGD with momentum takes the step (post-processing, as is the local objective's
penalty gradient — ``fedgov.objectives``, e.g. FedProx's proximal term —, which depends on the
weights only). That is Opacus' DP-SGD with Poisson sampling and flat clipping,
and what :mod:`privacy.accounting` accounts for: ``steps`` compositions of the subsampled Gaussian
mechanism with (σ, q).

``grad_sample_mode``: ``fused`` computes the clipped sum in one backward pass
(:class:`privacy.dp_sgd.FusedClipper`); ``hooks``/``ghost``/``ew``/``functorch`` hand model,
optimizer and data to Opacus' ``PrivacyEngine.make_private``, whose accountant must then record
exactly the planned (σ, q, steps) — checked after training.

Sampling and noise draw from generators seeded by the caller with a secret of the site (derived
from its signing key), so the server — which knows the run's seed — cannot predict either.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import nn

from clients.training import TrainResult
from fedgov.config import TrainConfig
from fedgov.datasets import Dataset
from fedgov.objectives import LocalObjective, ObjectiveTerm, bind, resolve_objective
from privacy.dp_sgd import FusedClipper


@dataclass(frozen=True)
class DpSgdPlan:
    """One round of DP-SGD at a site: what the accountant composes and the clipping norm."""

    noise_multiplier: float  # σ
    sample_rate: float  # q: each record's probability of joining a batch
    steps: int
    max_grad_norm: float  # C
    num_records: int  # n

    @property
    def expected_batch_size(self) -> float:
        return self.sample_rate * self.num_records

    @property
    def history_entry(self) -> tuple[float, float, int]:
        return (self.noise_multiplier, self.sample_rate, self.steps)


def train_local_dp(
    model: nn.Module,
    rows: Dataset,
    settings: TrainConfig,
    plan: DpSgdPlan,
    *,
    sampling_seed: int,
    noise_seed: int,
    grad_sample_mode: str = "fused",
    objective: LocalObjective | None = None,
    proximal_mu: float = 0.0,
) -> TrainResult:
    """``plan.steps`` DP-SGD steps on ``rows``; ``train_loss`` is the mean loss of the sampled
    records (it stays at the site: it is not differentially private). ``objective``'s penalty
    gradient (or FedProx's for a bare ``proximal_mu``) joins the noisy gradient."""
    if len(rows.y) != plan.num_records:
        raise ValueError(f"plan is for {plan.num_records} records, the site has {len(rows.y)}")
    term = bind(resolve_objective(objective, proximal_mu), model)
    if grad_sample_mode == "fused":
        return _train_fused(model, rows, settings, plan, sampling_seed, noise_seed, term)
    return _train_opacus(
        model, rows, settings, plan, sampling_seed, noise_seed, term, grad_sample_mode
    )


def _train_fused(
    model: nn.Module,
    rows: Dataset,
    settings: TrainConfig,
    plan: DpSgdPlan,
    sampling_seed: int,
    noise_seed: int,
    term: ObjectiveTerm | None,
) -> TrainResult:
    x, y = torch.from_numpy(rows.x), torch.from_numpy(rows.y)
    sampler = torch.Generator().manual_seed(sampling_seed)
    noise = torch.Generator().manual_seed(noise_seed)
    params = list(model.parameters())
    optimizer = torch.optim.SGD(params, lr=settings.lr, momentum=settings.momentum)
    noise_std = plan.noise_multiplier * plan.max_grad_norm
    clipper = FusedClipper(model)
    model.train()
    total_loss, total_rows = 0.0, 0
    try:
        for _ in range(plan.steps):
            chosen = (torch.rand(plan.num_records, generator=sampler) < plan.sample_rate).nonzero()
            batch = chosen.squeeze(1)
            loss_sum, _ = clipper.clipped_gradient_sum(x[batch], y[batch], plan.max_grad_norm)
            total_loss, total_rows = total_loss + loss_sum, total_rows + len(batch)
            with torch.no_grad():
                for p in params:
                    draw = torch.randn(p.shape, generator=noise, dtype=p.dtype)
                    p.grad.add_(draw, alpha=noise_std).div_(plan.expected_batch_size)
            if term is not None:
                term.add_gradient(params)
            optimizer.step()
    finally:
        clipper.remove()
    return TrainResult(
        train_loss=total_loss / max(total_rows, 1), num_examples=plan.num_records, steps=plan.steps
    )


class _Rows(torch.utils.data.Dataset):
    """Rows fetched a batch at a time (``__getitems__``) instead of one tensor per record."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, index: int):
        return self.x[index], self.y[index]

    def __getitems__(self, indices: list[int]):
        if not indices:
            return []  # Opacus' collate turns an empty Poisson batch into zero-row tensors
        index = torch.as_tensor(indices, dtype=torch.long)
        return _Batch(self.x[index], self.y[index])


class _Batch(list):
    """A pre-collated batch that Opacus' empty-batch wrapper and the collate pass through."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        super().__init__([(x, y)])
        self.tensors = (x, y)


def _collate(batch):
    return batch.tensors if isinstance(batch, _Batch) else torch.utils.data.default_collate(batch)


def _train_opacus(
    model: nn.Module,
    rows: Dataset,
    settings: TrainConfig,
    plan: DpSgdPlan,
    sampling_seed: int,
    noise_seed: int,
    term: ObjectiveTerm | None,
    grad_sample_mode: str,
) -> TrainResult:
    from opacus import PrivacyEngine

    x, y = torch.from_numpy(rows.x), torch.from_numpy(rows.y)
    batches_per_epoch = round(1 / plan.sample_rate)
    batch_size = -(-plan.num_records // batches_per_epoch)
    loader = torch.utils.data.DataLoader(_Rows(x, y), batch_size=batch_size, collate_fn=_collate)
    if len(loader) != batches_per_epoch:
        raise ValueError(f"cannot express sampling rate {plan.sample_rate} as Opacus batches")
    optimizer = torch.optim.SGD(model.parameters(), lr=settings.lr, momentum=settings.momentum)
    # Opacus' Poisson sampler draws from torch's global generator: seed it with the site secret.
    torch.manual_seed(sampling_seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Secure RNG turned off": the seeds are site secrets
        engine = PrivacyEngine(accountant="rdp")
        prepared = engine.make_private(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            criterion=nn.CrossEntropyLoss(),
            noise_multiplier=plan.noise_multiplier,
            max_grad_norm=plan.max_grad_norm,
            poisson_sampling=True,
            noise_generator=torch.Generator().manual_seed(noise_seed),
            grad_sample_mode=grad_sample_mode,
        )
    if grad_sample_mode == "ghost":
        private_model, dp_optimizer, criterion, dp_loader = prepared
    else:
        private_model, dp_optimizer, dp_loader = prepared
        criterion = nn.CrossEntropyLoss()
    private_model.train()
    total_loss, total_batches, steps = 0.0, 0, 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        while steps < plan.steps:
            for xb, yb in dp_loader:
                if steps == plan.steps:
                    break
                dp_optimizer.zero_grad(set_to_none=True)
                loss = criterion(private_model(xb), yb)
                loss.backward()
                if len(yb):
                    total_loss, total_batches = total_loss + float(loss.detach()), total_batches + 1
                if term is not None:
                    if dp_optimizer.pre_step():
                        term.add_gradient(dp_optimizer.params)
                        dp_optimizer.original_optimizer.step()
                else:
                    dp_optimizer.step()
                steps += 1
    recorded = [tuple(entry) for entry in engine.accountant.history]
    if recorded != [plan.history_entry]:
        raise RuntimeError(f"Opacus accounted {recorded}, the site planned {plan.history_entry}")
    if hasattr(private_model, "_close"):
        private_model._close()
    return TrainResult(
        train_loss=total_loss / max(total_batches, 1), num_examples=plan.num_records, steps=steps
    )
