"""No UI action changes a running job's process-wide state: chatting during a run leaves the run bit-for-bit as it
would have been without the chat, and an export draws nothing from the RNG the run draws from."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch

from autotuning.config import load_config
from autotuning.export import export_run
from autotuning.inference import ModelCache
from autotuning.pipeline import Pipeline, RunStatus
from autotuning.runs import MetricsSink, read_metrics
from ui.chat_tab import reply_both
from ui.context import AppContext

MAX_STEPS = 40


def _config(out: Path):
    sets = {
        "model_name": "builtin:tiny-llama",
        "dataset_path": "sample",
        "output_dir": out,
        "peft_type": "lora",
        # Dropout draws its masks from the global RNG: a chat reply that drew from it too would change the losses.
        "lora_dropout": 0.1,
        "max_steps": MAX_STEPS,
        "per_device_train_batch_size": 4,
        "learning_rate": 5e-3,
        "logging_steps": 1,
        "save_steps": 1000,
        "eval_split": 0,
        "seed": 7,
        "max_seq_length": 128,
    }
    return load_config(None, [f"{k}={v}" for k, v in sets.items()])


def _losses(run_dir: Path) -> list[float]:
    return [e["loss"] for e in read_metrics(run_dir / "metrics.jsonl") if e["type"] == "train"]


@pytest.fixture(scope="module")
def alone(tmp_path_factory):
    """B: the run alone. Finished, it is also the fine-tuned model the Chat tab talks to during A."""
    root = tmp_path_factory.mktemp("runs")
    config = _config(root / "alone")
    assert config.peft.lora_dropout > 0
    run = Pipeline(root).start(config)
    assert run.wait(300) and run.status is RunStatus.FINISHED, run.error
    return run


def test_chat_during_training_leaves_the_run_bit_for_bit_equal(tmp_path, alone, monkeypatch):
    ctx = AppContext.create(tmp_path / "runs")
    during: list[str] = []
    errors: list[BaseException] = []

    # However fast the machine, a reply must overlap the training loop: the run pauses at its second train event
    # until one reply has ended (a pause changes no result: the same steps run, later).
    replied = threading.Event()
    emit = MetricsSink.emit

    def emit_after_a_reply(sink, event):
        if sink is chatted.sink and event.get("type") == "train" and event.get("step") == 2:
            replied.wait(120)
        emit(sink, event)

    monkeypatch.setattr(MetricsSink, "emit", emit_after_a_reply)

    # A: the same run while the Chat tab sends messages (sampled, temperature 0.9) to B's merged model and its base,
    # each reply loading both models afresh.
    chatted = ctx.pipeline.start(_config(tmp_path / "runs" / "chatted"))

    def chat() -> None:
        try:
            while chatted.is_active():
                ctx.models = ModelCache()  # an empty cache: every reply loads its models
                tuned, base = reply_both(ctx, str(alone.run_dir), "Tell me a story.", [], [], 12, 0.9)
                steps = sum(e.get("type") == "train" for e in chatted.events(0))
                if 0 < steps < MAX_STEPS:  # the reply ended while the run was in its training loop
                    during.append(tuned[-1]["content"] + base[-1]["content"])
                    replied.set()
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    chatter = threading.Thread(target=chat, daemon=True)
    started = time.monotonic()
    chatter.start()
    assert chatted.wait(300) and chatted.status is RunStatus.FINISHED, chatted.error
    chatter.join(60)
    assert not errors, errors
    assert during, f"no reply overlapped training ({time.monotonic() - started:.0f} s)"

    assert _losses(chatted.run_dir) == _losses(alone.run_dir) and len(_losses(alone.run_dir)) == MAX_STEPS
    adapter = Path("adapter") / "adapter_model.safetensors"
    assert (chatted.run_dir / adapter).read_bytes() == (alone.run_dir / adapter).read_bytes()


def test_an_export_from_the_export_tab_draws_nothing_from_the_global_rng(alone):
    """The Export tab exports a finished run while a job may train in another thread: loading the adapter to merge
    it must not draw the random initialisation PEFT gives new adapter layers from the RNG that job draws from."""
    before = torch.get_rng_state()
    figures = export_run(str(alone.run_dir), ["torch"], "q8_0")
    assert torch.equal(torch.get_rng_state(), before)
    assert figures["torch"]["status"] == "verified", figures["torch"]


def test_model_loads_in_several_threads_take_turns_and_leave_transformers_unpatched():
    """transformers swaps process-wide functions while it loads a model (PreTrainedModel.tie_weights among them);
    two loads at once in two threads could leave the no-op in place for good. Every load holds MODEL_LOADING."""
    from transformers import PreTrainedModel

    from autotuning.concurrency import MODEL_LOADING
    from autotuning.inference import load_generation_model

    original = PreTrainedModel.tie_weights
    done = threading.Event()
    with MODEL_LOADING:  # a load elsewhere in the app
        loader = threading.Thread(target=lambda: load_generation_model("builtin:tiny-gpt2") and done.set())
        loader.start()
        assert not done.wait(3.0)  # it waits its turn
    assert done.wait(120)
    loader.join()

    errors = []

    def load_twice():
        try:
            for name in ("builtin:tiny-gpt2", "builtin:tiny-llama"):
                load_generation_model(name)
        except Exception as exc:  # pragma: no cover - shown by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=load_twice) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and PreTrainedModel.tie_weights is original
    model, _ = load_generation_model("builtin:tiny-gpt2")  # tied embeddings: its head is the embedding, not meta
    assert not model.lm_head.weight.is_meta
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
