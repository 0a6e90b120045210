"""Exports of a trained run. One module per format; each verifies what it wrote before keeping it."""

from .torch import PARITY_TOLERANCE, export_torch, logits_on

__all__ = ["export_torch", "export_run", "logits_on", "PARITY_TOLERANCE"]


def export_run(run_dir, formats=("torch",), gguf_type: str | None = None) -> dict:
    """Export an existing run in the given formats; records the figures in its run.json.

    The merged torch export is (re)made first whenever it is missing or torch is asked for, since
    GGUF and TensorFlow are converted from it.
    """
    from ..config import PeftType, SaveFormat
    from ..modeling import load_tokenizer, resolve_model_path
    from ..runs import RunDir, load_run_config
    from .gguf import export_gguf
    from .tensorflow import export_tensorflow

    run = RunDir(run_dir)
    config = load_run_config(run.path)
    results = dict(run.read().get("exports") or {})
    wanted = [SaveFormat(f) if not isinstance(f, SaveFormat) else f for f in formats]
    tokenizer = load_tokenizer(config)
    if SaveFormat.TORCH in wanted or not (run.merged / "config.json").is_file():
        results["torch"] = export_torch(
            run, tokenizer, resolve_model_path(config.model.model_name), config.peft.peft_type is not PeftType.NONE
        )
    if SaveFormat.GGUF in wanted:
        results["gguf"] = export_gguf(run, tokenizer, gguf_type or config.export.gguf_type.value)
    if SaveFormat.TENSORFLOW in wanted:
        results["tensorflow"] = export_tensorflow(run)
    run.update(exports=results)
    try:
        from ..report import write_report

        write_report(run.path)  # new files and checksums in the report
    except Exception as exc:  # the exports above are done and recorded; the report is only a view
        import logging

        logging.getLogger("autotuning").warning("could not rewrite the run report: %s", exc)
    return results
