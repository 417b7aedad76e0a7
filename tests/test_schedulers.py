"""Our DDPM / DDIM schedulers against diffusers' own, step by step, for every schedule and prediction type."""

import diffusers
import pytest
import torch

from latentdiff.schedulers import DDIMScheduler, DDPMScheduler

SCHEDULES = [
    dict(beta_schedule="linear", beta_start=1e-4, beta_end=0.02),
    dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
    dict(beta_schedule="squaredcos_cap_v2"),
    dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, rescale_betas_zero_snr=True),
]
PREDICTIONS = ["epsilon", "v_prediction", "sample"]


def _pair(ours_cls, theirs_cls, **config):
    return ours_cls(**config), theirs_cls(**config)


def _same_schedule(ours, theirs):
    """Check ᾱ agrees, then give ours diffusers' exact float32 ᾱ so that the step equations are compared alone.

    Ours is accumulated in float64 and is ~10x closer to the exact ᾱ (3e-8 vs 2.5e-7 for diffusers' float32
    cumprod); the x_0-parameterisation's ε read-out divides by √(1 − ᾱ_t) ≈ 0.014 at t = 1 of the linear
    schedule, which turns that last-bit difference into ~2e-5 on its own.
    """
    torch.testing.assert_close(ours.alphas_cumprod, theirs.alphas_cumprod, atol=1e-6, rtol=0)
    ours.alphas_cumprod.copy_(theirs.alphas_cumprod)


def _run_chain(ours, theirs, steps, step_kwargs=None, seed=0):
    """Walk a sampling chain, giving both schedulers the same x_t at every step and comparing each step's output
    (a per-step check: float32 rounding must not be allowed to compound along the chain)."""
    step_kwargs = step_kwargs or {}
    ours.set_timesteps(steps)
    theirs.set_timesteps(steps)
    assert ours.timesteps.tolist() == theirs.timesteps.tolist()
    torch.manual_seed(seed)
    x = torch.randn(2, 4, 8, 8)
    for t in ours.timesteps:
        # A smooth stand-in for a network: any fixed function of (x, t) exercises the step equally well.
        model = lambda s: torch.tanh(s) * (0.5 + t.item() / 2000)  # noqa: E731
        out_ours = ours.step(model(x), t, x, generator=torch.Generator().manual_seed(int(t)), **step_kwargs)
        out_theirs = theirs.step(model(x), t, x, generator=torch.Generator().manual_seed(int(t)), **step_kwargs)
        torch.testing.assert_close(out_ours.pred_original_sample, out_theirs.pred_original_sample, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out_ours.prev_sample, out_theirs.prev_sample, atol=1e-5, rtol=1e-5)
        x = out_theirs.prev_sample


@pytest.mark.parametrize("schedule", SCHEDULES, ids=lambda s: s["beta_schedule"] + ("+zsnr" if len(s) > 3 else ""))
@pytest.mark.parametrize("prediction_type", PREDICTIONS)
@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large"])
def test_ddpm_step_matches_diffusers(schedule, prediction_type, variance_type):
    ours, theirs = _pair(DDPMScheduler, diffusers.DDPMScheduler, prediction_type=prediction_type,
                         variance_type=variance_type, **schedule)
    _same_schedule(ours, theirs)
    _run_chain(ours, theirs, steps=20)


@pytest.mark.parametrize("variance_type", [None, "fixed_small_log", "learned", "learned_range"])
def test_every_ddpm_variance_type_diffusers_takes_steps_as_diffusers_does(variance_type):
    """None is what DPM-Solver's config carries (the shipped model's): diffusers reads it as fixed_small. The learned
    variances come from extra output channels (the variance, or v of Nichol & Dhariwal's interpolation)."""
    ours, theirs = _pair(DDPMScheduler, diffusers.DDPMScheduler, variance_type=variance_type,
                         beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    _same_schedule(ours, theirs)
    ours.set_timesteps(20)
    theirs.set_timesteps(20)
    torch.manual_seed(0)
    x = torch.randn(2, 4, 8, 8)
    for t in ours.timesteps[:-1]:
        prediction = torch.tanh(x) * 0.5
        extra = {"learned": torch.rand(2, 4, 8, 8) * 0.01, "learned_range": torch.rand(2, 4, 8, 8) * 2 - 1}
        output = torch.cat([prediction, extra[variance_type]], 1) if variance_type in extra else prediction
        a = ours.step(output, t, x, generator=torch.Generator().manual_seed(int(t))).prev_sample
        b = theirs.step(output, t, x, generator=torch.Generator().manual_seed(int(t))).prev_sample
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        x = b


def test_fixed_large_log_is_fixed_large():
    """diffusers' DDPM returns NaN for fixed_large_log (it takes the square root of log β_t); we read it as the
    variance it names, β_t (GLIDE's "max_log")."""
    large_log, large = DDPMScheduler(variance_type="fixed_large_log"), DDPMScheduler(variance_type="fixed_large")
    for s in (large_log, large):
        s.set_timesteps(10)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = large.timesteps[3]
    a = large_log.step(x * 0.1, t, x, generator=torch.Generator().manual_seed(1)).prev_sample
    b = large.step(x * 0.1, t, x, generator=torch.Generator().manual_seed(1)).prev_sample
    assert torch.isfinite(a).all() and torch.equal(a, b)


def test_a_learned_variance_without_its_channels_is_named():
    ours = DDPMScheduler(variance_type="learned")
    ours.set_timesteps(10)
    x = torch.randn(1, 4, 8, 8)
    with pytest.raises(ValueError, match="variance_type 'learned' takes the variance from the model: its output needs "
                                         "twice the sample's channels"):
        ours.step(x, ours.timesteps[0], x)


@pytest.mark.parametrize("source", ["DPMSolverMultistepScheduler", "EulerDiscreteScheduler", "PNDMScheduler",
                                    "LCMScheduler", "DDPMScheduler", "DDIMScheduler"])
@pytest.mark.parametrize("ours_cls", [DDPMScheduler, DDIMScheduler], ids=["ddpm", "ddim"])
def test_ours_load_from_any_diffusers_scheduler_config_as_diffusers_do(source, ours_cls):
    config = getattr(diffusers, source)(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).config
    theirs = getattr(diffusers, ours_cls.__name__).from_config(config)
    ours = ours_cls.from_config(config)
    ours.set_timesteps(10)
    theirs.set_timesteps(10)
    assert ours.timesteps.tolist() == theirs.timesteps.tolist()
    torch.testing.assert_close(ours.alphas_cumprod.float(), theirs.alphas_cumprod, atol=1e-6, rtol=0)


@pytest.mark.parametrize("schedule", SCHEDULES, ids=lambda s: s["beta_schedule"] + ("+zsnr" if len(s) > 3 else ""))
@pytest.mark.parametrize("prediction_type", PREDICTIONS)
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_step_matches_diffusers(schedule, prediction_type, eta):
    ours, theirs = _pair(DDIMScheduler, diffusers.DDIMScheduler, prediction_type=prediction_type, steps_offset=1,
                         set_alpha_to_one=False, **schedule)
    _same_schedule(ours, theirs)
    _run_chain(ours, theirs, steps=25, step_kwargs=dict(eta=eta))


@pytest.mark.parametrize("spacing,steps", [("linspace", 25), ("trailing", 30), ("trailing", 25), ("leading", 7)])
@pytest.mark.parametrize("ours_cls,theirs_cls", [(DDIMScheduler, diffusers.DDIMScheduler),
                                                 (DDPMScheduler, diffusers.DDPMScheduler)], ids=["ddim", "ddpm"])
def test_every_timestep_spacing_steps_like_diffusers(spacing, steps, ours_cls, theirs_cls):
    """Including diffusers' DDIM rule prev = t − T // n, which for linspace leaves the schedule: a config must mean
    the same thing in both libraries."""
    ours, theirs = _pair(ours_cls, theirs_cls, timestep_spacing=spacing, beta_schedule="scaled_linear",
                         beta_start=0.00085, beta_end=0.012, clip_sample=False)
    _same_schedule(ours, theirs)
    _run_chain(ours, theirs, steps=steps)


@pytest.mark.parametrize("ours_cls,theirs_cls", [(DDIMScheduler, diffusers.DDIMScheduler),
                                                 (DDPMScheduler, diffusers.DDPMScheduler)], ids=["ddim", "ddpm"])
def test_zero_terminal_snr_with_v_prediction_reaches_t_max(ours_cls, theirs_cls):
    ours, theirs = _pair(ours_cls, theirs_cls, timestep_spacing="trailing", rescale_betas_zero_snr=True,
                         prediction_type="v_prediction", beta_schedule="scaled_linear", beta_start=0.00085,
                         beta_end=0.012, clip_sample=False)
    _same_schedule(ours, theirs)
    ours.set_timesteps(10)
    assert int(ours.timesteps[0]) == 999 and float(ours.alphas_cumprod[999]) == 0.0
    _run_chain(ours, theirs, steps=10)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cls", [DDIMScheduler, DDPMScheduler])
def test_reduced_precision_steps_stay_finite_and_close(cls, dtype):
    """Coefficients are computed from float32 ᾱ: in bf16 ᾱ_1 = 0.9983 would round to 1 and give 0/0."""
    sched = cls(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1, clip_sample=False)
    sched.set_timesteps(25)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    x_low = x.to(dtype)
    for t in sched.timesteps:
        x = sched.step(0.5 * x, t, x, generator=torch.Generator().manual_seed(int(t))).prev_sample
        x_low = sched.step(0.5 * x_low, t, x_low, generator=torch.Generator().manual_seed(int(t))).prev_sample
    assert x_low.dtype == dtype and torch.isfinite(x_low).all()
    torch.testing.assert_close(x_low.float(), x, atol=0.1, rtol=0.05)


def test_eta_outside_the_unit_interval_is_named():
    sched = DDIMScheduler()
    sched.set_timesteps(5)
    with pytest.raises(ValueError, match=r"eta must be in \[0, 1\].*got 1.5"):
        sched.step(torch.zeros(1, 4, 2, 2), sched.timesteps[0], torch.zeros(1, 4, 2, 2), eta=1.5)


@pytest.mark.parametrize("spacing", ["leading", "linspace", "trailing"])
def test_timesteps_match_diffusers(spacing):
    for steps in (1, 7, 25, 50, 1000):
        ours, theirs = _pair(DDIMScheduler, diffusers.DDIMScheduler, timestep_spacing=spacing, steps_offset=1)
        ours.set_timesteps(steps)
        theirs.set_timesteps(steps)
        assert ours.timesteps.tolist() == theirs.timesteps.tolist()


def test_epsilon_chain_matches_diffusers_without_sharing_the_schedule():
    """The common case end to end: ε-prediction, SD's schedule, our own ᾱ, per-step agreement to 1e-5."""
    for ours_cls, theirs_cls in [(DDPMScheduler, diffusers.DDPMScheduler), (DDIMScheduler, diffusers.DDIMScheduler)]:
        ours, theirs = _pair(ours_cls, theirs_cls, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                             steps_offset=1, clip_sample=False)
        _run_chain(ours, theirs, steps=25)


def test_ddpm_without_set_timesteps_steps_from_t_to_t_minus_1():
    ours = DDPMScheduler(num_train_timesteps=50)
    assert ours.previous_timestep(10) == 9 and ours.previous_timestep(0) == -1
    ours.set_timesteps(5)
    assert ours.timesteps.tolist() == [40, 30, 20, 10, 0] and ours.previous_timestep(40) == 30


@pytest.mark.parametrize("schedule", SCHEDULES, ids=lambda s: s["beta_schedule"] + ("+zsnr" if len(s) > 3 else ""))
def test_add_noise_and_velocity_match_diffusers(schedule):
    ours, theirs = _pair(DDPMScheduler, diffusers.DDPMScheduler, **schedule)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(6, 4, 8, 8, generator=g), torch.randn(6, 4, 8, 8, generator=g)
    t = torch.tensor([0, 1, 10, 500, 998, 999])
    torch.testing.assert_close(ours.add_noise(x0, noise, t), theirs.add_noise(x0, noise, t), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.get_velocity(x0, noise, t), theirs.get_velocity(x0, noise, t), atol=1e-5, rtol=1e-5)


def test_configs_move_between_libraries(tmp_path):
    ours = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1,
                         prediction_type="v_prediction")
    ours.save_pretrained(tmp_path)
    theirs = diffusers.DDIMScheduler.from_pretrained(tmp_path)
    assert theirs.config.prediction_type == "v_prediction" and theirs.config.beta_schedule == "scaled_linear"
    back = DDIMScheduler.from_config(theirs.config)
    public = lambda c: {k: v for k, v in c.items() if not k.startswith("_")}  # noqa: E731
    assert public(back.config) == public(ours.config)
    # Any diffusers scheduler drops in through from_config, and ours take a diffusers DDPM config.
    dpm = diffusers.DPMSolverMultistepScheduler.from_config(ours.config)
    assert dpm.config.prediction_type == "v_prediction"
    ddpm = DDPMScheduler.from_config(diffusers.DDPMScheduler(variance_type="fixed_large").config)
    assert ddpm.config.variance_type == "fixed_large"


@pytest.mark.parametrize("bad", [dict(prediction_type="x0"), dict(timestep_spacing="random"),
                                 dict(beta_schedule="quadratic")])
def test_bad_config_is_named(bad):
    (key, value), = bad.items()
    with pytest.raises(ValueError, match=f"{key}.*{value}"):
        DDPMScheduler(**bad)


@pytest.mark.parametrize("steps", [0, -3, 1001, 2.5])
def test_bad_step_count_is_named(steps):
    with pytest.raises(ValueError, match="num_inference_steps"):
        DDIMScheduler().set_timesteps(steps)


def test_the_shipped_models_sampler_config_loads_in_our_ddpm_and_ddim():
    """The issue's reproduction: the shipped DPM-Solver++ config carries "variance_type": null, which made
    `latentdiff generate --scheduler ddpm` and LoRA fine-tuning of the shipped model fail."""
    from latentdiff.model_folder import SHIPPED_MODEL_DIR
    from latentdiff.schedulers import scheduler_from_name

    config = diffusers.DPMSolverMultistepScheduler.from_pretrained(SHIPPED_MODEL_DIR / "scheduler").config
    assert config["variance_type"] is None
    for name in ("ddpm", "ddim"):
        scheduler = scheduler_from_name(name, config)
        scheduler.set_timesteps(5)
        x = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
        assert torch.isfinite(scheduler.step(x * 0.1, scheduler.timesteps[0], x).prev_sample).all()
