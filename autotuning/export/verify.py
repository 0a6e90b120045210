"""How every export is checked, judged and kept: one prompt, three figures, a bound per format and dtype.

The figures, for an export against the model it was made from, over :data:`PARITY_CONVERSATION` rendered
with the model's chat template (a real conversation: the template's default system prompt where it has
one, two user turns and an answer, accents and Chinese):

- ``rel_logit_diff``: max |Δlogit| / max |reference logit|, over every position and vocabulary entry.
  Real logits reach |30|-|40|: an absolute bound that fits a toy model (logits ~1) fails every real one,
  so the bound is relative to the reference's own scale (``reference_logit_scale``);
- ``top1_agreement``: the share of positions whose argmax agrees;
- ``greedy_agreement_tokens``: of a :data:`GREEDY_TOKENS`-token greedy continuation of the same prompt,
  the tokens that agree before the first divergence (pure argmax, no sampling settings).

Each (format, dtype/type) has its own :class:`ParityBound`, set from figures measured on real models
(``docs/EXPORT_PARITY.md``, reproduced by ``bench/export_parity.py``) with a margin, and low enough that a
deliberately wrong export fails it (``tests/test_export_real.py``).

An export that fails its check is not thrown away: the training it came from is intact, and the files may
still be useful. It is kept *unverified* (:func:`install_export`): in its usual folder with an
``UNVERIFIED.txt`` note next to it, or beside a verified earlier export (``<folder>.unverified/``), which a
failed check never replaces. ``run.json`` records ``status: unverified`` with the figures and the reason.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "work_dir",
    "PARITY_CONVERSATION",
    "GREEDY_TOKENS",
    "ParityBound",
    "BOUNDS",
    "bound_for",
    "parity_ids",
    "Reference",
    "hf_reference",
    "hf_logits",
    "hf_greedy",
    "judge",
    "also_require",
    "describe",
    "UNVERIFIED_NOTE",
    "is_unverified",
    "install_export",
]

PARITY_CONVERSATION = [
    {"role": "user", "content": "Explain in two sentences why the sky looks blue."},
    {
        "role": "assistant",
        "content": "Sunlight is scattered by the molecules of the air, and blue light, with its shorter "
        "wavelength, is scattered far more than red. So wherever you look away from the sun, the sky sends "
        "you mostly blue light.",
    },
    {"role": "user", "content": "Et au coucher du soleil, pourquoi est-il rouge ? Réponds aussi en chinois (你好)."},
]
GREEDY_TOKENS = 16
UNVERIFIED_NOTE = "UNVERIFIED.txt"


@dataclass(frozen=True)
class ParityBound:
    """What an export must meet. ``measured`` names the figures the bound was set from, and the margin."""

    max_rel_logit_diff: float
    min_top1_agreement: float
    min_greedy_agreement_tokens: int
    measured: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# (format, saved dtype or GGUF type) -> bound. ``measured`` is the worst figure seen for it (rel diff / top-1 /
# greedy of 16) on SmolLM2-135M-Instruct after a 20-step LoRA (128 prompt positions) and, for torch, Gemma 3
# 270M after 8 steps (93 positions); for GGUF the worse of transformers' reader and llama.cpp. Margins and the
# defects each bound fails on: docs/EXPORT_PARITY.md (reproduced by bench/export_parity.py).
BOUNDS: dict[tuple[str, str], ParityBound] = {
    # fp32 paths: rounding only. 1e-4 is ~40x the noise and 50-600x below a LoRA scale 10% off.
    ("torch", "float32"): ParityBound(1e-4, 0.98, 12, "2.4e-6 / 100% / 16 (SmolLM2), 6.9e-7 / 100% / 16 (Gemma 3)"),
    ("tensorflow", "float32"): ParityBound(1e-4, 0.98, 12, "2.7e-6 / 100% / 16 (SmolLM2)"),
    # gguf f32 in llama.cpp: llama-family models stay under 1e-5 (SmolLM2 2.4e-6), but ggml's CPU GELU reads an
    # fp16 table (GGML_GELU_FP16), so Gemma models reach 3.5e-4 (Gemma 3 270M); 1e-3 is ~3x that and 100x below
    # the smallest defect measured (0.106: a Gemma 3 whose attention scale llama.cpp does not read).
    ("gguf", "f32"): ParityBound(
        1e-3, 0.98, 12, "2.4e-6 (SmolLM2), 3.5e-4 (Gemma 3 270M), 1.35e-4 (small Gemma 2) / 100% / 16, llama.cpp"
    ),
    # Half-precision files. gguf from fp32 merged/: every weight rounded independently, ~3x margin. torch from a
    # bf16/fp16 base: merging rounds W + ΔW back to the base's grid, which erases part of every LoRA update smaller
    # than half a step; coherent, so larger and run-dependent (SmolLM2: 0.018, 0.035, 0.047 in three runs). ~2x
    # over the worst; fp16 (3 more mantissa bits) gets bf16's bound / 8. torch also holds the merge itself, in
    # fp32 before saving, to the float32 bound (merge_check_fp32): that is what sees a wrong merge under this.
    ("torch", "bfloat16"): ParityBound(
        0.1,
        0.95,
        4,
        "0.047 / 97.7% / 16, 0.035 / 98.4% / 16, 0.018 / 99.2% / 16 (SmolLM2), 0.004 / 98.9% / 16 (Gemma 3)",
    ),
    ("torch", "float16"): ParityBound(0.012, 0.98, 8, "7.7e-4 / 100% / 16 (SmolLM2), 4.8e-4 / 100% / 16 (Gemma 3)"),
    ("gguf", "f16"): ParityBound(
        0.006, 0.98, 8, "0.0019 / 99.2% / 16 (SmolLM2 after 8 steps), 0.0016 / 100% / 16 (Gemma 3), llama.cpp"
    ),
    ("gguf", "bf16"): ParityBound(
        0.05, 0.95, 4, "0.0138 / 97.7% / 16 (SmolLM2 after 8 steps), 0.0076 / 98.9% / 16 (Gemma 3), llama.cpp"
    ),
    # Quantized, in llama.cpp (which also quantizes activations in its quantized dot products). Rounding of this
    # size can be as large as a conversion defect (SmolLM2, rope base 10000: 0.29 in q4_k_m, 0.34 in f32), so
    # every quantized file is also held to its f32/16-bit conversion's bound (conversion_check, gguf.py), and
    # these bounds catch what quantization itself breaks. ~1.5-2x over the worst figure; greedy is recorded but
    # not required (a near-tie flipped by rounding ends the agreeing prefix). SmolLM2's 576-wide rows are not
    # multiples of 256: llama.cpp falls back from k-quants to q8_0/q5_1/q5_0 for most of its tensors.
    ("gguf", "q8_0"): ParityBound(
        0.15, 0.85, 0, "0.058 / 90.6% (SmolLM2 after 8 steps), 0.058 / 96.9% (SmolLM2), 0.067 / 95.7% (Gemma 3)"
    ),
    ("gguf", "q6_k"): ParityBound(
        0.25, 0.8, 0, "0.074 / 89.1% (SmolLM2 after 8 steps), 0.126 / 94.5% (SmolLM2), 0.047 / 93.5% (Gemma 3)"
    ),
    ("gguf", "q5_k_m"): ParityBound(
        0.6, 0.65, 0, "0.289 / 75.8% (SmolLM2 after 8 steps), 0.380 / 77.3% (SmolLM2), 0.079 / 87.1% (Gemma 3)"
    ),
    ("gguf", "q5_k_s"): ParityBound(0.8, 0.65, 0, "0.473 / 76.6% (SmolLM2), 0.070 / 89.2% (Gemma 3)"),
    ("gguf", "q5_0"): ParityBound(0.6, 0.65, 0, "0.223 / 81.2% (SmolLM2 after 8 steps), 0.217 / 91.4% (Gemma 3)"),
    ("gguf", "q4_k_m"): ParityBound(0.6, 0.65, 0, "0.249 / 80.5% (SmolLM2 after 8 steps), 0.067 / 96.8% (Gemma 3)"),
    ("gguf", "q4_k_s"): ParityBound(0.6, 0.65, 0, "0.258 / 86.7% (SmolLM2), 0.097 / 90.3% (Gemma 3)"),
    ("gguf", "q4_0"): ParityBound(1.0, 0.55, 0, "0.523 / 71.1% (SmolLM2 after 8 steps), 0.259 / 68.8% (Gemma 3)"),
    ("gguf", "q3_k_m"): ParityBound(0.9, 0.55, 0, "0.471 / 70.3% (SmolLM2), 0.210 / 73.1% (Gemma 3)"),
    ("gguf", "q2_k"): ParityBound(1.2, 0.45, 0, "0.620 / 58.6% (SmolLM2), 0.355 / 62.4% (Gemma 3)"),
}


def bound_for(fmt: str, variant: str) -> ParityBound:
    try:
        return BOUNDS[(fmt, variant)]
    except KeyError:
        raise KeyError(f"no parity bound for {fmt} {variant}: measure one (bench/export_parity.py)") from None


def parity_ids(tokenizer) -> torch.Tensor:
    """The check prompt as token ids [1, T], rendered the way a chat user's prompt is."""
    text = tokenizer.apply_chat_template(PARITY_CONVERSATION, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return torch.tensor([ids], dtype=torch.long)


@dataclass
class Reference:
    """What an export is compared with: fp32 logits [T, V] on the check prompt and its greedy continuation."""

    logits: torch.Tensor
    greedy: list[int]
    kind: str  # e.g. "trained model in memory", "merged/ (fp32)"


@torch.no_grad()
def hf_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """fp32 logits [T, V] of a transformers model in eval mode (its training mode restored), on CPU."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = model(input_ids=ids.to(device)).logits[0].float().cpu()
    if was_training:
        model.train()
    return out


@torch.no_grad()
def hf_greedy(model, ids: torch.Tensor, steps: int = GREEDY_TOKENS) -> list[int]:
    """Pure argmax continuation with the KV cache. Not ``generate()``: a model's generation_config
    (repetition penalty, sampling) must not make two identical models look different."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = model(input_ids=ids.to(device), use_cache=True)
    tokens: list[int] = []
    for _ in range(steps):
        token = int(out.logits[0, -1].argmax())
        tokens.append(token)
        if len(tokens) == steps:
            break
        step = torch.tensor([[token]], device=device)
        out = model(input_ids=step, cache=out.cache, use_cache=True)  # transformers 5: `cache`, not past_key_values
    if was_training:
        model.train()
    return tokens


def hf_reference(model, ids: torch.Tensor, kind: str) -> Reference:
    return Reference(hf_logits(model, ids), hf_greedy(model, ids), kind)


def _agreeing_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def judge(fmt: str, variant: str, reference: Reference, logits: torch.Tensor, greedy: list[int]) -> dict[str, Any]:
    """The figures of one export against its reference, the bound they are held to, and the verdict."""
    bound = bound_for(fmt, variant)
    ref = reference.logits.float().reshape(-1, reference.logits.shape[-1])
    out = torch.as_tensor(logits).float().reshape(ref.shape)
    abs_diff = float((ref - out).abs().max())
    scale = float(ref.abs().max())
    rel = abs_diff / scale if scale > 0 else float("inf")
    top1 = float((ref.argmax(-1) == out.argmax(-1)).float().mean())
    agree = _agreeing_prefix(reference.greedy, greedy)
    problems = []
    if not rel <= bound.max_rel_logit_diff:  # `not <=`: a NaN fails too
        problems.append(
            f"relative logit diff {rel:.3g} > {bound.max_rel_logit_diff:g} (max |Δ| {abs_diff:.3g} on logits up to {scale:.3g})"
        )
    if top1 < bound.min_top1_agreement:
        problems.append(f"top-1 agreement {top1:.1%} < {bound.min_top1_agreement:.0%}")
    if agree < bound.min_greedy_agreement_tokens:
        problems.append(
            f"greedy agreement {agree}/{len(reference.greedy)} < {bound.min_greedy_agreement_tokens} tokens"
        )
    return {
        "status": "verified" if not problems else "unverified",
        "verified": not problems,
        "reason": "; ".join(problems),
        "variant": variant,
        "reference": reference.kind,
        "rel_logit_diff": rel,
        "max_abs_logit_diff": abs_diff,
        "reference_logit_scale": scale,
        "top1_agreement": top1,
        "positions": int(ref.shape[0]),
        "greedy_agreement_tokens": agree,
        "greedy_tokens": len(reference.greedy),
        "bound": {k: v for k, v in bound.to_dict().items() if k != "measured"},
    }


def also_require(figures: dict[str, Any], name: str, sub: dict[str, Any]) -> dict[str, Any]:
    """Record a second check under ``name``; the export is verified only if both are."""
    figures[name] = sub
    if not sub.get("verified", False):
        reason = f"{name}: {sub.get('reason') or sub.get('status')}"
        figures.update(
            verified=False, status="unverified", reason="; ".join(r for r in (figures["reason"], reason) if r)
        )
    return figures


def describe(figures: dict[str, Any]) -> str:
    """One line for logs, the CLI and the UI: the figures and the bound they were held to."""
    if "rel_logit_diff" not in figures:
        return figures.get("reason") or figures.get("status", "")
    b = figures.get("bound") or {}
    text = (
        f"rel logit diff {figures['rel_logit_diff']:.2g} (bound {b.get('max_rel_logit_diff', '?'):g}; "
        f"max |Δ| {figures['max_abs_logit_diff']:.2g} on logits up to {figures['reference_logit_scale']:.3g}), "
        f"top-1 {figures['top1_agreement']:.1%} (bound {b.get('min_top1_agreement', 0):.0%}), "
        f"greedy {figures['greedy_agreement_tokens']}/{figures['greedy_tokens']} "
        f"(bound {b.get('min_greedy_agreement_tokens', '?')})"
    )
    return f"{figures.get('variant', '')}: {text}" if figures.get("variant") else text


def is_unverified(folder: Path, note: str = UNVERIFIED_NOTE) -> bool:
    return (folder / note).is_file()


def _note_text(fmt: str, figures: dict[str, Any], run_dir: Path) -> str:
    return (
        f"This {fmt} export FAILED its parity check and is kept unverified: use it knowing that.\n\n"
        f"reason: {figures.get('reason', '')}\n"
        f"figures: {describe(figures)}\n"
        f"reference: {figures.get('reference', '')}\n\n"
        f"run.json (exports.{fmt}) has every figure. Export again with:\n"
        f"  python -m autotuning export --run {run_dir} --format {fmt}\n"
        "A verified export replaces this one.\n"
    )


def install_export(
    staged: Path,
    final: Path,
    figures: dict[str, Any],
    *,
    fmt: str,
    run_dir: Path,
    primary: str,
    note: str = UNVERIFIED_NOTE,
    whole_folder: bool = True,
) -> Path:
    """Move a checked export from ``staged`` into place; returns the folder it is in.

    ``primary`` is the file or folder whose presence means an export is there (``config.json``,
    ``saved_model``, ``model-q8_0.gguf``). Verified: replaces ``final`` and drops any unverified attempt
    kept aside. Unverified: goes to ``final`` with ``note`` written next to it, unless ``final`` holds a
    verified export, which stays; then to ``<final>.unverified/``. ``whole_folder=False`` moves the staged
    items into ``final`` one by one (``gguf/`` holds one file per type).
    """
    verified = bool(figures.get("verified"))
    aside = final.with_name(final.name + ".unverified")
    holds_verified = (final / primary).exists() and not (final / note).exists()
    target = aside if not verified and holds_verified else final
    if not verified:
        (staged / note).write_text(_note_text(fmt, figures, run_dir), encoding="utf-8")
    if whole_folder:
        shutil.rmtree(target, ignore_errors=True)
        os.replace(staged, target)
    else:
        target.mkdir(parents=True, exist_ok=True)
        if verified:
            (target / note).unlink(missing_ok=True)
        for item in staged.iterdir():
            os.replace(item, target / item.name)
    if verified:
        if whole_folder:
            shutil.rmtree(aside, ignore_errors=True)
        else:
            for name in (primary, note):
                (aside / name).unlink(missing_ok=True)
    return target


def work_dir(run_dir: Path, name: str) -> Path:
    """A fresh scratch folder ``<run>/.<name>-XXXX`` for one export, after removing ones a crash left behind.

    The caller holds the run's lock (:class:`autotuning.runs.RunLock`), so no other export is using them; the
    unique name keeps even an unlocked caller from writing into another export's files.
    """
    for stale in run_dir.glob(f".{name}-*"):
        shutil.rmtree(stale, ignore_errors=True)
    shutil.rmtree(run_dir / f".{name}.tmp", ignore_errors=True)  # the fixed name earlier versions used
    path = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=run_dir))
    path.chmod(0o755)  # mkdtemp's 0700 would carry over to the installed export
    return path
