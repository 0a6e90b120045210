"""GGUF and TensorFlow exports, each reloaded by an independent reader and checked against torch."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from autotuning.cli import main
from autotuning.config import load_config
from autotuning.errors import ExportError
from autotuning.export import gguf as gguf_export
from autotuning.export.gguf import SUPPORTED_GGUF_ARCHITECTURES, export_gguf
from autotuning.export.tensorflow import export_tensorflow
from autotuning.job import run_job
from autotuning.modeling import load_tokenizer
from autotuning.runs import RunDir, load_run_config

ARCHS = ["tiny-llama", "tiny-qwen2", "tiny-gpt2"]
HAS_LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One short LoRA run per builtin architecture (torch export only; the tests export the rest)."""
    runs = {}
    for name in ARCHS:
        out = tmp_path_factory.mktemp("export") / name
        config = load_config(
            None,
            [
                f"model_name=builtin:{name}",
                "dataset_path=sample",
                f"output_dir={out}",
                "max_steps=4",
                "max_seq_length=128",
                "eval_split=0",
                "learning_rate=5e-3",
            ],
        )
        assert run_job(config, show_progress=False).status == "finished"
        runs[name] = RunDir(out)
    return runs


def _tokenizer(run):
    return load_tokenizer(load_run_config(run.path))


@pytest.mark.parametrize("name", ARCHS)
def test_gguf_f32_parity_and_metadata(trained, name):
    run = trained[name]
    figures = export_gguf(run, _tokenizer(run), "f32")
    assert figures["max_abs_logit_diff"] <= 1e-4
    assert figures["tokenizer_ids_match"] and figures["chat_template_present"] and figures["eos_matches"]
    assert figures["greedy_agreement_tokens"] == figures["greedy_tokens"] == 32
    modelfile = (run.path / "gguf" / "Modelfile").read_text()
    assert "FROM ./model-f32.gguf" in modelfile and 'PARAMETER stop "<|im_end|>"' in modelfile
    print(f"\n{name} gguf f32: max |logit diff| {figures['max_abs_logit_diff']:.2e}")


@pytest.mark.parametrize("name", ARCHS)
def test_gguf_q8_0_reports_agreement(trained, name):
    run = trained[name]
    figures = export_gguf(run, _tokenizer(run), "q8_0")
    f32_size = (
        (run.path / "gguf" / "model-f32.gguf").stat().st_size
        if (run.path / "gguf" / "model-f32.gguf").exists()
        else None
    )
    assert 0 <= figures["greedy_agreement_tokens"] <= figures["greedy_tokens"] == 32
    assert 0 < figures["max_abs_logit_diff"] < 0.5  # quantization error, reported
    assert figures["tokenizer_ids_match"] and figures["eos_matches"]
    if f32_size:
        assert figures["bytes"] < f32_size / 2
    print(
        f"\n{name} gguf q8_0: max |logit diff| {figures['max_abs_logit_diff']:.3f}, "
        f"greedy agreement {figures['greedy_agreement_tokens']}/32"
    )


@pytest.mark.parametrize("name", ARCHS)
def test_tensorflow_savedmodel_parity(trained, name):
    pytest.importorskip("keras_hub", reason="keras-hub is not installed (pip install -r requirements.txt)")
    figures = export_tensorflow(trained[name])
    assert figures["max_abs_logit_diff"] <= 1e-4
    tf_dir = trained[name].path / "tensorflow"
    assert (tf_dir / "saved_model" / "saved_model.pb").is_file() and (tf_dir / "model.keras").is_file()
    print(f"\n{name} tensorflow: max |logit diff| {figures['max_abs_logit_diff']:.2e} ({figures['keras_class']})")


def test_failed_verification_keeps_the_earlier_export(trained, monkeypatch):
    run = trained["tiny-llama"]
    good = export_gguf(run, _tokenizer(run), "f32")
    before = (run.path / "gguf" / "model-f32.gguf").read_bytes()

    def broken(*args, **kwargs):
        raise ExportError("simulated verification failure", "test", "none")

    monkeypatch.setattr(gguf_export, "verify_gguf", broken)
    with pytest.raises(ExportError):
        export_gguf(run, _tokenizer(run), "f32")
    assert (run.path / "gguf" / "model-f32.gguf").read_bytes() == before
    assert not (run.path / ".gguf.tmp").exists()
    assert good["max_abs_logit_diff"] <= 1e-4


def test_export_command_records_figures(trained, capsys):
    run = trained["tiny-qwen2"]
    assert main(["export", "--run", str(run.path), "--format", "gguf", "--gguf-type", "f16"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["gguf"]["type"] == "f16" and summary["gguf"]["tokenizer_ids_match"]
    assert json.loads(run.run_json.read_text())["exports"]["gguf"]["type"] == "f16"


def test_pipeline_runs_the_requested_formats(tmp_path):
    pytest.importorskip("keras_hub", reason="keras-hub is not installed")
    config = load_config(
        None,
        [
            "dataset_path=sample",
            f"output_dir={tmp_path / 'all'}",
            "max_steps=2",
            "max_seq_length=128",
            "eval_split=0",
            "save_format=torch,gguf,tensorflow",
            "gguf_type=f32",
        ],
    )
    result = run_job(config, show_progress=False)
    assert set(result.exports) == {"torch", "gguf", "tensorflow"}
    assert all(e["max_abs_logit_diff"] <= 1e-4 for e in result.exports.values())


def _tiny_unsupported_model(path, tokenizer):
    from transformers import AutoModelForCausalLM, OPTConfig

    cfg = OPTConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        ffn_dim=128,
        num_hidden_layers=1,
        num_attention_heads=2,
        word_embed_proj_dim=64,
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
    )
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    tokenizer.save_pretrained(path)


@pytest.mark.parametrize("fmt", ["gguf", "tensorflow"])
def test_unsupported_architecture_fails_before_training(tmp_path, capsys, fmt):
    tokenizer = load_tokenizer(load_config(None, []))
    model_dir = tmp_path / "tiny-opt"
    _tiny_unsupported_model(model_dir, tokenizer)
    out = tmp_path / "run"
    code = main(
        ["train", "--set", f"model_name={model_dir}", "--set", f"save_format=torch,{fmt}", "--set", f"output_dir={out}"]
    )
    line = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error: ")][-1]
    assert code == 2
    assert "'opt'" in line and "supported:" in line
    if fmt == "gguf":
        assert all(arch in line for arch in SUPPORTED_GGUF_ARCHITECTURES)
    assert not out.exists()  # refused before training: nothing written


@pytest.mark.skipif(HAS_LLAMA_CPP, reason="llama-cpp-python is installed: the real check runs instead")
def test_llama_cpp_check_is_skipped_visibly_without_the_extra(trained):
    run = trained["tiny-llama"]
    figures = export_gguf(run, _tokenizer(run), "f32")
    assert figures["llama_cpp"].startswith("skipped: llama-cpp-python is not installed")


@pytest.mark.skipif(HAS_LLAMA_CPP, reason="llama-cpp-python is installed")
def test_k_quant_without_the_extra_is_refused_before_training(tmp_path, capsys):
    out = tmp_path / "kq"
    code = main(["train", "--set", "save_format=torch,gguf", "--set", "gguf_type=q4_k_m", "--set", f"output_dir={out}"])
    assert code == 2 and "llama-cpp-python" in capsys.readouterr().err and not out.exists()


def test_llama_cpp_runs_the_gguf_when_installed(trained):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (optional extra, see README)")
    run = trained["tiny-llama"]
    figures = export_gguf(run, _tokenizer(run), "f32")
    assert figures["llama_cpp"] == "ran"
    assert figures["llama_cpp_tokenizer_ids_match"] is True  # llama.cpp splits text like the HF tokenizer
    assert figures["llama_cpp_greedy_agreement_tokens"] >= 1


def test_gguf_tensor_names_and_types_read_back(trained):
    import gguf

    run = trained["tiny-llama"]
    export_gguf(run, _tokenizer(run), "q8_0")
    reader = gguf.GGUFReader(str(run.path / "gguf" / "model-q8_0.gguf"))
    names = {t.name: t.tensor_type.name for t in reader.tensors}
    assert names["token_embd.weight"] == "Q8_0" and names["blk.0.attn_q.weight"] == "Q8_0"
    assert names["output_norm.weight"] == "F32"  # norms stay f32
    assert reader.get_field("general.architecture").contents() == "llama"
    assert reader.get_field("tokenizer.ggml.pre").contents() == "gpt-2"
    assert torch.tensor(1)  # torch import kept for the fixture's model loading


def _tiny(model_type: str, tokenizer):
    from transformers import MistralConfig, Qwen3Config

    ids = dict(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        max_position_embeddings=512,
    )
    if model_type == "mistral":
        return MistralConfig(num_attention_heads=4, num_key_value_heads=2, **common, **ids)
    # transformers' GGUF reader does not read Qwen3's head_dim and assumes 128, as every released Qwen3 has.
    return Qwen3Config(num_attention_heads=4, num_key_value_heads=2, head_dim=128, **common, **ids)


@pytest.mark.parametrize("model_type", ["mistral", "qwen3"])
def test_gguf_other_architectures_f32_parity(tmp_path, model_type):
    """Architectures without a builtin model: a tiny random one, written and read back."""
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(load_config(None, []))
    torch.manual_seed(0)
    model_dir = tmp_path / model_type
    AutoModelForCausalLM.from_config(_tiny(model_type, tokenizer)).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    gguf_export.write_gguf(model_dir, model_dir / "m.gguf", "f32")
    figures = gguf_export.verify_gguf(model_dir / "m.gguf", model_dir, "f32", tokenizer)
    assert figures["max_abs_logit_diff"] <= 1e-4 and figures["tokenizer_ids_match"]
