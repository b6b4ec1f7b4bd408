"""Privacy maths: accountants against independent ones, DP-FedAvg, DP-SGD's clipping and noise.

Every ε fedgov prints comes from ``privacy.accounting.epsilon`` (Opacus); here it is reproduced
within 1% by computations that share no code with it: Rényi divergences by numerical integration
(RDP) and Google dp-accounting's PLD accountant (PRV).
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from clients.dp_training import DpSgdPlan, train_local_dp
from fedgov.config import TrainConfig
from fedgov.datasets import Dataset, load_dataset
from fedgov.models import MLP, GaborLinear, LogisticRegression, SmallCNN
from privacy.accounting import (
    MAX_NOISE_MULTIPLIER,
    epsilon,
    epsilon_after,
    history_extends,
    independent_epsilon,
    noise_multiplier_for,
    normalise_history,
    steps_per_round,
)
from privacy.dp_sgd import FusedClipper, UnsupportedModel, conv2d_per_record_weight_grads
from privacy.site_dp import (
    clip_update,
    dropout_decision,
    effective_noise_multiplier,
    noise_share_std,
    noisy_mean_update,
    poisson_sample,
    update_norm,
)

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook")


# ---- accounting ----------------------------------------------------------------------------------
def test_flower_notes_figures_are_reproduced_by_both_accountants():
    # Measured with Flower's RdpAccountant: z = 1.0, q = 1, ε(δ=1e-5) after 1 / 2 / 3 releases.
    for releases, expected in ((1, 4.73), (2, 7.08), (3, 9.01)):
        assert epsilon([(1.0, 1.0, releases)], 1e-5) == pytest.approx(expected, abs=0.005)
        assert independent_epsilon([(1.0, 1.0, releases)], 1e-5) == pytest.approx(
            expected, abs=0.005
        )


def test_opacus_composition_figures_from_the_notes():
    # 16 steps, q = 0.125, σ = 1.1: 3.91 (rdp), 3.36 (prv) in docs/flower-1.42-notes.md.
    assert epsilon([(1.1, 0.125, 16)], 1e-5, "rdp") == pytest.approx(3.91, abs=0.01)
    assert epsilon([(1.1, 0.125, 16)], 1e-5, "prv") == pytest.approx(3.36, abs=0.02)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    sigma=st.floats(0.5, 6.0),
    rate=st.floats(0.001, 1.0),
    steps=st.integers(1, 400),
    delta_exp=st.integers(4, 7),
)
def test_rdp_epsilon_matches_numerical_integration_within_one_percent(
    sigma, rate, steps, delta_exp
):
    history = [(sigma, rate, steps), (sigma * 1.3, rate / 2, steps // 2 + 1)]
    ours = epsilon(history, 10.0**-delta_exp, "rdp")
    other = independent_epsilon(history, 10.0**-delta_exp, "rdp")
    assert abs(ours - other) / other < 0.01, (history, ours, other)


def test_integer_order_moments_match_dp_accounting():
    """A third implementation for the orders dp-accounting evaluates exactly (integers)."""
    from dp_accounting.rdp.rdp_privacy_accountant import _compute_rdp_poisson_subsampled_gaussian

    from privacy.accounting import log_moment_by_integration

    orders = np.arange(2, 40, dtype=float)
    for sigma, rate in ((0.7, 0.01), (1.1, 0.125), (2.0, 0.5), (1.0, 1.0)):
        ours = log_moment_by_integration(sigma, rate, orders) / (orders - 1)
        theirs = _compute_rdp_poisson_subsampled_gaussian(rate, sigma, orders)
        np.testing.assert_allclose(ours, theirs, rtol=1e-6)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sigma=st.floats(0.7, 3.0), rate=st.floats(0.005, 0.5), steps=st.integers(5, 300))
def test_prv_epsilon_matches_a_pld_accountant_within_one_percent(sigma, rate, steps):
    history = [(sigma, rate, steps)]
    ours = epsilon(history, 1e-5, "prv")
    if not 0.1 < ours < 30:
        return
    other = independent_epsilon(history, 1e-5, "prv")
    assert abs(ours - other) / other < 0.01, (history, ours, other)


@settings(max_examples=25, deadline=None)
@given(
    sigma=st.floats(0.5, 5.0),
    rate=st.floats(0.001, 1.0),
    steps=st.integers(1, 200),
    more=st.integers(1, 200),
)
def test_epsilon_grows_with_steps_and_falls_with_noise(sigma, rate, steps, more):
    base = epsilon([(sigma, rate, steps)], 1e-5)
    assert epsilon([(sigma, rate, steps + more)], 1e-5) >= base - 1e-12
    assert epsilon([(sigma * 1.5, rate, steps)], 1e-5) <= base + 1e-12
    # composing round by round is composing all at once
    assert epsilon_after([(sigma, rate, steps)], (sigma, rate, more), 1e-5) == pytest.approx(
        epsilon([(sigma, rate, steps + more)], 1e-5)
    )


def test_history_normalisation_and_extension():
    assert normalise_history([(1.0, 0.1, 3), (1.0, 0.1, 2), (2.0, 0.1, 0), (0.5, 1, 1)]) == [
        (1.0, 0.1, 5),
        (0.5, 1.0, 1),
    ]
    assert history_extends([(1.0, 0.1, 3)], [(1.0, 0.1, 5), (2.0, 0.1, 1)])
    assert not history_extends([(1.0, 0.1, 6)], [(1.0, 0.1, 5)])
    assert not history_extends([(1.0, 0.2, 3)], [(1.0, 0.1, 5)])
    with pytest.raises(ValueError):
        normalise_history([(0.0, 0.1, 1)])
    with pytest.raises(ValueError):
        normalise_history([(1.0, 1.5, 1)])


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_noise_for_a_target_spends_at_most_the_target(accountant):
    rate, steps = 0.02, 250
    sigma = noise_multiplier_for(3.0, 1e-5, rate, steps, accountant)
    spent = epsilon([(sigma, rate, steps)], 1e-5, accountant)
    assert 3.0 * 0.99 <= spent <= 3.0
    assert independent_epsilon([(sigma, rate, steps)], 1e-5, accountant) == pytest.approx(
        spent, rel=0.01
    )
    with pytest.raises(ValueError, match="unreachable"):
        noise_multiplier_for(1e-4, 1e-5, 1.0, 10_000, accountant)
    assert MAX_NOISE_MULTIPLIER == 100.0


def test_sampling_rate_and_steps_are_opacus_data_loader_s():
    from opacus.data_loader import DPDataLoader

    for records, batch in ((777, 32), (1000, 256), (5, 5), (64, 64), (100, 7)):
        rate, steps = steps_per_round(records, batch, local_epochs=3)
        x = torch.zeros(records, 2)
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x), batch_size=batch)
        dp_loader = DPDataLoader.from_data_loader(loader)
        assert rate == dp_loader.sample_rate == 1 / len(loader)
        assert steps == 3 * len(dp_loader)


# ---- site-level DP (DP-FedAvg) ------------------------------------------------------------------
@settings(max_examples=50, deadline=None)
@given(
    scale=st.floats(1e-3, 1e3),
    norm=st.floats(0.01, 10.0),
    seed=st.integers(0, 2**31),
)
def test_clipping_bounds_the_update_norm_and_keeps_its_direction(scale, norm, seed):
    rng = np.random.default_rng(seed)
    update = {"a": rng.normal(size=(4, 3)) * scale, "b": rng.normal(size=5) * scale}
    clipped, original = clip_update(update, norm)
    assert original == pytest.approx(update_norm(update))
    assert update_norm(clipped) <= norm * (1 + 1e-9)
    factor = min(1.0, norm / original)
    for name in update:
        np.testing.assert_allclose(clipped[name], update[name] * factor, rtol=1e-12)


def test_noisy_mean_has_the_calibrated_noise():
    rng = np.random.default_rng(1)
    total = {"w": np.zeros(200_000)}
    mean = noisy_mean_update(
        total, noise_multiplier=1.5, clipping_norm=2.0, expected_sites=4, rng=rng
    )
    assert mean["w"].std() == pytest.approx(1.5 * 2.0 / 4, rel=0.01)
    assert abs(mean["w"].mean()) < 0.01


@settings(max_examples=50, deadline=None)
@given(
    z=st.floats(0.1, 5),
    clip=st.floats(0.1, 5),
    survivors=st.integers(0, 50),
    needed=st.integers(1, 50),
)
def test_noise_shares_of_the_survivors_add_up_to_the_effective_noise(z, clip, survivors, needed):
    share = noise_share_std(z, clip, needed)
    total_std = share * math.sqrt(survivors)
    assert effective_noise_multiplier(z, survivors, needed) * clip == pytest.approx(total_std)
    if survivors >= needed:
        assert total_std >= z * clip * (1 - 1e-12)
        assert dropout_decision(survivors, needed, "abort") == "ok"
    else:
        assert dropout_decision(survivors, needed, "abort") == "abort"
        assert dropout_decision(survivors, needed, "account") == "account"


def test_poisson_site_sampling_includes_each_site_at_its_rate():
    rng = np.random.default_rng(0)
    sites = [f"s{i}" for i in range(10)]
    counts = dict.fromkeys(sites, 0)
    for _ in range(4000):
        for site in poisson_sample(sites, 0.3, rng):
            counts[site] += 1
    assert all(abs(c / 4000 - 0.3) < 0.03 for c in counts.values())
    assert poisson_sample(sites, 1.0, rng) == sorted(sites)


# ---- DP-SGD: fused per-record clipping ----------------------------------------------------------
class _StridedNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, kernel_size=3, stride=2, padding=1)
        self.head = nn.Linear(3 * 4 * 4, 4, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv(x)).flatten(1))


@pytest.mark.parametrize(
    ("model", "shape", "classes"),
    [
        (MLP(16, 3, 32), (16,), 3),
        (LogisticRegression(10, 2), (10,), 2),
        (SmallCNN((1, 28, 28), 10, 8), (1, 28, 28), 10),
        (SmallCNN((1, 8, 8), 10, 4), (1, 8, 8), 10),
        (_StridedNet(), (2, 8, 8), 4),
        (GaborLinear((1, 28, 28), 10), (1, 28, 28), 10),
    ],
)
def test_fused_clipping_equals_opacus_per_sample_clipping(model, shape, classes):
    from opacus import GradSampleModule

    torch.manual_seed(0)
    x = torch.randn(23, *shape)
    y = torch.randint(0, classes, (23,))
    reference = GradSampleModule(copy.deepcopy(model), loss_reduction="sum")
    nn.functional.cross_entropy(reference(x), y, reduction="sum").backward()
    per_sample = [p.grad_sample for p in reference.parameters()]
    norms = torch.stack([g.flatten(1).norm(dim=1) for g in per_sample], 1).norm(dim=1)
    max_norm = float(norms.median())  # half the records get clipped
    scale = (max_norm / (norms + 1e-6)).clamp(max=1)
    expected = [torch.einsum("b,b...->...", scale, g) for g in per_sample]

    clipper = FusedClipper(model)
    _, fused_norms = clipper.clipped_gradient_sum(x, y, max_norm)
    torch.testing.assert_close(fused_norms, norms, rtol=1e-4, atol=1e-5)
    for parameter, reference_grad in zip(model.parameters(), expected, strict=True):
        torch.testing.assert_close(parameter.grad, reference_grad, rtol=1e-4, atol=1e-5)
    clipper.remove()


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_fused_clipping_is_exact_for_either_image_layout(memory_format):
    """Grey images sliced from a NumPy array may arrive channels-last (channel stride 1): the
    network then runs channels-last and so do its output gradients; per-record norms and the
    clipped sum must not depend on it. Reference: a naive loop, one record's backward at a time."""
    torch.manual_seed(3)
    model = SmallCNN((1, 28, 28), 10, 8)
    x = torch.randn(9, 1, 28, 28).contiguous(memory_format=memory_format)
    y = torch.randint(0, 10, (9,))
    per_record = []
    for i in range(len(y)):
        model.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1], reduction="sum").backward()
        per_record.append([p.grad.detach().clone() for p in model.parameters()])
    norms = torch.stack([torch.cat([g.flatten() for g in grads]).norm() for grads in per_record])
    max_norm = float(norms.median())
    scale = (max_norm / (norms + 1e-6)).clamp(max=1)
    expected = [
        sum(s * grads[k] for s, grads in zip(scale, per_record, strict=True))
        for k in range(len(per_record[0]))
    ]
    model.zero_grad(set_to_none=True)
    clipper = FusedClipper(model)
    _, fused_norms = clipper.clipped_gradient_sum(x, y, max_norm)
    clipper.remove()
    torch.testing.assert_close(fused_norms, norms, rtol=1e-4, atol=1e-5)
    for parameter, reference_grad in zip(model.parameters(), expected, strict=True):
        torch.testing.assert_close(parameter.grad, reference_grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize(("channels_in", "padding"), [(1, 1), (1, 0), (3, 1)])
def test_conv_per_record_gradients_equal_unfold_in_either_layout(
    memory_format, channels_in, padding
):
    torch.manual_seed(2)
    layer = nn.Conv2d(channels_in, 5, kernel_size=3, padding=padding)
    inputs = torch.randn(4, channels_in, 9, 7)
    grads = torch.randn(4, 5, 9 - 2 * (1 - padding), 7 - 2 * (1 - padding))
    expected = torch.bmm(grads.flatten(2), nn.functional.unfold(inputs, 3, padding=padding).mT)
    got = conv2d_per_record_weight_grads(
        layer,
        inputs.contiguous(memory_format=memory_format),
        grads.contiguous(memory_format=memory_format),
    )
    torch.testing.assert_close(got, expected)


def test_grouped_conv_per_record_gradients_equal_unfold():
    torch.manual_seed(1)
    layer = nn.Conv2d(3, 5, kernel_size=3, padding=1)
    inputs, grads = torch.randn(4, 3, 9, 7), torch.randn(4, 5, 9, 7)
    expected = torch.bmm(grads.flatten(2), nn.functional.unfold(inputs, 3, padding=1).mT)
    torch.testing.assert_close(conv2d_per_record_weight_grads(layer, inputs, grads), expected)


def test_layers_the_fused_pass_cannot_clip_are_refused():
    with pytest.raises(UnsupportedModel):
        FusedClipper(nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3)))
    with pytest.raises(UnsupportedModel):
        FusedClipper(nn.Sequential(nn.Conv2d(2, 2, 3, groups=2)))


def _rows(n: int, seed: int = 0) -> Dataset:
    data = load_dataset("synthetic", seed=seed, num_sites=2)
    return data.subset(np.arange(n) % len(data.y))


def test_dp_sgd_noise_has_the_calibrated_standard_deviation():
    """One step with σ = 1000: the clipped gradients (norm ≤ 1 in all) vanish next to the noise,
    so the update is the noise, of std lr·σ·C / (q·n) per coordinate."""
    rows = _rows(400)
    model = MLP(rows.x.shape[1], 2, 64)
    start = [p.detach().clone() for p in model.parameters()]
    plan = DpSgdPlan(
        noise_multiplier=1000.0, sample_rate=0.25, steps=1, max_grad_norm=1.0, num_records=400
    )
    settings_ = TrainConfig(lr=1.0, momentum=0.0)
    train_local_dp(model, rows, settings_, plan, sampling_seed=1, noise_seed=2)
    moved = torch.cat(
        [(s - p.detach()).flatten() for s, p in zip(start, model.parameters(), strict=True)]
    )
    expected_std = 1.0 * 1000.0 * 1.0 / (0.25 * 400)
    assert float(moved.std()) == pytest.approx(expected_std, rel=0.05)
    assert abs(float(moved.mean())) < 0.05 * expected_std


def test_dp_sgd_is_deterministic_in_its_secret_seeds_and_the_noise_depends_on_them():
    rows = _rows(300)
    plan = DpSgdPlan(1.0, 0.1, 20, 1.0, 300)

    def run(noise_seed: int) -> torch.Tensor:
        torch.manual_seed(0)
        model = MLP(rows.x.shape[1], 2, 32)
        train_local_dp(model, rows, TrainConfig(), plan, sampling_seed=5, noise_seed=noise_seed)
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    assert torch.equal(run(1), run(1))
    assert not torch.equal(run(1), run(2))


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_opacus_modes_train_and_account_exactly_the_plan(mode):
    rows = _rows(300)
    rate, steps = steps_per_round(300, 64, 1)
    plan = DpSgdPlan(1.0, rate, steps, 1.0, 300)
    torch.manual_seed(0)
    model = MLP(rows.x.shape[1], 2, 32)
    before = [p.detach().clone() for p in model.parameters()]
    result = train_local_dp(
        model,
        rows,
        TrainConfig(batch_size=64),
        plan,
        sampling_seed=1,
        noise_seed=2,
        grad_sample_mode=mode,
        proximal_mu=0.1,
    )
    # train_local_dp raises if Opacus' accountant recorded anything but (σ, q, steps)
    assert result.steps == steps
    assert any(
        not torch.equal(b, p.detach()) for b, p in zip(before, model.parameters(), strict=True)
    )


@settings(max_examples=50, deadline=None)
@given(z=st.floats(0.1, 5), survivors=st.integers(1, 50), needed=st.integers(1, 50))
def test_a_site_is_protected_by_the_other_survivors_shares_only(z, survivors, needed):
    """Add/remove one site: its own noise share leaves with it, so the noise protecting it is
    the other s − 1 shares of std z·C/√t each: z·√((s−1)/t) (0 for a lone survivor)."""
    from privacy.site_dp import protected_noise_multiplier

    clip = 1.7
    others_std = noise_share_std(z, clip, needed) * math.sqrt(survivors - 1)
    assert protected_noise_multiplier(z, survivors, needed) * clip == pytest.approx(others_std)
    assert protected_noise_multiplier(z, survivors, needed) < effective_noise_multiplier(
        z, survivors, needed
    )
