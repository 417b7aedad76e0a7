"""The Gaussian diffusion math of DDPM (Ho et al. 2020), with DDIM (Song et al. 2021), v-prediction
(Salimans & Ho 2022), min-SNR weighting (Hang et al. 2023), classifier-free guidance (Ho & Salimans 2022)
and its rescale (Lin et al. 2024), in one module.

Every function works on ᾱ values (`alpha_bar`, the cumulative product of 1 − β) that the caller has already
gathered for its timesteps and shaped to broadcast against the sample, so the same code serves training
(one random t per sample), ancestral sampling (t → t−1) and strided sampling (t → any s < t).
Coefficients are computed once in float64 and stored as float32 (`NoiseSchedule`).
"""

from __future__ import annotations

import math

import torch

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "cosine")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
# diffusers' names: the "_log" forms are the same variances (diffusers computes them through logs), "learned" takes the
# variance from extra model-output channels and "learned_range" interpolates log β̃_t … log β_t with them (Nichol &
# Dhariwal 2021, eq. 15). None, as diffusers reads it, is fixed_small.
VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned", "learned_range")
LEARNED_VARIANCES = ("learned", "learned_range")


# 1. β schedules -------------------------------------------------------------------------------------------------


def make_beta_schedule(
    name: str, num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02, max_beta: float = 0.999
) -> torch.Tensor:
    """β_1..β_T in float64.

    `linear`: Ho et al. 2020 §4 (1e-4 → 0.02 for T = 1000). `scaled_linear`: linear in √β, the Stable Diffusion
    schedule (0.00085 → 0.012). `cosine` (alias `squaredcos_cap_v2`, diffusers' name): Nichol & Dhariwal 2021
    eq. 17, ᾱ(t) = cos²((t/T + s)/(1 + s) · π/2) with s = 0.008, β clipped at `max_beta`.
    """
    if num_timesteps < 1:
        raise ValueError(f"num_timesteps must be a positive integer, got {num_timesteps}")
    if name == "linear":
        # Matches diffusers, which builds the float32 linspace first; the cast makes ᾱ agree to float32 precision.
        return torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float32).double()
    if name == "scaled_linear":
        return torch.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=torch.float32).double() ** 2
    if name in ("cosine", "squaredcos_cap_v2"):

        def alpha_bar(u: float) -> float:
            return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

        steps = [(i / num_timesteps, (i + 1) / num_timesteps) for i in range(num_timesteps)]
        return torch.tensor([min(1 - alpha_bar(b) / alpha_bar(a), max_beta) for a, b in steps], dtype=torch.float64)
    raise ValueError(f"beta_schedule must be one of {BETA_SCHEDULES}, got {name!r}")


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2024, Algorithm 1: shift and scale √ᾱ so that ᾱ_T = 0 (zero terminal SNR) while ᾱ_1 is kept."""
    sqrt_ab = torch.cumprod(1 - betas.double(), dim=0).sqrt()
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    sqrt_ab = (sqrt_ab - last) * first / (first - last)
    alpha_bar = sqrt_ab**2
    alphas = torch.cat([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])
    return 1 - alphas


class NoiseSchedule:
    """β_t, α_t = 1 − β_t and ᾱ_t = ∏_{s≤t} α_s (Ho et al. 2020, §2), computed in float64, kept as float32."""

    def __init__(self, betas: torch.Tensor):
        betas = betas.double()
        if betas.ndim != 1 or not bool(((betas > 0) & (betas <= 1)).all()):
            raise ValueError("betas must be a 1-D tensor with every β in (0, 1]")
        self.betas = betas.float()
        self.alphas = (1 - betas).float()
        self.alphas_cumprod = torch.cumprod(1 - betas, dim=0).float()

    @classmethod
    def from_name(cls, name: str, num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02,
                  zero_terminal_snr: bool = False) -> "NoiseSchedule":
        betas = make_beta_schedule(name, num_timesteps, beta_start, beta_end)
        return cls(rescale_zero_terminal_snr(betas) if zero_terminal_snr else betas)

    def __len__(self) -> int:
        return len(self.betas)

    def alpha_bar(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """ᾱ_t gathered for a batch of timesteps `t` (B,) and shaped (B, 1, 1, …) to broadcast against `like`."""
        return broadcast_to(self.alphas_cumprod.to(like.device)[t.to(like.device).long()], like)


def broadcast_to(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) or () → (B, 1, …, 1) with like.ndim dims, in like's dtype and device."""
    values = torch.as_tensor(values, device=like.device, dtype=like.dtype)
    return values.reshape(values.shape + (1,) * (like.ndim - values.ndim))


def check_prediction_type(prediction_type: str) -> None:
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")


def snr(alpha_bar: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio ᾱ / (1 − ᾱ) (Kingma et al. 2021, eq. 2)."""
    return alpha_bar / (1 - alpha_bar)


# 2. The forward process and its posterior -----------------------------------------------------------------------


def q_sample(x0: torch.Tensor, noise: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """x_t ~ q(x_t | x_0) = N(√ᾱ_t x_0, (1 − ᾱ_t) I), reparameterised with ε = `noise` (Ho et al. 2020, eq. 4)."""
    return alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * noise


def q_posterior(
    x0: torch.Tensor, x_t: torch.Tensor, alpha_bar_t: torch.Tensor, alpha_bar_prev: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean μ̃ and variance β̃ of q(x_s | x_t, x_0) for s < t (Ho et al. 2020, eqs. 6–7).

    With s = t − 1 these are the paper's equations; for a strided step the single-step α_t is replaced by
    ᾱ_t / ᾱ_s, which is exact because the forward process from s to t is itself Gaussian with that α.
        μ̃ = √ᾱ_s β_t/(1 − ᾱ_t) · x_0 + √α_t (1 − ᾱ_s)/(1 − ᾱ_t) · x_t,    β̃ = (1 − ᾱ_s)/(1 − ᾱ_t) · β_t
    """
    alpha_t = alpha_bar_t / alpha_bar_prev
    beta_t = 1 - alpha_t
    coef_x0 = alpha_bar_prev.sqrt() * beta_t / (1 - alpha_bar_t)
    coef_xt = alpha_t.sqrt() * (1 - alpha_bar_prev) / (1 - alpha_bar_t)
    variance = (1 - alpha_bar_prev) / (1 - alpha_bar_t) * beta_t
    return coef_x0 * x0 + coef_xt * x_t, variance


# 3. Conversions between the three parameterisations ε, x_0 and v ---------------------------------------------


def predict_x0_from_eps(x_t: torch.Tensor, eps: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """x_0 = (x_t − √(1 − ᾱ_t) ε) / √ᾱ_t, eq. 4 solved for x_0 (Ho et al. 2020, eq. 15)."""
    return (x_t - (1 - alpha_bar).sqrt() * eps) / alpha_bar.sqrt()


def predict_eps_from_x0(x_t: torch.Tensor, x0: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """ε = (x_t − √ᾱ_t x_0) / √(1 − ᾱ_t), eq. 4 solved for ε."""
    return (x_t - alpha_bar.sqrt() * x0) / (1 - alpha_bar).sqrt()


def predict_v(x0: torch.Tensor, eps: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """v = √ᾱ_t ε − √(1 − ᾱ_t) x_0 (Salimans & Ho 2022, §4 with α = √ᾱ, σ = √(1 − ᾱ))."""
    return alpha_bar.sqrt() * eps - (1 - alpha_bar).sqrt() * x0


def predict_x0_from_v(x_t: torch.Tensor, v: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """x_0 = √ᾱ_t x_t − √(1 − ᾱ_t) v."""
    return alpha_bar.sqrt() * x_t - (1 - alpha_bar).sqrt() * v


def predict_eps_from_v(x_t: torch.Tensor, v: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """ε = √(1 − ᾱ_t) x_t + √ᾱ_t v."""
    return (1 - alpha_bar).sqrt() * x_t + alpha_bar.sqrt() * v


def split_model_output(
    model_output: torch.Tensor, x_t: torch.Tensor, alpha_bar: torch.Tensor, prediction_type: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """The network's output read as (x̂_0, ε̂), whatever it was trained to predict."""
    if prediction_type == "epsilon":
        return predict_x0_from_eps(x_t, model_output, alpha_bar), model_output
    if prediction_type == "v_prediction":
        return predict_x0_from_v(x_t, model_output, alpha_bar), predict_eps_from_v(x_t, model_output, alpha_bar)
    check_prediction_type(prediction_type)
    return model_output, predict_eps_from_x0(x_t, model_output, alpha_bar)


def score_from_eps(eps: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """∇_x log p_t(x_t) = −ε / √(1 − ᾱ_t): the score-based reading of ε_θ (Song et al. 2021, eq. 11 / §4.3)."""
    return -eps / (1 - alpha_bar).sqrt()


# 4. Training objective ------------------------------------------------------------------------------------------


def training_target(x0: torch.Tensor, eps: torch.Tensor, alpha_bar: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """What the network regresses: ε (Ho et al. 2020, eq. 14), v (Salimans & Ho 2022) or x_0."""
    if prediction_type == "epsilon":
        return eps
    if prediction_type == "v_prediction":
        return predict_v(x0, eps, alpha_bar)
    check_prediction_type(prediction_type)
    return x0


def check_snr_weighting(gamma: float | None, floor: float = 0.0, names: tuple[str, str] = ("snr_gamma", "snr_floor")):
    """The rule for `min_snr_weight`'s γ and floor (γ > 0 when given, 0 ≤ floor ≤ γ), errors naming them as `names`
    (the training scripts pass their flags' names)."""
    gamma_name, floor_name = names
    if gamma is not None and not gamma > 0:
        raise ValueError(f"{gamma_name} must be positive, got {gamma:g}")
    if not 0 <= floor <= (gamma if gamma is not None else float("inf")):
        raise ValueError(f"{floor_name} must be in [0, {gamma_name}] (the x_0 weight it raises is capped at γ), "
                         f"got {floor:g}")


def min_snr_weight(alpha_bar: torch.Tensor, gamma: float | None, prediction_type: str,
                   floor: float = 0.0) -> torch.Tensor:
    """Per-sample loss weight of Min-SNR-γ (Hang et al. 2023, eq. 9 and its v / x_0 forms).

    The ε-loss equals SNR · (x_0-loss) and the v-loss (SNR + 1) · (x_0-loss), so weighting the x_0-loss by
    min(SNR, γ) means weighting the ε-loss by min(SNR, γ)/SNR and the v-loss by min(SNR, γ)/(SNR + 1).
    At SNR = 0 (the last step of a zero-terminal-SNR schedule) the ε weight is its limit, 1, and the v weight is
    0 as in the paper (diffusers' training example uses min(SNR + 1, γ)/(SNR + 1) instead, which is 1 there).

    `floor` > 0 raises the x_0-loss weight to at least `floor`: max(min(SNR, γ), floor), γ = ∞ when None. At the
    noisiest timesteps, where a scene's layout is decided, the ε-loss weighs the x_0 error by SNR alone (0.005 at
    t = 999 of SD's schedule), so what the caption says about the layout hardly moves the loss; floor 1 gives those
    steps the x_0 weight that v-prediction's plain loss gives them (SNR + 1 ≈ 1), and leaves the rest as it was
    (the perception-prioritised view of Choi et al. 2022: weight the content-forming, low-SNR steps up).
    """
    check_snr_weighting(gamma, floor)
    check_prediction_type(prediction_type)
    s = snr(alpha_bar)
    clipped = s if gamma is None else torch.minimum(s, torch.full_like(s, gamma))
    clipped = torch.clamp(clipped, min=floor)
    if prediction_type == "epsilon":
        if floor > 0 and bool((s == 0).any()):
            raise ValueError("snr_floor with epsilon prediction needs SNR > 0 at every timestep: at SNR = 0 (a "
                             "zero-terminal-SNR schedule) the ε-loss holds no x_0 error to weigh; use v_prediction")
        return torch.where(s > 0, clipped / s, torch.ones_like(s))
    if prediction_type == "v_prediction":
        return clipped / (s + 1)
    return clipped


def diffusion_loss(
    model_output: torch.Tensor,
    x0: torch.Tensor,
    eps: torch.Tensor,
    alpha_bar: torch.Tensor,
    prediction_type: str = "epsilon",
    snr_gamma: float | None = None,
    snr_floor: float = 0.0,
) -> torch.Tensor:
    """L_simple = E ‖target − f_θ(x_t, t)‖² (Ho et al. 2020, eq. 14), optionally weighted per sample by Min-SNR-γ
    and/or an x_0-weight floor (`min_snr_weight`)."""
    target = training_target(x0, eps, alpha_bar, prediction_type)
    per_sample = (model_output.float() - target.float()).pow(2).flatten(1).mean(1)  # (B,)
    if snr_gamma is not None or snr_floor:
        per_sample = per_sample * min_snr_weight(alpha_bar.float().flatten(), snr_gamma, prediction_type, snr_floor)
    return per_sample.mean()


# 5. Reverse steps -----------------------------------------------------------------------------------------------


def ddpm_variance(alpha_bar_t: torch.Tensor, alpha_bar_prev: torch.Tensor, variance_type: str | None = "fixed_small",
                  predicted: torch.Tensor | None = None) -> torch.Tensor:
    """σ_t² of the ancestral step: β̃_t = (1 − ᾱ_s)/(1 − ᾱ_t) β_t (`fixed_small`, Ho et al. 2020 §3.2), β_t
    (`fixed_large`), the model's own (`learned`), or exp(v log β_t + (1 − v) log β̃_t) with v = (output + 1)/2
    (`learned_range`, Nichol & Dhariwal 2021, eq. 15); β_t = 1 − ᾱ_t/ᾱ_s for a strided step."""
    beta = 1 - alpha_bar_t / alpha_bar_prev
    beta_tilde = ((1 - alpha_bar_prev) / (1 - alpha_bar_t) * beta).clamp(min=1e-20)
    if variance_type in (None, "fixed_small", "fixed_small_log"):
        return beta_tilde
    if variance_type in ("fixed_large", "fixed_large_log"):
        return beta
    if variance_type in LEARNED_VARIANCES:
        if predicted is None:
            raise ValueError(f"variance_type {variance_type!r} takes the variance from the model: its output needs "
                             "twice the sample's channels (the prediction, then the variance)")
        if variance_type == "learned":
            return predicted
        fraction = (predicted + 1) / 2
        return torch.exp(fraction * beta.log() + (1 - fraction) * beta_tilde.log())
    raise ValueError(f"variance_type must be one of {VARIANCE_TYPES} (or None: fixed_small), got {variance_type!r}")


def ddpm_step(
    x_t: torch.Tensor,
    x0_pred: torch.Tensor,
    alpha_bar_t: torch.Tensor,
    alpha_bar_prev: torch.Tensor,
    noise: torch.Tensor | None,
    variance_type: str | None = "fixed_small",
    predicted_variance: torch.Tensor | None = None,
) -> torch.Tensor:
    """Ancestral step x_s ~ p_θ(x_s | x_t) = N(μ̃(x_t, x̂_0), σ_t² I) (Ho et al. 2020, eq. 11 / Algorithm 2).

    With x̂_0 from ε this is x_{t−1} = 1/√α_t (x_t − β_t/√(1 − ᾱ_t) ε_θ) + σ_t z, σ_t² from `ddpm_variance`.
    `noise` is None on the last step (z = 0).
    """
    mean, _ = q_posterior(x0_pred, x_t, alpha_bar_t, alpha_bar_prev)
    if noise is None:
        return mean
    return mean + ddpm_variance(alpha_bar_t, alpha_bar_prev, variance_type, predicted_variance).sqrt() * noise


def ddim_sigma(alpha_bar_t: torch.Tensor, alpha_bar_prev: torch.Tensor, eta: float) -> torch.Tensor:
    """σ_t(η) = η √((1 − ᾱ_s)/(1 − ᾱ_t)) √(1 − ᾱ_t/ᾱ_s) (Song et al. 2021, eq. 16): η = 1 is DDPM, η = 0 is DDIM."""
    if eta == 0:
        return torch.zeros_like(alpha_bar_t)
    return eta * ((1 - alpha_bar_prev) / (1 - alpha_bar_t) * (1 - alpha_bar_t / alpha_bar_prev)).sqrt()


def ddim_step(
    x0_pred: torch.Tensor,
    eps_pred: torch.Tensor,
    alpha_bar_prev: torch.Tensor,
    sigma: torch.Tensor,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """x_s = √ᾱ_s x̂_0 + √(1 − ᾱ_s − σ²) ε̂ + σ z (Song et al. 2021, eq. 12)."""
    x_prev = alpha_bar_prev.sqrt() * x0_pred + (1 - alpha_bar_prev - sigma**2).sqrt() * eps_pred
    return x_prev if noise is None else x_prev + sigma * noise


# 6. Guidance ----------------------------------------------------------------------------------------------------


def classifier_free_guidance(
    eps_uncond: torch.Tensor, eps_cond: torch.Tensor, guidance_scale: float, guidance_rescale: float = 0.0
) -> torch.Tensor:
    """ε̂ = ε_u + s (ε_c − ε_u) (Ho & Salimans 2022, eq. 6 written with s = w + 1).

    `guidance_rescale` φ > 0 rescales ε̂ towards the standard deviation of ε_c (Lin et al. 2024, eqs. 15–16),
    which counters over-exposure at high s with zero-terminal-SNR schedules.
    """
    guided = eps_uncond + guidance_scale * (eps_cond - eps_uncond)
    if guidance_rescale > 0:
        dims = list(range(1, eps_cond.ndim))
        rescaled = guided * (eps_cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
        guided = guidance_rescale * rescaled + (1 - guidance_rescale) * guided
    return guided


# 6. Score-based sampling of the VP-SDE (Song et al. 2021) ---------------------------------------------------------


def vp_beta(alpha_bar_t: torch.Tensor, alpha_bar_s: torch.Tensor) -> torch.Tensor:
    """β of the step from t to s < t: 1 − ᾱ_t / ᾱ_s, the noise the forward process adds over it (∫ β(τ) dτ to first
    order), which is what the VP-SDE dx = −½ β(t) x dt + √β(t) dw integrates over the step."""
    return 1 - alpha_bar_t / alpha_bar_s


def reverse_sde_step(x_t: torch.Tensor, score: torch.Tensor, beta: torch.Tensor,
                     noise: torch.Tensor | None) -> torch.Tensor:
    """One Euler–Maruyama step of the reverse-time VP-SDE dx = [−½ β x − β ∇log p_t(x)] dt + √β dw̄, run backwards:
    x_s = x_t + ½ β x_t + β ∇log p_t(x_t) + √β z (Song et al. 2021, eq. 6 with f = −½ β x, g = √β); no z: its mean."""
    mean = x_t + 0.5 * beta * x_t + beta * score
    return mean if noise is None else mean + beta.sqrt() * noise


def probability_flow_step(x_t: torch.Tensor, score: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """One Euler step of the probability-flow ODE dx = [−½ β x − ½ β ∇log p_t(x)] dt backwards (Song et al. 2021,
    eq. 13): x_s = x_t + ½ β (x_t + ∇log p_t(x_t)). Deterministic; the same marginals as the SDE."""
    return x_t + 0.5 * beta * (x_t + score)


def langevin_step_size(score: torch.Tensor, noise: torch.Tensor, snr: float, alpha: torch.Tensor) -> torch.Tensor:
    """Langevin corrector step ε = 2 α (r ‖z‖ / ‖∇log p‖)², r the signal-to-noise ratio (Song et al. 2021,
    Algorithm 5; α = 1 − β_t for the VP-SDE). The norms are per sample (over all but the batch dimension) and
    averaged over the batch, as the paper's code does: one step size for the batch, which a single sample's score
    near a mode (‖∇log p‖ ≈ 0) cannot blow up."""
    grad_norm = score.flatten(1).norm(dim=1).mean().clamp_min(1e-12)
    noise_norm = noise.flatten(1).norm(dim=1).mean()
    return 2 * alpha * (snr * noise_norm / grad_norm) ** 2


def langevin_step(x: torch.Tensor, score: torch.Tensor, step_size: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """x ← x + ε ∇log p(x) + √(2ε) z: one step of Langevin dynamics toward p (the corrector of PC sampling)."""
    return x + step_size * score + (2 * step_size).sqrt() * noise


def classifier_guidance(
    eps: torch.Tensor, grad_log_p_y: torch.Tensor, alpha_bar: torch.Tensor, scale: float = 1.0
) -> torch.Tensor:
    """ε̂ = ε − s √(1 − ᾱ_t) ∇_{x_t} log p_φ(y | x_t) (Dhariwal & Nichol 2021, Algorithm 2 in ε form, eq. 14)."""
    return eps - scale * (1 - alpha_bar).sqrt() * grad_log_p_y
