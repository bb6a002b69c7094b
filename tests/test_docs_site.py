"""The front page and the manual hang together: README.md stays a short front
door, every page of docs/ can be reached (from the site's navigation or from
README's links), README's links and anchors lead somewhere, and the changelog
has an entry for the version being released."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text()
LINK = re.compile(r"\]\(([^)\s]+)\)")


def nav_pages(nav) -> set[str]:
    """Every page file named in mkdocs.yml's `nav:` (nested sections included)."""
    if isinstance(nav, str):
        return {nav}
    if isinstance(nav, list):
        return set().union(*(nav_pages(item) for item in nav))
    if isinstance(nav, dict):
        return set().union(*(nav_pages(value) for value in nav.values()))
    return set()


def slug(heading: str) -> str:
    """The anchor a Markdown renderer (GitHub's, PyPI's readme_renderer) gives a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def test_readme_is_at_most_12000_characters():
    assert len(README) <= 12_000, len(README)


def test_every_docs_page_is_in_the_nav_or_linked_from_the_readme():
    config = yaml.safe_load((REPO / "mkdocs.yml").read_text())
    nav = nav_pages(config["nav"])
    pages = {p.name for p in (REPO / "docs").glob("*.md")}
    linked = {m[len("docs/"):].split("#")[0] for m in LINK.findall(README) if m.startswith("docs/")}
    assert nav <= pages, f"nav names pages that do not exist: {sorted(nav - pages)}"
    assert not pages - nav - linked, f"pages nobody can reach: {sorted(pages - nav - linked)}"
    assert nav == pages, f"pages left out of mkdocs.yml's nav: {sorted(pages - nav)}"


def test_every_relative_link_in_the_readme_leads_to_a_file_or_heading():
    headings = {slug(h) for h in re.findall(r"^#+ (.+)$", README, re.M)}
    relative = [m for m in LINK.findall(README) if not m.startswith(("http://", "https://"))]
    assert relative, "README links nothing"
    for target in relative:
        path, _, anchor = target.partition("#")
        if path:
            assert (REPO / path).exists(), target
        else:
            assert anchor in headings, (target, sorted(headings))


def test_the_changelog_has_an_entry_for_the_packages_version():
    version = re.search(r'^__version__ = "([^"]+)"$', (REPO / "mergekit_cabs" / "__init__.py").read_text(), re.M)[1]
    changelog = (REPO / "CHANGELOG.md").read_text()
    entries = re.findall(r"^## \[([^\]]+)\]", changelog, re.M)
    assert entries[0] == "Unreleased" or entries[0] == version, entries
    assert version in entries, entries
