"""The notice a Hugging Face Space without a GPU shows: which features need one, which are only slow.

Spaces set ``SPACE_ID`` (``owner/name``) in the app's environment; free Spaces run on CPUs. Elsewhere
the person who started the app chose the machine and needs no notice.
"""

from __future__ import annotations

from collections.abc import Mapping

__all__ = ["is_space", "hardware_notice"]


def is_space(env: Mapping[str, str]) -> bool:
    return bool(env.get("SPACE_ID"))


def hardware_notice(env: Mapping[str, str], cuda_available: bool) -> str:
    """Markdown for the top of the app, or "" when none is needed (not a Space, or a Space with a GPU)."""
    if not is_space(env) or cuda_available:
        return ""
    return (
        "ℹ️ **This Space runs on a CPU.** The builtin tiny models train, evaluate and export here in seconds; "
        "a real Hub model trains very slowly.\n\n"
        "- **Needs a GPU:** `precision: fp16`, and `distributed: fsdp` (sharding across GPUs).\n"
        "- **Slow or limited on a CPU:** 4-bit / 8-bit quantization (QLoRA; 4-bit also needs layer sizes that "
        "are multiples of 64), `distributed: ddp` (runs as CPU processes), models beyond a few hundred million "
        "parameters.\n\n"
        "For those, pick GPU hardware in this Space's settings, or run the app on your own GPU machine "
        "(the repository's Dockerfile takes a CUDA build of torch through a build argument)."
    )
