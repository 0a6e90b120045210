"""Export parity figures on a real model: what each format and dtype/type changes, and what a defect changes.

    python bench/export_parity.py --model DIR [--run RUN_DIR] [--formats torch,gguf,tensorflow] [--steps 8]

A short LoRA run on DIR (or an existing run of it, ``--run``) is exported to every format, dtype and GGUF
type, and each export's figures (:mod:`autotuning.export.verify`: max |Δlogit| / max |logit|, top-1
agreement, greedy agreement over 16 tokens) are printed next to the same export made with a deliberate
defect of the kind each bound must catch:
- torch (float32, bfloat16, float16 bases: a copy of DIR in that dtype): the LoRA scale off by 10%;
- gguf (every type, converted by llama.cpp's converter and checked in llama.cpp): the file converted from a
  copy of merged/ whose config.json has rope_theta at llama.cpp's default 10000 instead of the model's (a
  converter reading the wrong field), and, separately, rms_norm_eps 10x off (a norm hyper-parameter lost);
- tensorflow: keras-hub's default norm epsilon 1e-6 instead of the checkpoint's (its Llama converter's bug).
``adapter_effect`` is how far training moved the logits (tuned vs base), so that a 10% scale error is a
real change. The bounds in verify.BOUNDS are set from these figures (docs/EXPORT_PARITY.md). The last line
is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

FIGURES = ("status", "rel_logit_diff", "max_abs_logit_diff", "reference_logit_scale", "top1_agreement")


def _row(label: str, f: dict) -> dict:
    out = {k: f.get(k) for k in FIGURES}
    out["greedy"] = f"{f.get('greedy_agreement_tokens')}/{f.get('greedy_tokens')}"
    merge = f.get("merge_check_fp32")
    if merge:
        out["merge_check_fp32"] = {k: merge.get(k) for k in FIGURES}
    cpp = f.get("llama_cpp") or {}
    if "rel_logit_diff" in cpp:
        out["llama_cpp"] = {k: cpp.get(k) for k in ("rel_logit_diff", "top1_agreement", "greedy_agreement_tokens")}
    print(
        f"{label:34s} rel {f.get('rel_logit_diff', float('nan')):.3g}  abs {f.get('max_abs_logit_diff', float('nan')):.3g}"
        f"  scale {f.get('reference_logit_scale', float('nan')):.3g}  top-1 {f.get('top1_agreement', float('nan')):.3f}"
        f"  greedy {out['greedy']}" + (f"  llama.cpp {out['llama_cpp']}" if "llama_cpp" in out else ""),
        flush=True,
    )
    return out


@contextlib.contextmanager
def _patched(module, name, value):
    old = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, old)


def _train(model: Path, out: Path, steps: int) -> Path:
    from autotuning.config import load_config
    from autotuning.recipe import run_job

    config = load_config(
        None,
        [
            f"model_name={model}",
            "dataset_path=sample",
            f"output_dir={out}",
            f"max_steps={steps}",
            "max_seq_length=96",
            "per_device_train_batch_size=8",
            "learning_rate=1e-3",
            "eval_split=0",
            "eval_generations=0",
            "save_format=torch",
            "overwrite_output_dir=true",
        ],
    )
    run_job(config, show_progress=False)
    return out


def _dtype_copy(model: Path, dtype: str, work: Path) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = work / f"base-{dtype}"
    if not (out / "config.json").is_file():
        m = AutoModelForCausalLM.from_pretrained(model, dtype=getattr(torch, dtype))
        m.save_pretrained(out)
        AutoTokenizer.from_pretrained(model).save_pretrained(out)
    return out


def _run_copy(run_dir: Path, work: Path, name: str):
    """A run directory sharing the trained adapter, to export again without touching the original."""
    from autotuning.runs import RunDir

    dest = work / name
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    for item in ("config.yaml", "run.json"):
        shutil.copy2(run_dir / item, dest / item)
    shutil.copytree(run_dir / "adapter", dest / "adapter")
    if (run_dir / "merged").is_dir():
        shutil.copytree(run_dir / "merged", dest / "merged")
    return RunDir(dest)


def _adapter_effect(model: Path, run, tokenizer) -> dict:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from autotuning.export.verify import Reference, hf_greedy, hf_logits, judge, parity_ids

    ids = parity_ids(tokenizer)
    base = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    base_ref = Reference(hf_logits(base, ids), hf_greedy(base, ids), "base")
    tuned = PeftModel.from_pretrained(base, str(run.adapter))
    return judge("torch", "float32", base_ref, hf_logits(tuned, ids), hf_greedy(tuned, ids))


def _wrong_merge(factor: float):
    import autotuning.export.torch as torch_export

    original = torch_export._merge

    def merge(with_adapter):
        for module in with_adapter.modules():
            scaling = getattr(module, "scaling", None)
            if isinstance(scaling, dict):
                for key in scaling:
                    scaling[key] *= factor
        return original(with_adapter)

    return _patched(torch_export, "_merge", merge)


def _gguf_defect(run, tokenizer, gtype: str, defect: str, work: Path) -> dict:
    """A GGUF converted from merged/ with one hyper-parameter wrong in config.json, checked against merged/."""
    import autotuning.export.gguf as gguf_export

    wrong = work / f"merged-{defect}"
    shutil.rmtree(wrong, ignore_errors=True)
    shutil.copytree(run.merged, wrong)
    config = json.loads((wrong / "config.json").read_text())
    if defect == "rope_theta_10000":
        rope = config.get("rope_parameters") or {}
        if "full_attention" in rope:  # per layer type (Gemma 3)
            for params in rope.values():
                params["rope_theta"] = 10000.0
        else:
            rope["rope_theta"] = 10000.0
        config["rope_parameters"] = rope
    elif defect == "rms_norm_eps_x10":
        config["rms_norm_eps"] = config["rms_norm_eps"] * 10
    (wrong / "config.json").write_text(json.dumps(config))
    source_type = "f32" if gtype in gguf_export.QUANTIZER_TYPES else gtype
    gguf_export.write_gguf(wrong, wrong / "source.gguf", source_type)
    path = wrong / "source.gguf"
    if gtype in gguf_export.QUANTIZER_TYPES:
        path = wrong / f"model-{gtype}.gguf"
        gguf_export._quantize(wrong / "source.gguf", path, gtype)
    figures = gguf_export.verify_gguf(path, run.merged, gtype, tokenizer)
    shutil.rmtree(wrong, ignore_errors=True)
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--run", type=Path, help="an existing LoRA run of --model (skips training)")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--formats", default="torch,gguf,tensorflow")
    parser.add_argument("--dtypes", default="float32,bfloat16,float16")
    parser.add_argument("--gguf-types", default="f32,f16,bf16,q8_0,q6_k,q5_k_m,q5_0,q4_k_m,q4_0")
    parser.add_argument("--gguf-defects", default="rope_theta_10000,rms_norm_eps_x10", help="'' for none")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "autotuning-bench-parity")
    args = parser.parse_args()

    import autotuning.export.gguf as gguf_export
    import autotuning.export.tensorflow as tf_export
    from autotuning.export import export_torch
    from autotuning.modeling import load_tokenizer
    from autotuning.runs import RunDir, load_run_config

    args.workdir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    run_dir = args.run or _train(args.model, args.workdir / "run", args.steps)
    tokenizer = load_tokenizer(load_run_config(run_dir))
    results: dict = {"model": str(args.model), "run": str(run_dir)}
    results["adapter_effect"] = _row(
        "adapter effect (tuned vs base)", _adapter_effect(args.model, RunDir(run_dir), tokenizer)
    )
    formats = args.formats.split(",")
    if "torch" in formats:
        for dtype in args.dtypes.split(","):
            base = args.model if dtype == "float32" else _dtype_copy(args.model, dtype, args.workdir)
            run = _run_copy(run_dir, args.workdir, f"torch-{dtype}")
            results[f"torch/{dtype}"] = _row(f"torch {dtype}", export_torch(run, tokenizer, str(base), True))
            with _wrong_merge(1.1):
                figures = export_torch(run, tokenizer, str(base), True)
            results[f"torch/{dtype}/lora_scale_x1.1"] = _row(f"torch {dtype} LoRA scale x1.1", figures)
            if dtype != "float32":
                shutil.rmtree(run.path)
    run = _run_copy(run_dir, args.workdir, "converted")
    if not (run.merged / "config.json").is_file():
        export_torch(run, tokenizer, str(args.model), True)
    if "gguf" in formats:
        for gtype in args.gguf_types.split(","):
            results[f"gguf/{gtype}"] = _row(f"gguf {gtype}", gguf_export.export_gguf(run, tokenizer, gtype))
            for defect in filter(None, args.gguf_defects.split(",")):
                figures = _gguf_defect(run, tokenizer, gtype, defect, args.workdir)
                results[f"gguf/{gtype}/{defect}"] = _row(f"gguf {gtype} {defect}", figures)
            shutil.rmtree(run.path / "gguf", ignore_errors=True)
            shutil.rmtree(run.path / "gguf.unverified", ignore_errors=True)
    if "tensorflow" in formats:
        results["tensorflow/float32"] = _row("tensorflow", tf_export.export_tensorflow(run, tokenizer))
        with _patched(tf_export, "_EPSILON_FIELD", {}):
            figures = tf_export.export_tensorflow(run, tokenizer)
        results["tensorflow/float32/keras_hub_default_epsilon"] = _row("tensorflow keras-hub default eps", figures)
    results["seconds"] = round(time.time() - started, 1)
    print(json.dumps(results, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
