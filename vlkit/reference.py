"""The part reference behind ``vlkit list``: docstrings as plain text, and every ``Args`` field with its type,
default and documentation.

Field documentation is the string literal written right after the field (an attribute docstring, the
codebase's convention), which Python does not keep at runtime, so it is read from the source with
:mod:`ast`. This module imports nothing heavy; :func:`describe` imports the part it describes.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import itertools
import re
import textwrap
import typing
from typing import Any

_ROLE = re.compile(r":[a-z]+(?::[a-z]+)?:`~?([^`<]*?)(?:\s*<[^>]*>)?`")  # :class:`~a.b.C` / :func:`x <y>`
_LITERAL = re.compile(r"``([^`]+)``")
_LINK = re.compile(r"`([^`<]+?)\s*<[^>]+>`_+")  # `text <url>`_
_INTERPRETED = re.compile(r"(?<![`\w])`([^`]+)`(?!`)")
_EMPHASIS = re.compile(r"(?<![*\w])\*\*?([^*\n]+?)\*\*?(?![*\w])")


def plain(text: str) -> str:
    """reST markup removed: roles (``:class:`~a.B``` -> ``B``), literals, links, emphasis; ``::`` -> ``:``."""
    def role(m: re.Match[str]) -> str:
        target = m.group(1).strip()
        whole = m.group(0)
        return target.rsplit(".", 1)[-1] if "`~" in whole else target

    text = _ROLE.sub(role, text)
    text = _LINK.sub(r"\1", text)
    text = _LITERAL.sub(r"\1", text)
    text = _INTERPRETED.sub(r"\1", text)
    text = _EMPHASIS.sub(r"\1", text)
    return re.sub(r"(\S)::(\s|$)", r"\1:\2", text)


def paragraphs(doc: str) -> list[str]:
    """The paragraphs of a docstring as plain text, each joined into one line (indented blocks kept)."""
    out = []
    for block in re.split(r"\n\s*\n", inspect.cleandoc(doc or "")):
        lines = block.splitlines()
        if lines and all(line.startswith((" ", "\t")) for line in lines[1:]) and len(lines) > 1 \
                and lines[0].rstrip().endswith("::"):
            out.append(plain(block))
        elif any(line.startswith((" ", "\t", "* ", "- ")) for line in lines):
            out.append("\n".join(plain(line) for line in lines))
        else:
            out.append(plain(" ".join(line.strip() for line in lines)))
    return [p for p in out if p.strip()]


def summary(doc: str) -> str:
    """The first sentence of a docstring's first paragraph, as plain text (the whole paragraph when no
    sentence ends inside it); never cut mid-sentence."""
    paras = paragraphs(doc)
    if not paras:
        return ""
    first = " ".join(paras[0].split())
    m = re.search(r"(?<!\be\.g)(?<!\bi\.e)(?<!\betc)[.!?](?=\s+[A-Z(])", first)
    return first[:m.end()] if m else first


def field_docs(cls: type) -> dict[str, str]:
    """``{field: doc}`` for the attribute docstrings of ``cls`` (a dataclass) and its dataclass bases."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if klass is object or not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError, SyntaxError):
            continue
        node = next((n for n in tree.body if isinstance(n, ast.ClassDef)), None)
        body = node.body if node is not None else []
        for stmt, nxt in itertools.pairwise(body):
            if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
                    and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                    and isinstance(nxt.value.value, str)):
                docs[stmt.target.id] = " ".join(paragraphs(nxt.value.value))
    return docs


def type_name(tp: Any) -> str:
    """A readable annotation: ``int | None``, ``list[str]``, ``'a' | 'b'`` for literals."""
    if isinstance(tp, str):
        return tp
    if tp is type(None):
        return "None"
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in args)
    if origin is typing.Union or type(tp).__name__ == "UnionType":
        return " | ".join(type_name(a) for a in args)
    if origin is not None:
        name = getattr(origin, "__name__", str(origin))
        return f"{name}[{', '.join(type_name(a) for a in args)}]" if args else name
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def describe_args(args_cls: type) -> list[tuple[str, str, str, str]]:
    """``(name, type, default, doc)`` for each field of an ``Args`` dataclass; default ``required`` when
    the recipe must set it."""
    try:
        hints = typing.get_type_hints(args_cls)
    except Exception:  # an annotation that does not resolve: show it as written
        hints = {}
    docs = field_docs(args_cls)
    rows = []
    for f in dataclasses.fields(args_cls):
        if not f.init:
            continue
        if f.default is not dataclasses.MISSING:
            default = repr(f.default)
        elif f.default_factory is not dataclasses.MISSING:
            default = repr(f.default_factory())
        else:
            default = "required"
        rows.append((f.name, type_name(hints.get(f.name, f.type)), default, docs.get(f.name, "")))
    return rows


def describe(registry: Any, name: str, width: int = 100) -> str:
    """The reference of one part as plain text: where it comes from, its whole docstring, every argument."""
    cls = registry.get(name)
    info = registry.index().get(name)
    origin = info.origin if info is not None else f"{cls.__module__}:{cls.__qualname__}"
    lines = [f"{registry.kind} {name}  ({origin})", ""]
    doc = cls.__dict__.get("__doc__") or ""
    for para in paragraphs(doc):
        if "\n" in para:
            lines.append(para)
        else:
            lines.extend(textwrap.wrap(para, width))
        lines.append("")
    rows = describe_args(cls.Args)
    common = {k: v for k, v in getattr(registry, "common_args", {}).items() if k not in {r[0] for r in rows}}
    lines.append("arguments:" if rows or common else "arguments: none")
    for field_name, tp, default, fdoc in rows:
        lines.append(f"  {field_name}: {tp} = {default}")
        lines.extend(textwrap.wrap(fdoc, width, initial_indent="      ", subsequent_indent="      "))
    for key, (tp, kdoc) in common.items():
        lines.append(f"  {key}: {type_name(tp)} = None")
        lines.extend(textwrap.wrap(f"{kdoc} Accepted by every {registry.kind}.", width,
                                   initial_indent="      ", subsequent_indent="      "))
    return "\n".join(lines).rstrip() + "\n"
