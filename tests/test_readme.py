"""The README and docs/ as a user reads them: the examples run, the links resolve, the README stays short and
free of commit ids, and the usage guide names every flag and recipe field."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").rglob("*.md"))]
MAX_README_LINES = 250

# A commit id: 7-40 hex digits standing alone, with at least one digit (so "defaced" is a word) and not the
# fractional part of a number ("0.70710678").
COMMIT_ID = re.compile(r"(?<![\w.])(?=[a-f]*\d)[0-9a-fA-F]{7,40}(?!\w)")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6} (.+)$", re.MULTILINE)
FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)


def _python_blocks(marker: str) -> str:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)
    return next(block for block in blocks if marker in block)


def _run(source: str) -> dict:
    namespace: dict = {}
    exec(compile(source, str(README), "exec"), namespace)
    return namespace


def test_readme_model_example_runs() -> None:
    namespace = _run(_python_blocks("RecLMIS.build"))
    assert namespace["logits"].shape == namespace["masks"].shape


def test_readme_ops_example_runs() -> None:
    namespace = _run(_python_blocks("weighted_mask("))
    q, img, txt = namespace["q"], namespace["img"], namespace["txt"]
    assert namespace["out"].shape == q.shape
    assert namespace["S"].shape == (img.shape[0], txt.shape[0])
    mask = namespace["mask"]
    assert mask.shape == img.shape[:2] and (mask.sum(1) == img.shape[1] // 2).all()
    assert (namespace["x_masked"][mask] == 0).all()


def test_readme_is_at_most_250_lines() -> None:
    lines = len(README.read_text().splitlines())
    assert lines <= MAX_README_LINES, f"README.md has {lines} lines, at most {MAX_README_LINES}"


def test_commit_id_pattern() -> None:
    assert COMMIT_ID.findall(
        "at commit 33e1efa, (8d4532a) and 602e797b8c24ed79b6e3a71f3e89fba0931435eb."
    ) == [
        "33e1efa",
        "8d4532a",
        "602e797b8c24ed79b6e3a71f3e89fba0931435eb",
    ]
    assert COMMIT_ID.findall("1234567 and 1234567.") == ["1234567", "1234567"]
    ordinary = "defaced arXiv:2404.02845 0.70710678 1e-10 fp16 sm_90 2.14.1+cu130 1821--1835 note_seed0"
    assert COMMIT_ID.findall(ordinary) == []


def test_readme_has_no_commit_ids() -> None:
    found = [
        (number, line)
        for number, line in enumerate(README.read_text().splitlines(), 1)
        if COMMIT_ID.search(line)
    ]
    assert not found, f"commit ids in README.md (line, text): {found}"


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped (hyphens and underscores kept), spaces
    to hyphens."""
    text = re.sub(r"[`*]", "", heading).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    return {_slug(heading) for heading in HEADING.findall(FENCE.sub("", page.read_text()))}


def _links(page: Path) -> list[str]:
    return LINK.findall(FENCE.sub("", page.read_text()))


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_relative_links_resolve(page: Path) -> None:
    broken = []
    for target in _links(page):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and file.suffix == ".md" and anchor not in _anchors(file):
            broken.append(f"{target} (no heading #{anchor} in {file.relative_to(ROOT)})")
    assert not broken, f"{page.relative_to(ROOT)}: broken links: {broken}"


def test_torch_ops_named_in_the_docs_exist() -> None:
    pytest.importorskip("triton")
    import reclmis.kernels.conditioned_attention  # registers the attention's torch.ops
    import reclmis.kernels.max_similarity  # noqa: F401
    from reclmis.ops.weighted_mask import extension_available

    names = {name for page in PAGES for name in re.findall(r"torch\.ops\.reclmis\.(\w+)", page.read_text())}
    if not extension_available():
        names.discard("weighted_mask")
    missing = [name for name in sorted(names) if not hasattr(torch.ops.reclmis, name)]
    assert names and not missing, f"torch.ops.reclmis has no {missing}"


def test_usage_guide_names_every_flag_and_field() -> None:
    from reclmis.cli import build_parser
    from reclmis.config import LossWeights, RecLMISConfig, TrainConfig

    usage = (ROOT / "docs" / "usage.md").read_text()
    parser = build_parser()
    commands = next(action for action in parser._actions if action.dest == "command").choices
    missing = []
    for command, sub in commands.items():
        if f"reclmis {command}" not in usage:
            missing.append(f"reclmis {command}")
        for action in sub._actions:
            flags = [flag for flag in action.option_strings if flag.startswith("--") and flag != "--help"]
            missing += [f"{command} {flag}" for flag in flags if f"`{flag}" not in usage]
    for config in (RecLMISConfig, TrainConfig, LossWeights):
        missing += [
            f"{config.__name__}.{f.name}" for f in dataclasses.fields(config) if f"`{f.name}`" not in usage
        ]
    assert not missing, f"docs/usage.md does not document {missing}"


def test_readme_recipe_table_lists_every_recipe() -> None:
    text = README.read_text()
    missing = [
        path.name
        for path in sorted((ROOT / "configs").glob("*.yaml"))
        if f"(configs/{path.name})" not in text
    ]
    assert not missing, f"the README's recipe table lacks {missing}"
