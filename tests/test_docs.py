"""The docs cover the public API and the examples they list exist."""

import pathlib
import re

import lift

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def _docs_text() -> str:
    return "\n".join(p.read_text() for p in sorted(DOCS.rglob("*.md")))


def test_every_public_name_has_an_api_entry():
    text = _docs_text()
    missing = [name for name in lift.__all__ if f"::: lift.{name}\n" not in text]
    assert not missing, f"public names without a `::: lift.NAME` API entry: {missing}"


def test_every_public_name_has_a_docstring_with_an_example():
    lacking = [
        name
        for name in lift.__all__
        if not isinstance(getattr(lift, name), type)
        or not issubclass(getattr(lift, name), Exception)
        if ">>>" not in (getattr(lift, name).__doc__ or "")
    ]
    assert not lacking, f"public names without a `>>>` example: {lacking}"


def test_every_example_listed_in_the_docs_exists_and_every_example_is_listed():
    listed = set(
        re.findall(r"`examples/([a-z_]+\.py)`", (DOCS / "examples.md").read_text())
    )
    present = {p.name for p in (ROOT / "examples").glob("*.py")}
    assert listed == present


def test_every_nav_page_exists():
    nav = re.findall(r":\s+([\w/-]+\.md)\s*$", (ROOT / "mkdocs.yml").read_text(), re.M)
    assert nav, "mkdocs.yml has no nav"
    missing = [page for page in nav if not (DOCS / page).is_file()]
    assert not missing, f"nav pages missing from docs/: {missing}"
