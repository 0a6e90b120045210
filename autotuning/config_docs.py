"""The README's config reference, rendered from the config dataclasses so it cannot drift from them.

``python -m autotuning.config_docs`` prints the Markdown; ``--write`` replaces what stands between the
``<!-- config-table:start -->`` and ``<!-- config-table:end -->`` markers in README.md; ``--check``
exits 1 when the README differs from a fresh render (``tests/test_docs.py`` does the same).

Defaults come from the dataclass fields themselves, not from ``Config()``, so an ``HF_TOKEN`` in the
environment never leaks into the page.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import sys
import typing
from pathlib import Path
from typing import Any

from .config import SEED_ALIASES, Config, iter_fields
from .export.gguf import render_gguf_architectures

__all__ = [
    "render_config_table",
    "replace_between_markers",
    "README",
    "START",
    "END",
    "GGUF_START",
    "GGUF_END",
    "REGENERATE",
]

README = Path(__file__).resolve().parent.parent / "README.md"
START = "<!-- config-table:start -->"
END = "<!-- config-table:end -->"
REGENERATE = "python -m autotuning.config_docs --write"
GGUF_START = "<!-- gguf-architectures:start -->"
GGUF_END = "<!-- gguf-architectures:end -->"


def _type_text(annotation: Any) -> str:
    if typing.get_origin(annotation) is list:
        (item,) = typing.get_args(annotation)
        return f"list of {_type_text(item)}"
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return " / ".join(f"`{m.value}`" for m in annotation)
    return annotation.__name__


def _default_text(name: str, f: dataclasses.Field) -> str:
    if name == "hf_token":
        return "`$HF_TOKEN`"
    value = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    if isinstance(value, list):
        return "`[" + ", ".join(str(v) for v in value) + "]`"
    if isinstance(value, enum.Enum):
        return f"`{value.value}`"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, float):
        return f"`{value:g}`"
    if value == "":
        return '`""`'
    return f"`{value}`"


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def render_config_table() -> str:
    """One Markdown table per option group: option (seed alias), type, default, help."""
    aliases = {field: alias for alias, field in SEED_ALIASES.items()}
    lines = [f"<!-- generated from autotuning/config.py by `{REGENERATE}`; edit the dataclasses, not this table -->"]
    # Config's fields are the groups; each one's default_factory is the group's dataclass.
    group_types = {g.name: typing.get_type_hints(g.default_factory) for g in dataclasses.fields(Config)}
    group_seen = None
    for group, f in iter_fields():
        if group != group_seen:
            lines += ["", f"**{group}**", "", "| option | type | default | what it does |", "| --- | --- | --- | --- |"]
            group_seen = group
        annotation = group_types[group][f.name]
        name = f"`{f.name}`" + (f" (`{aliases[f.name]}`)" if f.name in aliases else "")
        lines.append(
            f"| {name} | {_cell(_type_text(annotation))} | {_default_text(f.name, f)} | {_cell(f.metadata['help'])} |"
        )
    return "\n".join(lines) + "\n"


def replace_between_markers(text: str, body: str, start_marker: str = START, end_marker: str = END) -> str:
    """``text`` with everything between the start and end marker lines replaced by ``body``."""
    start, end = text.find(start_marker), text.find(end_marker)
    if start < 0 or end < start:
        raise ValueError(f"README.md needs the marker lines {start_marker} and {end_marker}, in that order")
    head = text[: start + len(start_marker)]
    return f"{head}\n{body}{text[end:]}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m autotuning.config_docs", description=__doc__.splitlines()[0])
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--write", action="store_true", help="update the table in README.md")
    action.add_argument("--check", action="store_true", help="exit 1 if README.md's table is stale")
    parser.add_argument("--readme", type=Path, default=README, help="the file with the markers (default: README.md)")
    args = parser.parse_args(argv)
    table = render_config_table()
    if not (args.write or args.check):
        sys.stdout.write(table)
        return 0
    current = args.readme.read_text(encoding="utf-8")
    fresh = replace_between_markers(current, table)
    if GGUF_START in fresh:  # the GGUF architectures, from llama.cpp's converter
        fresh = replace_between_markers(fresh, render_gguf_architectures(), GGUF_START, GGUF_END)
    if args.check:
        if fresh != current:
            print(f"{args.readme}: the config reference is stale; run: {REGENERATE}", file=sys.stderr)
            return 1
        return 0
    if fresh != current:
        args.readme.write_text(fresh, encoding="utf-8")
        print(f"updated {args.readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
