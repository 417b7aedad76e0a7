"""DDPM and DDIM samplers built on `latentdiff.diffusion`, exposed through diffusers' scheduler contract.

They take the same config keys and carry the same class names as diffusers' `DDPMScheduler` and `DDIMScheduler`,
so a `scheduler_config.json` written by either library loads in the other and gives the same samples, and any
diffusers scheduler can be swapped in with `pipe.scheduler = X.from_config(pipe.scheduler.config)`.

The step coefficients are computed from float32 ᾱ and only then meet the sample, whatever its dtype: in bf16,
ᾱ_1 = 0.9983 would round to 1 and turn 1 − ᾱ into 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from numbers import Integral

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers, SchedulerMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from . import diffusion
from .argparsing import SCHEDULER_NAMES  # defined there: the CLI reads them without torch

TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
SDE_METHODS = ("sde", "ode", "pc")


@dataclass
class SchedulerOutput(BaseOutput):
    """`prev_sample` is x_{t−1} (or x_s for a strided step); `pred_original_sample` is the model's x̂_0."""

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor | None = None


class _GaussianScheduler(SchedulerMixin, ConfigMixin):
    """What DDPM and DDIM share: the noise schedule, timestep spacing, `add_noise` and the x̂_0 read-out."""

    _compatibles = [e.name for e in KarrasDiffusionSchedulers]
    order = 1
    init_noise_sigma = 1.0

    def _setup(self, config) -> None:
        diffusion.check_prediction_type(config.prediction_type)
        if config.timestep_spacing not in TIMESTEP_SPACINGS:
            raise ValueError(f"timestep_spacing must be one of {TIMESTEP_SPACINGS}, got {config.timestep_spacing!r}")
        if config.trained_betas is not None:
            betas = torch.tensor(config.trained_betas, dtype=torch.float64)
        else:
            betas = diffusion.make_beta_schedule(
                config.beta_schedule, config.num_train_timesteps, config.beta_start, config.beta_end
            )
        if config.rescale_betas_zero_snr:
            betas = diffusion.rescale_zero_terminal_snr(betas)
        # With rescale_betas_zero_snr, ᾱ_T = 0 exactly: x̂_0 is then defined for v- and x_0-prediction only, which is
        # why Lin et al. 2024 pair zero terminal SNR with v-prediction.
        self.schedule = schedule = diffusion.NoiseSchedule(betas)
        self.betas, self.alphas, self.alphas_cumprod = schedule.betas, schedule.alphas, schedule.alphas_cumprod
        self.num_inference_steps: int | None = None
        self.timesteps = torch.from_numpy(np.arange(config.num_train_timesteps)[::-1].copy())

    def scale_model_input(self, sample: torch.Tensor, timestep: int | None = None) -> torch.Tensor:
        """DDPM and DDIM feed x_t to the network as it is."""
        return sample

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """Choose the n sampling timesteps (descending) out of the T training ones, by `timestep_spacing`
        (Lin et al. 2024, Table 2: "leading", "linspace", "trailing")."""
        T, n = self.config.num_train_timesteps, num_inference_steps
        if isinstance(n, bool) or not isinstance(n, Integral) or not 1 <= n <= T:
            raise ValueError(f"num_inference_steps must be an integer in [1, {T}] (num_train_timesteps), got {n!r}")
        spacing = self.config.timestep_spacing
        if spacing == "linspace":
            timesteps = np.linspace(0, T - 1, n).round()[::-1].astype(np.int64)
        elif spacing == "leading":
            timesteps = (np.arange(0, n) * (T // n)).round()[::-1].astype(np.int64) + self.config.steps_offset
        else:  # trailing
            timesteps = np.round(np.arange(T, 0, -T / n)).astype(np.int64) - 1
        self.num_inference_steps = int(n)
        self.timesteps = torch.from_numpy(timesteps.copy()).to(device)
        self._timestep_list = timesteps.tolist()  # host copy: finding the next timestep never syncs a device

    def previous_timestep(self, timestep: int | torch.Tensor) -> int:
        """The timestep after `timestep` in the current schedule, −1 after the last (meaning ᾱ = 1: clean data)."""
        t = int(timestep)
        if self.num_inference_steps is None:
            return t - 1
        try:
            index = self._timestep_list.index(t)
        except ValueError:
            raise ValueError(f"timestep {t} is not in this scheduler's timesteps; call set_timesteps first") from None
        return self._timestep_list[index + 1] if index + 1 < len(self._timestep_list) else -1

    def _alpha_bars(self, t: int, prev_t: int, final_alpha_bar: float, like: torch.Tensor):
        """ᾱ_t and ᾱ_s (`final_alpha_bar` past the end) as float32 0-d tensors on like's device."""
        ab_t = self.alphas_cumprod[t]
        ab_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else torch.tensor(final_alpha_bar)
        return ab_t.to(like.device), ab_prev.to(like.device, torch.float32)

    def _predict_x0_eps(self, model_output, sample, alpha_bar_t):
        x0, eps = diffusion.split_model_output(model_output, sample, alpha_bar_t, self.config.prediction_type)
        if self.config.clip_sample:
            r = self.config.clip_sample_range
            x0 = x0.clamp(-r, r)
        return x0, eps

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """q_sample at a batch of timesteps: the forward process used in training (Ho et al. 2020, eq. 4)."""
        return diffusion.q_sample(original_samples, noise, self.schedule.alpha_bar(timesteps, original_samples))

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The v-prediction target for clean `sample` and `noise` at `timesteps`."""
        return diffusion.predict_v(sample, noise, self.schedule.alpha_bar(timesteps, sample))

    def __len__(self) -> int:
        return self.config.num_train_timesteps


class DDPMScheduler(_GaussianScheduler):
    """Ancestral sampling of Ho et al. 2020 (Algorithm 2), also with fewer steps than T (strided posterior).

    `variance_type`: "fixed_small" uses σ_t² = β̃_t, "fixed_large" σ_t² = β_t (§3.2); diffusers' other names
    ("fixed_small_log", "fixed_large_log", "learned", "learned_range") and None (fixed_small, as diffusers reads it)
    are taken too, so every DDPMScheduler config diffusers loads loads here (`diffusion.ddpm_variance`).
    """

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: list[float] | None = None,
        variance_type: str | None = "fixed_small",
        clip_sample: bool = True,
        prediction_type: str = "epsilon",
        clip_sample_range: float = 1.0,
        timestep_spacing: str = "leading",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
    ):
        if variance_type is not None and variance_type not in diffusion.VARIANCE_TYPES:
            raise ValueError(f"variance_type must be one of {diffusion.VARIANCE_TYPES} (or None: fixed_small), "
                             f"got {variance_type!r}")
        self._setup(self.config)

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | list[torch.Generator] | None = None,
        return_dict: bool = True,
    ) -> SchedulerOutput | tuple:
        t = int(timestep)
        prev_t = self.previous_timestep(t)
        predicted_variance = None
        if self.config.variance_type in diffusion.LEARNED_VARIANCES and model_output.shape[1] == 2 * sample.shape[1]:
            model_output, predicted_variance = model_output.split(sample.shape[1], dim=1)
        ab_t, ab_prev = self._alpha_bars(t, prev_t, 1.0, sample)
        x0, _ = self._predict_x0_eps(model_output, sample, ab_t)
        noise = None
        if t > 0:
            noise = randn_tensor(model_output.shape, generator=generator, device=model_output.device,
                                 dtype=model_output.dtype)
        prev_sample = diffusion.ddpm_step(sample, x0, ab_t, ab_prev, noise, self.config.variance_type,
                                          predicted_variance)
        if not return_dict:
            return (prev_sample, x0)
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)


class DDIMScheduler(_GaussianScheduler):
    """Denoising diffusion implicit models (Song et al. 2021): deterministic at η = 0, DDPM-like at η = 1.

    `set_alpha_to_one`: past the last step ᾱ is 1 (True) or ᾱ_0 (False), as in diffusers. Each step goes from t to
    t − T // n, as diffusers' DDIM does: that is the next timestep of the schedule for "leading" spacing (and for
    "trailing" when n divides T), and a nearby one otherwise — kept so that a config means the same in both.
    """

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: list[float] | None = None,
        clip_sample: bool = True,
        set_alpha_to_one: bool = True,
        steps_offset: int = 0,
        prediction_type: str = "epsilon",
        clip_sample_range: float = 1.0,
        timestep_spacing: str = "leading",
        rescale_betas_zero_snr: bool = False,
    ):
        self._setup(self.config)
        self.final_alpha_cumprod = 1.0 if set_alpha_to_one else float(self.alphas_cumprod[0])

    def previous_timestep(self, timestep: int | torch.Tensor) -> int:
        if self.num_inference_steps is None:
            raise ValueError("DDIMScheduler.step needs num_inference_steps: call set_timesteps first")
        return int(timestep) - self.config.num_train_timesteps // self.num_inference_steps

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        variance_noise: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> SchedulerOutput | tuple:
        if not 0 <= eta <= 1:
            raise ValueError(f"eta must be in [0, 1] (0: DDIM, 1: DDPM-like), got {eta!r}")
        t = int(timestep)
        ab_t, ab_prev = self._alpha_bars(t, self.previous_timestep(t), self.final_alpha_cumprod, sample)
        x0, eps = self._predict_x0_eps(model_output, sample, ab_t)
        sigma = diffusion.ddim_sigma(ab_t, ab_prev, eta)
        noise = None
        if eta > 0:
            if variance_noise is not None and generator is not None:
                raise ValueError("pass either generator or variance_noise to DDIMScheduler.step, not both")
            noise = variance_noise
            if noise is None:
                noise = randn_tensor(model_output.shape, generator=generator, device=model_output.device,
                                     dtype=model_output.dtype)
        prev_sample = diffusion.ddim_step(x0, eps, ab_prev, sigma, noise)
        if not return_dict:
            return (prev_sample, x0)
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)




class ScoreSDEScheduler(_GaussianScheduler):
    """Score-based sampling of the VP-SDE that a DDPM noise schedule defines (Song et al. 2021), with the network's
    ε read as the score ∇log p_t(x) = −ε / √(1 − ᾱ_t). `method`:
    - "sde": the reverse-time SDE by Euler–Maruyama (`diffusion.reverse_sde_step`), stochastic;
    - "ode": the probability-flow ODE by Euler (`diffusion.probability_flow_step`), deterministic;
    - "pc": predictor–corrector: the reverse-SDE step as predictor, then `corrector_steps` Langevin steps at the new
      time with step sizes from the signal-to-noise ratio `snr` (Algorithm 5 of the paper). Each corrector step
      needs its own network call, so the schedule repeats each timestep after the first (1 + corrector_steps
      calls per step), as diffusers' Heun repeats its timesteps.
    The last step goes to clean data without noise (the paper's final denoising). Euler steps need more steps than
    DDIM for the same quality: DDIM is an exact integrator of the same probability-flow ODE in another variable.
    """

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: list[float] | None = None,
        prediction_type: str = "epsilon",
        timestep_spacing: str = "leading",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
        method: str = "sde",
        snr: float = 0.16,
        corrector_steps: int = 1,
        clip_sample: bool = False,
        clip_sample_range: float = 1.0,
    ):
        if method not in SDE_METHODS:
            raise ValueError(f"method must be one of {SDE_METHODS}, got {method!r}")
        if not snr > 0:
            raise ValueError(f"snr must be > 0, got {snr!r}")
        if isinstance(corrector_steps, bool) or not isinstance(corrector_steps, Integral) or corrector_steps < 0:
            raise ValueError(f"corrector_steps must be an integer ≥ 0, got {corrector_steps!r}")
        if rescale_betas_zero_snr:
            raise ValueError("the score −ε/√(1 − ᾱ) needs ᾱ_T < 1 − 0: rescale_betas_zero_snr is not supported here")
        self._setup(self.config)
        self._plan: list[tuple[str, int, int]] = []  # per call: ("P" or "C", t, the time it steps to)
        self._index = 0

    @property
    def corrections(self) -> int:
        return self.config.corrector_steps if self.config.method == "pc" else 0

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        super().set_timesteps(num_inference_steps, device)
        times = self._timestep_list
        plan = []
        for k, t in enumerate(times):
            if k > 0:  # correct at the time the predictor just reached
                plan += [("C", t, t)] * self.corrections
            plan.append(("P", t, times[k + 1] if k + 1 < len(times) else -1))
        self._plan, self._index = plan, 0
        self.timesteps = torch.tensor([t for _, t, _ in plan], dtype=torch.int64, device=device)

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | list[torch.Generator] | None = None,
        return_dict: bool = True,
    ) -> SchedulerOutput | tuple:
        if not self._plan:
            raise ValueError("ScoreSDEScheduler.step needs its schedule: call set_timesteps first")
        if self._index >= len(self._plan):
            raise ValueError("ScoreSDEScheduler.step was called more times than its schedule has steps; call "
                             "set_timesteps again")
        kind, t, s = self._plan[self._index]
        if int(timestep) != t:
            raise ValueError(f"ScoreSDEScheduler.step expected timestep {t} (step {self._index} of its schedule), "
                             f"got {int(timestep)}")
        self._index += 1
        ab_t, ab_s = self._alpha_bars(t, s, 1.0, sample)
        x0, eps = self._predict_x0_eps(model_output, sample, ab_t)
        score = diffusion.score_from_eps(eps.float(), ab_t)
        x = sample.float()

        def noise():
            return randn_tensor(sample.shape, generator=generator, device=sample.device, dtype=torch.float32)

        if kind == "C":  # Langevin at time t; α = 1 − β_t of the training schedule
            z = noise()
            alpha = self.alphas[t].to(sample.device)
            size = diffusion.langevin_step_size(score, z, self.config.snr, alpha)
            prev = diffusion.langevin_step(x, score, size, z)
        else:
            beta = diffusion.vp_beta(ab_t, ab_s)
            if self.config.method == "ode":
                prev = diffusion.probability_flow_step(x, score, beta)
            else:
                prev = diffusion.reverse_sde_step(x, score, beta, noise() if s >= 0 else None)
        prev = prev.to(sample.dtype)
        if not return_dict:
            return (prev, x0)
        return SchedulerOutput(prev_sample=prev, pred_original_sample=x0)


def scheduler_class(name: str) -> type[SchedulerMixin]:
    """A scheduler class by short name (`ddpm`, `ddim`: ours; `dpm++`: diffusers' DPM-Solver++ multistep; `sde`,
    `ode`, `pc`: ScoreSDEScheduler) or by class name (ours for DDPMScheduler, DDIMScheduler and ScoreSDEScheduler,
    otherwise diffusers' class of that name)."""
    import diffusers

    ours = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler, "DDPMScheduler": DDPMScheduler, "DDIMScheduler": DDIMScheduler,
            "ScoreSDEScheduler": ScoreSDEScheduler, **{method: ScoreSDEScheduler for method in SDE_METHODS}}
    cls = ours.get(name) or getattr(diffusers, "DPMSolverMultistepScheduler" if name == "dpm++" else name, None)
    if not (isinstance(cls, type) and issubclass(cls, SchedulerMixin)):
        raise ValueError(f"scheduler must be one of {SCHEDULER_NAMES} or a diffusers scheduler class name, got {name!r}")
    return cls


def scheduler_from_name(name: str, config) -> SchedulerMixin:
    """A scheduler (see `scheduler_class`) configured from another scheduler's config: same training noise schedule
    and prediction type (`sde`, `ode`, `pc`: ScoreSDEScheduler with that method)."""
    if name in SDE_METHODS:
        return ScoreSDEScheduler.from_config(config, method=name)
    return scheduler_class(name).from_config(config)
