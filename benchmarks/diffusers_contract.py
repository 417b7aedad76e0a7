"""Diffusers' own fast tests for `StableDiffusionPipeline`, run on diffusers' class and on ours in its place.

    git -C DIFFUSERS_CHECKOUT archive HEAD tests | tar -x -C /tmp/dtests
    pip install parameterized requests_mock      # what diffusers' test helpers import
    python benchmarks/diffusers_contract.py /tmp/dtests/tests [--json results.json]

The tests are diffusers' (Apache-2.0), read from a checkout the user provides, never copied into this project. Two
things make them run offline and on our class:
- the tests build their tiny pipeline with `CLIPTokenizer.from_pretrained("hf-internal-testing/tiny-random-clip")`,
  a hub download; a byte-level BPE tokenizer of 1 000 tokens trained here stands in for it, for both classes (so
  tests that compare against pixel values recorded with the hub tokenizer fail for both, and are not counted);
- for our run, `diffusers.StableDiffusionPipeline` is replaced by `LatentDiffusionPipeline` before the test
  module imports it, and a test that reads the log of diffusers' pipeline module reads ours (the module that
  defines the class in its place).
The script runs the suite twice (diffusers' class, then ours) in subprocesses and reports, per test, both outcomes;
the contract is: every test that diffusers' class passes, ours passes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

TEST_FILE = "pipelines/stable_diffusion/test_stable_diffusion.py"
SELECT = "TestStableDiffusionPipeline and not Integration and not Ckpt and not DeviceMap"

PLUGIN = textwrap.dedent('''
    import os

    import transformers

    _from_pretrained = transformers.CLIPTokenizer.from_pretrained.__func__
    _local = {}


    def _tokenizer(cls, name, *args, **kwargs):
        if str(name) != "hf-internal-testing/tiny-random-clip":
            return _from_pretrained(cls, name, *args, **kwargs)
        if "tok" not in _local:
            from latentdiff import train_tokenizer

            words = "a painting of squirrel eating burger cat dog photo red blue astronaut riding horse".split()
            texts = [" ".join(words[i:] + words[:i]) for i in range(len(words))] * 4
            _local["tok"] = train_tokenizer(texts, vocab_size=1000)
        return _local["tok"]


    transformers.CLIPTokenizer.from_pretrained = classmethod(_tokenizer)

    if os.environ.get("LATENTDIFF_CONTRACT") == "ours":
        import diffusers
        import diffusers.pipelines

        from latentdiff import LatentDiffusionPipeline

        diffusers.StableDiffusionPipeline = LatentDiffusionPipeline
        diffusers.pipelines.StableDiffusionPipeline = LatentDiffusionPipeline
        # some tests find the class under test in diffusers.pipelines by its own name (to read its source)
        diffusers.pipelines.LatentDiffusionPipeline = LatentDiffusionPipeline

        # and some read the log of the module that defines the code under test (the truncation warning of
        # encode_prompt; the components from_pretrained loaded): with our class in its place, that is our module
        import diffusers.utils.logging as diffusers_logging

        _get_logger = diffusers_logging.get_logger
        _defining_module = {
            "diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion": LatentDiffusionPipeline.__module__,
            "diffusers.pipelines.pipeline_utils": LatentDiffusionPipeline.__module__,
        }
        diffusers_logging.get_logger = lambda name=None: _get_logger(_defining_module.get(name, name))
''')


def run(tests: Path, which: str, extra: list[str]) -> dict[str, str]:
    """{test id: outcome} for one class."""
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "latentdiff_contract_plugin.py").write_text(PLUGIN)
        report = Path(tmp) / "report.xml"
        env = {**os.environ, "LATENTDIFF_CONTRACT": which, "HF_HUB_OFFLINE": "1",
               "PYTHONPATH": os.pathsep.join([tmp, str(tests.parent), os.environ.get("PYTHONPATH", "")])}
        subprocess.run([sys.executable, "-m", "pytest", "-p", "latentdiff_contract_plugin", str(tests / TEST_FILE),
                        "-k", SELECT, "-q", "-p", "no:cacheprovider", f"--junitxml={report}", *extra],
                       cwd=tests.parent, env=env, check=False)
        return _outcomes(report)


def _outcomes(report: Path) -> dict[str, str]:
    import xml.etree.ElementTree as ET

    outcomes = {}
    for case in ET.parse(report).iter("testcase"):
        kinds = {child.tag for child in case}
        outcome = "failed" if kinds & {"failure", "error"} else "skipped" if "skipped" in kinds else "passed"
        outcomes[f"{case.get('classname').rsplit('.', 1)[-1]}::{case.get('name')}"] = outcome
    return outcomes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("tests", type=Path, help="the tests/ folder of a diffusers checkout")
    parser.add_argument("--json", type=Path, default=None, help="write the per-test outcomes here (default: none)")
    parser.add_argument("pytest_args", nargs="*", help="passed on to pytest (after --)")
    args = parser.parse_args(argv)
    if not (args.tests / TEST_FILE).is_file():
        parser.error(f"{args.tests / TEST_FILE} does not exist; pass the tests/ folder of a diffusers checkout")
    theirs, ours = run(args.tests, "theirs", args.pytest_args), run(args.tests, "ours", args.pytest_args)
    rows = {name: {"diffusers": theirs.get(name, "missing"), "latentdiff": ours.get(name, "missing")}
            for name in sorted(set(theirs) | set(ours))}
    owed = [n for n, r in rows.items() if r["diffusers"] == "passed" and r["latentdiff"] != "passed"]
    for name, row in rows.items():
        mark = "OWED" if name in owed else ""
        print(f"{row['diffusers']:>8} {row['latentdiff']:>8} {mark:4} {name}")
    passed = sum(r["diffusers"] == "passed" for r in rows.values())
    print(f"\n{len(rows)} tests; diffusers' class passes {passed}; latentdiff fails {len(owed)} of those")
    if args.json:
        args.json.write_text(json.dumps({"tests": rows, "owed": owed}, indent=2) + "\n")
    return 1 if owed else 0


if __name__ == "__main__":
    sys.exit(main())
