"""Peak-memory estimate of a training run, before any weights are loaded.

The model is instantiated on PyTorch's ``meta`` device (shapes only, no memory, seconds even for 8B
models), so parameter counts and the layers LoRA wraps are exact. Memory is then the sum of:

- **runtime**: the framework itself (Python + torch + transformers resident on CPU; the CUDA context
  and kernels on a GPU), a measured constant;
- **weights**: as :func:`autotuning.modeling.load_model` loads them: fp32 on CPU, bf16/fp16 on GPU for
  LoRA, 4-bit nf4 (0.5 byte + ~0.016 byte of double-quantized block scales per weight) or 8-bit
  (1 byte + an fp32 scale per row); the parts bitsandbytes leaves alone keep the dtype they load in
  (``prepare_model_for_kbit_training`` makes them fp32, :func:`autotuning.modeling.apply_peft` casts them back);
- **LoRA adapters**, their **gradients** and **AdamW state** (two fp32 moments), all fp32; a full
  fine-tune pays gradients and optimizer state for every weight;
- **activations** kept for the backward pass, per token and layer (see :func:`_activation_bytes`),
  or only the layer inputs plus one layer's worth when gradient checkpointing recomputes the rest;
- **weight casts**: under autocast (fp32 weights, bf16/fp16 compute) each matmul keeps a
  compute-dtype copy of its weight for the backward pass;
- **logits**: the vocabulary-sized tensors of the loss (the logits, their fp32 copy, the
  log-softmax kept for backward, and the gradient), which dominate for small models with large
  vocabularies;
- **allocator slack**: on CPU glibc keeps the forward pass's freed temporaries (+50% of the step's
  tensors, measured); on GPU the caching allocator's fragmentation (+10%);
- **checkpoint pages** (CPU): when the weights are converted on load (quantized, or another dtype), the
  memory-mapped checkpoint file stays resident beside them.

Parts are summed although a full fine-tune's optimizer state and its activations peak at different
moments, so full fine-tunes come out on the high side.

Tokens per micro-batch are ``per_device_train_batch_size x max_seq_length``: the worst case, when rows
fill the sequence. Paired preference methods (dpo, orpo, simpo) put two sequences per row in a batch (prompt +
chosen, prompt + rejected), so twice that. DPO and KTO compare against a reference model: with LoRA the base
with the adapter disabled (no memory); with a full fine-tune a frozen copy of the weights (**reference model**),
whose forward pass keeps no activations. Figures against measured peaks are in docs/BENCHMARKS.md (``bench/memory.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import psutil
import torch
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.pytorch_utils import Conv1D

from .concurrency import MODEL_LOADING
from .config import Config, Distributed, PeftType, Quantization
from .distributed import resolve_num_processes
from .errors import ModelError
from .modeling import resolve_model_path, resolve_precision

__all__ = ["MemoryEstimate", "estimate_memory", "free_memory", "describe", "as_replace_kwargs", "RUNTIME_BYTES"]

GiB = 1024**3
MiB = 1024**2

# What the process holds before the model exists: measured on the pinned stack (bench/memory.py prints it).
# CPU: Python + torch + transformers + trl + peft + datasets + tokenizers resident. GPU: CUDA context + kernels.
RUNTIME_BYTES = {"cpu": 620 * MiB, "cuda": 600 * MiB}
# Below this share of the free memory the run fits; up to all of it is tight (fragmentation, eval batches).
FITS_SHARE = 0.85


@dataclass
class MemoryEstimate:
    device: str
    parts: dict[str, int]
    free_bytes: int
    facts: dict[str, Any] = field(default_factory=dict)
    suggestions: list[dict[str, Any]] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return int(sum(self.parts.values()))

    @property
    def verdict(self) -> str:
        if self.total_bytes <= FITS_SHARE * self.free_bytes:
            return "fits"
        if self.total_bytes <= self.free_bytes:
            return "tight"
        return "will not fit"

    def to_dict(self) -> dict[str, Any]:
        return {
            "device": self.device,
            "estimate_bytes": self.total_bytes,
            "free_bytes": self.free_bytes,
            "verdict": self.verdict,
            "parts": dict(self.parts),
            "facts": dict(self.facts),
            "suggestions": list(self.suggestions),
        }


def free_memory(device: str) -> int:
    """Bytes available now: free GPU memory, or the OS's available RAM on CPU."""
    if device.startswith("cuda"):
        free, _total = torch.cuda.mem_get_info()
        return int(free)

    return int(psutil.virtual_memory().available)


def _meta_model(config: Config):

    path = resolve_model_path(config.model.model_name)
    try:
        model_config = AutoConfig.from_pretrained(
            path, token=config.model.hf_token or None, trust_remote_code=config.model.trust_remote_code
        )
    except Exception as exc:
        raise ModelError(
            f"cannot read the model config of '{config.model.model_name}' ({type(exc).__name__})",
            "field 'model_name'",
            "check the id or path (the Hub must be reachable, or the model cached), or use builtin:tiny-llama",
        ) from None
    with torch.device("meta"):
        with MODEL_LOADING:  # transformers' load patches are process-wide (concurrency.py)
            model = AutoModelForCausalLM.from_config(model_config, trust_remote_code=config.model.trust_remote_code)
    return model, model_config


def _linear_layers(model) -> list[tuple[str, int, int, int]]:
    """(name, in, out, weight elements) of every projection: nn.Linear, and GPT-2's Conv1D (weight is in x out)."""

    out = []
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear):
            out.append((name, m.in_features, m.out_features, m.weight.numel()))
        elif isinstance(m, Conv1D):
            out.append((name, m.weight.shape[0], m.weight.shape[1], m.weight.numel()))
    return out


def _lora_targets(model, targets: list[str]) -> list[tuple[str, int, int]]:
    """(name, in, out) of every projection LoRA would wrap, matched the way peft matches target_modules."""
    linears = [(name, i, o) for name, i, o, _n in _linear_layers(model) if not name.endswith("lm_head")]
    if targets == ["all-linear"]:
        return linears
    return [(n, i, o) for n, i, o in linears if any(n == t or n.endswith("." + t) for t in targets)]


def _activation_bytes(h: int, kv: int, inter: int, compute: int, dropout_inputs: int) -> int:
    """Bytes kept for backward per token and decoder layer (no checkpointing).

    Counted with ``torch.autograd.graph.saved_tensors_hooks`` on a LoRA'd Llama block under CPU bf16
    autocast: two fp32 hidden-sized tensors (the norms' inputs), six hidden-sized tensors in the compute
    dtype (the projections' cast inputs and outputs), q/k/v/attention output (2h + 2kv), four
    intermediate-sized tensors (gate, up, activation, product). With LoRA dropout on, peft also keeps an
    fp32 copy of every adapter's input (``dropout_inputs`` = the summed input sizes of the wrapped layers
    of one decoder layer). Fused SDPA attention keeps no seq x seq matrix.
    """
    return 8 * h + compute * (8 * h + 2 * kv + 4 * inter) + 4 * dropout_inputs


def estimate_memory(
    config: Config,
    device: str | None = None,
    free_bytes: int | None = None,
    suggest: bool = True,
) -> MemoryEstimate:
    """Estimate the peak memory of training ``config`` on ``device`` (default: cuda if available, else cpu)."""

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    on_gpu = device.startswith("cuda")
    model, mc = _meta_model(config)
    t, quant, peft = config.training, config.quantization.quantization, config.peft.peft_type

    params = {id(p): p.numel() for p in model.parameters()}  # tied weights counted once
    total_params = int(sum(params.values()))
    projections = _linear_layers(model)
    quantizable = 0
    if quant is not Quantization.NONE:
        quantizable = sum(n for name, _i, _o, n in projections if not name.endswith("lm_head"))
    precision = resolve_precision(t.precision)
    compute = 2 if precision in ("bf16", "fp16") else 4
    # load_model: half-precision weights only on GPU for adapter training; fp32 otherwise.
    weight_bytes = 2 if (on_gpu and compute == 2 and peft is not PeftType.NONE) else 4
    # The parts bitsandbytes leaves alone (norms, embeddings, head) stay in the dtype they load in: apply_peft
    # recasts them after prepare_model_for_kbit_training made them fp32.
    if quant is Quantization.INT4:
        weights = quantizable * (0.5 + 1 / 64 + 4 / (64 * 256)) + (total_params - quantizable) * weight_bytes
    elif quant is Quantization.INT8:
        rows = sum(o for name, _i, o, _n in projections if not name.endswith("lm_head"))
        weights = quantizable * 1 + rows * 4 + (total_params - quantizable) * weight_bytes
    else:
        weights = total_params * weight_bytes

    targets = _lora_targets(model, list(config.peft.lora_target_modules)) if peft is not PeftType.NONE else []
    lora_params = sum(config.peft.lora_r * (i + o) for _n, i, o in targets)
    trainable = lora_params if peft is not PeftType.NONE else total_params
    # Gradients and AdamW's two moments in the trainable parameters' dtype (fp32 for adapters and full fine-tunes).
    grad_bytes = trainable * 4
    optimizer = trainable * 8

    h = mc.hidden_size
    layers = mc.num_hidden_layers
    heads = getattr(mc, "num_attention_heads", 1) or 1
    kv_heads = getattr(mc, "num_key_value_heads", None) or heads
    head_dim = getattr(mc, "head_dim", None) or h // heads
    kv = kv_heads * head_dim
    inter = getattr(mc, "intermediate_size", None) or getattr(mc, "n_inner", None) or 4 * h
    vocab = mc.vocab_size
    tokens = t.per_device_train_batch_size * config.data.max_seq_length
    method = config.preference.training_method
    if method.paired:
        tokens *= 2  # every row is two sequences in one batch: prompt + chosen, prompt + rejected
    dropout_inputs = sum(i for _n, i, _o in targets) // max(layers, 1) if config.peft.lora_dropout > 0 else 0
    per_token_layer = _activation_bytes(h, kv, inter, compute, dropout_inputs)
    if t.gradient_checkpointing:
        # Only each layer's input survives the forward pass; backward recomputes one layer at a time.
        activations = tokens * (layers * 4 * h + per_token_layer)
    else:
        activations = tokens * layers * per_token_layer
    activations += tokens * h * 4 * 2  # embedding output and final norm
    # Logits in the compute dtype, the loss's fp32 copy and saved log-softmax, and their gradient.
    logits = tokens * vocab * (compute + 4 + 4 + 4)
    # Autocast (CPU, or fp32 weights on a GPU) saves a compute-dtype copy of every weight a matmul used, for
    # the backward pass; bf16/fp16 weights are used as they are. 4-bit layers dequantize again in backward.
    casts = 0
    if weight_bytes > compute:
        casts = (sum(n for *_rest, n in projections) - quantizable) * compute

    parts = {
        "runtime": RUNTIME_BYTES["cuda" if on_gpu else "cpu"],
        "weights": int(weights),
        "lora_adapters": int(lora_params * 4),
        "gradients": int(grad_bytes),
        "optimizer_state": int(optimizer),
        "activations": int(activations),
        "weight_casts": int(casts),
        "logits": int(logits),
    }
    dynamic = activations + casts + logits
    if on_gpu:
        # The caching allocator's fragmentation around the step's temporaries.
        parts["allocator_slack"] = int(0.10 * dynamic)
    else:
        # glibc keeps the forward pass's freed temporaries (fp32 upcasts, cast inputs): measured peak RSS was
        # ~1.5x the tensors saved for backward on the 110M Llama (bench/memory.py).
        parts["allocator_slack"] = int(0.50 * dynamic)
        file_bytes = total_params * _checkpoint_dtype_bytes(mc)
        if quant is not Quantization.NONE or _checkpoint_dtype_bytes(mc) != weight_bytes:
            # safetensors maps the checkpoint; when the loaded weights are converted copies (quantized, or
            # another dtype) the pages read stay mapped, and resident, while the model lives.
            parts["checkpoint_pages"] = int(file_bytes)
    if method.uses_reference and peft is PeftType.NONE:
        # A full fine-tune's reference is a frozen copy of the starting weights (with LoRA it is the base with the
        # adapter disabled: nothing more). Its forward pass keeps no activations, and runs before the policy's.
        parts["reference_model"] = int(weights)
    if peft is PeftType.NONE:
        parts.pop("lora_adapters")
    parts, processes = _per_device(parts, config, on_gpu)
    free = free_bytes if free_bytes is not None else free_memory(device)
    estimate = MemoryEstimate(
        device=device,
        parts=parts,
        free_bytes=free,
        facts={
            "parameters": total_params,
            "trainable_parameters": int(trainable),
            "layers": layers,
            "hidden_size": h,
            "intermediate_size": inter,
            "vocab_size": vocab,
            "tokens_per_micro_batch": tokens,
            "compute_dtype": {2: "bf16/fp16", 4: "fp32"}[compute],
            "quantization": quant.value,
            "gradient_checkpointing": t.gradient_checkpointing,
            "processes": processes,
            "per": "GPU" if on_gpu else "machine",
            "training_method": method.value,
        },
    )
    if suggest and estimate.verdict != "fits":
        estimate.suggestions = _suggestions(config, device, free)
    return estimate


def _per_device(parts: dict[str, int], config: Config, on_gpu: bool) -> tuple[dict[str, int], int]:
    """The parts as one GPU (or, on CPU, the machine) holds them in a multi-process run, and the process count."""
    t = config.training
    if t.distributed is Distributed.NONE:
        return parts, 1
    processes = max(1, resolve_num_processes(config))
    if t.distributed is Distributed.FSDP:
        # Full shard: each GPU holds 1/n of the weights, gradients and optimizer state (plus one layer
        # gathered at a time); activations are per GPU as before.
        return {name: int(v / processes) if name in _SHARDED else v for name, v in parts.items()}, processes
    if not on_gpu:
        # CPU DDP: every process is a full replica in the same RAM.
        return {name: value * processes for name, value in parts.items()}, processes
    return parts, processes


_SHARDED = ("weights", "lora_adapters", "gradients", "optimizer_state")


def _checkpoint_dtype_bytes(model_config) -> int:
    dtype = getattr(model_config, "dtype", None) or getattr(model_config, "torch_dtype", None)
    return 2 if str(dtype).replace("torch.", "") in ("bfloat16", "float16") else 4


def _suggestions(config: Config, device: str, free: int) -> list[dict[str, Any]]:
    """Changes that lower the estimate, each applied on top of the previous, until the run fits."""
    steps: list[tuple[str, dict[str, Any]]] = []
    current = config
    t = config.training
    if config.quantization.quantization is Quantization.NONE and config.peft.peft_type is not PeftType.NONE:
        steps.append(("load the base in 4-bit (QLoRA)", {"quantization": "4bit", "peft_type": "qlora"}))
    batch, accumulation = t.per_device_train_batch_size, t.gradient_accumulation_steps
    while batch > 1:
        batch, accumulation = batch // 2, accumulation * 2
        steps.append(
            (
                f"per_device_train_batch_size {batch} with gradient_accumulation_steps {accumulation} (same effective batch)",
                {"per_device_train_batch_size": batch, "gradient_accumulation_steps": accumulation},
            )
        )
    if not t.gradient_checkpointing:
        steps.append(("gradient_checkpointing: true (~30% slower)", {"gradient_checkpointing": True}))
    seq = config.data.max_seq_length
    while seq > 256:
        seq //= 2
        steps.append((f"max_seq_length {seq} (longer rows are truncated)", {"max_seq_length": seq}))
    out = []
    best = estimate_memory(config, device, free, suggest=False).total_bytes
    for text, change in steps:
        candidate = current.replace(**change)
        after = estimate_memory(candidate, device, free, suggest=False)
        if after.total_bytes > 0.95 * best:
            continue  # does not help this model (e.g. 4-bit on a tiny model whose memory is activations)
        current, best = candidate, after.total_bytes
        out.append({"change": text, "set": change, "estimate_bytes": after.total_bytes, "verdict": after.verdict})
        if after.verdict == "fits":
            break
    return out


def _gib(n: float) -> str:
    if n >= 0.1 * GiB:
        return f"{n / GiB:.2f} GiB"
    return f"{n / MiB:.0f} MiB" if n >= MiB else "<1 MiB"


def describe(estimate: MemoryEstimate) -> list[str]:
    """Human lines: the breakdown, the device's free memory, the verdict and what would make it fit."""
    f = estimate.facts
    lines = [
        f"model: {f['parameters'] / 1e6:.1f}M parameters ({f['trainable_parameters'] / 1e6:.2f}M trainable), "
        f"{f['layers']} layers, hidden {f['hidden_size']}, vocab {f['vocab_size']}, quantization {f['quantization']}",
        f"micro-batch: {f['tokens_per_micro_batch']} tokens, compute {f['compute_dtype']}, "
        f"gradient checkpointing {'on' if f['gradient_checkpointing'] else 'off'}",
    ]
    for name, value in estimate.parts.items():
        lines.append(f"  {name.replace('_', ' '):<16} {_gib(value):>10}")
    lines.append(f"  {'total':<16} {_gib(estimate.total_bytes):>10}")
    lines.append(f"free on {estimate.device}: {_gib(estimate.free_bytes)} -> {estimate.verdict}")
    for s in estimate.suggestions:
        lines.append(f"suggestion: {s['change']} -> {_gib(s['estimate_bytes'])} ({s['verdict']})")
    return lines


def as_replace_kwargs(estimate: MemoryEstimate) -> dict[str, Any]:
    """The cumulative config changes of the suggestions (what 'apply the suggestion' would set)."""
    merged: dict[str, Any] = {}
    for s in estimate.suggestions:
        merged.update(s["set"])
    return merged
