"""Chat replies and model loading never touch the process-wide RNG a training job in another thread draws from."""

from __future__ import annotations

import shutil

import pytest
import torch

from autotuning.config import load_config
from autotuning.inference import ModelCache, generate_reply, load_generation_model
from autotuning.modeling import ensure_builtin_model

MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def tiny():
    return load_generation_model("builtin:tiny-llama")


def test_sampling_draws_from_a_generator_of_its_own(tiny):
    model, tokenizer = tiny
    before = torch.get_rng_state()
    replies = [generate_reply(model, tokenizer, MESSAGES, max_new_tokens=16, temperature=1.0, seed=s) for s in range(6)]
    again = generate_reply(model, tokenizer, MESSAGES, max_new_tokens=16, temperature=1.0, seed=3)
    greedy = [generate_reply(model, tokenizer, MESSAGES, max_new_tokens=16, temperature=0.0, seed=s) for s in (0, 1)]
    assert torch.equal(torch.get_rng_state(), before)
    assert again == replies[3]  # same seed, same reply
    assert len(set(replies)) > 1  # the seed matters: the reply is sampled
    assert greedy[0] == greedy[1]  # temperature 0 is greedy: the seed plays no part


def test_sampling_is_the_same_draw_as_generate_with_a_seeded_global_rng(tiny):
    """What the Chat tab showed before sampling moved off the global RNG: generate(do_sample=True) after
    torch.manual_seed(seed), with temperature and top-p 0.95. The replies are the same for the same seed (on CPU)."""
    model, tokenizer = tiny
    text = tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    state = torch.get_rng_state()
    try:
        for seed in (0, 1, 2):
            ours = generate_reply(model, tokenizer, MESSAGES, max_new_tokens=16, temperature=0.7, seed=seed)
            torch.manual_seed(seed)
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=16,
                do_sample=True,
                temperature=0.7,
                top_p=0.95,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=[tokenizer.eos_token_id],
            )
            assert ours == tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()
    finally:
        torch.set_rng_state(state)


def test_loading_a_chat_model_draws_nothing_from_the_global_rng(tmp_path):
    """A run's merged folder (here GPT-2's, whose output head is tied to its embeddings) and a base model by name,
    through the cache the Chat tab uses."""
    run = tmp_path / "run"
    run.mkdir()
    load_config(None, ["model_name=builtin:tiny-gpt2", f"output_dir={run}"]).save_yaml(run / "config.yaml")
    shutil.copytree(ensure_builtin_model("builtin:tiny-gpt2"), run / "merged")
    like = load_config(None, ["model_name=builtin:tiny-gpt2"])
    cache = ModelCache()
    before = torch.get_rng_state()
    for source, base_of in ((str(run), None), ("builtin:tiny-llama", None), ("builtin:tiny-gpt2", like)):
        model, _tokenizer = cache.get(source, fresh=True, like=base_of)
        assert not model.training
    assert torch.equal(torch.get_rng_state(), before)
