"""Score-based samplers of the VP-SDE (Song et al. 2021) against data whose score is known in closed form.

For x_0 ~ N(μ, σ² I) in 64 dimensions, the forward marginal is x_t ~ N(√ᾱ_t μ, (ᾱ_t σ² + 1 − ᾱ_t) I), so the exact ε-prediction is
ε(x, t) = √(1 − ᾱ_t) (x − √ᾱ_t μ) / (ᾱ_t σ² + 1 − ᾱ_t). Every sampler run on it must return N(μ, σ²)."""

import pytest
import torch

from latentdiff import diffusion
from latentdiff.schedulers import DDIMScheduler, ScoreSDEScheduler, scheduler_from_name

DIM = 64
MU, SIGMA = torch.linspace(-1.5, 1.5, DIM), 0.3


def exact_eps(scheduler, x, t):
    ab = scheduler.alphas_cumprod[int(t)]
    return (1 - ab).sqrt() * (x - ab.sqrt() * MU) / (ab * SIGMA**2 + 1 - ab)


def sample(scheduler, steps, n=2000, seed=0):
    generator = torch.Generator().manual_seed(seed)
    scheduler.set_timesteps(steps)
    x = torch.randn(n, DIM, generator=generator)
    for t in scheduler.timesteps:
        x = scheduler.step(exact_eps(scheduler, x, t), t, x, generator=generator).prev_sample
    return x


def config(**kw):
    return dict(beta_schedule="linear", beta_start=1e-4, beta_end=0.02, timestep_spacing="trailing", **kw)


@pytest.mark.parametrize("method, steps", [("sde", 500), ("ode", 500), ("pc", 200)])
def test_each_sampler_returns_the_data_distribution(method, steps):
    x = sample(ScoreSDEScheduler(**config(method=method)), steps)
    torch.testing.assert_close(x.mean(0), MU, atol=0.04, rtol=0)
    torch.testing.assert_close(x.std(0), torch.full((DIM,), SIGMA), atol=0.03, rtol=0)


def test_a_wrong_score_is_caught():  # the check above can fail: a score of the wrong sign scatters the samples
    scheduler = ScoreSDEScheduler(**config(method="sde"))
    scheduler.set_timesteps(200)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2000, DIM, generator=generator)
    for t in scheduler.timesteps:
        x = scheduler.step(-exact_eps(scheduler, x, t), t, x, generator=generator).prev_sample
    assert (x.std(0) - SIGMA).abs().max() > 0.5


def test_pc_runs_one_network_call_per_corrector_step_at_the_time_the_predictor_reached():
    scheduler = ScoreSDEScheduler(**config(method="pc", corrector_steps=2))
    scheduler.set_timesteps(4)
    assert scheduler.timesteps.tolist() == [999, 749, 749, 749, 499, 499, 499, 249, 249, 249]
    with pytest.raises(ValueError, match="expected timestep 999"):
        scheduler.step(torch.zeros(1, DIM), 749, torch.zeros(1, DIM))


def test_the_ode_is_deterministic_and_the_sde_reproducible_from_its_generator():
    ode = ScoreSDEScheduler(**config(method="ode"))
    torch.testing.assert_close(sample(ode, 50, n=8, seed=1), sample(ode, 50, n=8, seed=1), rtol=0, atol=0)
    sde = ScoreSDEScheduler(**config(method="sde"))
    a, b, c = sample(sde, 50, n=8, seed=1), sample(sde, 50, n=8, seed=1), sample(sde, 50, n=8, seed=2)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(a, c)


def test_langevin_dynamics_alone_reaches_the_distribution_of_its_score():
    generator = torch.Generator().manual_seed(0)
    x = MU + torch.randn(2000, DIM, generator=generator)  # three times too wide
    for _ in range(1500):
        score = -(x - MU) / SIGMA**2
        z = torch.randn(x.shape, generator=generator)
        x = diffusion.langevin_step(x, score, diffusion.langevin_step_size(score, z, 0.16, torch.tensor(1.0)), z)
    torch.testing.assert_close(x.mean(0), MU, atol=0.04, rtol=0)
    torch.testing.assert_close(x.std(0), torch.full((DIM,), SIGMA), atol=0.03, rtol=0)


def test_the_steps_are_the_equations():
    x, score, beta, z = torch.randn(3, 2), torch.randn(3, 2), torch.tensor(0.02), torch.randn(3, 2)
    torch.testing.assert_close(diffusion.reverse_sde_step(x, score, beta, z),
                               x + 0.5 * beta * x + beta * score + beta.sqrt() * z)
    torch.testing.assert_close(diffusion.probability_flow_step(x, score, beta), x + 0.5 * beta * (x + score))
    ab_t, ab_s = torch.tensor(0.5), torch.tensor(0.8)
    torch.testing.assert_close(diffusion.vp_beta(ab_t, ab_s), 1 - ab_t / ab_s)
    size = diffusion.langevin_step_size(score, z, 0.1, torch.tensor(0.99))
    torch.testing.assert_close(size, 2 * 0.99 * (0.1 * z.norm(dim=1).mean() / score.norm(dim=1).mean()) ** 2)


def test_the_short_names_load_from_any_models_config():
    ddim = DDIMScheduler(**config())
    for method in ("sde", "ode", "pc"):
        scheduler = scheduler_from_name(method, ddim.config)
        assert isinstance(scheduler, ScoreSDEScheduler) and scheduler.config.method == method
        torch.testing.assert_close(scheduler.alphas_cumprod, ddim.alphas_cumprod)
    with pytest.raises(ValueError, match="method must be one of"):
        ScoreSDEScheduler(method="euler")


@pytest.mark.parametrize("method", ["sde", "ode", "pc"])
def test_the_pipeline_samples_with_each_method(tiny_pipe, method):
    from conftest import seeded

    tiny_pipe.scheduler = scheduler_from_name(method, tiny_pipe.scheduler.config)
    images = tiny_pipe("a red circle", num_inference_steps=4, generator=seeded(0), output_type="np").images
    assert images.shape == (1, 32, 32, 3) and (images >= 0).all() and (images <= 1).all()
    calls = []
    tiny_pipe("a red circle", num_inference_steps=4, generator=seeded(0), output_type="np",
              callback_on_step_end=lambda pipe, i, t, tensors: calls.append(int(t)) or {})
    assert len(calls) == (4 + 3 if method == "pc" else 4)  # pc: one corrector call after each step but the first
