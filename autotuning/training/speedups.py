"""Optional speed-ups of the training step, each switchable in the config (training group) and each from PyTorch, PEFT
or a well-kept kernel library rather than hand-written kernels:

- ``fused_lora``: each LoRA update is added into the base layer's output by one ``addmm_`` (PEFT's vanilla path
  writes the update and the scaled update as two more output-sized tensors, then adds them). Hooked in through
  PEFT's own extension point, a LoRA *variant* per layer, so merging, saving and reloading stay PEFT's.
- ``liger_kernels`` / ``fused_cross_entropy``: Liger's Triton kernels (RMSNorm, RoPE, SwiGLU/GeGLU; the LM head and
  loss fused in chunks) through transformers' ``use_liger_kernel``. CUDA only.
- ``compile_layers``: ``torch.compile`` of each decoder layer (regional compilation: the layers share one code
  object, so one compiled graph serves them all; compiling the whole model would recompile per shape change of
  everything around the layers).

Each must give the same results as the plain path (tests/test_speedups.py); docs/BENCHMARKS.md records where each
was measured to help.
"""

from __future__ import annotations

import importlib.util

import torch
from peft.tuners.lora.layer import Linear as LoraLinear
from peft.tuners.lora.layer import LoraVariant
from torch import nn
from transformers import TrainerCallback

from ..config import Config
from ..errors import ConfigError

__all__ = [
    "check_speedups",
    "liger_arguments",
    "use_fused_lora",
    "compile_decoder_layers",
    "fused_lora_add",
    "use_varlen_attention",
    "varlen_attention_forward",
    "VARLEN_ATTENTION",
]


def check_speedups(config: Config) -> None:
    """Refuse a speed-up that cannot run on this machine, before any work starts."""
    t = config.training
    if t.varlen_attention and not torch.cuda.is_available():
        raise ConfigError(
            "varlen_attention runs PyTorch's variable-length flash attention, which needs a CUDA GPU, and this "
            "machine has none",
            "field 'varlen_attention'",
            "set varlen_attention: false here (packing then uses sdpa's block mask)",
        )
    liger = [name for name in ("liger_kernels", "fused_cross_entropy") if getattr(t, name)]
    if not liger:
        return
    if not torch.cuda.is_available():
        raise ConfigError(
            f"{' and '.join(liger)} run Liger's Triton kernels, which need a CUDA GPU, and this machine has none",
            f"field '{liger[0]}'",
            f"set {': false, '.join(liger)}: false here (keep them for the GPU machine)",
        )
    if importlib.util.find_spec("liger_kernel") is None:
        raise ConfigError(
            f"{' and '.join(liger)} need the liger-kernel package, which is not installed",
            f"field '{liger[0]}'",
            "pip install 'autotuning[liger]'",
        )


def liger_arguments(config: Config) -> dict:
    """The TrainingArguments that apply Liger's kernels (transformers' own integration), or none."""
    t = config.training
    if not (t.liger_kernels or t.fused_cross_entropy):
        return {}
    kernels = t.liger_kernels
    # Liger's apply functions take the keywords their architecture has (swiglu for Llama/Qwen, geglu for Gemma)
    # and ignore the rest.
    return dict(
        use_liger_kernel=True,
        liger_kernel_config=dict(
            rope=kernels,
            rms_norm=kernels,
            swiglu=kernels,
            geglu=kernels,
            cross_entropy=False,
            fused_linear_cross_entropy=t.fused_cross_entropy,
        ),
    )


class _LoraAdd(torch.autograd.Function):
    """``result += scaling * (x @ A.T) @ B.T`` in place, by one addmm; gradients for x, A and B by hand.

    Matmuls run in ``result``'s dtype (the compute dtype: bf16 under autocast), as PEFT's path does under autocast;
    the adapter's gradients come back in the adapter's own dtype (fp32), like autocast's cast back.
    """

    @staticmethod
    def forward(ctx, result, x, weight_a, weight_b, scaling):
        dtype = result.dtype
        with torch.autocast(result.device.type, enabled=False):
            x2 = x.reshape(-1, x.shape[-1]).to(dtype)
            a, b = weight_a.to(dtype), weight_b.to(dtype)
            xa = x2 @ a.t()
            # A view of result: the in-place add lands in result. The base layer's backward does not need its output.
            result.view(-1, result.shape[-1]).addmm_(xa, b.t(), alpha=scaling)
        ctx.mark_dirty(result)
        ctx.save_for_backward(x2, xa, a, b)
        ctx.scaling = scaling
        ctx.x_meta = (x.shape, x.dtype)
        ctx.param_dtypes = (weight_a.dtype, weight_b.dtype)
        return result

    @staticmethod
    def backward(ctx, grad):
        x2, xa, a, b = ctx.saved_tensors
        s = ctx.scaling
        grad_x = grad_a = grad_b = None
        with torch.autocast(grad.device.type, enabled=False):
            g = grad.reshape(-1, grad.shape[-1]).to(xa.dtype)
            if ctx.needs_input_grad[3]:
                grad_b = (g.t() @ xa).mul_(s).to(ctx.param_dtypes[1])
            if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
                g_xa = (g @ b).mul_(s)  # (tokens, r): the gradient reaching x @ A.T
                if ctx.needs_input_grad[2]:
                    grad_a = (g_xa.t() @ x2).to(ctx.param_dtypes[0])
                if ctx.needs_input_grad[1]:
                    shape, dtype = ctx.x_meta
                    grad_x = (g_xa @ a).reshape(shape).to(dtype)
        return grad, grad_x, grad_a, grad_b, None


def fused_lora_add(result: torch.Tensor, x: torch.Tensor, weight_a, weight_b, scaling: float) -> torch.Tensor:
    """``result + scaling * B(A(x))``, written into ``result``."""
    return _LoraAdd.apply(result, x, weight_a, weight_b, float(scaling))


class FusedLoraAdd(LoraVariant):
    """Vanilla LoRA whose forward adds the update with :func:`fused_lora_add`. Merging is vanilla LoRA's."""

    @staticmethod
    def init(module, adapter_name, **kwargs) -> None:
        pass

    @staticmethod
    def merge_safe(module, active_adapter, orig_weight):
        return orig_weight + module.get_delta_weight(active_adapter).to(orig_weight.dtype)

    @staticmethod
    def merge_unsafe(module, active_adapter, orig_weight) -> None:
        orig_weight.data += module.get_delta_weight(active_adapter).to(orig_weight.dtype)

    @staticmethod
    def unmerge(module, active_adapter, orig_weight):
        return orig_weight - module.get_delta_weight(active_adapter).to(orig_weight.dtype)

    @staticmethod
    def forward(module, active_adapter, x, result, **kwargs):
        lora_a, lora_b, scaling = (
            module.lora_A[active_adapter],
            module.lora_B[active_adapter],
            module.scaling[active_adapter],
        )
        if not result.is_contiguous():  # the in-place add writes through a flat view; vanilla LoRA otherwise
            return result + lora_b(lora_a(x)) * scaling
        return fused_lora_add(result, x, lora_a.weight, lora_b.weight, scaling)


def _fusable(module, adapter: str) -> bool:
    """Vanilla LoRA on a linear layer: no dropout, no LoRA bias, no DoRA or other variant, weights not transposed."""
    return (
        adapter in module.lora_A
        and adapter not in module.lora_variant
        and isinstance(module.lora_A[adapter], nn.Linear)
        and isinstance(module.lora_dropout[adapter], nn.Identity)
        and not module.lora_bias.get(adapter, False)
        and not module.use_dora.get(adapter, False)
        and not getattr(module, "fan_in_fan_out", False)
    )


def use_fused_lora(model: nn.Module) -> int:
    """Switch every fusable LoRA linear layer (bitsandbytes' 4/8-bit ones included) to :class:`FusedLoraAdd`.

    Returns how many layers were switched. The variant is not saved: an adapter reloaded from disk is vanilla LoRA.
    """
    switched = 0
    for module in model.modules():
        if not isinstance(module, LoraLinear) and not _is_bnb_lora(module):
            continue
        for adapter in list(module.lora_A):
            if _fusable(module, adapter):
                module.lora_variant[adapter] = FusedLoraAdd()
                switched += 1
    return switched


def _is_bnb_lora(module: nn.Module) -> bool:
    if importlib.util.find_spec("bitsandbytes") is None:
        return False
    from peft.tuners.lora import bnb

    classes = tuple(getattr(bnb, name) for name in ("Linear4bit", "Linear8bitLt") if hasattr(bnb, name))
    return bool(classes) and isinstance(module, classes)


def compile_decoder_layers(model: nn.Module) -> int:
    """``torch.compile`` each decoder layer in place (``nn.Module.compile``); returns how many were compiled.

    The decoder layers are the modules of the classes a transformers model names in ``_no_split_modules`` (the
    blocks it never splits across devices: LlamaDecoderLayer, GPT2Block, ...).
    """
    core = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(core, "_no_split_modules", None) or ())
    layers = [m for m in core.modules() if type(m).__name__ in names]
    for layer in layers:
        layer.compile()
    return len(layers)


# The name our variable-length attention is registered under in transformers' attention and mask interfaces.
VARLEN_ATTENTION = "autotuning_varlen"


def varlen_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention of packed rows, document by document, with PyTorch's variable-length flash attention.

    TRL's padding-free collator flattens a batch into one row and hands the document boundaries along
    (``cu_seq_lens_q``/``_k``, ``max_length_q``/``_k``, computed on the CPU: no device sync). With sdpa the same
    batch needs a dense tokens x tokens block mask. Registered without a mask function, so transformers builds
    no mask at all; :func:`use_varlen_attention` refuses models whose attention this does not cover.
    """
    from torch.nn.attention import varlen

    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_q is None or cu_k is None or query.shape[0] != 1:
        raise RuntimeError(
            "varlen attention got a batch without packed-document boundaries (cu_seq_lens_q); it runs only on "
            "TRL's padding-free batches (packing: true)"
        )
    # (1, heads, tokens, dim) -> (tokens, heads, dim), the layout varlen_attn takes.
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))
    out = varlen.varlen_attn(
        q,
        k,
        v,
        cu_q.to(torch.int32),
        cu_k.to(torch.int32),
        int(kwargs["max_length_q"]),
        int(kwargs["max_length_k"]),
        scale=scaling,
        window_size=(-1, 0),  # causal
        enable_gqa=q.shape[1] != k.shape[1],
    )
    return out.unsqueeze(0), None  # (1, tokens, heads, dim), as transformers' attention functions return


def check_varlen_model(hf_config) -> None:
    """Refuse what varlen attention does not compute: sliding windows, soft-capped logits, attention dropout."""
    sliding = getattr(hf_config, "sliding_window", None) and getattr(hf_config, "use_sliding_window", True)
    reasons = [
        name
        for name, present in (
            ("a sliding attention window", bool(sliding)),
            ("soft-capped attention logits", bool(getattr(hf_config, "attn_logit_softcapping", None))),
            ("attention dropout", bool(getattr(hf_config, "attention_dropout", 0.0))),
        )
        if present
    ]
    if reasons:
        raise ConfigError(
            f"varlen_attention computes plain causal attention, and this model ({hf_config.model_type}) uses "
            + " and ".join(reasons),
            "field 'varlen_attention'",
            "set varlen_attention: false (packing then uses sdpa's block mask)",
        )


class _RestoreAttention(TrainerCallback):
    """After training, the model goes back to its own attention: evaluation and export checks feed it padded
    batches, which have no document boundaries."""

    def __init__(self, model: nn.Module, implementation: str):
        self.model, self.implementation = model, implementation

    def on_train_end(self, args, state, control, **kwargs):
        self.model.set_attn_implementation(self.implementation)


def use_varlen_attention(model: nn.Module) -> TrainerCallback:
    """Switch the model to :func:`varlen_attention_forward`; returns the callback that switches it back."""
    from transformers import AttentionInterface

    core = model.get_base_model() if hasattr(model, "get_base_model") else model
    check_varlen_model(core.config)
    AttentionInterface.register(VARLEN_ATTENTION, varlen_attention_forward)
    previous = core.config._attn_implementation
    core.set_attn_implementation(VARLEN_ATTENTION)
    return _RestoreAttention(core, previous)
