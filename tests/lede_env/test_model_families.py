"""Every supported model family decodes losslessly, sliding attention windows included: on tiny
random Llama, Mistral, Qwen2 and Qwen3 models whose window (where they have one) is shorter than
the sequence, lede's logits equal transformers' forward pass and every action sequence gives
transformers' greedy ``generate`` tokens (transformers PR #48280, #47447: sliding-window models
decoded as if the window were not there)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lede_env.decoding import SelfSpeculativeDecoder, SequencePolicy, StaticPolicy, greedy_reference
from lede_env.exits import ExitHeads
from lede_env.layers import attention_windows
from lede_env.model import bundle_from_model

WINDOW = 8


def tiny(family: str, seed: int = 0):
    """A tiny random model of ``family``; ``-window`` families attend within WINDOW positions
    (Qwen: the last two of four layers, as ``max_window_layers=2`` makes them)."""
    import transformers

    name, _, window = family.partition("-")
    Config, Model = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "mistral": ("MistralConfig", "MistralForCausalLM"),
                     "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"), "qwen3": ("Qwen3Config", "Qwen3ForCausalLM")}[name]
    kw = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=0,
              tie_word_embeddings=True, attn_implementation="sdpa", initializer_range=0.08)
    if name == "mistral":
        kw["sliding_window"] = WINDOW if window else None
    elif name in ("qwen2", "qwen3"):
        kw.update(use_sliding_window=bool(window), sliding_window=WINDOW, max_window_layers=2)
    torch.manual_seed(seed)
    model = getattr(transformers, Model)(getattr(transformers, Config)(**kw)).eval()
    model.requires_grad_(False)
    return bundle_from_model(model, name=f"tiny-{family}")


FAMILIES = ["llama", "mistral", "mistral-window", "qwen2", "qwen2-window", "qwen3-window"]
BUNDLES: dict = {}


def bundle(family):
    if family not in BUNDLES:
        BUNDLES[family] = tiny(family)
    return BUNDLES[family]


def test_the_windows_are_read_as_transformers_reads_them():
    assert attention_windows(bundle("llama").model.config) == (None,) * 4
    assert attention_windows(bundle("mistral").model.config) == (None,) * 4
    assert attention_windows(bundle("mistral-window").model.config) == (WINDOW,) * 4
    assert attention_windows(bundle("qwen2").model.config) == (None,) * 4
    for fam in ("qwen2-window", "qwen3-window"):
        assert attention_windows(bundle(fam).model.config) == (None, None, WINDOW, WINDOW)


@pytest.mark.parametrize("family", FAMILIES)
def test_prefill_and_incremental_logits_equal_transformers(family):
    """20 positions (2.5 windows): a prefill of 12 then passes of 1, 3 and 4 positions through
    lede's layer stack and KV cache give transformers' full-sequence logits at every position."""
    b = bundle(family)
    st_ = b.stack
    ids = torch.randint(3, 128, (1, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = b.model(ids).logits[0]
        cache, got, pos = st_.new_cache(), [], 0
        for q in (12, 1, 3, 4):
            h = st_.run(st_.embed(ids[:, pos:pos + q]), 0, st_.num_layers, cache, pos)
            got.append(st_.lm_head(st_.norm(h))[0])
            pos += q
    assert torch.allclose(torch.cat(got), want, atol=1e-4, rtol=1e-4), (torch.cat(got) - want).abs().max()


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(family=st.sampled_from(FAMILIES), prompt=st.lists(st.integers(3, 127), min_size=1, max_size=14),
       actions=st.lists(st.integers(0, 10_000), max_size=30), reuse=st.booleans())
def test_every_action_sequence_gives_transformers_greedy_tokens(family, prompt, actions, reuse):
    """Drafts that are rejected are cropped off the cache in every layer (sliding ones too), and
    the output past the window equals transformers' greedy ``generate``."""
    b = bundle(family)
    heads = ExitHeads(b.stack, (1, 2, 3))
    dec = SelfSpeculativeDecoder(b.stack, heads, 4, b.eos_ids, reuse=reuse)
    ids = torch.tensor(prompt)
    want = greedy_reference(b.model, ids, 24, b.eos_ids)
    assert dec.generate(ids, SequencePolicy([a % dec.actions.n for a in actions]), 24).tokens == want


@pytest.mark.parametrize("family", ["mistral-window", "qwen2-window"])
def test_exit_drafts_past_the_window_are_greedy(family):
    """A case users met: E=1, K=3 on a sliding-window model (it raised a tensor-size error)."""
    b = bundle(family)
    dec = SelfSpeculativeDecoder(b.stack, ExitHeads(b.stack, (1, 2, 3)), 4, b.eos_ids)
    ids = torch.randint(3, 128, (20,), generator=torch.Generator().manual_seed(2))
    want = greedy_reference(b.model, ids, 30, b.eos_ids)
    for exit_layer, k in ((1, 3), (2, 4), (0, 1)):
        action = dec.actions.encode(exit_layer, k) if exit_layer else 0
        out = dec.generate(ids, StaticPolicy(action), 30)
        assert out.tokens == want, (exit_layer, k)
