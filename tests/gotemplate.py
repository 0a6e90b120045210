"""A faithful emulation of the part of Go's text/template that Ollama Modelfile templates use.

Actions: ``{{ .Field }}``, ``{{ $var }}``, ``{{ $var := expr }}`` / ``{{ $var = expr }}``, ``{{ range .Messages }}``,
``{{ if expr }}`` / ``{{ else if expr }}`` / ``{{ else }}`` / ``{{ end }}``, with ``eq a b`` and ``not a``, string
literals, and the ``{{-`` / ``-}}`` trim markers (which remove all adjacent ASCII whitespace, as in Go). Truth is
Go's: the empty string, 0, false and nil are false. Variables are scoped as in Go: a variable declared outside a
range is visible and assignable inside it. Anything else raises, so a template this cannot read fails the test.
"""

from __future__ import annotations

import re

_ACTION = re.compile(r"\{\{(-\s)?(.*?)(\s-)?\}\}", re.S)


def _tokens(template: str):
    out, pos = [], 0
    for m in _ACTION.finditer(template):
        text = template[pos : m.start()]
        if m.group(1):
            text = text.rstrip(" \t\r\n")
        out.append(("text", text))
        out.append(("action", m.group(2).strip()))
        pos = m.end()
        if m.group(3):
            rest = template[pos:]
            pos += len(rest) - len(rest.lstrip(" \t\r\n"))
    out.append(("text", template[pos:]))
    return out


def _parse(tokens, i=0, stop=("end",)):
    nodes = []
    while i < len(tokens):
        kind, value = tokens[i]
        if kind == "text":
            nodes.append(("text", value))
            i += 1
            continue
        head = value.split(None, 1)[0] if value else ""
        if head in ("end", "else"):
            return nodes, i
        if head == "range":
            body, i = _parse(tokens, i + 1)
            if tokens[i][1] != "end":
                raise ValueError("range without end")
            nodes.append(("range", value[len("range") :].strip(), body))
            i += 1
        elif head == "if":
            branches = []
            cond = value[2:].strip()
            while True:
                body, i = _parse(tokens, i + 1)
                branches.append((cond, body))
                action = tokens[i][1]
                if action == "end":
                    break
                if action.startswith("else if "):
                    cond = action[len("else if ") :].strip()
                elif action == "else":
                    cond = None
                else:
                    raise ValueError(action)
            nodes.append(("if", branches))
            i += 1
        else:
            nodes.append(("expr", value))
            i += 1
    return nodes, i


def _args(expr: str):
    return re.findall(r'"(?:[^"\\]|\\.)*"|\S+', expr)


class _Scope:
    def __init__(self, parent=None):
        self.vars, self.parent = {}, parent

    def find(self, name):
        scope = self
        while scope is not None:
            if name in scope.vars:
                return scope
            scope = scope.parent
        raise NameError(f"undefined variable {name}")


def _value(arg: str, dot, scope: _Scope):
    if arg.startswith('"'):
        return bytes(arg[1:-1], "utf-8").decode("unicode_escape")
    if arg.startswith("$."):
        return scope.find("$").vars["$"][arg[2:]]
    if arg.startswith("$"):
        return scope.find(arg).vars[arg]
    if arg == ".":
        return dot
    if arg.startswith("."):
        return dot[arg[1:]]
    raise ValueError(f"unsupported argument {arg}")


def _eval(expr: str, dot, scope: _Scope):
    parts = _args(expr)
    if len(parts) >= 3 and parts[1] in (":=", "="):
        value = _eval(" ".join(parts[2:]), dot, scope)
        if parts[1] == ":=":
            scope.vars[parts[0]] = value
        else:
            scope.find(parts[0]).vars[parts[0]] = value
        return None
    if parts[0] == "eq":
        return _value(parts[1], dot, scope) == _value(parts[2], dot, scope)
    if parts[0] == "not":
        return not _truth(_value(parts[1], dot, scope))
    if len(parts) != 1:
        raise ValueError(f"unsupported expression {expr}")
    return _value(parts[0], dot, scope)


def _truth(value) -> bool:
    return value not in (None, "", 0, False) and value != [] and value != {}


def _run(nodes, dot, scope, out):
    for node in nodes:
        if node[0] == "text":
            out.append(node[1])
        elif node[0] == "expr":
            value = _eval(node[1], dot, scope)
            if value is not None:
                out.append(str(value))
        elif node[0] == "range":
            for item in _eval(node[1], dot, scope):
                _run(node[2], item, _Scope(scope), out)
        else:
            for cond, body in node[1]:
                if cond is None or _truth(_eval(cond, dot, scope)):
                    _run(body, dot, _Scope(scope), out)
                    break


def render(template: str, data: dict) -> str:
    nodes, i = _parse(_tokens(template))
    scope = _Scope()
    scope.vars["$"] = data
    out: list[str] = []
    _run(nodes, data, scope, out)
    return "".join(out)
