"""Trained (non-padding) tokens per second: our default path vs the seed's method vs TRL's SFTTrainer defaults.

    python bench/throughput.py [--steps 8] [--rounds 2] [--workdir DIR]

Workload (bench/common.py): a ~29M-parameter Llama built locally, 2,000 alpaca rows of mixed lengths,
max_seq_length 512, LoRA r=16 on all linear layers, batch 8, no gradient checkpointing, for every method:

- ours: `autotuning.training.build_trainer` on `autotuning.data.prepare_data`, exactly what `train` runs
  (rows padded to the longest in the batch, batches grouped by length, answer-only loss, bf16 autocast
  where the CPU supports it);
- seed: the seed project's method: every row padded to max_seq_length, plain `transformers.Trainer` with
  its default precision (fp32 on a CPU), labels masked up to a "### Response:" separator;
- seed_bf16: the same with bf16 autocast, to separate what padding and precision each contribute;
- trl: TRL's `SFTTrainer` with its defaults on prompt/completion rows (random batches padded to the
  longest), bf16 and checkpointing set as ours.

Methods are interleaved: each round runs every method for `--steps` steps on the same model instance
shape (fresh LoRA per method), and only steps after the first of each call are timed, so slow and fast
moments of the machine hit every method alike. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import gc
import tempfile
import time
from pathlib import Path

import torch
from common import BATCH, SEQ, bench_config, build_default_trainer, print_result
from transformers import TrainerCallback


class StepClock(TrainerCallback):
    """Seconds and non-padding tokens of every step after the first of each train() call.

    Tokens are counted by a forward pre-hook on the model (each training batch's attention mask), the same way
    for every method: our trainer adds its tokens seen to the state only at each log line (no host sync per
    step), so the state is not a per-step count there. On a CPU the hook's read costs nothing.
    """

    def __init__(self):
        self.seconds = 0.0
        self.tokens = 0
        self.steps = 0
        self._last = None
        self._last_tokens = 0
        self._seen = 0
        self._hooked = None

    def _count(self, module, args, kwargs):
        mask = kwargs.get("attention_mask")
        if module.training and mask is not None:
            self._seen += int(mask.sum())

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._last = None
        if model is not None and self._hooked is not model:
            model.register_forward_pre_hook(self._count, with_kwargs=True)
            self._hooked = model

    def on_step_end(self, args, state, control, **kwargs):
        now = time.perf_counter()
        tokens = self._seen
        if self._last is not None:
            self.seconds += now - self._last
            self.tokens += tokens - self._last_tokens
            self.steps += 1
        self._last, self._last_tokens = now, tokens


def _lora(model, config):
    from autotuning.modeling import apply_peft

    return apply_peft(model, config)


def _ours(config, workdir):
    clock = StepClock()
    trainer, _precision = build_default_trainer(config, workdir, lambda model: [clock])
    return trainer, clock


def _seed(config, workdir, bf16: bool = False):
    """Pad every row to max_seq_length; labels -100 up to the response separator and on padding."""
    import datasets
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    from autotuning.data.loading import load_rows
    from autotuning.modeling import load_tokenizer

    tokenizer = load_tokenizer(config)
    raw = load_rows(config.data.fine_tuning_type, config.data.dataset_path)
    separator = "\n### Response:\n"
    sep_ids = tokenizer(separator, add_special_tokens=False)["input_ids"]

    def encode(row):
        prompt = f"### Instruction:\n{row['instruction']}\n{row.get('input', '')}".rstrip() + separator
        enc = tokenizer(
            prompt + row["output"] + tokenizer.eos_token,
            max_length=SEQ,
            truncation=True,
            padding="max_length",
            add_special_tokens=False,
        )
        ids, mask = enc["input_ids"], enc["attention_mask"]
        cut = next((i + len(sep_ids) for i in range(len(ids)) if ids[i : i + len(sep_ids)] == sep_ids), len(ids))
        labels = [t if (i >= cut and m) else -100 for i, (t, m) in enumerate(zip(ids, mask))]
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    dataset = datasets.Dataset.from_list([encode(r) for r in raw.rows])
    model = _lora(AutoModelForCausalLM.from_pretrained(config.model.model_name, dtype=torch.float32), config)
    clock = StepClock()
    args = TrainingArguments(
        output_dir=str(workdir / ("seed-bf16" if bf16 else "seed")),
        per_device_train_batch_size=BATCH,
        learning_rate=2e-4,
        max_steps=1,
        # The seed ran TrainingArguments' defaults: fp32 on a CPU. `seed_bf16` is the same method with bf16
        # autocast switched on, to show how much of our lead is padding and how much is precision.
        bf16=bf16,
        gradient_checkpointing=False,
        use_cpu=not torch.cuda.is_available(),
        report_to="none",
        disable_tqdm=True,
        save_strategy="no",
        logging_steps=1000,
        include_num_input_tokens_seen="non_padding",
        dataloader_num_workers=0,
    )
    return Trainer(model=model, args=args, train_dataset=dataset, callbacks=[clock]), clock


def _trl(config, workdir):
    """TRL's defaults on prompt/completion rows; bf16 and checkpointing set as ours, max_length as ours."""
    import datasets
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    from autotuning.data.loading import load_rows
    from autotuning.modeling import load_tokenizer, resolve_precision

    tokenizer = load_tokenizer(config)
    raw = load_rows(config.data.fine_tuning_type, config.data.dataset_path)
    rows = [
        {
            "prompt": [{"role": "user", "content": (r["instruction"] + "\n\n" + r.get("input", "")).strip()}],
            "completion": [{"role": "assistant", "content": r["output"]}],
        }
        for r in raw.rows
    ]
    precision = resolve_precision(config.training.precision)
    model = _lora(AutoModelForCausalLM.from_pretrained(config.model.model_name, dtype=torch.float32), config)
    clock = StepClock()
    args = SFTConfig(
        output_dir=str(workdir / "trl"),
        per_device_train_batch_size=BATCH,
        learning_rate=2e-4,
        max_steps=1,
        bf16=precision == "bf16",
        gradient_checkpointing=False,
        use_cpu=not torch.cuda.is_available(),
        max_length=SEQ,
        report_to="none",
        disable_tqdm=True,
        save_strategy="no",
        logging_steps=1000,
        include_num_input_tokens_seen="non_padding",
    )
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=datasets.Dataset.from_list(rows),
        processing_class=tokenizer,
        callbacks=[clock],
    )
    return trainer, clock


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8, help="steps per method per round (the first is not timed)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "autotuning-bench")
    args = parser.parse_args()
    from autotuning.config import Precision
    from autotuning.modeling import resolve_precision

    config = bench_config(args.workdir)
    methods = {
        "ours": _ours,
        "seed": _seed,
        "seed_bf16": lambda config, workdir: _seed(config, workdir, bf16=resolve_precision(Precision.AUTO) == "bf16"),
        "trl": _trl,
    }
    built = {name: make(config, args.workdir) for name, make in methods.items()}
    for _round in range(args.rounds):
        for trainer, _clock in built.values():
            trainer.args.max_steps = args.steps  # each call starts a fresh schedule: only timing matters here
            trainer.train(resume_from_checkpoint=None)
            gc.collect()
    rate = {name: clock.tokens / clock.seconds for name, (_t, clock) in built.items()}
    for name, (_t, clock) in built.items():
        print(
            f"{name}: {clock.steps} timed steps, {clock.tokens} trained tokens, {clock.seconds:.1f} s, {rate[name]:.0f} tok/s"
        )
    print_result(
        {
            "ours_tok_s": round(rate["ours"], 1),
            "seed_method_tok_s": round(rate["seed"], 1),
            "seed_method_bf16_tok_s": round(rate["seed_bf16"], 1),
            "trl_default_tok_s": round(rate["trl"], 1),
            "ratio_vs_seed": round(rate["ours"] / rate["seed"], 3),
            "ratio_vs_seed_bf16": round(rate["ours"] / rate["seed_bf16"], 3),
            "ratio_vs_trl": round(rate["ours"] / rate["trl"], 3),
            "timed_steps_per_method": args.rounds * (args.steps - 1),
            "seq": SEQ,
            "batch": BATCH,
        }
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
