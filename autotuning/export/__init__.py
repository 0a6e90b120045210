"""Exports of a trained run. One module per format; each verifies what it wrote before keeping it."""

from .torch import PARITY_TOLERANCE, export_torch, max_logit_diff

__all__ = ["export_torch", "export_run", "max_logit_diff", "PARITY_TOLERANCE"]


def export_run(run_dir, formats=("torch",)) -> dict:
    """Export an existing run in the given formats; records the figures in its run.json."""
    from ..config import PeftType, SaveFormat
    from ..errors import ConfigError
    from ..modeling import load_tokenizer, resolve_model_path
    from ..runs import RunDir, load_run_config

    run = RunDir(run_dir)
    config = load_run_config(run.path)
    results = dict(run.read().get("exports") or {})
    for fmt in formats:
        fmt = SaveFormat(fmt) if not isinstance(fmt, SaveFormat) else fmt
        if fmt is not SaveFormat.TORCH:
            raise ConfigError(
                f"export format '{fmt.value}' is not available in this version yet", "format", "use torch"
            )
        tokenizer = load_tokenizer(config)
        results["torch"] = export_torch(
            run, tokenizer, resolve_model_path(config.model.model_name), config.peft.peft_type is not PeftType.NONE
        )
    run.update(exports=results)
    return results
