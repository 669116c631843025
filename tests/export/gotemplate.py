"""A tiny interpreter of the Go ``text/template`` subset our Ollama templates use, so a test can render
them without Go: text, ``{{ .Field }}``, ``{{ $v }}``, ``{{ $v := ... }}`` / ``{{ $v = ... }}``,
``range .Messages``, ``if`` / ``else if`` / ``else`` / ``end``, ``eq``, ``not``, ``and``, string
literals, ``true``/``false``, and the ``{{-`` / ``-}}`` whitespace trims. Anything else raises."""

from __future__ import annotations

import re
from typing import Any

_ACTION = re.compile(r"{{(-?)\s*(.*?)\s*(-?)}}", re.S)
_TERM = re.compile(r'"(?:[^"\\]|\\.)*"|\$\w+|\.\w+(?:\.\w+)*|\w+|\(|\)')


def _lex(src: str) -> list[tuple[str, str]]:
    out, pos = [], 0
    for m in _ACTION.finditer(src):
        text = src[pos:m.start()]
        if m.group(1):
            text = text.rstrip()
        if out and out[-1][0] == "trim":
            out.pop()
            text = text.lstrip()
        out.append(("text", text))
        out.append(("action", m.group(2)))
        if m.group(3):
            out.append(("trim", ""))
        pos = m.end()
    text = src[pos:]
    if out and out[-1][0] == "trim":
        out.pop()
        text = text.lstrip()
    out.append(("text", text))
    return out


def _value(expr: str, dot: Any, scope: list[dict[str, Any]]) -> Any:
    terms = _TERM.findall(expr)

    def one(t: str) -> Any:
        if t.startswith('"'):
            return bytes(t[1:-1], "utf-8").decode("unicode_escape")
        if t.startswith("$"):
            return next(s[t] for s in reversed(scope) if t in s)
        if t.startswith("."):
            v = dot
            for part in t[1:].split("."):
                v = v[part]
            return v
        return {"true": True, "false": False}[t]

    if terms[0] in ("eq", "and", "not"):
        args = [one(t) for t in terms[1:]]
        return {"eq": lambda: args[0] == args[1], "not": lambda: not args[0],
                "and": lambda: all(args) and args[-1]}[terms[0]]()
    if len(terms) != 1:
        raise ValueError(f"unsupported expression {expr!r}")
    return one(terms[0])


def render(src: str, data: dict[str, Any]) -> str:
    tokens = _lex(src)
    out: list[str] = []

    def block(i: int, dot: Any, scope: list[dict[str, Any]], emit: bool) -> tuple[int, str]:
        """Run tokens from i until else/end at this level; return (index of that token, its text)."""
        while i < len(tokens):
            kind, text = tokens[i]
            if kind == "text":
                if emit:
                    out.append(text)
                i += 1
                continue
            word = text.split(" ", 1)[0]
            if word in ("end", "else"):
                return i, text
            if word == "range":
                items = _value(text[6:], dot, scope) if emit else []
                start = i + 1
                end = _skip(start, dot, scope)
                for item in items:
                    scope.append({})
                    block(start, item, scope, True)
                    scope.pop()
                i = end + 1
            elif word == "if":
                i = _if(i, text[3:], dot, scope, emit)
            elif m := re.fullmatch(r"(\$\w+)\s*(:?=)\s*(.*)", text, re.S):
                if emit:
                    value = _value(m.group(3), dot, scope)
                    if m.group(2) == ":=":
                        scope[-1][m.group(1)] = value
                    else:
                        next(s for s in reversed(scope) if m.group(1) in s)[m.group(1)] = value
                i += 1
            else:
                if emit:
                    out.append(str(_value(text, dot, scope)))
                i += 1
        return i, ""

    def _skip(i: int, dot: Any, scope: list[dict[str, Any]]) -> int:
        while True:
            i, text = block(i, dot, scope, False)
            if text == "end":
                return i
            i += 1

    def _if(i: int, cond: str, dot: Any, scope: list[dict[str, Any]], emit: bool) -> int:
        taken = False
        while True:
            run = emit and not taken and (cond is None or bool(_value(cond, dot, scope)))
            i, text = block(i + 1, dot, scope, run)
            taken = taken or run
            if text == "end":
                return i + 1
            cond = text[8:] if text.startswith("else if") else None

    scope: list[dict[str, Any]] = [{}]
    block(0, data, scope, True)
    return "".join(out)
