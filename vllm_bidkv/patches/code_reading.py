"""How the capability probe reads vLLM: signatures, source text, and compiled code.

A vLLM installed without its ``.py`` files has no source text; the probe then reads the
names each function's compiled code uses. ``Reading`` decides each capability from
whichever of the two answered and records which way it went (``capabilities.probe``).
"""

from __future__ import annotations

import inspect
from typing import Any


def signature_params(fn: Any) -> list[str]:
    try:
        return list(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return []


def has_no_default(cls: Any, field: str) -> bool:
    try:
        param = inspect.signature(cls).parameters.get(field)
    except (TypeError, ValueError):
        return False
    return param is not None and param.default is inspect.Parameter.empty


def source_of(fn: Any) -> str | None:
    """``fn``'s source text; None where it is not installed (compiled files only)."""
    try:
        return inspect.getsource(fn)
    except (OSError, TypeError):
        return None


def source_mentions(fn: Any, text: str) -> bool | None:
    """Whether ``fn``'s source contains ``text``; False without a function, None without its source."""
    return False if fn is None else contains(source_of(fn), text)


def code_names(fn: Any) -> set[str] | None:
    """The names ``fn``'s compiled code uses (attributes, globals, locals, keyword arguments of its
    calls), with the functions nested in it; None without a function or a code object."""
    code = getattr(fn, "__code__", None)
    if code is None:
        return None
    names: set[str] = set()
    pending = [code]
    while pending:
        code = pending.pop()
        names.update(code.co_names, code.co_varnames)
        for const in code.co_consts:
            if inspect.iscode(const):
                pending.append(const)
            elif isinstance(const, tuple) and all(isinstance(item, str) for item in const):
                names.update(const)  # the keyword names of a call
    return names


def contains(found: str | set[str] | None, *parts: str) -> bool | None:
    """Every part in a source text or a set of names; None when there was nothing to read."""
    return None if found is None else all(part in found for part in parts)


class Reading:
    """Decides a source-text capability: the source's answer; without source, the compiled code's;
    with neither, unknown (False). Remembers which capabilities took the second or third way."""

    def __init__(self) -> None:
        self.from_compiled_code: dict[str, None] = {}
        self.unknown: dict[str, None] = {}

    def __call__(self, capability: str, in_source: bool | None, in_code: bool | None) -> bool:
        if in_source is not None:
            return in_source
        if in_code is not None:
            self.from_compiled_code[capability] = None
            return in_code
        self.unknown[capability] = None
        return False
