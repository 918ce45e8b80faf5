"""Griffe extension: render the docstrings' Sphinx markup as Markdown for mkdocstrings.

The docstrings are Google style (``Args:``, ``Returns:``) with reStructuredText inline markup,
which reads well in ``help()``. Before mkdocstrings parses them, this extension rewrites:

- ``:func:`name``` (also ``:class:``, ``:meth:``, ``:attr:``, ``:mod:``, ``:data:``, ``:obj:``)
  into an autorefs cross-reference ``[`name`][full.path]``, the name resolved in the scope of the
  documented object (``~`` shows the last component only). A name that does not resolve, or
  resolves into ``solvers``/``bilevel`` but is not documented, fails ``mkdocs build --strict``;
  names from other libraries (``optax.adam``) become inline code.
- external links ```text <url>`_`` into ``[text](url)``;
- ``:math:`x``` into ``$x$`` and ``.. math::`` blocks into ``$$ ... $$`` (pymdownx.arithmatex).
- simple tables (``=====  =====`` borders) into Markdown tables.

It also reads two Napoleon spellings that Griffe's Google parser does not: an ``Example:``
section (as ``Examples:``, so doctests render as code) and grouped parameters ``a, b: text`` (as
one entry per name, each with the text).
"""

from __future__ import annotations

import builtins
import re

import griffe

OWN_PACKAGES = ("solvers", "bilevel")

_LINK = re.compile(r"`([^`<]+?)\s*<(https?://[^>\s]+)>`__?")
_ROLE = re.compile(r":(?:func|class|meth|attr|mod|data|obj|exc):`(~?)([^`]+)`")
_MATH = re.compile(r":math:`([^`]+)`")
_DIRECTIVE = re.compile(r"^(\s*)\.\. math::(.*)$")
_BORDER = re.compile(r"^(\s*)(=+)(\s+=+)+\s*$")
_LIST_ITEM = re.compile(r"^(?:[-*+]|\d+\.)\s")
_EXAMPLE = re.compile(r"^(\s*)Example:\s*$")
_SECTION = re.compile(r"^(\s*)[A-Z][A-Za-z ]*:\s*$")
_PARAMS = ("Args:", "Arguments:", "Parameters:", "Params:", "Keyword Args:", "Other Parameters:")
_GROUPED = re.compile(r"^(\s+)(\*{0,2}\w+(?:,\s*\*{0,2}\w+)+)(\s*(?:\([^)]*\))?:.*)$")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _resolve(obj: griffe.Object, name: str) -> str | None:
    """Full path of ``name`` seen from ``obj``; ``None`` when it is not one of ours."""
    head, _, rest = name.partition(".")
    if head in OWN_PACKAGES:
        return name
    if head in vars(builtins):  # ValueError, print: not documented here
        return None
    try:
        base = obj.resolve(head)
    except griffe.NameResolutionError:
        # A warning fails ``mkdocs build --strict``: a renamed or removed object.
        griffe.logger.warning(f"{obj.path}: cannot resolve the reference `{name}`")
        return None
    path = f"{base}.{rest}" if rest else base
    return path if path.split(".")[0] in OWN_PACKAGES else None


def _roles(text: str, obj: griffe.Object) -> str:
    def role(match: re.Match) -> str:
        tilde, name = match.groups()
        name = name.strip().lstrip(".")
        shown = name.rsplit(".", 1)[-1] if tilde else name
        target = _resolve(obj, name)
        if target is None:
            return f"`{shown}`"
        return f"[`{shown}`][{target}]"

    text = _LINK.sub(lambda m: f"[{m.group(1)}]({m.group(2)})", text)
    return _MATH.sub(lambda m: f"${m.group(1).strip()}$", _ROLE.sub(role, text))


def _math_blocks(lines: list[str]) -> list[str]:
    out: list[str] = []
    i = 0
    while i < len(lines):
        match = _DIRECTIVE.match(lines[i])
        if not match:
            out.append(lines[i])
            i += 1
            continue
        pad, first = match.group(1), match.group(2).strip()
        body = [first] if first else []
        j = i + 1
        while j < len(lines) and (not lines[j].strip() or _indent(lines[j]) > len(pad)):
            body.append(lines[j].strip())
            j += 1
        while j > i + 1 and not lines[j - 1].strip():  # trailing blank lines stay outside
            j -= 1
            body.pop()
        body = [line for line in body if line]
        if body and any(line.endswith("\\\\") for line in body) and "\\begin" not in body[0]:
            body = ["\\begin{aligned}", *body, "\\end{aligned}"]  # as Sphinx: split lines
        out += [f"{pad}$$", *(pad + line for line in body), f"{pad}$$"]
        i = j
    return out


def _tables(lines: list[str]) -> list[str]:
    """RST simple tables (border, header, border, rows, border) to Markdown tables."""
    out: list[str] = []
    i = 0
    while i < len(lines):
        match = _BORDER.match(lines[i])
        ends = [j for j in range(i + 1, len(lines)) if _BORDER.match(lines[j])][:2]
        if not match or len(ends) < 2 or ends[0] != i + 2:
            out.append(lines[i])
            i += 1
            continue
        starts = [m.start() for m in re.finditer(r"=+", lines[i])]

        def cells(line: str, starts=starts) -> list[str]:
            # Column k spans from the k-th border run to the next one; the last is unbounded.
            return [line[a:b].strip() for a, b in zip(starts, [*starts[1:], None], strict=True)]

        pad = match.group(1)
        header = cells(lines[i + 1])
        out.append(pad + "| " + " | ".join(header) + " |")
        out.append(pad + "|" + "|".join(" --- " for _ in header) + "|")
        for line in lines[ends[0] + 1 : ends[1]]:
            if line.strip():
                out.append(pad + "| " + " | ".join(cells(line)) + " |")
        i = ends[1] + 1
    return out


def _sections(lines: list[str]) -> list[str]:
    """``Example:`` as ``Examples:``; grouped parameters ``a, b: text`` as one entry per name."""
    out: list[str] = []
    params_indent = None  # indentation of the current parameter section's header
    i = 0
    while i < len(lines):
        line = lines[i]
        header = _SECTION.match(line)
        if header:
            params_indent = len(header.group(1)) if line.strip() in _PARAMS else None
        elif line.strip() and params_indent is not None and _indent(line) <= params_indent:
            params_indent = None
        grouped = _GROUPED.match(line) if params_indent is not None else None
        if grouped and _indent(line) > params_indent:
            pad, names, rest = grouped.groups()
            j = i + 1
            while j < len(lines) and lines[j].strip() and _indent(lines[j]) > len(pad):
                j += 1
            for name in names.split(","):
                out += [pad + name.strip() + rest, *lines[i + 1 : j]]
            i = j
            continue
        out.append(_EXAMPLE.sub(r"\1Examples:", line))
        i += 1
    return out


def _lists(lines: list[str]) -> list[str]:
    """Indent list items of the description by 4 per level, as Python-Markdown needs.

    The docstrings indent the continuation of a list item by 2 (as reStructuredText does);
    Python-Markdown needs 4, or a paragraph or ``$$`` block after a blank line leaves the list.
    Sections (``Args:`` ...) are left alone: Griffe parses their indentation itself.
    """
    out: list[str] = []
    section = None  # indentation of the current section header
    in_list = loose = False  # loose: the current item has a blank line (several paragraphs)
    for line in lines:
        indent = _indent(line)
        if line.strip():
            if _SECTION.match(line):
                section, in_list = indent, False
            elif section is not None and indent <= section:
                section = None
            if section is None and indent == 0:
                item = bool(_LIST_ITEM.match(line))
                if item and in_list and loose and out[-1].strip():
                    out.append("")  # else the item joins the previous item's last paragraph
                in_list, loose = item, False
        elif in_list:
            loose = True
        if section is None and in_list and indent:
            line = " " * indent + line
        out.append(line)
    return out


def convert(text: str, obj: griffe.Object) -> str:
    """The docstring ``text`` of ``obj`` with its Sphinx markup rewritten as Markdown."""
    lines = _lists(_sections(_tables(_math_blocks(text.split("\n")))))
    return _roles("\n".join(lines), obj)


class SphinxMarkup(griffe.Extension):
    """Rewrite every docstring of a loaded package once the whole package is known."""

    def on_package(self, *, pkg: griffe.Module, **kwargs) -> None:
        seen: set[int] = set()

        def visit(obj: griffe.Object) -> None:
            if id(obj) in seen:
                return
            seen.add(id(obj))
            if obj.docstring is not None:
                obj.docstring.value = convert(obj.docstring.value, obj)
            for member in obj.members.values():
                if not member.is_alias:
                    visit(member)

        visit(pkg)
