"""Model FLOPs utilisation of our default training path, against the machine's matmul peak and a bare loop.

    python bench/mfu.py [--steps 8] [--rounds 2]                                # CPU: the 29M workload
    python bench/mfu.py --preset 0.8b --batch 32 [--quantization 4bit]          # GPU: a ~0.8B Llama built locally
    python bench/mfu.py --preset llama-3.2-1b --batch 16 [--set packing=true]   # GPU: Llama-3.2-1B's shapes

- Peak: large square `torch.matmul` in fp32 and bf16, timed in this script (the best of a few repeats), and
  the spec sheet's dense bf16 figure for the GPU (`SPEC_PEAK_BF16_TFLOPS`, by `torch.cuda.get_device_name`;
  None on a CPU or an unlisted GPU). MFU is reported against both.
- FLOPs a step really performs, per real (non-padding) token, as the issue defines them: forward 2N over
  every matmul weight (LoRA A/B and the LM head included); backward 2N for frozen weights (the input
  gradient) and 4N for trained ones (input and weight gradients); plus causal attention, counted per
  document of T real tokens as 3 x 2 x layers x (heads x head_dim) x T(T+1) (QK^T and AV forward, twice that
  backward). A packed row holds several documents (its position_ids restart at 0, or cu_seq_lens mark
  them): each is counted alone, since attention does not cross them. Padding is not counted: work spent
  on pad tokens is waste, not utilisation.
- Timing: N steps between two device synchronisations (the first step of every call is not timed; the
  window runs from the end of step 1 to the end of the last step). Nothing in the window waits for the
  device on the benchmark's behalf: the FLOP counter sums its tokens on the device and is read once, after
  the window; logging is off inside it (logging_steps far above the step count).
- Ours: `build_trainer` on `prepare_data`, exactly what `train` runs (batches grouped by length, padded to
  the longest row, bf16 autocast where the machine supports it). `--set key=value` passes config options
  (e.g. `packing=true`, or a speed switch under test) to ours and the bare loop alike.
- Bare loop: the practical limit. A hand-written PyTorch loop on the same model (a fresh LoRA with the
  same seed) and the very batches our trainer trained on in that round (recorded from its forward calls,
  same order): forward with labels under autocast, backward, AdamW step. No scheduler, no logging, no
  callbacks.

Presets are built locally from config with random weights (`bench/common.py`), with the builtin tokenizer:
its ids are all small, so the vocabulary only sizes the embedding and the LM head, as in the real model.

Ours and the bare loop alternate for `--rounds`. The last line is one JSON object (`mfu_bf16` is a
fraction of the measured bf16 peak, `mfu_bf16_spec` of the spec sheet's: 0.45 = 45%).
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

# name -> (architecture, config sizes) of a model built locally with random weights; None: bench/common.py's
# CPU workload.
PRESETS: dict[str, tuple[str, dict] | None] = {
    # The CPU workload of bench/common.py (~29M parameters).
    "30m": None,
    # ~0.8B parameters, for a GPU: hidden 2048, 16 layers, 16 heads, intermediate 5632, vocab 8192 (issue 20's
    # workload: the figures in docs/BENCHMARKS.md are on it).
    "0.8b": (
        "llama",
        dict(
            vocab_size=8192,
            hidden_size=2048,
            intermediate_size=5632,
            num_hidden_layers=16,
            num_attention_heads=16,
            num_key_value_heads=16,
            max_position_embeddings=2048,
            tie_word_embeddings=False,
            dtype="bfloat16",
        ),
    ),
    # Llama-3.2-1B's shapes (its config.json): GQA 32/8 heads of 64, a 128k vocabulary, tied embeddings,
    # rope theta 500000 with llama3 scaling. ~1.24B parameters.
    "llama-3.2-1b": (
        "llama",
        dict(
            vocab_size=128256,
            hidden_size=2048,
            intermediate_size=8192,
            num_hidden_layers=16,
            num_attention_heads=32,
            num_key_value_heads=8,
            head_dim=64,
            max_position_embeddings=131072,
            rms_norm_eps=1e-5,
            rope_theta=500000.0,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 32.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192,
            },
            tie_word_embeddings=True,
            dtype="bfloat16",
        ),
    ),
    # Qwen2.5-0.5B's shapes: GQA 14/2 heads of 64, biases on q/k/v, a 152k vocabulary, tied. ~0.49B parameters.
    "qwen2.5-0.5b": (
        "qwen2",
        dict(
            vocab_size=151936,
            hidden_size=896,
            intermediate_size=4864,
            num_hidden_layers=24,
            num_attention_heads=14,
            num_key_value_heads=2,
            max_position_embeddings=32768,
            rms_norm_eps=1e-6,
            rope_theta=1000000.0,
            tie_word_embeddings=True,
            dtype="bfloat16",
        ),
    ),
}

# Dense bf16 tensor-core peaks (TFLOP/s, FP32 accumulate) from NVIDIA's spec sheets, keyed by
# torch.cuda.get_device_name(). Spec sheets print the 2:4-sparsity figure; dense is half of it. H100 SXM:
# 132 SMs x 4 tensor cores x 1024 FLOP/clock x 1.83 GHz = 989.4 (the Hopper whitepaper's 989.4/1978.9);
# the H200 is the same chip with more memory ("1,979 TFLOPS with sparsity").
SPEC_PEAK_BF16_TFLOPS = {
    "NVIDIA H200": 989.4,
    "NVIDIA H100 80GB HBM3": 989.4,  # H100 SXM5
    "NVIDIA H100 PCIe": 756.5,
    "NVIDIA A100-SXM4-80GB": 312.0,
    "NVIDIA A100-SXM4-40GB": 312.0,
    "NVIDIA A100 80GB PCIe": 312.0,
    "NVIDIA A100-PCIE-40GB": 312.0,
}


def spec_peak_bf16_gflops() -> float | None:
    """The spec sheet's dense bf16 peak of GPU 0 in GFLOP/s; None on a CPU or a GPU not in the table."""
    if not torch.cuda.is_available():
        return None
    tflops = SPEC_PEAK_BF16_TFLOPS.get(torch.cuda.get_device_name(0))
    return tflops * 1000 if tflops is not None else None


def build_preset(preset: str, workdir: Path) -> Path | None:
    """The preset's model directory under ``workdir``, built once in a child process (None: the CPU workload).

    A child process, so the timed process holds nothing of the build (the random initialisation of a 1B
    model and its safetensors writer).
    """
    if PRESETS[preset] is None:
        return None
    arch, sizes = PRESETS[preset]
    model = workdir / f"{arch}-{preset}"
    if not (model / "config.json").is_file():
        code = (
            "import json, sys; sys.path.insert(0, sys.argv[1]); from common import build_local_model; "
            "build_local_model(__import__('pathlib').Path(sys.argv[2]), sys.argv[3], **json.loads(sys.argv[4]))"
        )
        subprocess.run(
            [sys.executable, "-c", code, str(Path(__file__).parent), str(model), arch, json.dumps(sizes)], check=True
        )
    return model


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


def matmul_weights(model) -> tuple[int, int]:
    """(frozen, trained) matmul weights of a model, LoRA A/B counted as trained, the LM head as frozen (a tied head
    is a matmul too). Packed 4-bit weights are counted by their in x out shape."""
    frozen = trained = 0
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if weight is None or not hasattr(module, "in_features") or not hasattr(module, "out_features"):
            continue
        if hasattr(module, "base_layer"):  # a PEFT LoRA wrapper: its base layer and A/B are counted themselves
            continue
        size = module.in_features * module.out_features
        if weight.requires_grad:
            trained += size
        else:
            frozen += size
    return frozen, trained


def attention_width(config) -> int:
    """heads x head_dim: the width of QK^T and AV (the hidden size for Llama 3.2 and Qwen2.5, not for every model)."""
    heads = config.num_attention_heads
    return heads * (getattr(config, "head_dim", None) or config.hidden_size // heads)


def step_flops(frozen: int, trained: int, layers: int, width: int, tokens: int, attention_pairs: int) -> float:
    """Useful FLOPs of training on ``tokens`` real tokens whose documents hold ``attention_pairs`` causal
    (query, key) pairs in all: sum over documents of T(T+1)/2.

    Per token: forward 2N everywhere; backward 2N frozen (input grad), 4N trained (input + weight grad). Attention:
    per pair, 2 x width FLOPs for QK^T and as many for AV forward, twice that backward, in every layer.
    """
    per_token = 2 * (frozen + trained) + 2 * frozen + 4 * trained
    return float(per_token) * tokens + 12.0 * layers * width * attention_pairs


class FlopCounter:
    """Counts real tokens and causal attention pairs of every training forward call (a forward pre-hook), on the
    device: nothing here waits for it. :meth:`read` fetches both once.

    A document's T tokens hold T(T+1)/2 causal pairs, which is the sum of (position + 1) over its tokens. So the
    pairs of any batch are sum(position + 1) over its real tokens, with positions restarting at every document:
    a padded row (positions from its attention mask), a packed row (its position_ids restart at 0 per document)
    and cu_seq_lens (flash-attention style boundaries) all reduce to that, with no loop over documents.
    """

    def __init__(self, model):
        core = model.get_base_model() if hasattr(model, "get_base_model") else model
        cfg = core.config
        self.layers, self.width = cfg.num_hidden_layers, attention_width(cfg)
        self.frozen_params, self.trained_params = matmul_weights(model)
        self._totals = None  # int64 [tokens, pairs] on the model's device
        self.recorded: list[dict] | None = None  # set to a list to keep every training batch seen
        model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        if not module.training:
            return
        ids = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else args[0]
        if self.recorded is not None:
            self.recorded.append(
                {
                    k: kwargs[k].detach().clone()
                    for k in ("input_ids", "attention_mask", "position_ids", "labels")
                    if kwargs.get(k) is not None
                }
            )
        counts = batch_counts(ids, kwargs.get("attention_mask"), kwargs.get("position_ids"), kwargs)
        self._totals = counts if self._totals is None else self._totals + counts

    def snapshot(self):
        """The running totals (a device tensor, not read): subtract two with :meth:`read` to count a window."""
        return None if self._totals is None else self._totals.clone()

    def read(self, since=None) -> tuple[int, int]:
        """(real tokens, attention pairs) since the ``since`` snapshot (or from the start): one device read."""
        if self._totals is None:
            return 0, 0
        totals = self._totals if since is None else self._totals - since
        tokens, pairs = totals.tolist()
        return int(tokens), int(pairs)

    def flops(self, tokens: int, pairs: int) -> float:
        return step_flops(self.frozen_params, self.trained_params, self.layers, self.width, tokens, pairs)


def batch_counts(ids, attention_mask=None, position_ids=None, kwargs=None):
    """int64 [real tokens, causal attention pairs] of one batch, computed on its device (no host sync)."""
    kwargs = kwargs or {}
    cu = kwargs.get("cu_seq_lens_q")
    if cu is None:
        cu = kwargs.get("cu_seqlens_q")
    if cu is not None:  # document boundaries given outright: T_i = cu[i+1] - cu[i]
        lengths = (cu[1:] - cu[:-1]).long()
        return torch.stack([lengths.sum(), (lengths * (lengths + 1)).sum() // 2])
    if attention_mask is not None and attention_mask.dim() == 2:
        mask = attention_mask.long()
    else:
        mask = torch.ones_like(ids, dtype=torch.long)
    if position_ids is not None and position_ids.shape == ids.shape:
        positions = position_ids.long()
    else:
        positions = mask.cumsum(dim=-1) - 1  # also right for left padding
    return torch.stack([mask.sum(), ((positions + 1) * mask).sum()])


class StepClock(TrainerCallback):
    """Seconds, tokens and FLOPs of each train() call's steps after the first: one window between two syncs.

    The window opens at the end of step 1 (a sync, then the clock and a snapshot of the device-side counter) and
    closes at the end of the last step (a sync); the counter is read after that. Steps in between run as they
    would without the benchmark.
    """

    def __init__(self, counter: FlopCounter):
        self.counter = counter
        self.seconds = self.flops = 0.0
        self.tokens = self.pairs = self.steps = 0
        self._start = None

    def on_train_begin(self, args, state, control, **kwargs):
        self._start = None

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 1:
            _sync()
            self._start = (time.perf_counter(), self.counter.snapshot())
        elif state.global_step == state.max_steps and self._start is not None:
            _sync()
            seconds = time.perf_counter() - self._start[0]
            tokens, pairs = self.counter.read(since=self._start[1])
            self.seconds += seconds
            self.tokens += tokens
            self.pairs += pairs
            self.flops += self.counter.flops(tokens, pairs)
            self.steps += state.global_step - 1
            self._start = None


def build_ours(config, workdir: Path):
    clock = None

    def callbacks(model):  # the FLOP counter hooks the LoRA model before the trainer wraps it
        nonlocal clock
        clock = StepClock(FlopCounter(model))
        return [clock]

    trainer, precision = build_default_trainer(config, workdir, callbacks)
    trainer.args.logging_first_step = False  # its loss read would wait for the device inside the window
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
        # Fused AdamW, as the Trainer's default optim (adamw_torch_fused) on torch >= 2.8.
        self.optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4, fused=True)
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        self.seconds = self.flops = 0.0
        self.tokens = self.steps = 0

    def run(self, batches: list[dict]) -> None:
        """One untimed step (as ours), then the rest between two syncs."""
        start = None
        for step, batch in enumerate(batches):
            if step == 1:
                _sync()
                start = (time.perf_counter(), self.counter.snapshot())
            inputs = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
            with torch.autocast(self.device, dtype=self.dtype or torch.float32, enabled=self.dtype is not None):
                loss = self.model(**inputs).loss
            loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        if start is None:
            return
        _sync()
        self.seconds += time.perf_counter() - start[0]
        tokens, pairs = self.counter.read(since=start[1])
        self.tokens += tokens
        self.flops += self.counter.flops(tokens, pairs)
        self.steps += len(batches) - 1


# Far above any step count here: the Trainer logs (and reads the loss back from the device) only at the end.
NO_LOGGING_STEPS = 1_000_000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8, help="steps per method per round (the first is not timed)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="30m")
    parser.add_argument("--batch", type=int, default=BATCH)
    parser.add_argument("--quantization", choices=["none", "4bit", "8bit"], default="none")
    parser.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a config option for ours and the bare loop (repeatable), e.g. packing=true",
    )
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "autotuning-bench")
    args = parser.parse_args()

    peak = {"fp32": peak_matmul_gflops(torch.float32), "bf16": peak_matmul_gflops(torch.bfloat16)}
    spec = spec_peak_bf16_gflops()
    print(
        f"peak matmul: fp32 {peak['fp32']:.0f} GFLOP/s, bf16 {peak['bf16']:.0f} GFLOP/s; "
        f"spec sheet bf16: {f'{spec:.0f} GFLOP/s' if spec else 'none for this device'}"
    )
    extra = {
        "per_device_train_batch_size": args.batch,
        "quantization": args.quantization,
        "peft_type": "qlora" if args.quantization != "none" else "lora",
        "logging_steps": NO_LOGGING_STEPS,
    }
    extra.update(dict(item.split("=", 1) for item in args.sets))
    # On a fresh GPU machine run the script twice: the first run pays CUDA's kernel JIT (cached in
    # ~/.nv/ComputeCache) inside our trainer's timed steps (13.5k vs 42k tok/s on an H200).
    model = build_preset(args.preset, args.workdir)
    if model is not None:
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

    def of_spec(gflops: float) -> float | None:
        return round(gflops / spec, 3) if spec else None

    print_result(
        {
            "peak_fp32_gflops": round(peak["fp32"], 1),
            "peak_bf16_gflops": round(peak["bf16"], 1),
            "spec_peak_bf16_gflops": spec,
            "ours_gflops": round(ours_gflops, 1),
            "bare_loop_gflops": round(bare_gflops, 1),
            "mfu_bf16": round(ours_gflops / peak["bf16"], 3),
            "mfu_bf16_spec": of_spec(ours_gflops),
            "bare_loop_mfu_bf16": round(bare_gflops / peak["bf16"], 3),
            "bare_loop_mfu_bf16_spec": of_spec(bare_gflops),
            "ours_tok_s": round(ours_rate, 1),
            "bare_loop_tok_s": round(bare_rate, 1),
            "ratio_vs_bare_loop": round(ours_rate / bare_rate, 3),
            "precision": precision,
            "preset": args.preset,
            "quantization": args.quantization,
            "batch": args.batch,
            "sets": args.sets,
            "timed_steps_per_method": args.rounds * (args.steps - 1),
        }
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
