"""What every latentdiff command line shares: help that states each flag's default, and argument types whose
errors name the rule."""

from __future__ import annotations

import argparse

MAX_SEED = 2**64 - 1  # what torch.Generator.manual_seed takes


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


def non_negative_int(text: str) -> int:
    if not text.lstrip("+").isdigit():
        raise argparse.ArgumentTypeError(f"must be an integer ≥ 0, got {text!r}")
    return int(text)


def seed(text: str) -> int:
    if not text.lstrip("+").isdigit() or int(text) > MAX_SEED:
        raise argparse.ArgumentTypeError(f"must be an integer in [0, 2**64 - 1], got {text!r}")
    return int(text)


def guidance(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (value >= 0 and value != float("inf")):
        raise argparse.ArgumentTypeError(f"must be a finite number ≥ 0, got {text!r}")
    return value
