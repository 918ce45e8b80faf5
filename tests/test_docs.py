"""The documentation site: its docstring translator, its pages and its navigation.

``.ci/run`` builds the site with ``mkdocs build --strict``, which fails on a broken
cross-reference or docstring problem; these tests cover the translation of the docstrings'
Sphinx markup and the pages the build does not check.
"""

from __future__ import annotations

import importlib.util
import logging
import re
from pathlib import Path

import pytest

griffe = pytest.importorskip("griffe")  # the docs extra: pip install -e ".[docs]"
yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def _load_extension():
    spec = importlib.util.spec_from_file_location(
        "sphinx_markup", DOCS / "_ext" / "sphinx_markup.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


sphinx_markup = _load_extension()

PKG = {
    "__init__.py": "from pkg._impl import Thing, helper\n\n__all__ = ['Thing', 'helper']\n",
    "_impl.py": '''
import optax


class Thing:
    """A thing.

    Example:
      >>> Thing().run()
    """

    def run(self):
        """Run :meth:`go` then :func:`helper`."""

    def go(self):
        """Go."""


def helper(a, b):
    """Help :class:`Thing`, :meth:`Thing.run`, :func:`~pkg.helper`, :func:`optax.sgd`.

    Raises :class:`ValueError`; see `the paper <https://example.org/p>`_.

    Args:
      a, b: the inputs
        (two of them).
    """


def stale():
    """Calls :func:`gone`."""
''',
}


@pytest.fixture
def package(monkeypatch):
    monkeypatch.setattr(sphinx_markup, "OWN_PACKAGES", ("pkg",))
    extensions = griffe.load_extensions(sphinx_markup.SphinxMarkup())
    with griffe.temporary_visited_package("pkg", PKG, extensions=extensions) as pkg:
        yield pkg


def test_roles_become_cross_references_to_full_paths(package):
    text = package["_impl.helper"].docstring.value
    assert "[`Thing`][pkg._impl.Thing]" in text
    assert "[`Thing.run`][pkg._impl.Thing.run]" in text
    assert "[`helper`][pkg.helper]" in text  # ~ shows the last component only
    assert "`optax.sgd`" in text and "[`optax.sgd`]" not in text  # another library: code
    assert "`ValueError`" in text and "[`ValueError`]" not in text
    assert "[the paper](https://example.org/p)" in text
    assert ":func:" not in text and ":class:" not in text and ":meth:" not in text
    # A method's bare name resolves in its class.
    run = package["_impl.Thing.run"].docstring.value
    assert run == "Run [`go`][pkg._impl.Thing.go] then [`helper`][pkg._impl.helper]."


def test_unresolvable_reference_is_a_warning(package, caplog):
    # mkdocs build --strict turns this warning into a failed build.
    with caplog.at_level(logging.WARNING):
        sphinx_markup.convert(":func:`gone`", package["_impl.stale"])
    assert "pkg._impl.stale: cannot resolve the reference `gone`" in caplog.text


def test_example_section_and_grouped_parameters(package):
    assert "Examples:\n  >>> Thing().run()" in package["_impl.Thing"].docstring.value
    helper = package["_impl.helper"]
    params = helper.docstring.parse("google")[-1]
    assert [p.name for p in params.value] == ["a", "b"]
    assert all(p.description == "the inputs\n(two of them)." for p in params.value)


def test_math_blocks_and_inline_math():
    text = "\n".join(
        [
            r"Intro :math:`\alpha_t` here.",
            "",
            r".. math:: a &= b \\",
            "   c &= d",
            "",
            ".. math::",
            "",
            "  x = y",
            "",
            "After.",
        ]
    )
    out = sphinx_markup.convert(text, obj=None).split("\n")
    assert out[0] == r"Intro $\alpha_t$ here."
    assert out[2:8] == ["$$", r"\begin{aligned}", r"a &= b \\", "c &= d", r"\end{aligned}", "$$"]
    assert out[9:12] == ["$$", "x = y", "$$"]
    assert out[12:] == ["", "After."]


def test_simple_table_becomes_markdown_table():
    text = "\n".join(
        [
            "====  ========  ===",
            "spec  value     for",
            "====  ========  ===",
            "a     one two   x",
            "b     three",
            "====  ========  ===",
        ]
    )
    assert sphinx_markup.convert(text, obj=None).split("\n") == [
        "| spec | value | for |",
        "| --- | --- | --- |",
        "| a | one two | x |",
        "| b | three |  |",
    ]


def test_list_items_get_markdown_indentation():
    text = "\n".join(
        ["- first", "  more", "", "  .. math:: x", "", "  para", "- second", "", "Args:", "  a: b"]
    )
    assert sphinx_markup.convert(text, obj=None).split("\n") == [
        "- first",
        "    more",
        "",
        "    $$",
        "    x",
        "    $$",
        "",
        "    para",
        "",  # else "- second" would join "para" (Python-Markdown)
        "- second",
        "",
        "Args:",
        "  a: b",  # sections keep their indentation: Griffe parses it
    ]


def test_hparams_table_renders():
    # The one table in the docstrings: every row keeps its three columns.
    loader = griffe.GriffeLoader(
        extensions=griffe.load_extensions(sphinx_markup.SphinxMarkup()), search_paths=[str(ROOT)]
    )
    text = loader.load("bilevel.hparams").docstring.value
    rows = [line for line in text.split("\n") if line.startswith("| ``")]
    assert len(rows) == 7
    assert all(row.count(" | ") == 2 for row in rows)
    assert "| ``bounded(init, lo, hi)`` | $lo + (hi - lo)\\,\\sigma(u)$ (one-sided" in text


def _nav_pages(nav) -> list[str]:
    pages = []
    for entry in nav:
        for value in entry.values() if isinstance(entry, dict) else [entry]:
            pages += _nav_pages(value) if isinstance(value, list) else [value]
    return pages


def test_every_page_is_in_the_navigation():
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    pages = {str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md")}
    assert sorted(_nav_pages(config["nav"])) == sorted(pages)


def test_api_reference_covers_every_package():
    directives = set()
    for page in (DOCS / "api").glob("*.md"):
        directives |= set(re.findall(r"^::: ([\w.]+)$", page.read_text(), re.M))
    subpackages = {f"bilevel.{p.parent.name}" for p in (ROOT / "bilevel").glob("*/__init__.py")}
    assert directives == {"solvers", "bilevel", "bilevel.hparams"} | subpackages


def test_experiments_page_lists_every_script():
    scripts = {p.stem for p in (ROOT / "experiments").glob("*.py") if not p.stem.startswith("_")}
    listed = set(
        re.findall(r"`python -m experiments\.(\w+)`", (DOCS / "experiments.md").read_text())
    )
    assert listed == scripts


def test_install_lines_on_the_home_page():
    home = (DOCS / "index.md").read_text()
    assert 'pip install -e ".[experiments]" "jax[cuda12]"' in home
    assert 'pip install -e ".[docs]"' in home
