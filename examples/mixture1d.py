"""The design notes' 1-D experiment (`../shared/seeds/004_…`): a DDPM trained on 800 points of the two-mode mixture
½ N(−2, 0.5) + ½ N(2, 0.5) (0.5 the variance) with T = 1000 steps, then sampled five ways with latentdiff's
schedulers: DDPM (ancestral), DDIM, and the score-based reverse SDE, probability-flow ODE and predictor–corrector.

    python examples/mixture1d.py [--out docs/mixture1d.png]

Prints each sampler's mode weights, mode means and its two-sample Kolmogorov–Smirnov distance to fresh draws of
the mixture, and plots the forward diffusion turning the two modes into N(0, 1) beside the samples.
"""

from __future__ import annotations

import argparse
import math

import torch

from latentdiff import diffusion
from latentdiff.schedulers import DDIMScheduler, DDPMScheduler, ScoreSDEScheduler

MEANS, VARIANCE, T = (-2.0, 2.0), 0.5, 1000
SCHEDULE = dict(num_train_timesteps=T, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                timestep_spacing="trailing", clip_sample=False)


def mixture(n: int, generator: torch.Generator) -> torch.Tensor:
    """n draws of ½ N(−2, 0.5) + ½ N(2, 0.5), shape (n, 1)."""
    modes = torch.tensor(MEANS)[torch.randint(2, (n,), generator=generator)]
    return (modes + math.sqrt(VARIANCE) * torch.randn(n, generator=generator)).unsqueeze(1)


class EpsNet(torch.nn.Module):
    """ε_θ(x_t, t): an MLP on x_t and a sinusoidal embedding of t."""

    def __init__(self, width: int = 128, frequencies: int = 16):
        super().__init__()
        self.register_buffer("freqs", torch.exp(torch.linspace(0, math.log(1000), frequencies)) / 1000)
        self.net = torch.nn.Sequential(torch.nn.Linear(1 + 2 * frequencies, width), torch.nn.SiLU(),
                                       torch.nn.Linear(width, width), torch.nn.SiLU(),
                                       torch.nn.Linear(width, width), torch.nn.SiLU(), torch.nn.Linear(width, 1))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        angles = t.float().reshape(-1, 1) * self.freqs
        return self.net(torch.cat([x, angles.sin(), angles.cos()], dim=1))


def train(points: torch.Tensor, steps: int = 4000, seed: int = 0) -> EpsNet:
    """L_simple (Ho et al. 2020, eq. 14) on `points`, full batch, Adam."""
    torch.manual_seed(seed)
    model = EpsNet()
    schedule = diffusion.NoiseSchedule(diffusion.make_beta_schedule("linear", T, 1e-4, 0.02))
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    lr = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    for _ in range(steps):
        t = torch.randint(0, T, (len(points),))
        noise = torch.randn_like(points)
        alpha_bar = schedule.alpha_bar(t, points)
        loss = diffusion.diffusion_loss(model(diffusion.q_sample(points, noise, alpha_bar), t), points, noise,
                                        alpha_bar, "epsilon")
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        lr.step()
    return model.eval()


def samplers() -> dict:
    """name → (scheduler, steps)."""
    return {"DDPM": (DDPMScheduler(**SCHEDULE), 1000), "DDIM": (DDIMScheduler(**SCHEDULE), 100),
            "SDE": (ScoreSDEScheduler(**SCHEDULE, method="sde"), 1000),
            "ODE": (ScoreSDEScheduler(**SCHEDULE, method="ode"), 1000),
            "PC": (ScoreSDEScheduler(**SCHEDULE, method="pc", corrector_steps=1), 500)}


@torch.no_grad()
def sample(model: EpsNet, scheduler, steps: int, n: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    scheduler.set_timesteps(steps)
    x = torch.randn(n, 1, generator=generator)
    for t in scheduler.timesteps:
        eps = model(x, torch.full((n,), int(t)))
        x = scheduler.step(eps, t, x, generator=generator).prev_sample
    return x


def summary(x: torch.Tensor, reference: torch.Tensor) -> dict:
    """Mode weights (x < 0, x > 0), mode means, and the two-sample KS distance to `reference`."""
    from scipy.stats import ks_2samp

    x = x.flatten()
    left, right = x[x < 0], x[x >= 0]
    result = ks_2samp(x.numpy(), reference.flatten().numpy())
    return {"weight_left": len(left) / len(x), "weight_right": len(right) / len(x),
            "mean_left": float(left.mean()), "mean_right": float(right.mean()),
            "var_left": float(left.var()), "var_right": float(right.var()),
            "ks": float(result.statistic), "ks_p": float(result.pvalue)}


def plot(points: torch.Tensor, results: dict, out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    schedule = diffusion.NoiseSchedule(diffusion.make_beta_schedule("linear", T, 1e-4, 0.02))
    generator = torch.Generator().manual_seed(1)
    figure, axes = plt.subplots(2, 5, figsize=(16, 6), sharey="row")
    grid = torch.linspace(-5, 5, 400)
    density = sum(0.5 * torch.exp(-(grid - m) ** 2 / (2 * VARIANCE)) / math.sqrt(2 * math.pi * VARIANCE)
                  for m in MEANS)
    for ax, t in zip(axes[0], (0, 50, 200, 500, 999)):
        ab = schedule.alphas_cumprod[t]
        x_t = ab.sqrt() * points + (1 - ab).sqrt() * torch.randn(points.shape, generator=generator)
        ax.hist(x_t.flatten().numpy(), bins=60, range=(-5, 5), density=True, color="#7a9cc6")
        ax.plot(grid, torch.exp(-grid**2 / 2) / math.sqrt(2 * math.pi), color="k", lw=1, ls=":")
        ax.set_title(f"forward: x_t at t = {t + 1}")
    for ax, (name, (x, stats)) in zip(axes[1], results.items()):
        ax.hist(x.flatten().numpy(), bins=60, range=(-5, 5), density=True, color="#d08c60")
        ax.plot(grid, density, color="k", lw=1)
        ax.set_title(f"{name}: KS {stats['ks']:.3f}, weights {stats['weight_left']:.2f}/{stats['weight_right']:.2f}")
    figure.suptitle("½N(−2, 0.5) + ½N(2, 0.5), 800 training points, T = 1000: the forward process (top, N(0, 1) "
                    "dotted) and samples of the trained DDPM (bottom, the mixture's density in black)")
    figure.tight_layout()
    figure.savefig(out, dpi=80)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="docs/mixture1d.png")
    parser.add_argument("--samples", type=int, default=5000)
    parser.add_argument("--train-steps", type=int, default=4000)
    args = parser.parse_args(argv)
    points = mixture(800, torch.Generator().manual_seed(0))
    model = train(points, args.train_steps)
    reference = mixture(args.samples, torch.Generator().manual_seed(1))
    results = {}
    for name, (scheduler, steps) in samplers().items():
        x = sample(model, scheduler, steps, args.samples)
        results[name] = (x, summary(x, reference))
        s = results[name][1]
        print(f"{name:5s} {steps:5d} steps: weights {s['weight_left']:.3f} / {s['weight_right']:.3f}, means "
              f"{s['mean_left']:+.3f} / {s['mean_right']:+.3f}, variances {s['var_left']:.3f} / {s['var_right']:.3f}, "
              f"KS distance {s['ks']:.3f}")
    plot(points, results, args.out)
    print(f"wrote {args.out}")
    return {name: stats for name, (_, stats) in results.items()}


if __name__ == "__main__":
    main()
