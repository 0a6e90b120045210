"""Model FLOPs utilisation of our default training path, against the machine's matmul peak and a bare loop.

    python bench/mfu.py [--steps 8] [--rounds 2]                       # CPU: the 29M workload
    python bench/mfu.py --preset 0.8b --batch 32 [--quantization 4bit] # GPU: a ~0.8B Llama built locally

- Peak: large square `torch.matmul` in fp32 and bf16, timed in this script (the best of a few repeats).
- FLOPs a step really performs, per real (non-padding) token, as the issue defines them: forward 2N over
  every matmul weight (LoRA A/B and the LM head included); backward 2N for frozen weights (the input
  gradient) and 4N for trained ones (input and weight gradients); plus causal attention, counted for each
  row's real length T as 3 x 2 x layers x hidden x T(T+1) (QK^T and AV forward, twice that backward).
  Padding is not counted: work spent on pad tokens is waste, not utilisation.
- Ours: `build_trainer` on `prepare_data`, exactly what `train` runs (batches grouped by length, padded to
  the longest row, bf16 autocast where the machine supports it).
- Bare loop: the practical limit. A hand-written PyTorch loop on the same model (a fresh LoRA with the
  same seed) and the very batches our trainer trained on in that round (recorded from its forward calls,
  same order): forward with labels under autocast, backward, AdamW step. No scheduler, no logging, no
  callbacks.

Ours and the bare loop alternate for `--rounds`; the first step of every call is not timed. The last
line is one JSON object (`mfu_bf16` is a fraction: 0.45 = 45%).
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import BATCH, bench_config, build_default_trainer, print_result
from transformers import TrainerCallback

PRESETS = {
    # The CPU workload of bench/common.py (~29M parameters).
    "30m": None,
    # ~0.8B parameters, for a GPU: hidden 2048, 16 layers, 16 heads, intermediate 5632, vocab 8192.
    "0.8b": dict(
        vocab_size=8192,
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=16,
        num_attention_heads=16,
        num_key_value_heads=16,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
    ),
}


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def peak_matmul_gflops(dtype: torch.dtype) -> float:
    """The machine's practical matmul ceiling for ``dtype``: the best of several sizes and repeats.

    Several sizes, because the fastest differs by machine (cache sizes, thread count); taking the best
    keeps the peak from being under-measured, which would flatter the MFU.
    """
    device = "cuda" if torch.cuda.is_available() else "cpu"
    sizes = (4096, 8192) if device == "cuda" else (1024, 2048, 4096)
    best = 0.0
    for n in sizes:
        a = torch.randn(n, n, dtype=dtype, device=device)
        b = torch.randn(n, n, dtype=dtype, device=device)
        reps = 20 if device == "cuda" else max(2, int(2e10 // (2 * n**3)))  # >= ~20 GFLOP per timing
        torch.matmul(a, b)  # warm-up
        for _ in range(3):
            _sync()
            start = time.perf_counter()
            for _ in range(reps):
                torch.matmul(a, b)
            _sync()
            best = max(best, 2 * n**3 * reps / (time.perf_counter() - start) / 1e9)
    return best


class FlopCounter:
    """Counts real tokens and useful FLOPs of every forward call the model sees (a forward pre-hook)."""

    def __init__(self, model):
        core = model.get_base_model() if hasattr(model, "get_base_model") else model
        cfg = core.config
        self.layers, self.hidden = cfg.num_hidden_layers, cfg.hidden_size
        frozen = trained = 0
        for module in model.modules():
            weight = getattr(module, "weight", None)
            if weight is None or not hasattr(module, "in_features") or not hasattr(module, "out_features"):
                continue
            if hasattr(module, "base_layer"):  # a PEFT LoRA wrapper: its base layer and A/B are counted themselves
                continue
            size = module.in_features * module.out_features  # also right for packed 4-bit weights
            if weight.requires_grad:
                trained += size
            else:
                frozen += size
        self.frozen_params, self.trained_params = frozen, trained
        # Per token: forward 2N everywhere; backward 2N frozen (input grad), 4N trained (input + weight grad).
        self.per_token = 2 * (frozen + trained) + 2 * frozen + 4 * trained
        self.tokens = 0
        self.flops = 0.0
        self.recorded: list[dict] | None = None  # set to a list to keep every training batch seen
        model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        if not module.training:
            return
        mask = kwargs.get("attention_mask")
        ids = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else args[0]
        lengths = mask.sum(dim=1) if mask is not None else torch.full((ids.shape[0],), ids.shape[1])
        lengths = lengths.double()
        if self.recorded is not None:
            self.recorded.append(
                {k: kwargs[k].detach().clone() for k in ("input_ids", "attention_mask", "labels") if k in kwargs}
            )
        self.tokens += int(lengths.sum())
        attention = 6 * self.layers * self.hidden * float((lengths * (lengths + 1)).sum())
        self.flops += self.per_token * float(lengths.sum()) + attention


class StepClock(TrainerCallback):
    """Seconds, tokens and FLOPs of every step after the first of each train() call."""

    def __init__(self, counter: FlopCounter):
        self.counter = counter
        self.seconds = self.flops = 0.0
        self.tokens = self.steps = 0
        self._last = None

    def on_train_begin(self, args, state, control, **kwargs):
        _sync()
        self._last = None

    def on_step_end(self, args, state, control, **kwargs):
        _sync()
        now, tokens, flops = time.perf_counter(), self.counter.tokens, self.counter.flops
        if self._last is not None:
            self.seconds += now - self._last[0]
            self.tokens += tokens - self._last[1]
            self.flops += flops - self._last[2]
            self.steps += 1
        self._last = (now, tokens, flops)


def build_ours(config, workdir: Path):
    clock = None

    def callbacks(model):  # the FLOP counter hooks the LoRA model before the trainer wraps it
        nonlocal clock
        clock = StepClock(FlopCounter(model))
        return [clock]

    trainer, precision = build_default_trainer(config, workdir, callbacks)
    return trainer, clock, precision


class BareLoop:
    """The practical limit: the same model (a fresh LoRA, same seed) in a hand-written loop, fed the very
    batches our trainer just trained on (recorded by its FlopCounter), in the same order."""

    def __init__(self, config, precision: str):
        from autotuning.modeling import apply_peft, load_model

        model = apply_peft(load_model(config).model, config)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if not any(p.device.type == "cuda" for p in model.parameters()):
            model.to(self.device)
        model.train()
        self.model = model
        self.counter = FlopCounter(model)
        self.optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        self.seconds = self.flops = 0.0
        self.tokens = self.steps = 0

    def run(self, batches: list[dict]) -> None:
        for step, batch in enumerate(batches):
            inputs = {k: v.to(self.device) for k, v in batch.items()}
            _sync()
            start, tokens, flops = time.perf_counter(), self.counter.tokens, self.counter.flops
            with torch.autocast(self.device, dtype=self.dtype or torch.float32, enabled=self.dtype is not None):
                loss = self.model(**inputs).loss
            loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            _sync()
            if step:  # the first step of each round is a warm-up, as for ours
                self.seconds += time.perf_counter() - start
                self.tokens += self.counter.tokens - tokens
                self.flops += self.counter.flops - flops
                self.steps += 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8, help="steps per method per round (the first is not timed)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="30m")
    parser.add_argument("--batch", type=int, default=BATCH)
    parser.add_argument("--quantization", choices=["none", "4bit", "8bit"], default="none")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "autotuning-bench")
    args = parser.parse_args()

    peak = {"fp32": peak_matmul_gflops(torch.float32), "bf16": peak_matmul_gflops(torch.bfloat16)}
    print(f"peak matmul: fp32 {peak['fp32']:.0f} GFLOP/s, bf16 {peak['bf16']:.0f} GFLOP/s")
    extra = {
        "per_device_train_batch_size": args.batch,
        "quantization": args.quantization,
        "peft_type": "qlora" if args.quantization != "none" else "lora",
    }
    if PRESETS[args.preset]:
        model = args.workdir / f"llama-{args.preset}"
        if not (model / "config.json").is_file():
            # Built in a child process, so the timed process holds nothing of the build. On a fresh GPU machine
            # run the script twice: the first run pays CUDA's kernel JIT (cached in ~/.nv/ComputeCache) inside
            # our trainer's timed steps (13.5k vs 42k tok/s on an H200).
            code = (
                "import json, sys; sys.path.insert(0, sys.argv[1]); from common import build_local_llama; "
                "build_local_llama(__import__('pathlib').Path(sys.argv[2]), **json.loads(sys.argv[3]))"
            )
            subprocess.run(
                [sys.executable, "-c", code, str(Path(__file__).parent), str(model), json.dumps(PRESETS[args.preset])],
                check=True,
            )
        extra["model_name"] = str(model)
    config = bench_config(args.workdir, **extra)
    trainer, clock, precision = build_ours(config, args.workdir)
    bare = BareLoop(config, precision)
    for _round in range(args.rounds):
        clock.counter.recorded = []
        trainer.args.max_steps = args.steps  # each call starts a fresh schedule: only timing matters here
        trainer.train(resume_from_checkpoint=None)
        batches, clock.counter.recorded = clock.counter.recorded, None
        gc.collect()
        bare.run(batches)
        del batches
        gc.collect()
    bare_seconds, bare_flops, bare_tokens = bare.seconds, bare.flops, bare.tokens
    ours_rate, bare_rate = clock.tokens / clock.seconds, bare_tokens / bare_seconds
    ours_gflops, bare_gflops = clock.flops / clock.seconds / 1e9, bare_flops / bare_seconds / 1e9
    counter = clock.counter
    print(
        f"matmul weights: {counter.frozen_params / 1e6:.1f}M frozen, {counter.trained_params / 1e6:.2f}M trained; "
        f"precision {precision}"
    )
    print(f"ours: {clock.steps} timed steps, {clock.tokens} tokens, {ours_rate:.0f} tok/s, {ours_gflops:.1f} GFLOP/s")
    print(
        f"bare loop: {bare.steps} timed steps, {bare_tokens} tokens, {bare_rate:.0f} tok/s, {bare_gflops:.1f} GFLOP/s"
    )
    print_result(
        {
            "peak_fp32_gflops": round(peak["fp32"], 1),
            "peak_bf16_gflops": round(peak["bf16"], 1),
            "ours_gflops": round(ours_gflops, 1),
            "bare_loop_gflops": round(bare_gflops, 1),
            "mfu_bf16": round(ours_gflops / peak["bf16"], 3),
            "bare_loop_mfu_bf16": round(bare_gflops / peak["bf16"], 3),
            "ours_tok_s": round(ours_rate, 1),
            "bare_loop_tok_s": round(bare_rate, 1),
            "ratio_vs_bare_loop": round(ours_rate / bare_rate, 3),
            "precision": precision,
            "preset": args.preset,
            "quantization": args.quantization,
            "batch": args.batch,
            "timed_steps_per_method": args.rounds * (args.steps - 1),
        }
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
