"""What every latentdiff command line shares: help that states each flag's default, and argument types whose
errors name the rule."""

from __future__ import annotations

import argparse
import sys
from numbers import Real

SCHEDULER_NAMES = ("ddpm", "ddim", "dpm++", "sde", "ode", "pc")  # the short names `latentdiff.schedulers.scheduler_class` takes

MAX_SEED = 2**64 - 1  # what torch.Generator.manual_seed takes
DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}  # flag value → torch dtype name


def torch_dtype(name: str):
    """The torch dtype a --dtype flag value names (fp32, bf16, fp16)."""
    import torch

    return getattr(torch, DTYPE_NAMES[name])


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions as written; each flag's help ends with its default unless it states it already."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.option_strings and "default" not in text and action.nargs != 0 \
                and not any(action.default is v for v in (None, False, argparse.SUPPRESS)):
            text += " (default: %(default)s)"
        return text


class ArgumentParser(argparse.ArgumentParser):
    """A usage error is one line: the command, the argument and the rule (`--help` shows the usage)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def parser(prog: str | None = None, description: str | None = None) -> ArgumentParser:
    return ArgumentParser(prog=prog, description=description, formatter_class=HelpFormatter)


def positive_int(text: str) -> int:
    if not text.lstrip("+").isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be an integer ≥ 1, got {text!r}")
    return int(text)


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text!r}")
    return value


def port(text: str) -> int:
    if not text.lstrip("+").isdigit() or not 0 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port number in [0, 65535], got {text!r}")
    return int(text)


def non_negative_int(text: str) -> int:
    if not text.lstrip("+").isdigit():
        raise argparse.ArgumentTypeError(f"must be an integer ≥ 0, got {text!r}")
    return int(text)


def seed(text: str) -> int:
    if not text.lstrip("+").isdigit() or int(text) > MAX_SEED:
        raise argparse.ArgumentTypeError(f"must be an integer in [0, 2**64 - 1], got {text!r}")
    return int(text)


def run_guarded(prog: str, main, argv: list[str]) -> int:
    """`main(argv)` as a command: an error is one line on stderr, `PROG: error: message`, with exit status 2 (or
    the error's `exit_code`), an interrupt exits 130, and `--debug` (before any `--`) shows the traceback instead."""
    cut = argv.index("--") if "--" in argv else len(argv)
    debug = "--debug" in argv[:cut]  # after "--" it is a value (a prompt, say)
    argv = [a for a in argv[:cut] if a != "--debug"] + argv[cut:]
    try:
        main(argv)
        return 0
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001 - every failure reaches the user as one line
        if debug:
            raise
        message = " ".join(str(error).split()) or type(error).__name__
        if not isinstance(error, (ValueError, TypeError, OSError, ArithmeticError)) \
                and not hasattr(error, "exit_code"):
            message = f"{type(error).__name__}: {message} (run again with --debug for the traceback)"
        print(f"{prog}: error: {message}", file=sys.stderr)
        return getattr(error, "exit_code", 2)


MAX_TRAINING_SEED = 2**31 - 1  # accelerate's set_seed seeds numpy (< 2**32) with seed + process index


def training_seed(text: str) -> int:
    if not text.lstrip("+").isdigit() or int(text) > MAX_TRAINING_SEED:
        raise argparse.ArgumentTypeError(f"must be an integer in [0, 2**31 - 1], got {text!r}")
    return int(text)


def guidance(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (value >= 0 and value != float("inf")):
        raise argparse.ArgumentTypeError(f"must be a finite number ≥ 0, got {text!r}")
    return value


def check_guidance_options_apply(guidance_rescale: float, few_step: bool, steps: int,
                          guidance_interval: tuple[float, float] = (0.0, 1.0)) -> None:
    """--guidance-rescale and --guidance-interval act on classifier-free guidance; the few-step student's embedded
    guidance has neither."""
    for flag, value, off in (("--guidance-rescale", guidance_rescale, 0), ("--guidance-interval",
                                                                           tuple(guidance_interval), (0.0, 1.0))):
        if value != off and few_step:
            raise ValueError(f"{flag} needs classifier-free guidance, which the few-step weights used at "
                             f"--steps {steps} do not run (give --scheduler to sample the model itself), "
                             f"got {value}")


def valid_interval(interval) -> bool:
    """Whether `interval` is a guidance interval: two numbers (start, stop) with 0 ≤ start < stop ≤ 1."""
    return (isinstance(interval, (tuple, list)) and len(interval) == 2
            and all(isinstance(v, Real) and not isinstance(v, bool) for v in interval)
            and 0 <= interval[0] < interval[1] <= 1)


def check_interval(flag: str, interval) -> tuple[float, float]:
    """A guidance interval (start, stop) given as `flag START STOP`, as a tuple (ValueError naming `flag`)."""
    if not valid_interval(interval):
        raise ValueError(f"{flag} must be START STOP with 0 ≤ START < STOP ≤ 1, got {interval[0]:g} {interval[1]:g}")
    return float(interval[0]), float(interval[1])

