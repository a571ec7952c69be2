"""The README and docs/ stay true to the tree: generated tables fresh, links and named paths alive."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from spyre_backend.config import ServingConfig
from tools import config_doc

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# top-level folders of this repository: a path in backticks that starts with one must exist
TRACKED_ROOTS = ("spyre_backend", "bench", "scripts", "tests", "tools", "testkit", "client", "deploy", "docker",
                 "model_repository", "docs", "checkpoints")
# packages run with python -m (one-off scripts/ since removed are named with their commit)
PACKAGES = ("spyre_backend", "bench", "tools", "testkit", "client")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def page_id(page: Path) -> str:
    return str(page.relative_to(ROOT))


def anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens, repeats numbered."""
    seen: dict[str, int] = {}
    for heading in re.findall(r"^#+ (.+)$", FENCE.sub("", page.read_text()), re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        seen[slug] = seen.get(slug, -1) + 1
        if seen[slug]:
            seen[f"{slug}-{seen[slug]}"] = 0
    return set(seen)


def test_configuration_doc_is_generated_from_config_py():
    current = config_doc.DOC.read_text()
    assert config_doc.render(current) == current, "docs/configuration.md is stale: python -m tools.config_doc --write"


def test_configuration_doc_lists_every_parameter():
    text = config_doc.DOC.read_text()
    missing = [name for name in ServingConfig.parameters() if f"| `{name}` |" not in text]
    assert not missing


def test_readme_is_a_quickstart():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    assert "make serve" in readme.split("```")[1] and "make test" in readme.split("```")[1]


def test_readme_glance_names_real_parameters():
    readme = (ROOT / "README.md").read_text()
    table = readme.split("## Configuration at a glance", 1)[1].split("\n## ", 1)[0]
    named = {n for row in re.findall(r"^\| (`.+?) \|", table, re.M) for n in re.findall(r"`(\w+)`", row)}
    assert named and not named - set(ServingConfig.parameters())


@pytest.mark.parametrize("page", PAGES[1:], ids=page_id)
def test_docs_page_starts_by_saying_what_it_holds(page):
    lines = page.read_text().splitlines()
    assert lines[0].startswith("# ") and lines[1] == "" and lines[2].startswith("This page holds")


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_links_resolve(page):
    text = FENCE.sub("", page.read_text())
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"\w+://", target):
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        assert file.exists(), f"{page_id(page)}: link to missing {target}"
        if anchor and file.suffix == ".md":
            assert anchor in anchors(file), f"{page_id(page)}: no heading for #{anchor} in {file.name}"


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_named_paths_and_modules_exist(page):
    text = page.read_text()
    for span in re.findall(r"`([^`\s]+)`", FENCE.sub("", text)):
        span = span.rstrip(".,:;")
        if span.split("/")[0] in TRACKED_ROOTS and "/" in span and ":" not in span:
            assert list(ROOT.glob(span.rstrip("/"))), f"{page_id(page)}: `{span}` does not exist"
    for module in re.findall(r"python -m ([\w.]+)", text):
        if module.split(".")[0] in PACKAGES:
            base = ROOT / module.replace(".", "/")
            assert base.with_suffix(".py").exists() or (base / "__init__.py").exists() or \
                (base / "__main__.py").exists(), f"{page_id(page)}: no module {module}"
