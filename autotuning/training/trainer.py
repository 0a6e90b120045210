"""Build TRL's SFTTrainer from a Config. We configure the loop; we do not rewrite it."""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from ..config import Config

__all__ = ["build_sft_config", "build_trainer", "last_checkpoint", "resume_checkpoint"]

_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def build_sft_config(config: Config, checkpoint_dir: Path, precision: str, has_eval: bool, show_progress: bool):
    from trl import SFTConfig

    t = config.training
    eval_every = t.eval_steps if (has_eval and t.eval_steps > 0) else None
    select_best = bool(eval_every) and (t.load_best_model_at_end or t.early_stopping_patience > 0)
    return SFTConfig(
        output_dir=str(checkpoint_dir),
        # Schedule
        num_train_epochs=t.num_train_epochs,
        max_steps=t.max_steps,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler_type.value,
        warmup_steps=t.warmup_ratio,  # < 1 means a fraction of the total steps
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        per_device_train_batch_size=t.per_device_train_batch_size,
        per_device_eval_batch_size=t.per_device_eval_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        seed=t.seed,
        data_seed=t.seed,
        # TRL defaults bf16=True and gradient checkpointing on, even on CPU: set both explicitly.
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        gradient_checkpointing=t.gradient_checkpointing,
        use_cpu=not torch.cuda.is_available(),
        # Several CPU processes (distributed: ddp on CPU) talk over gloo; GPUs use the default (nccl).
        ddp_backend="gloo" if not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1 else None,
        # Data: rows arrive tokenised with a completion mask; TRL turns it into labels (-100 on prompts).
        max_length=config.data.max_seq_length,
        completion_only_loss=True,
        packing=t.packing,
        # Every batch is padded to its longest row, never to max_seq_length; grouping rows of similar length
        # (in shuffled megabatches) leaves little padding even then.
        train_sampling_strategy="group_by_length" if (t.group_by_length and not t.packing) else "random",
        dataset_num_proc=None,
        # Logging, evaluation, checkpoints
        logging_steps=t.logging_steps,
        logging_first_step=True,
        eval_strategy="steps" if eval_every else "no",
        eval_steps=eval_every,
        # The chart gets a before-training baseline point; not when selecting the best checkpoint, where the
        # baseline (which has no checkpoint) would count as the best.
        eval_on_start=bool(eval_every) and not select_best,
        load_best_model_at_end=select_best and t.load_best_model_at_end,
        metric_for_best_model="eval_loss" if select_best else None,
        greater_is_better=False if select_best else None,
        save_strategy="steps",
        save_steps=eval_every if select_best else t.save_steps,  # the best must be a saved checkpoint
        save_total_limit=t.save_total_limit,
        include_num_input_tokens_seen="non_padding",
        report_to="none",
        disable_tqdm=not show_progress,
        dataloader_num_workers=0,
    )


def build_trainer(
    config: Config,
    model,
    tokenizer,
    train_dataset,
    eval_dataset,
    checkpoint_dir: Path,
    precision: str,
    callbacks: list,
    show_progress: bool = True,
):
    from trl import SFTTrainer

    from transformers.trainer_callback import PrinterCallback

    if not show_progress:
        # No tqdm bars and no printed log dicts: a UI or a test shows progress from the metric events.
        import datasets
        from transformers.utils import logging as hf_logging

        datasets.disable_progress_bars()
        hf_logging.disable_progress_bar()  # "Loading weights", "Writing model shards"
    args = build_sft_config(config, checkpoint_dir, precision, eval_dataset is not None, show_progress)
    if args.metric_for_best_model and config.training.early_stopping_patience > 0:
        from transformers import EarlyStoppingCallback

        callbacks = [
            *callbacks,
            EarlyStoppingCallback(config.training.early_stopping_patience, config.training.early_stopping_threshold),
        ]
    trainer_class = _plain_loss_trainer_class() if not torch.cuda.is_available() else SFTTrainer
    trainer = trainer_class(
        model=model,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        callbacks=callbacks,
    )
    if not show_progress:
        trainer.remove_callback(PrinterCallback)
    return trainer


def _plain_loss_trainer_class():
    from trl import SFTTrainer
    from transformers import Trainer

    class PlainLossSFTTrainer(SFTTrainer):
        """SFTTrainer with the model's own shifted cross-entropy instead of TRL's fused LM-head loss.

        TRL computes the loss through a chunked LM head (a Python autograd Function) and adds entropy and
        token-accuracy metrics every step; that saves memory on GPUs with large vocabularies, but on CPU it
        cost ~20% of each step (bench/throughput.py, cProfile). Labels are the same (-100 on prompt tokens).
        """

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            return Trainer.compute_loss(self, model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)

    return PlainLossSFTTrainer


def last_checkpoint(checkpoint_dir: Path) -> Path | None:
    """The newest *complete* checkpoint (trainer state written last by the Trainer), or None."""
    if not checkpoint_dir.is_dir():
        return None
    found = []
    for child in checkpoint_dir.iterdir():
        match = _CHECKPOINT.match(child.name)
        if match and child.is_dir() and (child / "trainer_state.json").is_file():
            found.append((int(match.group(1)), child))
    return max(found)[1] if found else None


def resume_checkpoint(checkpoint_dir: Path) -> Path:
    """The checkpoint a resume continues from, or a ConfigError saying there is none."""
    from ..errors import ConfigError

    checkpoint = last_checkpoint(checkpoint_dir)
    if checkpoint is None:
        raise ConfigError(
            "the run in output_dir has no complete checkpoint to resume from",
            f"{checkpoint_dir}",
            "start a new run (or check that save_steps was reached before it stopped)",
        )
    return checkpoint
