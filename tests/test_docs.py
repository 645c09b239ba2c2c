"""The docs run, cover the public API, and the examples they list exist.

Every ```python block of README.md and of the pages under docs/ runs here, page by
page, the blocks of a page in reading order in one namespace, as a reader pastes
them. A page is one test, so `pytest -n 2` never splits a page's namespace across
workers, and a failure names the page and line (the blocks are compiled with the
page as their file name and their own line numbers, so tracebacks point into the
Markdown). A block that is deliberately not runnable is fenced as something other
than `python` (`text`, `pycon`, `bash`).

A block that only includes another file (mkdocs' `--8<-- "examples/quickstart.py"`)
is not run here: the examples run as scripts in CI; the file must exist.

The collector is a few lines of our own rather than a plugin (Sybil,
pytest-markdown-docs): those make one test item per block, which `pytest -n 2` may
send to different workers, splitting a page's shared namespace; here a page is one
item, and nothing is added to the test dependencies.

Blocks run with JAX's default promotion rules (a reader's, not the strict ones the
rest of the suite uses), in a temporary working directory, and any JAX setting or
environment variable a page changes is restored afterwards.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import os
import pathlib
import re
import sys
import types

import jax
import pytest

import lift

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]

_OPEN = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})\s*(?P<info>[^`]*)$")
# mkdocs' `pymdownx.snippets` include line: the block shows another file.
_SNIPPET = re.compile(r'^\s*--8<--\s+"(?P<path>[^"]+)"\s*$')
_IMPORT = re.compile(r"^\s*(?:from|import)\s+([A-Za-z_]\w*)", re.M)
# JAX settings a page may change; each is put back after the page.
_JAX_OPTIONS = (
    "jax_enable_x64",
    "jax_numpy_dtype_promotion",
    "jax_numpy_rank_promotion",
)


@dataclasses.dataclass(frozen=True)
class Block:
    """One fenced code block: its language, first line of code (1-based), code."""

    language: str
    line: int
    code: str


def code_blocks(text: str) -> list[Block]:
    """The fenced code blocks of a Markdown text, in order (also indented ones)."""
    lines = text.splitlines()
    blocks, i = [], 0
    while i < len(lines):
        opened = _OPEN.match(lines[i])
        if opened is None:
            i += 1
            continue
        indent, fence = opened["indent"], opened["fence"]
        words = opened["info"].split()
        body, j = [], i + 1
        while j < len(lines):
            stripped = lines[j].strip()
            if stripped.startswith(fence) and not stripped.strip(fence[0]):
                break
            body.append(lines[j].removeprefix(indent))
            j += 1
        blocks.append(Block(words[0] if words else "", i + 2, "\n".join(body)))
        i = j + 1
    return blocks


def python_blocks(page: pathlib.Path) -> list[Block]:
    return [b for b in code_blocks(page.read_text()) if b.language == "python"]


def _missing_modules(blocks: list[Block]) -> list[str]:
    names = {m for block in blocks for m in _IMPORT.findall(block.code)}
    return sorted(n for n in names if importlib.util.find_spec(n) is None)


@contextlib.contextmanager
def _restored_settings():
    """Put back os.environ and the JAX settings a page may change."""
    environ = dict(os.environ)
    options = {name: getattr(jax.config, name) for name in _JAX_OPTIONS}
    try:
        with jax.numpy_dtype_promotion("standard"), jax.numpy_rank_promotion("allow"):
            yield
    finally:
        os.environ.clear()
        os.environ.update(environ)
        for name, value in options.items():
            jax.config.update(name, value)


def run_page(page: pathlib.Path) -> None:
    """Run the python blocks of `page` in order in one fresh module namespace."""
    rel = page.relative_to(ROOT).as_posix() if page.is_relative_to(ROOT) else page
    module = types.ModuleType("__docs__")
    module.__file__ = str(page)
    sys.modules["__docs__"] = module
    try:
        with _restored_settings():
            for block in python_blocks(page):
                lines = [line for line in block.code.splitlines() if line.strip()]
                included = [_SNIPPET.match(line) for line in lines]
                if any(included):  # an included example: it runs as a script in CI
                    assert all(included), f"{rel}:{block.line}: code beside --8<--"
                    for match in filter(None, included):
                        assert (ROOT / match["path"]).is_file(), (rel, match["path"])
                    continue
                # Blank lines in front keep the page's line numbers in tracebacks.
                source = "\n" * (block.line - 1) + block.code + "\n"
                try:
                    exec(compile(source, str(page), "exec"), module.__dict__)
                except BaseException as error:
                    error.add_note(
                        f"in the python block of {rel} that starts at line "
                        f"{block.line} (blocks of a page run in order, as pasted)"
                    )
                    raise
    finally:
        del sys.modules["__docs__"]


RUNNABLE = [page for page in PAGES if python_blocks(page)]


@pytest.mark.parametrize(
    "page", RUNNABLE, ids=[p.relative_to(ROOT).as_posix() for p in RUNNABLE]
)
def test_python_blocks_run(page, tmp_path, monkeypatch):
    missing = _missing_modules(python_blocks(page))
    if missing:
        message = f"{page.name} needs {', '.join(missing)}"
        if os.environ.get("LIFT_REQUIRE_EXTRAS"):
            pytest.fail(f"{message} (LIFT_REQUIRE_EXTRAS is set)")
        pytest.skip(message)
    monkeypatch.chdir(tmp_path)  # a block that writes a file writes it here
    run_page(page)


def test_a_broken_block_fails_with_its_page_and_line(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "# Page\n\n```python\nx = 1\n```\n\ntext\n\n"
        "```text\nnot python\n```\n\n```python\ny = x + undefined\n```\n"
    )
    with pytest.raises(NameError, match="undefined") as caught:
        run_page(page)
    assert caught.value.__notes__ == [
        f"in the python block of {page} that starts at line 14 (blocks of a page "
        "run in order, as pasted)"
    ]
    frame = caught.traceback[-1]
    assert (str(frame.path), frame.lineno + 1) == (str(page), 14)


def test_a_page_changes_no_setting_and_needs_only_what_it_imports(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "```python\nimport os, jax\njax.config.update('jax_enable_x64', True)\n"
        "os.environ['LIFT_DOCS_PROBE'] = '1'\n"
        "import jax.numpy as jnp\n"
        "x = jnp.ones((2, 3), jnp.float32) + jnp.ones(3, jnp.int32)  # JAX's defaults\n"
        "```\n"
        "```python\nimport surely_not_installed_module\n```\n"
    )
    with pytest.raises(ModuleNotFoundError):
        run_page(page)
    assert not jax.config.jax_enable_x64
    assert "LIFT_DOCS_PROBE" not in os.environ
    assert _missing_modules(python_blocks(page)) == ["surely_not_installed_module"]


def test_fences_are_found_indented_and_only_python_runs():
    text = (
        "!!! note\n    ```python\n    a = 1\n    ```\n\n"
        "```text\nb\n```\n~~~python\nc\n~~~\n"
    )
    assert code_blocks(text) == [
        Block("python", 3, "a = 1"),
        Block("text", 7, "b"),
        Block("python", 10, "c"),
    ]


def test_few_blocks_are_not_runnable():
    fenced = [
        (page.relative_to(ROOT).as_posix(), block)
        for page in PAGES
        for block in code_blocks(page.read_text())
    ]
    assert sum(block.language == "python" for _, block in fenced) > 30
    # Python is fenced `python` (and runs); other aliases would skip it unnoticed.
    aliases = [
        (rel, block.line)
        for rel, block in fenced
        if block.language in {"py", "py3", "python3", "ipython", "Python"}
    ]
    assert not aliases, f"python fenced under another name: {aliases}"
    # Code fenced as `text` or `pycon` to keep it from running is rare and deliberate.
    code = re.compile(r"^\s*(import \w|from [\w.]+ import|def \w|class \w)", re.M)
    hidden = [
        (rel, block.line, block.language)
        for rel, block in fenced
        if block.language != "python" and code.search(block.code)
    ]
    assert len(hidden) <= 3, f"code blocks that do not run: {hidden}"


def _docs_text() -> str:
    return "\n".join(p.read_text() for p in sorted(DOCS.rglob("*.md")))


def test_every_public_name_has_an_api_entry():
    text = _docs_text()
    missing = [name for name in lift.__all__ if f"::: lift.{name}\n" not in text]
    assert not missing, f"public names without a `::: lift.NAME` API entry: {missing}"


def test_every_transform_has_a_runnable_example_in_the_docs():
    code = "\n".join(block.code for page in RUNNABLE for block in python_blocks(page))
    transforms = [
        "jit", "vmap", "scan", "grad", "value_and_grad", "checkpoint", "cond",
        "switch", "while_loop", "fori_loop", "eval_shape", "shard_map", "pmap",
    ]  # fmt: skip
    missing = [name for name in transforms if f"lift.{name}(" not in code]
    assert not missing, f"transforms without a runnable docs example: {missing}"


def test_docs_make_no_claim_the_benchmarks_contradict_and_install_jax_lift():
    # The benchmarks measure a compiled lift.jit step at 1.07-1.09x a hand-written
    # jax.jit step (the keys in the model cost JAX's flatten), so not "the same cost".
    claim = re.compile(r"costs\s+what\s+(a\s+call\s+of\s+)?`?jax\.jit", re.I)
    for path in [*PAGES, *(ROOT / "examples").glob("*.py")]:
        text = path.read_text()
        assert not claim.search(text), path
        # The distribution is jax-lift: installing the index's `lift` gets another
        # project.
        assert not re.search(r"pip install ['\"]?lift\b", text), path


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
    pages = {p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md")}
    assert not pages - set(nav), f"pages not in mkdocs.yml's nav: {pages - set(nav)}"
