"""Every ``python -m`` command written in README.md and docs/*.md parses: its keys are settings of the command and
its values have their types (the command's own parser decides, in process, without running anything).

A command is read from a fenced block (lines joined at a trailing backslash) or an inline code span, from
``python -m <module>`` to the end of the command (a pipe, ``&&``, ``;``, a redirect or a comment ends it).
Arguments that are placeholders for the reader (``<dir>``, ``...``, ``$(...)``) are left out, and a command named
without arguments is only named (test_docs checks its module); everything else must parse. ``come_rl.run`` takes Hydra overrides: they must compose with the package's configuration.
"""

from __future__ import annotations

import importlib
import re
import shlex
from pathlib import Path

import pytest
from test_docs import FENCE, INLINE_CODE, doc_files, doc_ids

from come_rl.cli_args import parse_dataclass

COMMAND = re.compile(r"\bpython3?\s+-m\s+([A-Za-z_][\w.]*)(.*)")
PLACEHOLDER = re.compile(r"<[^<>\n]*>")
ENDS = {"|", "||", "&&", ";", "&", ">", ">>", "2>&1", ")"}
# module -> (module holding its settings, the settings dataclass); a benchmark's come from come_rl.bench.cli
SETTINGS = {
    "come_rl.experiments.consistency": ("come_rl.experiments.consistency", "ConsistencyConfig"),
    "come_rl.experiments.latent_probe": ("come_rl.experiments.latent_probe", "LatentProbeConfig"),
    "come_rl.experiments.recall": ("come_rl.experiments.recall", "RecallConfig"),
    "come_rl.experiments.steps_curve": ("come_rl.experiments.steps_curve", "StepsCurveConfig"),
    "come_rl.experiments.streaming": ("come_rl.experiments.streaming", "StreamingConfig"),
    "come_rl.evaluate": ("come_rl.evaluate", "EvaluateConfig"),
    "come_rl.train": ("come_rl.train", "TrainConfig"),
    "come_rl.distill": ("come_rl.distill", "AssembleConfig"),
    "come_rl.collect": ("come_rl.collect", "CollectConfig"),
    "come_rl.odometry": ("come_rl.odometry", "OdometryTrainConfig"),
    "come_rl.gpu_check": ("come_rl.gpu_check", "GPUCheckConfig"),
    "agents.find_object": ("agents.find_object", "FindConfig"),
    "agents.find_object_tuning": ("agents.find_object_tuning", "TuneConfig"),
    "agents.return_to_place": ("agents.return_to_place", "ReturnConfig"),
    "agents.return_to_place_diagnosis": ("agents.return_to_place_diagnosis", "DiagnosisConfig"),
    "agents.nwm_protocol": ("agents.nwm_protocol", "ProtocolConfig"),
}
NOT_PYTHON_COMMANDS = {"pip", "pytest", "venv"}  # the set-up and the test runner


def placeholder(argument: str) -> bool:
    return any(mark in argument for mark in ("<", ">", "...", "$", "…"))


def reader_values(arguments: list[str]) -> list[str]:
    """``key=<what the reader puts here>`` -> ``key=placeholder`` (the key must still be a setting); placeholders
    without a key are left out."""
    kept = []
    for argument in arguments:
        key, has_value, _ = argument.partition("=")
        if not placeholder(argument):
            kept.append(argument)
        elif has_value and not placeholder(key):
            kept.append(f"{key}=placeholder")
    return kept


def parse_settings(arguments: list[str], settings: type) -> None:
    """parse_dataclass, where a ``key=placeholder`` of another type than text counts as given."""
    try:
        parse_dataclass(arguments, settings)
    except ValueError as error:
        bad = re.search(r"override (\w+)=placeholder|bad value for (\w+): 'placeholder'", str(error))
        if bad is None:
            raise
        key = bad.group(1) or bad.group(2)
        parse_settings([a for a in arguments if a != f"{key}=placeholder"], settings)


def commands(text: str) -> list[tuple[str, list[str]]]:
    """(module, arguments) of every ``python -m`` command in ``text``."""
    chunks = [block.replace("\\\n", " ") for block in FENCE.findall(text)]
    chunks += [span.strip("`") for span in INLINE_CODE.findall(FENCE.sub("", text))]
    found = []
    for chunk in chunks:
        for line in chunk.splitlines():
            for match in COMMAND.finditer(line):
                rest = PLACEHOLDER.sub("<placeholder>", match.group(2))  # "<16 x 500 steps>" is one argument
                try:
                    tokens = shlex.split(rest, comments=True)
                except ValueError:  # an unbalanced quote: the span was cut inside a longer command
                    tokens = rest.split()
                arguments = []
                for token in tokens:
                    if token in ENDS or token.startswith(">"):
                        break
                    arguments.append(token)
                found.append((match.group(1), arguments))
    return found


def check(module: str, arguments: list[str]) -> None:
    arguments = reader_values(arguments)
    if not arguments:
        return  # the command named, not written out (its module is checked by test_docs)
    if module in NOT_PYTHON_COMMANDS or module == "come_rl" or arguments[:1] in (["--help"], ["-h"]):
        return
    if module == "come_rl.run":
        from test_cli import compose_config

        compose_config(arguments)
        return
    if module == "come_rl.bench":
        from come_rl.bench.cli import BENCHMARKS

        assert arguments and arguments[0] in BENCHMARKS, f"unknown benchmark in {arguments}"
        name, _, settings = BENCHMARKS[arguments[0]]
        parse_settings(arguments[1:], getattr(importlib.import_module(f"come_rl.bench.{name}"), settings))
        return
    if module == "come_rl.checkpoint":  # sign|verify, then the reader's own checkpoint directories
        from come_rl.checkpoint import CheckpointCommand

        assert arguments[0] in ("sign", "verify"), f"come_rl.checkpoint needs sign or verify first: {arguments}"
        parse_settings([argument for argument in arguments[1:] if "=" in argument], CheckpointCommand)
        return
    assert module in SETTINGS, f"no parser known for python -m {module}: add it to SETTINGS"
    where, settings = SETTINGS[module]
    parse_settings(arguments, getattr(importlib.import_module(where), settings))


@pytest.mark.parametrize("path", doc_files(), ids=doc_ids)
def test_every_command_in_the_docs_parses(path: Path) -> None:
    failures = []
    for module, arguments in commands(path.read_text()):
        try:
            check(module, arguments)
        except Exception as error:  # the parser's own message says which key or value
            failures.append(f"python -m {module} {' '.join(arguments)}\n    -> {type(error).__name__}: {error}")
    assert not failures, f"{doc_ids(path)}: commands that do not parse:\n" + "\n".join(failures)


def test_the_command_reader_sees_what_it_checks() -> None:
    text = ("Run `python -m come_rl.evaluate checkpoint=x clips=8 | tee log` or\n\n```bash\n"
            "python -m come_rl.experiments.recall seed=1 \\\n    steps_list=20 out_dir=<dir>  # a comment\n```\n")
    assert commands(text) == [("come_rl.experiments.recall", ["seed=1", "steps_list=20", "out_dir=<placeholder>"]),
                              ("come_rl.evaluate", ["checkpoint=x", "clips=8"])]
    check("come_rl.experiments.recall", ["seed=1", "steps_list=20", "out_dir=<placeholder>",
                                            "episodes_per_start=<an int>"])
    with pytest.raises(ValueError, match="unknown key 'dir'"):
        check("come_rl.experiments.recall", ["dir=<placeholder>"])
    with pytest.raises(ValueError, match="unknown key 'clip'"):
        check("come_rl.evaluate", ["clip=8"])
    with pytest.raises(Exception, match="plannr"):
        check("come_rl.run", ["plannr.population=8"])
