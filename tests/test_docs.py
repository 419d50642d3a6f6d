"""The README and docs/ stay true to the code and to each other: the README opens with the two commands, stays short,
every relative link and anchor resolves, and every config.yaml key has a row in the configuration reference.

The tables quoted from measurements and the metrics table are checked where their data lives: tests/test_performance.py
(docs/benchmarks.md), tests/test_exports.py (docs/using-models.md), tests/test_deploy.py (docs/configuration.md).
"""

from __future__ import annotations

import re
import typing
from pathlib import Path

from pydantic import BaseModel

from conftest import ROOT
from daemon.config import Config

README = ROOT / "README.md"
PAGES = sorted((ROOT / "docs").glob("*.md"))
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def prose(text: str) -> str:
    """The text outside fenced code blocks and inline code spans (where brackets and '#' mean something else)."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)
    return re.sub(r"`[^`\n]*`", "", text)


def anchors(path: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation except '-' and '_' dropped, spaces to hyphens."""
    headings = re.findall(r"^#{1,6} +(.+?) *$", re.sub(r"^```.*?^```", "", path.read_text(), flags=re.M | re.S), re.M)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


def test_the_readme_opens_with_make_run_and_make_test_and_stays_short():
    text = README.read_text()
    assert len(text.splitlines()) <= 250
    top = text.split("\n## ", 1)[0]
    block = re.search(r"^```sh\n(.*?)^```", top, re.M | re.S)
    assert block, "no command block before the README's first section"
    commands = [line.split("#")[0].strip() for line in block.group(1).splitlines()]
    assert commands == ["make run", "make test"]
    assert "Both commands create the virtual environment and install everything" in top


def test_every_relative_link_and_anchor_in_the_readme_and_docs_resolves():
    broken = []
    for page in [README, *PAGES]:
        for target in LINK.findall(prose(page.read_text())):
            if re.match(r"[a-z]+:", target):
                continue
            file, _, anchor = target.partition("#")
            path = (page.parent / file).resolve() if file else page
            if not path.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target}")
                continue
            if anchor and path.suffix == ".md" and anchor not in anchors(path):
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
    assert broken == []


def test_the_readme_links_every_docs_page():
    linked = {(README.parent / t.partition("#")[0]).resolve() for t in LINK.findall(prose(README.read_text()))}
    assert {p.resolve() for p in PAGES} <= linked


def config_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        nested = [a for a in (annotation, *typing.get_args(annotation)) if isinstance(a, type)
                  and issubclass(a, BaseModel)]
        keys += config_keys(nested[0], f"{prefix}{name}.") if nested else [f"{prefix}{name}"]
    return keys


def test_every_config_key_has_a_row_in_the_configuration_reference():
    section = (ROOT / "docs" / "configuration.md").read_text().split("\n## `config.yaml`\n", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        if line.startswith("| `"):
            cells = line.split(" | ")
            rows.append((set(re.findall(r"`([a-z_.*]+)`", cells[0])), set(re.findall(r"`([a-z_.*]+)`", line))))
    keys = config_keys(Config)
    assert len(keys) > 40

    def documented(key: str) -> bool:
        # Named in full (`metrics.port`), or by its last part in the row of its section (`runner.slurm.*`,
        # `notify`) or of a sibling named in full (`limits.archive_max_bytes`, `archive_max_files`).
        parent, _, last = key.rpartition(".")
        return any(key in named or (parent and last in named and (parent in first or f"{parent}.*" in first or any(
            name.startswith(f"{parent}.") for name in first))) for first, named in rows)

    assert [k for k in keys if not documented(k)] == []
