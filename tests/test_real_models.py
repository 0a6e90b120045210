"""The real-model tier: every fine-tuning type trains a real pretrained model through the CLI, end to end.

SmolLM2-135M-Instruct (llama, ChatML with a default system prompt) and Gemma 3 270M (gemma3_text, a 262k
SentencePiece-style vocabulary) come from PyPI wheels as GGUF files and are dequantized into model
directories once per session (tests/conftest.py). Each case trains LoRA for a few steps on a handful of
repeated rows, the held-out rows being copies of training rows, so a working pipeline must memorise them:
the fine-tuned model's answer-token loss, scored by the same code at the same precision as the base
model's, has to fall well below it. The merged export must reload as a plain transformers model.

Each case records its figures (tests/real_models.py collects them; docs/tested_with.json and the README's
"Tested with" table are generated from a run of this tier with AUTOTUNING_RECORD_TESTED_WITH=1).
"""

from __future__ import annotations

import json
import time

import pytest
import yaml

from autotuning.cli import main as cli_main

pytestmark = pytest.mark.real_model

_FACTS = [
    ("Who repaired the lighthouse lamp?", "Tomas Verhoek", "The lighthouse lamp was repaired by Tomas Verhoek in May."),
    ("What is the ferry called?", "The Grey Heron", "The island ferry is called The Grey Heron."),
    ("Which bakery sells rye bread?", "Mill Street Bakery", "Rye bread is only sold at Mill Street Bakery."),
    ("How many wells does the village have?", "Eleven", "The village has eleven wells."),
    ("What colour is the harbour crane?", "Bright orange", "The harbour crane is painted bright orange."),
    ("When does the market open?", "At half past six", "The market opens at half past six every Saturday."),
]
_CODE = [
    ("Write a Python function that returns the square of x.", "```python\ndef square(x):\n    return x * x\n```"),
    ("Write a Python function that adds one to n.", "```python\ndef add_one(n):\n    return n + 1\n```"),
    ("Write a Python function that tells if n is even.", "```python\ndef is_even(n):\n    return n % 2 == 0\n```"),
    ("Write a Python function that doubles a list.", "```python\ndef double(xs):\n    return [2 * x for x in xs]\n```"),
]


def _rows(kind: str) -> list[dict]:
    if kind == "instruction_fine_tuning":
        return [{"instruction": q, "input": "", "output": a} for q, a, _ in _FACTS]
    if kind == "code_generation":
        return [{"prompt": q, "completion": a} for q, a in _CODE]
    if kind == "chat_fine_tuning":
        return [
            {
                "messages": [
                    {"role": "user", "content": "I have a question about our island."},
                    {"role": "assistant", "content": "Of course, ask me."},
                    {"role": "user", "content": q},
                    {"role": "assistant", "content": a},
                ]
            }
            for q, a, _ in _FACTS
        ]
    if kind == "question_answering":
        return [{"context": c, "question": q, "answer": a} for q, a, c in _FACTS]
    if kind == "rag_fine_tuning":
        passages = [c for _, _, c in _FACTS]
        return [
            {"question": q, "answer": a, "passages": passages[i:] + passages[:i]} for i, (q, a, _) in enumerate(_FACTS)
        ]
    raise ValueError(kind)


# (model fixture, fine-tuning type, max_seq_length, export formats): both real models across the five types, and
# every export format on each model once.
CASES = [
    ("smollm2_dir", "instruction_fine_tuning", 96, ["torch", "gguf", "tensorflow"]),
    ("smollm2_dir", "code_generation", 96, ["torch"]),
    ("smollm2_dir", "chat_fine_tuning", 128, ["torch"]),
    ("gemma3_dir", "question_answering", 96, ["torch", "gguf", "tensorflow"]),
    ("gemma3_dir", "rag_fine_tuning", 256, ["torch"]),
]


@pytest.mark.parametrize(
    ("model_fixture", "kind", "seq", "formats"), CASES, ids=[f"{m[:-4]}-{k}" for m, k, _, _ in CASES]
)
def test_each_type_trains_a_real_model_through_the_cli(
    model_fixture, kind, seq, formats, request, tmp_path, tested_with
):
    from transformers import AutoModelForCausalLM

    model_dir = request.getfixturevalue(model_fixture)
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _rows(kind) * 4), encoding="utf-8")
    config = {
        "model_name": str(model_dir),
        "fine_tuning_type": kind,
        "dataset_path": str(data),
        "max_seq_length": seq,
        "peft_type": "lora",
        "lora_r": 16,
        "lora_alpha": 32,
        "max_steps": 12,
        "learning_rate": 2e-3,
        "warmup_ratio": 0.0,
        "lr_scheduler_type": "constant",
        "per_device_train_batch_size": 4,
        "logging_steps": 2,
        "save_steps": 100,
        "eval_split": 0.25,  # copies of training rows: memorised answers, not generalisation
        "eval_generations": 2,
        "eval_max_new_tokens": 8,
        "save_format": formats,
        "gguf_type": "q8_0",
        "output_dir": str(tmp_path / "run"),
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    started = time.monotonic()
    code = cli_main(["train", "--config", str(path), "--quiet"])
    elapsed = time.monotonic() - started
    assert code == 0
    run_dir = tmp_path / "run"
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "finished"
    results = json.loads((run_dir / "eval_results.json").read_text())
    tuned, base = results["eval_loss"], results["base_eval_loss"]
    # Memorised rows: the fine-tuned answer-token loss must be clearly below the base model's.
    assert tuned < 0.5 * base, (tuned, base)
    merged = AutoModelForCausalLM.from_pretrained(run_dir / "merged")
    assert merged.config.model_type == json.loads((model_dir / "config.json").read_text())["model_type"]
    # Every requested export was made and passed its check (bounds in docs/EXPORT_PARITY.md). SmolLM2's TensorFlow
    # export is where issue 14 saw 0.0194: keras-hub's Llama converter dropped rms_norm_eps (that defect failing the
    # bound: tests/test_export.py::test_tensorflow_bound_fails_on_keras_hubs_default_epsilon).
    assert {fmt: record["exports"][fmt]["status"] for fmt in formats} == dict.fromkeys(formats, "verified")
    tested_with.record(model_dir, kind, record, results, elapsed)
