"""The docs say what the code does: generated config reference, export architectures, links, module map."""

from __future__ import annotations

import re
from pathlib import Path

from autotuning.config import iter_fields
from autotuning.config_docs import (
    END,
    GGUF_END,
    GGUF_START,
    REGENERATE,
    START,
    render_config_table,
    replace_between_markers,
)
from autotuning.export.gguf import TESTED_ARCHITECTURES, converter_architectures, render_gguf_architectures
from autotuning.export.tensorflow import SUPPORTED_TF_ARCHITECTURES

REPO = Path(__file__).resolve().parents[1]

README = (REPO / "README.md").read_text(encoding="utf-8")
ARCHITECTURE = (REPO / "docs" / "ARCHITECTURE.md").read_text(encoding="utf-8")


def test_readme_config_reference_is_fresh():
    fresh = replace_between_markers(README, render_config_table())
    assert fresh == README, f"README.md's config reference is stale: regenerate it with `{REGENERATE}`"


def test_config_reference_lists_every_option():
    table = README[README.index(START) : README.index(END)]
    for _group, f in iter_fields():
        assert f"| `{f.name}`" in table, f.name


def test_readme_heading_follows_the_spaces_front_matter():
    # Hugging Face Spaces reads the YAML block at the very top; the document itself starts right after it.
    lines = README.splitlines()
    assert lines[0] == "---"
    end = lines.index("---", 1)
    assert next(line for line in lines[end + 1 :] if line.strip()) == "# autotuning"


def _row(format_name: str) -> str:
    (row,) = [line for line in README.splitlines() if line.startswith(f"| {format_name} | ")]
    return row


def test_readme_gguf_architectures_come_from_the_converter():
    fresh = replace_between_markers(README, render_gguf_architectures(), GGUF_START, GGUF_END)
    assert fresh == README, f"README.md's GGUF architecture list is stale: regenerate it with `{REGENERATE}`"
    assert set(TESTED_ARCHITECTURES) <= set(converter_architectures())


def test_supported_architectures_table_matches_the_exporters():
    for name in SUPPORTED_TF_ARCHITECTURES:
        assert re.search(rf"\b{name}\b", _row("tensorflow").split("|")[2]), f"tensorflow: {name} missing"


def test_relative_links_and_images_exist():
    for doc, text in (("README.md", README), ("docs/ARCHITECTURE.md", ARCHITECTURE)):
        base = (REPO / doc).parent
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
            if "://" in target:
                continue
            assert (base / target).exists(), f"{doc} links to missing {target}"


def test_readme_anchors_exist():
    headings = {
        re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in re.findall(r"^#+ (.+)$", README, re.M)
    }
    for anchor in re.findall(r"\]\(#([^)]+)\)", README):
        assert anchor in headings, f"README links to missing section #{anchor}"


def test_architecture_names_every_module():
    """Every module of autotuning/ and ui/ is named by its path (a subpackage by its folder, or by each module)."""
    paths = [p for p in (REPO / "autotuning").glob("*.py") if p.stem not in ("__init__", "__main__")]
    paths += [p for p in (REPO / "autotuning").iterdir() if p.is_dir() and not p.name.startswith("__")]
    paths += list((REPO / "ui").glob("*.py"))
    missing = []
    for path in paths:
        rel = path.relative_to(REPO).as_posix()
        if path.is_dir():
            if f"{rel}/" not in ARCHITECTURE:
                missing.append(f"{rel}/")
        elif rel not in ARCHITECTURE:
            missing.append(rel)
    assert not missing, f"docs/ARCHITECTURE.md does not mention {missing}"


def test_readme_tested_with_table_is_rendered_from_the_recorded_runs():
    from autotuning.tested_with import END as TW_END
    from autotuning.tested_with import START as TW_START
    from autotuning.tested_with import load_records, render_table

    fresh = replace_between_markers(README, render_table(load_records()), TW_START, TW_END)
    assert fresh == README, (
        "README.md's Tested-with table differs from docs/tested_with.json: python -m autotuning.tested_with --write"
    )
