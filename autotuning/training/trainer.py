"""Build TRL's SFTTrainer from a Config. We configure the loop; we do not rewrite it."""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

import datasets
import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from transformers import EarlyStoppingCallback, Trainer
from transformers.trainer_callback import PrinterCallback
from transformers.utils import logging as hf_logging
from trl import SFTConfig, SFTTrainer

from ..config import BestMetric, Config, Distributed
from .speedups import compile_decoder_layers, liger_arguments, use_fused_lora, use_varlen_attention
from .trackers import attach_trackers

__all__ = [
    "build_sft_config",
    "build_trainer",
    "use_model_loss",
    "common_arguments",
    "assemble_trainer",
    "quiet_progress",
]

log = logging.getLogger("autotuning")


def common_arguments(config: Config, checkpoint_dir: Path, precision: str, has_eval: bool, show_progress: bool):
    """The TrainingArguments every method shares (schedule, precision, logging, checkpoints), as keyword arguments.

    SFT and the preference methods (:mod:`.preference`) build their TRL config from these plus their own.
    """
    t = config.training
    eval_every = t.eval_steps if (has_eval and t.eval_steps > 0) else None
    select_best = bool(eval_every) and (t.load_best_model_at_end or t.early_stopping_patience > 0)
    best = _best_metric(config)
    return dict(
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
        # Under FSDP, activation checkpointing is FSDP's (fsdp_activation_checkpointing in the accelerate config the
        # launcher writes): transformers refuses both at once, so the Trainer's own stays off there.
        gradient_checkpointing=t.gradient_checkpointing and t.distributed is not Distributed.FSDP,
        use_cpu=not torch.cuda.is_available(),
        ddp_timeout=t.ddp_timeout,  # the process group's timeout: a lost peer fails the run instead of hanging it
        # Several CPU processes (distributed: ddp on CPU) talk over gloo; GPUs use the default (nccl).
        ddp_backend="gloo" if not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1 else None,
        max_length=config.data.max_seq_length,
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
        metric_for_best_model=best[0] if select_best else None,
        greater_is_better=best[1] if select_best else None,
        save_strategy="steps",
        save_steps=eval_every if select_best else t.save_steps,  # the best must be a saved checkpoint
        save_total_limit=t.save_total_limit,
        include_num_input_tokens_seen="non_padding",  # for tokens/s in the metric events
        # The filter's torch.isnan(loss) is a host sync every step, and it hides a diverged run behind an average:
        # a nan loss is logged as nan.
        logging_nan_inf_filter=False,
        # Trackers through transformers' integrations; training/trackers.py points them at the run directory.
        # The integrations report from the global rank 0 only (state.is_world_process_zero).
        report_to=[str(r) for r in config.run.report_to] or "none",
        run_name=checkpoint_dir.parent.name,
        disable_tqdm=not show_progress,
        dataloader_num_workers=0,
    )


def _best_metric(config: Config) -> tuple[str, bool]:
    """(the Trainer's metric_for_best_model, greater_is_better) for the config's best_metric."""
    if config.preference.best_metric is BestMetric.REWARD_ACCURACY:
        return "eval_rewards/accuracies", True
    if config.preference.best_metric is BestMetric.ACCURACY:
        return "eval_accuracy", True  # from answer_token_accuracy below
    return "eval_loss", False


def build_sft_config(config: Config, checkpoint_dir: Path, precision: str, has_eval: bool, show_progress: bool):
    t = config.training
    return SFTConfig(
        **common_arguments(config, checkpoint_dir, precision, has_eval, show_progress),
        # Data: rows arrive tokenised with a completion mask; TRL turns it into labels (-100 on prompts).
        completion_only_loss=True,
        packing=t.packing,
        # Every batch is padded to its longest row, never to max_seq_length; grouping rows of similar length
        # (in shuffled megabatches) leaves little padding even then.
        train_sampling_strategy="group_by_length" if (t.group_by_length and not t.packing) else "random",
        **liger_arguments(config),
    )


def quiet_progress() -> None:
    """No tqdm bars and no printed log dicts: a UI or a test shows progress from the metric events."""
    datasets.disable_progress_bars()
    hf_logging.disable_progress_bar()  # "Loading weights", "Writing model shards"


def assemble_trainer(trainer_class, config: Config, args, model, tokenizer, train_dataset, eval_dataset, callbacks):
    """Every method's trainer is built the same way: early stopping when the config asks for it (and the arguments
    name a best-checkpoint metric), and no printed log dicts when progress is quiet."""
    t = config.training
    if args.metric_for_best_model and t.early_stopping_patience > 0:
        callbacks = [*callbacks, EarlyStoppingCallback(t.early_stopping_patience, t.early_stopping_threshold)]
    run_dir = Path(args.output_dir).parent  # output_dir is <run>/checkpoints
    # Speed-ups (speedups.py), before the Trainer wraps the model.
    if t.fused_lora:
        log.info("fused_lora: %d LoRA layers add their update with one addmm", use_fused_lora(model))
    if t.varlen_attention:
        callbacks = [*callbacks, use_varlen_attention(model)]
    if t.compile_layers:
        log.info(
            "compile_layers: %d decoder layers compiled (the first steps pay the compile)",
            compile_decoder_layers(model),
        )
    trainer = trainer_class(
        model=model,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        callbacks=callbacks,
    )
    attach_trackers(trainer, config, run_dir)  # report_to's callbacks: after ours, writing under the run directory
    if args.disable_tqdm:
        trainer.remove_callback(PrinterCallback)
    return trainer


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
    if not show_progress:
        quiet_progress()
    args = build_sft_config(config, checkpoint_dir, precision, eval_dataset is not None, show_progress)
    vocab_size = getattr(getattr(model, "config", None), "vocab_size", None) or len(tokenizer)
    by_accuracy = args.metric_for_best_model == "eval_accuracy"
    # Accuracy needs each evaluation's predictions, which only the model's own loss path hands back.
    trainer_class = _trainer_class(by_accuracy or use_model_loss(config, vocab_size, precision))
    trainer = assemble_trainer(trainer_class, config, args, model, tokenizer, train_dataset, eval_dataset, callbacks)
    if by_accuracy:
        trainer.compute_metrics = answer_token_accuracy
        trainer.preprocess_logits_for_metrics = _predicted_tokens
    return trainer


def _predicted_tokens(logits, labels):
    """Keep only the argmax of each position's logits: an evaluation gathers ids, never vocabulary-wide logits."""
    return (logits[0] if isinstance(logits, tuple) else logits).argmax(dim=-1)


def answer_token_accuracy(prediction) -> dict[str, float]:
    """The share of answer tokens (labels != -100) the model predicts right, as the Trainer's ``compute_metrics``.

    Position t's prediction is for token t + 1 (the model shifts its labels inside its own loss).
    """
    predicted, labels = prediction.predictions, prediction.label_ids
    predicted, labels = predicted[:, :-1], labels[:, 1:]
    answer = labels != -100
    total = int(answer.sum())
    return {"accuracy": float((predicted == labels)[answer].sum()) / total if total else 0.0}


# Above this size the full logits of one batch (the estimate's logits term) would crowd a GPU: TRL's chunked
# LM-head loss never materialises them, at the price of speed.
_MODEL_LOSS_MAX_LOGITS_BYTES = 2 * 1024**3


def use_model_loss(config: Config, vocab_size: int, precision: str) -> bool:
    """The model's own shifted cross-entropy (fast) instead of TRL's fused LM-head loss (lean)?

    On CPU always: TRL's loss (a chunked Python autograd Function, plus entropy and token-accuracy metrics
    every step) cost ~20% of a step (bench/throughput.py, cProfile). On a GPU it cost ~30% of a step of a
    0.8B Llama with an 8k vocabulary (bench/mfu.py on an H200), so we keep it only where its memory saving
    matters: when one batch's full logits would pass 2 GiB (large vocabularies, long rows, big batches).
    """
    if not torch.cuda.is_available() or config.training.fused_cross_entropy:
        return True  # Liger's fused cross-entropy replaces the model's own loss
    compute = 4 if precision == "fp32" else 2
    tokens = config.training.per_device_train_batch_size * config.data.max_seq_length
    return tokens * vocab_size * (compute + 12) <= _MODEL_LOSS_MAX_LOGITS_BYTES


def _trainer_class(model_loss: bool):

    class AutotuningSFTTrainer(SFTTrainer):
        """SFTTrainer with speed-ups that change no result.

        - Under mixed precision, LoRA layers skip casting their input to the adapter's fp32 dtype: autocast casts
          it straight back to bf16/fp16 for the matmul, so the two copies (and their backward) were pure waste
          (~20% of a GPU step in torch.profiler: aten::copy_ and ToCopyBackward0). The layers are found once, not
          by walking every module twice a step.
        - No host sync every step: the tokens seen are summed on the device and read once per log and checkpoint
          (transformers reads them with ``.item()`` each step), and the FLOP count uses a parameter count taken
          once (transformers walks every parameter each step).
        - Optionally the model's own loss (see :func:`use_model_loss`); labels are the same (-100 on prompts).
        """

        def __init__(self, *args, **kwargs):
            self._tuner_layers: dict[int, list] = {}
            self._pending_tokens = None
            self._counted_parameters = None
            super().__init__(*args, **kwargs)

        @contextlib.contextmanager
        def _casting(self, model):
            if not (self.args.bf16 or self.args.fp16):
                yield
                return
            layers = self._tuner_layers.get(id(model))
            if layers is None:
                layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
                self._tuner_layers[id(model)] = layers
            saved = [layer.cast_input_dtype_enabled for layer in layers]
            for layer in layers:
                layer.cast_input_dtype_enabled = False
            try:
                yield
            finally:
                for layer, value in zip(layers, saved):
                    layer.cast_input_dtype_enabled = value

        def training_step(self, model, inputs, *args, **kwargs):
            with self._casting(model):
                return super().training_step(model, inputs, *args, **kwargs)

        def prediction_step(self, model, inputs, *args, **kwargs):
            with self._casting(model):
                return super().prediction_step(model, inputs, *args, **kwargs)

        def _track_num_input_tokens(self, inputs):
            if self.args.include_num_input_tokens_seen != "non_padding" or "attention_mask" not in inputs:
                return super()._track_num_input_tokens(inputs)
            count = inputs["attention_mask"].sum()
            self._pending_tokens = count if self._pending_tokens is None else self._pending_tokens + count

        def _flush_tokens(self) -> None:
            """Add the tokens summed on the device to the state (every rank calls this: the gather is collective)."""
            pending, self._pending_tokens = self._pending_tokens, None
            if pending is not None:
                pending = torch.as_tensor(pending, device=self.args.device, dtype=torch.int64)
                self.state.num_input_tokens_seen += int(self.accelerator.gather(pending).sum().item())

        def log(self, logs, *args, **kwargs):
            self._flush_tokens()
            return super().log(logs, *args, **kwargs)

        def _save_checkpoint(self, *args, **kwargs):
            self._flush_tokens()  # the checkpoint's trainer_state.json carries the count a resume continues from
            return super()._save_checkpoint(*args, **kwargs)

        def floating_point_ops(self, inputs):
            ids = inputs.get(getattr(self.model, "main_input_name", "input_ids"))
            if ids is None or not hasattr(self.model, "num_parameters"):
                return super().floating_point_ops(inputs)
            if self._counted_parameters is None:
                self._counted_parameters = self.model.num_parameters(exclude_embeddings=True)
            return 6 * ids.numel() * self._counted_parameters

        if model_loss:

            def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
                return Trainer.compute_loss(
                    self, model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
                )

    return AutotuningSFTTrainer
