"""AUTOMATIC1111's sampler and schedule-type names, as diffusers schedulers configured from a model's own.

A1111 names a sampler ("DPM++ 2M", "Euler a") and, since 1.9, a schedule type ("Karras", "Exponential"); older
clients put the schedule into the name ("DPM++ 2M Karras"). Both spellings are accepted. "LCM" samples with the
model's few-step weights, which only models that ship them have; no sampler name at all means the model's own
sampler, and its few-step weights at few steps, exactly as `pipe(…)` and `latentdiff generate` choose."""

from __future__ import annotations

from dataclasses import dataclass, field

LCM = "LCM"


class RequestError(ValueError):
    """A request field that cannot be served: the server answers 422 naming the field."""

    def __init__(self, field_name: str, message: str):
        super().__init__(message)
        self.field = field_name


@dataclass(frozen=True, eq=False)  # compared and hashed by identity: the entries of SAMPLERS
class Sampler:
    name: str
    scheduler: str  # diffusers class name (ours for DDIM and DDPM: `latentdiff.schedulers.scheduler_class`)
    options: dict = field(default_factory=dict)  # config overrides
    aliases: tuple[str, ...] = ()
    schedules: tuple[str, ...] = ()  # the schedule types it takes besides the default


SIGMA_SCHEDULES = ("karras", "exponential")
SAMPLERS = (
    Sampler("DPM++ 2M", "DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2},
            ("k_dpmpp_2m",), SIGMA_SCHEDULES),
    Sampler("DPM++ 2M SDE", "DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 2},
            ("k_dpmpp_2m_sde",), SIGMA_SCHEDULES),
    Sampler("Euler a", "EulerAncestralDiscreteScheduler", {}, ("k_euler_a", "k_euler_ancestral")),
    Sampler("Euler", "EulerDiscreteScheduler", {}, ("k_euler",), SIGMA_SCHEDULES),
    Sampler("LMS", "LMSDiscreteScheduler", {}, ("k_lms",), ("karras",)),
    Sampler("Heun", "HeunDiscreteScheduler", {}, ("k_heun",), SIGMA_SCHEDULES),
    Sampler("DPM2", "KDPM2DiscreteScheduler", {}, ("k_dpm_2",), ("karras",)),
    Sampler("DPM2 a", "KDPM2AncestralDiscreteScheduler", {}, ("k_dpm_2_a",), ("karras",)),
    Sampler("UniPC", "UniPCMultistepScheduler", {}, ("unipc",), SIGMA_SCHEDULES),
    Sampler("DDIM", "DDIMScheduler", {}, ("ddim",)),
    Sampler("DDPM", "DDPMScheduler", {}, ("ddpm",)),
    Sampler("PLMS", "PNDMScheduler", {"skip_prk_steps": True}, ("plms",)),
    Sampler(LCM, "LCMScheduler", {}, ("lcm",)),
)
SCHEDULE_TYPES = ("Automatic", "Uniform", "Karras", "Exponential")  # A1111's `scheduler` values taken here
_BY_NAME = {key.lower(): s for s in SAMPLERS for key in (s.name, *s.aliases)}


@dataclass(frozen=True)
class Choice:
    """What a request's sampler_name and scheduler resolve to: None for the model's own sampler."""
    sampler: Sampler | None
    schedule: str | None = None  # "karras" or "exponential"

    @property
    def label(self) -> str:
        """The name A1111 writes into an image's parameters."""
        if self.sampler is None:
            return ""
        return self.sampler.name + (f" {self.schedule.title()}" if self.schedule else "")


def resolve(sampler_name: str | None, schedule: str | None = None) -> Choice:
    """The sampler and schedule a request names (A1111 spellings); RequestError naming the field when unknown."""
    name = (sampler_name or "").strip()
    schedule_name = (schedule or "").strip().lower()
    if name and name.lower() not in _BY_NAME:
        for suffix in SIGMA_SCHEDULES:  # "DPM++ 2M Karras": A1111's names before schedule types
            if name.lower().endswith(" " + suffix) and name[: -len(suffix) - 1].lower() in _BY_NAME:
                name, schedule_name = name[: -len(suffix) - 1], schedule_name or suffix
                break
        else:
            raise RequestError("sampler_name", f"sampler_name must be one of {', '.join(s.name for s in SAMPLERS)} (or empty: the "
                             f"model's own), got {sampler_name!r}")
    if schedule_name not in ("", "automatic", "uniform", *SIGMA_SCHEDULES):
        raise RequestError("scheduler", f"scheduler must be one of {', '.join(SCHEDULE_TYPES)}, got {schedule!r}")
    schedule_name = schedule_name if schedule_name in SIGMA_SCHEDULES else None
    sampler = _BY_NAME.get(name.lower()) if name else None
    if schedule_name is not None and (sampler is None or schedule_name not in sampler.schedules):
        takes = ", ".join(s.title() for s in sampler.schedules) if sampler else "none (the model's own sampler)"
        raise RequestError("scheduler", f"scheduler {schedule!r} does not apply to sampler_name {sampler_name!r}; "
                                        f"it takes {takes or 'none'}")
    return Choice(sampler, schedule_name)


def make_scheduler(choice: Choice, config):
    """The diffusers scheduler of `choice` on a model's scheduler config (its noise schedule and prediction type)."""
    from ..schedulers import scheduler_class

    options = dict(choice.sampler.options)
    if choice.schedule is not None:
        options[f"use_{choice.schedule}_sigmas"] = True
    return scheduler_class(choice.sampler.scheduler).from_config(config, **options)


def listing(has_few_step: bool) -> list[dict]:
    """`GET /sdapi/v1/samplers`: name, aliases and options of each sampler this model can use."""
    return [{"name": s.name, "aliases": list(s.aliases), "options": {k: str(v) for k, v in s.options.items()}}
            for s in SAMPLERS if s.name != LCM or has_few_step]
