from __future__ import annotations

import dataclasses

import pytest
import yaml

from autotuning.config import (
    SEED_ALIASES,
    Config,
    ConfigError,
    FineTuningType,
    PeftType,
    Quantization,
    SaveFormat,
    config_from_dict,
    iter_fields,
    load_config,
)


def test_defaults_are_valid_and_offline_model():
    cfg = Config()
    assert cfg.model.model_name == "builtin:tiny-llama"
    assert cfg.data.fine_tuning_type is FineTuningType.INSTRUCTION
    assert cfg.export.save_format == [SaveFormat.TORCH]


def test_every_field_has_help():
    for group, f in iter_fields():
        assert f.metadata.get("help"), f"{group}.{f.name} has no help"


def test_seed_aliases_load_the_same_config_as_snake_case(tmp_path):
    seed = {
        "ModelName": "builtin:tiny-gpt2",
        "FineTuningType": "question_answering",
        "DatasetPath": "data/qa.jsonl",
        "ModelSeqMaxLength": 384,
        "QuantizationType4Bit8Bit": "4bit",
        "PeftType": "QLORA",
        "SaveFormat": ["torch"],
        "ModelDir": "out/qa",
        "EvalSaveFormat": "csv",
        "FSDP": False,
        "HfToken": "hf_secret",
    }
    snake = {SEED_ALIASES[k]: v for k, v in seed.items()}
    snake["peft_type"] = "qlora"
    (tmp_path / "seed.yaml").write_text(yaml.safe_dump(seed))
    (tmp_path / "snake.yaml").write_text(yaml.safe_dump(snake))
    a, b = load_config(tmp_path / "seed.yaml"), load_config(tmp_path / "snake.yaml")
    assert a == b
    assert a.peft.peft_type is PeftType.QLORA and a.quantization.quantization is Quantization.INT4
    assert a.data.max_seq_length == 384 and a.run.output_dir == "out/qa"
    assert set(SEED_ALIASES) == set(seed)


def test_yaml_round_trip_and_grouped_or_flat(tmp_path):
    cfg = load_config(None, ["learning_rate=1e-4", "save_format=torch", "lora_target_modules=[q_proj,v_proj]"])
    path = tmp_path / "c.yaml"
    cfg.save_yaml(path)
    again = load_config(path)
    assert again == cfg
    assert again.training.learning_rate == pytest.approx(1e-4)
    assert again.peft.lora_target_modules == ["q_proj", "v_proj"]
    flat = config_from_dict(cfg.to_flat_dict())
    assert flat == cfg


def test_cli_style_values_are_typed():
    cfg = load_config(
        None, ["max_steps=20", "packing=true", "eval_split=0.2", "fine_tuning_type=rag", "training.seed=7"]
    )
    assert cfg.training.max_steps == 20 and cfg.training.packing is True
    assert cfg.data.eval_split == pytest.approx(0.2)
    assert cfg.data.fine_tuning_type is FineTuningType.RAG
    assert cfg.training.seed == 7


def test_qlora_without_4bit_is_explained():
    with pytest.raises(ConfigError) as err:
        config_from_dict({"peft_type": "qlora"})
    assert "quantization" in str(err.value) and "4bit" in str(err.value)


@pytest.mark.parametrize("value", [0, -5])
def test_max_seq_length_must_be_positive(value):
    with pytest.raises(ConfigError) as err:
        config_from_dict({"max_seq_length": value})
    assert "max_seq_length" in str(err.value)


def test_unknown_type_lists_valid_ones():
    with pytest.raises(ConfigError) as err:
        config_from_dict({"fine_tuning_type": "summarisation"})
    message = str(err.value)
    for kind in FineTuningType:
        assert kind.value in message


def test_unknown_key_suggests_the_right_one():
    with pytest.raises(ConfigError) as err:
        config_from_dict({"learning_rte": 1e-4})
    assert "learning_rte" in str(err.value) and "did you mean 'learning_rate'" in str(err.value)


def test_wrong_types_name_the_field():
    with pytest.raises(ConfigError) as err:
        config_from_dict({"max_steps": "many"})
    assert "max_steps" in str(err.value)
    with pytest.raises(ConfigError):
        config_from_dict({"packing": "perhaps"})


def test_token_is_never_written_or_printed(tmp_path, monkeypatch):
    secret = "hf_SENTINEL_0123456789"
    cfg = config_from_dict({"hf_token": secret})
    assert cfg.model.hf_token == secret
    path = tmp_path / "c.yaml"
    cfg.save_yaml(path)
    assert secret not in path.read_text()
    assert secret not in repr(cfg) and secret not in str(cfg.to_dict()) and secret not in cfg.to_yaml()


def test_token_from_environment(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_from_env")
    assert Config().model.hf_token == "hf_from_env"


def test_field_names_are_unique_across_groups():
    names = [f.name for _, f in iter_fields()]
    assert len(names) == len(set(names))
    assert all(dataclasses.is_dataclass(getattr(Config(), g)) for g, _ in iter_fields())
