"""The training speed-ups (fused_lora, liger_kernels, fused_cross_entropy, compile_layers) give the plain path's
results, and refuse to run where they cannot."""

from __future__ import annotations

import copy
import json
import logging
import re
from collections import OrderedDict

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from torch import nn

from autotuning.config import ConfigError, load_config
from autotuning.data import prepare_data
from autotuning.modeling import load_tokenizer
from autotuning.recipe import preflight, run_job
from autotuning.runs import read_metrics
from autotuning.training.speedups import use_fused_lora


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest difference relative to the scale of what is compared."""
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


def _lora_pair(dtype=torch.float32):
    torch.manual_seed(0)
    base = nn.Sequential(OrderedDict(proj=nn.Linear(96, 80), act=nn.GELU(), out=nn.Linear(80, 64)))
    # init_lora_weights=False: B random, not zero, so the update is not trivially nothing.
    lora = LoraConfig(r=8, lora_alpha=12, target_modules=["proj", "out"], init_lora_weights=False)
    plain = get_peft_model(base.to(dtype), lora)
    fused = copy.deepcopy(plain)
    assert use_fused_lora(fused) == 2
    return plain, fused


def _forward_backward(model, x, autocast_dtype=None):
    x = x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
        out = model(x)
    (out.float() ** 2).mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.detach(), x.grad, grads


@pytest.mark.parametrize("autocast_dtype", [None, torch.bfloat16], ids=["fp32", "bf16-autocast"])
def test_fused_lora_add_gives_peft_outputs_and_gradients(autocast_dtype):
    plain, fused = _lora_pair()
    x = torch.randn(3, 7, 96)
    out_p, gx_p, grads_p = _forward_backward(plain, x, autocast_dtype)
    out_f, gx_f, grads_f = _forward_backward(fused, x, autocast_dtype)
    # fp32: the same sums in another order; bf16: PEFT rounds the update to bf16 before adding it, addmm does not.
    bound = 1e-5 if autocast_dtype is None else 2e-2
    assert out_f.dtype == out_p.dtype
    assert _relative(out_f, out_p) < bound
    assert _relative(gx_f, gx_p) < bound
    assert grads_f.keys() == grads_p.keys() and len(grads_p) == 4  # A and B of both layers
    for name in grads_p:
        assert grads_f[name].dtype == grads_p[name].dtype == torch.float32  # adapter gradients stay fp32
        assert _relative(grads_f[name], grads_p[name]) < bound, name


def test_fused_lora_merges_like_vanilla_lora():
    plain, fused = _lora_pair()
    x = torch.randn(4, 96)
    merged_plain = plain.merge_and_unload()
    merged_fused = fused.merge_and_unload()
    for (name, a), (_, b) in zip(merged_plain.state_dict().items(), merged_fused.state_dict().items()):
        assert torch.equal(a, b), name
    assert torch.equal(merged_plain(x), merged_fused(x))


def test_fused_lora_leaves_dropout_layers_vanilla():
    torch.manual_seed(0)
    base = nn.Sequential(OrderedDict(proj=nn.Linear(16, 16)))
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["proj"], lora_dropout=0.1))
    assert use_fused_lora(model) == 0


def _run_config(tmp_path, name, **extra):
    sets = {
        "dataset_path": "sample",
        "output_dir": str(tmp_path / name),
        "max_seq_length": 256,
        "num_train_epochs": 1,
        "per_device_train_batch_size": 8,
        "learning_rate": 5e-3,
        "logging_steps": 1,
        "save_steps": 1000,
        "eval_split": 0,
        "save_format": "torch",
        "gguf_type": "q8_0",
        "eval_generations": 0,
    }
    sets.update(extra)
    return load_config(None, [f"{k}={v}" for k, v in sets.items()])


def test_fused_lora_trains_the_plain_curve_and_exports_the_same_model(tmp_path, caplog):
    """One epoch each way, in fp32: the same losses, every non-padding token counted (summed on the device, read at
    each log) and the same merged weights. (In bf16 the two paths round differently and Adam amplifies that on
    near-zero gradients: the curves still agree to ~1e-4, single weights of the tiny model to a few %.)"""
    runs = {}
    for fused in (False, True):
        config = _run_config(tmp_path, f"fused-{fused}", fused_lora=fused, precision="fp32")
        with caplog.at_level(logging.INFO, logger="autotuning"):
            result = run_job(config, show_progress=False)
        assert result.status == "finished"
        switched = re.findall(r"fused_lora: (\d+) LoRA layers", caplog.text)
        assert switched == ([] if not fused else ["14"])  # 2 layers x 7 linear layers of the tiny Llama
        caplog.clear()
        train = [e for e in read_metrics(result.run_dir / "metrics.jsonl") if e["type"] == "train"]
        runs[fused] = (config, result, train)
    config, plain, plain_train = runs[False]
    _, fused, fused_train = runs[True]
    assert [e["step"] for e in fused_train] == [e["step"] for e in plain_train]
    losses_p = torch.tensor([e["loss"] for e in plain_train])
    losses_f = torch.tensor([e["loss"] for e in fused_train])
    assert _relative(losses_f, losses_p) < 1e-5, (losses_p.tolist(), losses_f.tolist())
    assert losses_f[-1] < losses_f[0]  # it trained

    tokenizer = load_tokenizer(config)
    rows = prepare_data(config, tokenizer).train
    expected = sum(len(ids) for ids in rows["input_ids"])
    assert plain_train[-1]["tokens_seen"] == fused_train[-1]["tokens_seen"] == expected
    assert all(a["tokens_seen"] < b["tokens_seen"] for a, b in zip(fused_train, fused_train[1:]))

    weights_p = load_file(str(plain.run_dir / "merged" / "model.safetensors"))
    weights_f = load_file(str(fused.run_dir / "merged" / "model.safetensors"))
    assert weights_p.keys() == weights_f.keys()
    for name in weights_p:
        assert _relative(weights_f[name], weights_p[name]) < 1e-4, name
    run = json.loads((fused.run_dir / "run.json").read_text())
    assert run["exports"]["torch"]["verified"] is True


@pytest.mark.parametrize(
    "sets, fields",
    [
        ({"fused_lora": True, "lora_dropout": 0.1}, "'fused_lora'/'lora_dropout'"),
        ({"fused_lora": True, "peft_type": "none"}, "'fused_lora'/'peft_type'"),
        ({"liger_kernels": True, "training_method": "dpo"}, "'liger_kernels'/'training_method'"),
    ],
)
def test_speedups_that_cannot_apply_are_refused_with_the_fields(sets, fields):
    with pytest.raises(ConfigError, match=fields):
        load_config(None, [f"{k}={v}" for k, v in {"dataset_path": "sample", **sets}.items()])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
@pytest.mark.parametrize("name", ["liger_kernels", "fused_cross_entropy", "varlen_attention"])
def test_cuda_speedups_on_a_machine_without_cuda_are_refused_before_any_work(name):
    config = load_config(None, ["dataset_path=sample", f"{name}=true", "packing=true"])
    with pytest.raises(ConfigError, match=f"field '{name}'.*false here"):
        preflight(config)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize(
    "speedup",
    [
        {"fused_lora": True},
        {"liger_kernels": True},
        {"fused_cross_entropy": True},
        {"compile_layers": True},
        {"packing": True, "varlen_attention": True},
    ],
    ids=lambda s: list(s)[-1],
)
def test_each_gpu_speedup_trains_the_plain_curve(tmp_path, speedup):
    """On a GPU (bf16): the speed-up's loss curve follows the plain path's within bf16 noise."""
    if "liger" in next(iter(speedup)) or "cross_entropy" in next(iter(speedup)):
        pytest.importorskip("liger_kernel")
    curves = []
    plain = {k: v for k, v in speedup.items() if k == "packing"}  # varlen's plain path: packing with sdpa
    for name, extra in (("plain", plain), ("fast", speedup)):
        config = _run_config(tmp_path, name, max_steps=12, num_train_epochs=3, save_format="torch", **extra)
        result = run_job(config, show_progress=False)
        assert result.status == "finished"
        curves.append(
            torch.tensor([e["loss"] for e in read_metrics(result.run_dir / "metrics.jsonl") if e["type"] == "train"])
        )
    assert len(curves[0]) == len(curves[1])
    assert _relative(curves[1], curves[0]) < 3e-2, (curves[0].tolist(), curves[1].tolist())


def _reference_varlen(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1), enable_gqa=False):
    """What torch.nn.attention.varlen.varlen_attn computes (its kernel is CUDA only): causal sdpa per document."""
    assert window_size == (-1, 0) and torch.equal(cu_q, cu_k)
    assert max_q == int(cu_q.diff().max())
    outs = []
    for start, end in zip(cu_q[:-1].tolist(), cu_q[1:].tolist()):
        qi, ki, vi = (t[start:end].transpose(0, 1) for t in (q, k, v))  # (heads, tokens, dim)
        out = torch.nn.functional.scaled_dot_product_attention(
            qi, ki, vi, is_causal=True, scale=scale, enable_gqa=enable_gqa
        )
        outs.append(out.transpose(0, 1))
    return torch.cat(outs)


def _packed_vs_separate(model, documents, collator):
    """Logits of the documents packed into one padding-free row, and of each document alone."""
    batch = collator([{"input_ids": ids} for ids in documents])
    assert batch["input_ids"].shape[0] == 1 and "cu_seq_lens_q" in batch and "attention_mask" not in batch
    inputs = {k: v for k, v in batch.items() if k != "labels" and k != "seq_idx"}
    with torch.no_grad():
        packed = model(**inputs).logits[0]
    return packed, batch["cu_seq_lens_q"].tolist()


def test_varlen_attention_attends_within_each_packed_document(monkeypatch):
    """The glue around torch's varlen kernel (layout, document boundaries through transformers' kwargs, GQA, the
    causal window), with the kernel replaced by its reference on this CPU; the kernel itself runs in the GPU test."""
    from torch.nn.attention import varlen
    from transformers import AutoModelForCausalLM
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from autotuning.modeling import resolve_model_path
    from autotuning.training.speedups import use_varlen_attention

    monkeypatch.setattr(varlen, "varlen_attn", _reference_varlen)
    path = resolve_model_path("builtin:tiny-llama")
    plain = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa", dtype=torch.float32).eval()
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa", dtype=torch.float32).eval()
    restore = use_varlen_attention(model)
    torch.manual_seed(0)
    documents = [torch.randint(5, 200, (n,)).tolist() for n in (7, 12, 4)]
    collator = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)
    packed, bounds = _packed_vs_separate(model, documents, collator)
    assert bounds == [0, 7, 19, 23]
    with torch.no_grad():
        for ids, start in zip(documents, bounds):
            alone = plain(input_ids=torch.tensor([ids])).logits[0]
            assert _relative(packed[start : start + len(ids)], alone) < 1e-5
    # sdpa without a mask over the same packed row attends across documents: the check above can fail.
    with torch.no_grad():
        mixed = plain(input_ids=torch.tensor([sum(documents, [])])).logits[0]
    assert _relative(mixed[7:19], packed[7:19]) > 1e-3
    restore.on_train_end(None, None, None)
    assert model.config._attn_implementation == "sdpa"


def test_varlen_attention_refuses_what_it_does_not_compute():
    from transformers import Gemma3TextConfig, LlamaConfig

    from autotuning.training.speedups import check_varlen_model

    check_varlen_model(LlamaConfig())
    with pytest.raises(ConfigError, match="sliding attention window.*soft-capped|sliding attention window"):
        check_varlen_model(Gemma3TextConfig())
    with pytest.raises(ConfigError, match="varlen_attention.*packing"):
        load_config(None, ["dataset_path=sample", "varlen_attention=true"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_torchs_varlen_kernel_matches_causal_attention_per_document():
    from torch.nn.attention import varlen

    torch.manual_seed(0)
    cu = torch.tensor([0, 37, 100, 129], dtype=torch.int32, device="cuda")
    q = torch.randn(129, 8, 64, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(129, 2, 64, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    got = varlen.varlen_attn(q, k, v, cu, cu, 63, 63, window_size=(-1, 0), enable_gqa=True)
    want = _reference_varlen(q, k, v, cu, cu, 63, 63, window_size=(-1, 0), enable_gqa=True)
    assert _relative(got, want) < 2e-2
