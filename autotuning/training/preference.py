"""Preference tuning: TRL's DPO, ORPO, CPO (as SimPO) and KTO trainers, configured from our Config.

As with SFT, the loop is TRL's; we choose the trainer and its knobs, and the shared arguments (schedule,
precision, logging, checkpoints) come from :func:`.trainer.common_arguments`.

The reference model (DPO, KTO): with LoRA it is the base with the adapter disabled, so it costs no memory.
TRL, handed a model that already carries an adapter, copies that adapter into a second one named ``ref``
(for re-training an existing adapter); ours is freshly initialised (its ``B`` is zero), so the copy is the
base again and only costs memory and a second adapter in every checkpoint. We drop it, and TRL then
disables the adapter for the reference pass. A full fine-tune gets a frozen copy of the starting weights
(TRL loads it again from the model's path): one more model's weights in memory, no gradients or optimizer
state. ORPO and SimPO need no reference.
"""

from __future__ import annotations

from pathlib import Path

from peft import PeftModel
from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer
from trl.experimental.cpo import CPOConfig, CPOTrainer
from trl.experimental.orpo import ORPOConfig, ORPOTrainer

from ..config import Config, TrainingMethod
from .trainer import assemble_trainer, common_arguments, quiet_progress

__all__ = ["build_preference_config", "build_preference_trainer", "REFERENCE_ADAPTER"]

REFERENCE_ADAPTER = "ref"  # the name TRL gives its copy of the adapter


def build_preference_config(config: Config, checkpoint_dir: Path, precision: str, has_eval: bool, show_progress: bool):
    """The TRL config of the run's preference method."""
    p = config.preference
    common = common_arguments(config, checkpoint_dir, precision, has_eval, show_progress)
    beta = p.resolved_beta()
    method = p.training_method
    if method is TrainingMethod.DPO:
        return DPOConfig(**common, beta=beta, loss_type=[p.dpo_loss_type.value])
    if method is TrainingMethod.ORPO:
        return ORPOConfig(**common, beta=beta)
    if method is TrainingMethod.SIMPO:
        # SimPO is CPO's loss with a length-normalised reward and a margin, and without CPO's SFT term (cpo_alpha 0).
        return CPOConfig(**common, beta=beta, loss_type="simpo", simpo_gamma=p.simpo_gamma, cpo_alpha=0.0)
    if method is TrainingMethod.KTO:
        return KTOConfig(
            **common,
            beta=beta,
            desirable_weight=p.desirable_weight,
            undesirable_weight=p.undesirable_weight,
        )
    raise ValueError(f"{method} is not a preference method")  # programming error: SFT goes to build_trainer


_TRAINERS = {
    TrainingMethod.DPO: DPOTrainer,
    TrainingMethod.ORPO: ORPOTrainer,
    TrainingMethod.SIMPO: CPOTrainer,
    TrainingMethod.KTO: KTOTrainer,
}


def build_preference_trainer(
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
    """The method's TRL trainer on conversational rows (prompt / chosen / rejected, or prompt / completion / label).

    TRL renders each prompt with the tokenizer's chat template and puts only the answer tokens (of chosen and of
    rejected) in the log-probabilities it compares.
    """
    if not show_progress:
        quiet_progress()
    args = build_preference_config(config, checkpoint_dir, precision, eval_dataset is not None, show_progress)
    trainer_class = _TRAINERS[config.preference.training_method]
    trainer = assemble_trainer(trainer_class, config, args, model, tokenizer, train_dataset, eval_dataset, callbacks)
    _drop_reference_adapter(trainer.model)
    return trainer


def _drop_reference_adapter(model) -> None:
    """The reference is the base with our fresh adapter disabled, not TRL's copy of that adapter (see above)."""
    peft_model = model if isinstance(model, PeftModel) else getattr(model, "module", None)
    if isinstance(peft_model, PeftModel) and REFERENCE_ADAPTER in peft_model.peft_config:
        peft_model.delete_adapter(REFERENCE_ADAPTER)
        peft_model.set_adapter("default")
