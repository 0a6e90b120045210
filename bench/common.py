"""The shared benchmark workload: a ~30M-parameter Llama built locally and 2,000 alpaca rows of mixed lengths.

Both are deterministic and cached under the given work directory, so every script (and every method
inside one script) trains on exactly the same model and data.
"""

from __future__ import annotations

import json
import os
import platform
import random
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

SEQ = 512
BATCH = 8
LORA_R = 16


def machine() -> dict:
    """Cores, CPU model, GPU (if any): printed with every figure."""
    import torch

    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cores": os.cpu_count(),
        "cpu": cpu,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__,
    }


def build_local_model(path: Path, arch: str = "llama", **sizes) -> Path:
    """A causal LM with random weights (fixed seed) and the builtin tokenizer, saved once to ``path``.

    ``arch`` is ``llama`` or ``qwen2``. The builtin tokenizer has a small vocabulary: ``vocab_size`` only sizes
    the embedding and the head (every token id it produces is below it), which is what a speed benchmark needs.
    Weights are built on the GPU when there is one (a 1B model initialises in seconds there, minutes on a few
    cores) and saved in bf16 when ``sizes`` asks for it (``dtype="bfloat16"``): half the bytes to write and read.
    """
    if (path / "config.json").is_file():
        return path
    import torch
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        PreTrainedTokenizerFast,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    from autotuning.modeling import resolve_model_path

    classes = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}
    config_class, model_class = classes[arch]
    dtype = getattr(torch, sizes.pop("dtype", "float32"))
    tokenizer = PreTrainedTokenizerFast.from_pretrained(resolve_model_path("builtin:tiny-llama"))
    config = config_class(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **sizes,
    )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    with torch.device(device):
        model = model_class(config)
    model.to(dtype).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def build_local_llama(path: Path, **sizes) -> Path:
    """A Llama with random weights (fixed seed) and the builtin tokenizer, saved once to ``path``."""
    return build_local_model(path, "llama", **sizes)


def build_llama_30m(path: Path) -> Path:
    """hidden 512, 6 layers, 8 heads, intermediate 1536, vocab 8192 (~29M parameters)."""
    return build_local_llama(
        path,
        vocab_size=8192,
        hidden_size=512,
        intermediate_size=1536,
        num_hidden_layers=6,
        num_attention_heads=8,
        num_key_value_heads=8,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
    )


def build_rows(path: Path, rows: int = 2000) -> Path:
    """Alpaca rows of realistic mixed lengths: mostly single bundled rows (median ~110 tokens), some 2-4 joined."""
    if path.is_file():
        return path
    sample = [
        json.loads(line)
        for line in (REPO / "assets" / "datasets" / "instruction_sample.jsonl").read_text().splitlines()
    ]
    rng = random.Random(0)
    out = []
    for _ in range(rows):
        parts = rng.sample(sample, k=rng.choice([1, 1, 1, 1, 1, 1, 2, 2, 3, 4]))
        out.append(
            {
                "instruction": " ".join(p["instruction"] for p in parts),
                "input": " ".join(p.get("input", "") for p in parts).strip(),
                "output": "\n\n".join(p["output"] for p in parts),
            }
        )
    path.write_text("".join(json.dumps(r) + "\n" for r in out), encoding="utf-8")
    return path


def workload(workdir: Path) -> tuple[Path, Path]:
    workdir.mkdir(parents=True, exist_ok=True)
    return build_llama_30m(workdir / "llama-30m"), build_rows(workdir / "rows.jsonl")


def bench_config(workdir: Path, **extra):
    from autotuning.config import load_config

    model, rows = workload(workdir)
    sets = {
        "model_name": str(model),
        "dataset_path": str(rows),
        "max_seq_length": SEQ,
        "per_device_train_batch_size": BATCH,
        "lora_r": LORA_R,
        "lora_alpha": 2 * LORA_R,
        "lora_target_modules": "all-linear",
        "eval_split": 0,
        "logging_steps": 1,
        "save_steps": 100000,
        "learning_rate": 2e-4,
        "output_dir": str(workdir / "run"),
        "overwrite_output_dir": True,
    }
    sets.update(extra)
    return load_config(None, [f"{k}={v}" for k, v in sets.items()])


def build_default_trainer(config, workdir: Path, callbacks_for, train_dataset=None):
    """Our default training path, exactly what `train` runs: `prepare_data` -> `load_model` -> LoRA ->
    `build_trainer`. ``callbacks_for(model)`` gives the benchmark's callbacks (it may hook the model).
    ``train_dataset`` (tokenised rows: input_ids, completion_mask) replaces `prepare_data` where a benchmark
    feeds every method the very same rows. Returns (trainer, precision)."""
    from autotuning.data import prepare_data
    from autotuning.modeling import apply_peft, load_model, load_tokenizer
    from autotuning.training import build_trainer

    tokenizer = load_tokenizer(config)
    if train_dataset is None:
        train_dataset = prepare_data(config, tokenizer).train
    loaded = load_model(config)
    model = apply_peft(loaded.model, config)
    trainer = build_trainer(
        config,
        model,
        tokenizer,
        train_dataset,
        None,
        workdir / "ours",
        loaded.precision,
        callbacks=callbacks_for(model),
        show_progress=False,
    )
    return trainer, loaded.precision


def print_result(figures: dict) -> None:
    """The last line every benchmark prints: one JSON object."""
    print(json.dumps({**figures, "machine": machine()}))


def git_rev() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        return ""
