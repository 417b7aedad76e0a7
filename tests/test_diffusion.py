"""The DDPM math against its equations (Ho et al. 2020 and the papers cited in latentdiff/diffusion.py)."""

import math

import pytest
import torch

from latentdiff import diffusion as D

SCHEDULES = [("linear", 1e-4, 0.02), ("scaled_linear", 0.00085, 0.012), ("cosine", 0, 0)]


@pytest.mark.parametrize("name,start,end", SCHEDULES)
@pytest.mark.parametrize("zero_snr", [False, True])
def test_alpha_bar_strictly_decreasing_in_unit_interval(name, start, end, zero_snr):
    ab = D.NoiseSchedule.from_name(name, 1000, start, end, zero_terminal_snr=zero_snr).alphas_cumprod.double()
    assert bool((ab[1:] < ab[:-1]).all())
    if zero_snr:  # Lin et al. 2024: ᾱ_T = 0 exactly, everything before it stays in (0, 1)
        assert ab[-1] == 0 and bool(((ab[:-1] > 0) & (ab[:-1] < 1)).all())
    else:
        assert bool(((ab > 0) & (ab < 1)).all())


def test_zero_terminal_snr_keeps_the_first_step():
    betas = D.make_beta_schedule("scaled_linear", 1000, 0.00085, 0.012)
    before = torch.cumprod(1 - betas, 0)
    after = torch.cumprod(1 - D.rescale_zero_terminal_snr(betas), 0)
    assert after[0] == pytest.approx(before[0].item(), abs=1e-12) and after[-1] == pytest.approx(0, abs=1e-12)


def test_linear_schedule_is_the_papers():
    betas = D.make_beta_schedule("linear", 1000)
    assert betas[0] == pytest.approx(1e-4) and betas[-1] == pytest.approx(0.02)
    cosine = D.make_beta_schedule("cosine", 1000)
    # Nichol & Dhariwal eq. 17: ᾱ_t = f(t)/f(0) with f(t) = cos²((t/T + s)/(1 + s) · π/2)
    f = lambda t: math.cos((t / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    assert torch.cumprod(1 - cosine, 0)[499].item() == pytest.approx(f(500) / f(0), rel=1e-9)


def test_bad_schedule_name_is_named():
    with pytest.raises(ValueError, match="beta_schedule.*'sigmoidal'"):
        D.make_beta_schedule("sigmoidal", 10)


@pytest.mark.parametrize("t", [0, 100, 500, 999])
def test_q_sample_moments_match_closed_form(t):
    schedule = D.NoiseSchedule.from_name("linear", 1000)
    x0 = torch.tensor([1.5, -0.7, 0.0])
    n = 200_000
    g = torch.Generator().manual_seed(t)
    noise = torch.randn(n, 3, generator=g)
    ab = schedule.alpha_bar(torch.full((n,), t), noise)
    xt = D.q_sample(x0.expand(n, 3), noise, ab)
    a = schedule.alphas_cumprod[t].item()
    # Standard errors at n = 2e5 are ≤ 0.0023 (mean) and ≤ 0.0032 (variance): 5 σ bounds.
    torch.testing.assert_close(xt.mean(0), math.sqrt(a) * x0, atol=0.012, rtol=0)
    torch.testing.assert_close(xt.var(0), torch.full((3,), 1 - a), atol=0.016, rtol=0.016)


@pytest.mark.parametrize("t,s", [(1, 0), (10, 9), (500, 499), (999, 998), (600, 400), (961, 921)])
def test_posterior_is_the_bayes_product(t, s):
    """q(x_s | x_t, x_0) ∝ q(x_t | x_s) q(x_s | x_0), integrated numerically on a grid (1-D)."""
    ab = D.NoiseSchedule.from_name("linear", 1000).alphas_cumprod.double()
    ab_t, ab_s = ab[t], ab[s]
    alpha = ab_t / ab_s  # the forward process from s to t: N(√α x_s, (1 − α) I)
    x0, xt = torch.tensor(0.8, dtype=torch.float64), torch.tensor(-0.3, dtype=torch.float64)
    grid = torch.linspace(-6, 6, 600_001, dtype=torch.float64)
    log_p = -((xt - alpha.sqrt() * grid) ** 2) / (2 * (1 - alpha)) - (grid - ab_s.sqrt() * x0) ** 2 / (2 * (1 - ab_s))
    w = torch.exp(log_p - log_p.max())
    w = w / w.sum()
    mean = (w * grid).sum()
    var = (w * (grid - mean) ** 2).sum()
    mu, beta_tilde = D.q_posterior(x0, xt, ab_t, ab_s)
    assert mu.item() == pytest.approx(mean.item(), abs=1e-6)
    assert beta_tilde.item() == pytest.approx(var.item(), rel=1e-4)


@pytest.mark.parametrize("t", [0, 1, 250, 999])
def test_parameterisations_round_trip(t):
    ab = D.NoiseSchedule.from_name("cosine", 1000).alphas_cumprod.double()[t]
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(4, 3, generator=g, dtype=torch.float64), torch.randn(4, 3, generator=g, dtype=torch.float64)
    xt = D.q_sample(x0, eps, ab)
    torch.testing.assert_close(D.predict_eps_from_x0(xt, D.predict_x0_from_eps(xt, eps, ab), ab), eps)
    torch.testing.assert_close(D.predict_x0_from_eps(xt, eps, ab), x0, rtol=1e-6, atol=1e-6 / ab.sqrt().item())
    v = D.predict_v(x0, eps, ab)
    torch.testing.assert_close(D.predict_x0_from_v(xt, v, ab), x0)
    torch.testing.assert_close(D.predict_eps_from_v(xt, v, ab), eps)
    for kind, out in [("epsilon", eps), ("v_prediction", v), ("sample", x0)]:
        assert torch.equal(D.training_target(x0, eps, ab, kind), out)
        x0_hat, eps_hat = D.split_model_output(out, xt, ab, kind)
        torch.testing.assert_close(eps_hat, eps, rtol=1e-6, atol=1e-6 / (1 - ab).sqrt().item())


def test_ancestral_step_is_algorithm_2():
    """x_{t−1} = 1/√α_t (x_t − β_t/√(1 − ᾱ_t) ε_θ) + σ_t z, with σ² = β̃_t or β_t."""
    betas = D.make_beta_schedule("linear", 1000)  # float64 throughout: the identity is exact
    ab = torch.cumprod(1 - betas, 0)
    g = torch.Generator().manual_seed(1)
    xt, eps, z = (torch.randn(5, generator=g, dtype=torch.float64) for _ in range(3))
    for t in (1, 300, 999):
        x0 = D.predict_x0_from_eps(xt, eps, ab[t])
        alpha_t = 1 - betas[t]
        mean = (xt - betas[t] / (1 - ab[t]).sqrt() * eps) / alpha_t.sqrt()
        beta_tilde = (1 - ab[t - 1]) / (1 - ab[t]) * betas[t]
        for variance_type, var in [("fixed_small", beta_tilde), ("fixed_large", betas[t])]:
            got = D.ddpm_step(xt, x0, ab[t], ab[t - 1], z, variance_type)
            torch.testing.assert_close(got, mean + var.sqrt() * z)
        torch.testing.assert_close(D.ddpm_step(xt, x0, ab[t], ab[t - 1], None), mean)


def test_ddim_with_eta_one_has_the_ddpm_variance():
    ab = D.NoiseSchedule.from_name("linear", 1000).alphas_cumprod.double()
    _, beta_tilde = D.q_posterior(torch.zeros(()), torch.zeros(()), ab[700], ab[650])
    assert D.ddim_sigma(ab[700], ab[650], 1.0) ** 2 == pytest.approx(beta_tilde.item(), rel=1e-12)
    assert D.ddim_sigma(ab[700], ab[650], 0.0) == 0
    # η = 0, exact x̂_0 and ε̂: the step lands exactly on q_sample at s.
    x0, eps = torch.randn(3, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    torch.testing.assert_close(D.ddim_step(x0, eps, ab[650], torch.tensor(0.0)), D.q_sample(x0, eps, ab[650]))


def test_classifier_free_guidance():
    g = torch.Generator().manual_seed(2)
    eps_u, eps_c = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    torch.testing.assert_close(D.classifier_free_guidance(eps_u, eps_c, 1.0), eps_c)
    assert torch.equal(D.classifier_free_guidance(eps_u, eps_c, 0.0), eps_u)
    w = 6.5  # Ho & Salimans' (1 + w) ε_c − w ε_u is our s = w + 1
    torch.testing.assert_close(D.classifier_free_guidance(eps_u, eps_c, w + 1), (1 + w) * eps_c - w * eps_u)
    full = D.classifier_free_guidance(eps_u, eps_c, 7.5, guidance_rescale=1.0)
    torch.testing.assert_close(full.std(dim=(1, 2, 3)), eps_c.std(dim=(1, 2, 3)))


def test_min_snr_weights_clip_the_x0_loss_weight_at_gamma():
    ab = torch.tensor([0.999, 0.9, 0.5, 0.01], dtype=torch.float64)
    s = ab / (1 - ab)
    for kind, x0_weight in [("epsilon", s), ("v_prediction", s + 1), ("sample", torch.ones_like(s))]:
        # the loss on x_0 that each parameterisation's unweighted loss implies, times the min-SNR weight
        effective = D.min_snr_weight(ab, 5.0, kind) * x0_weight
        torch.testing.assert_close(effective, torch.clamp(s, max=5.0))
    with pytest.raises(ValueError, match="snr_gamma"):
        D.min_snr_weight(ab, 0.0, "epsilon")


def test_min_snr_weights_at_zero_terminal_snr():
    ab = torch.tensor([0.5, 0.0])  # ᾱ_T = 0 with a zero-terminal-SNR schedule
    assert D.min_snr_weight(ab, 5.0, "epsilon").tolist() == [1.0, 1.0]  # the limit of min(SNR, γ)/SNR
    assert D.min_snr_weight(ab, 5.0, "v_prediction").tolist() == [0.5, 0.0]  # the paper's weight
    x0 = torch.randn(2, 4, 3, 3)
    loss = D.diffusion_loss(torch.zeros_like(x0), x0, torch.randn_like(x0), D.broadcast_to(ab, x0), snr_gamma=5.0)
    assert torch.isfinite(loss)


def test_diffusion_loss_is_zero_at_the_target_and_weighted_per_sample():
    g = torch.Generator().manual_seed(3)
    x0, eps = torch.randn(4, 2, 3, 3, generator=g), torch.randn(4, 2, 3, 3, generator=g)
    ab = D.broadcast_to(torch.tensor([0.99, 0.7, 0.3, 0.05]), x0)
    for kind in D.PREDICTION_TYPES:
        target = D.training_target(x0, eps, ab, kind)
        assert D.diffusion_loss(target, x0, eps, ab, kind, snr_gamma=5.0).item() == pytest.approx(0, abs=1e-12)
    out = eps + 1.0  # error 1 everywhere: the plain loss is 1, the weighted one the mean of the weights
    assert D.diffusion_loss(out, x0, eps, ab).item() == pytest.approx(1.0)
    weights = D.min_snr_weight(ab.flatten(), 5.0, "epsilon")
    assert D.diffusion_loss(out, x0, eps, ab, snr_gamma=5.0).item() == pytest.approx(weights.mean().item(), rel=1e-6)


def test_score_and_classifier_guidance_are_the_same_shift():
    """Adding s∇log p(y|x) to the score is subtracting s√(1−ᾱ)∇log p(y|x) from ε (Dhariwal & Nichol 2021, eq. 14)."""
    ab = torch.tensor(0.3)
    eps, grad = torch.randn(6), torch.randn(6)
    guided = D.classifier_guidance(eps, grad, ab, scale=2.0)
    torch.testing.assert_close(D.score_from_eps(guided, ab), D.score_from_eps(eps, ab) + 2.0 * grad)


def test_snr_floor_raises_the_x0_weight_of_the_noisiest_timesteps_only():
    ab = torch.tensor([0.999, 0.9, 0.5, 0.2, 0.0047], dtype=torch.float64)
    s = ab / (1 - ab)
    for kind, x0_weight in [("epsilon", s), ("v_prediction", s + 1), ("sample", torch.ones_like(s))]:
        effective = D.min_snr_weight(ab, 5.0, kind, floor=1.0) * x0_weight
        torch.testing.assert_close(effective, torch.clamp(torch.clamp(s, max=5.0), min=1.0))
    # SNR ≥ 1: the weights of min-SNR-γ unchanged; t = 999 of SD's schedule: ε weight 1/SNR ≈ 212
    plain, floored = D.min_snr_weight(ab, 5.0, "epsilon"), D.min_snr_weight(ab, 5.0, "epsilon", floor=1.0)
    torch.testing.assert_close(floored[:3], plain[:3])
    assert floored[-1].item() == pytest.approx((1 - 0.0047) / 0.0047)
    # without γ: max(SNR, floor), i.e. plain ε-loss wherever SNR ≥ floor
    torch.testing.assert_close(D.min_snr_weight(ab, None, "epsilon", floor=1.0)[:3], torch.ones(3, dtype=ab.dtype))
    with pytest.raises(ValueError, match="snr_floor"):
        D.min_snr_weight(ab, 5.0, "epsilon", floor=6.0)
    with pytest.raises(ValueError, match="v_prediction"):
        D.min_snr_weight(torch.tensor([0.5, 0.0]), 5.0, "epsilon", floor=1.0)
    x0, eps = torch.randn(5, 2, 3, 3), torch.randn(5, 2, 3, 3)
    out = eps + 1.0
    assert D.diffusion_loss(out, x0, eps, D.broadcast_to(ab.float(), x0), snr_floor=1.0).item() == pytest.approx(
        D.min_snr_weight(ab.float(), None, "epsilon", 1.0).mean().item(), rel=1e-5)
