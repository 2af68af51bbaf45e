"""What ``model.generate(..., custom_generate=lede_generate)`` is given beside ``input_ids`` is
honoured exactly or refused by name, and a streamer always ends.

- sampling settings of the model's generation config: honoured (its ``do_sample``/``top_k``)
  or refused naming the setting and its origin, as are settings of the call and processors;
- ``attention_mask`` (transformers PR #46773, mlx-lm #1906): left padding, masked tokens inside
  the prompt and random masks give transformers' own masked greedy tokens, for every kind of
  policy (AR steps with context drafts, exit drafts, copies); a mask that masks the last token
  (right padding, where transformers continues from a pad position) is refused by name;
- ``inputs_embeds`` (unsloth #3309), alone or beside ``input_ids``, non-consecutive
  ``position_ids`` and a filled cache are one ``ValueError`` naming the input;
- a streamer gets ``end()`` exactly once on every exit path, a refusal included (ms-swift PR
  #10133: a ``TextIteratorStreamer``'s reader waited forever), in the transformers hook,
  :meth:`Lede.generate` and the decoder.
"""

from __future__ import annotations

import threading

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ..conftest import chat_input_ids as _chat, generate_unmasked as _generate, top_tokens as _top
from .test_context_limit import _model, _tokenizer

POLICIES = ("ar", "static:2,3", "static:1,4", "static:0,2")


@pytest.fixture(scope="module")
def hook(tmp_path_factory):
    """A tiny Llama (vocabulary 128, 256 positions) and a Lede per policy kind on it."""
    from lede_env.generate import Lede

    tok = _tokenizer()
    model = _model(256)
    mp = pytest.MonkeyPatch()
    mp.setenv("LEDE_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
    kw = dict(exit_layers=[1, 2, 3], k_max=4, head_kind="lens", draft_vocab=None, context_datastore=False)
    ledes = {p: Lede(model, tok, policy=p, **kw) for p in POLICIES}
    yield model, ledes
    mp.undo()


def _ids(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(3, 128, (n,), generator=g)
    if n >= 12:
        x[n // 2:n // 2 + 6] = x[:6]  # (a repeat, so that context copies are drafted too)
    return x.view(1, -1)


def _both(model, lede, x, mask, max_new=24):
    from lede_env.hf import lede_generate

    kw = dict(attention_mask=mask, max_new_tokens=max_new, do_sample=False, pad_token_id=0)
    return model.generate(x, custom_generate=lede_generate, lede=lede, **kw).tolist(), model.generate(x, **kw).tolist()


def _masks(n: int) -> dict:
    left = torch.ones(1, n, dtype=torch.long)
    left[0, :6] = 0  # 6 pad tokens
    middle = torch.ones(1, n, dtype=torch.long)
    middle[0, 4:18] = 0  # 14 masked text tokens
    first = torch.ones(1, n, dtype=torch.long)
    first[0, 0] = 0
    return {"left padding": left, "masked middle": middle, "first masked": first,
            "all kept": torch.ones(1, n, dtype=torch.long)}


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("case", list(_masks(30)))
def test_attention_mask_gives_transformers_masked_greedy_tokens(hook, policy, case):
    model, ledes = hook
    x = _ids(30)
    if case == "left padding":
        x[0, :6] = 0
    got, want = _both(model, ledes[policy], x, _masks(30)[case])
    assert got == want


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(n=st.integers(2, 40), data=st.data(), policy=st.sampled_from(POLICIES), seed=st.integers(0, 3))
def test_any_mask_gives_transformers_masked_greedy_tokens(hook, n, data, policy, seed):
    model, ledes = hook
    bits = data.draw(st.lists(st.integers(0, 1), min_size=n - 1, max_size=n - 1)) + [1]
    got, want = _both(model, ledes[policy], _ids(n, seed), torch.tensor([bits]), max_new=16)
    assert got == want


def test_a_mask_that_keeps_nothing_or_pads_on_the_right_is_refused(hook):
    model, ledes = hook
    x = _ids(8)
    with pytest.raises(ValueError, match="attention_mask keeps no token"):
        _both(model, ledes["ar"], x, torch.zeros_like(x))
    right = torch.ones_like(x)
    right[0, -3:] = 0
    with pytest.raises(ValueError, match="right padding.*padding_side = 'left'"):
        _both(model, ledes["static:2,3"], x, right)


def test_inputs_embeds_is_refused_by_name(hook):
    from lede_env.hf import lede_generate

    model, ledes = hook
    x = _ids(10)
    emb = model.model.embed_tokens(x)
    for kw in (dict(inputs_embeds=emb), dict(input_ids=x, inputs_embeds=emb)):
        with pytest.raises(ValueError, match="inputs_embeds cannot be honoured: pass input_ids"):
            model.generate(**kw, max_new_tokens=4, custom_generate=lede_generate, lede=ledes["ar"])


def test_positions_are_honoured_or_refused(hook):
    """A constant shift of ``position_ids`` changes nothing with rotary attention (transformers'
    own output is the same): honoured; positions that skip are refused by name."""
    from lede_env.hf import lede_generate

    model, ledes = hook
    x = _ids(12)
    shifted = torch.arange(12).view(1, -1) + 5
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    out = model.generate(x, position_ids=shifted, custom_generate=lede_generate, lede=ledes["static:2,3"], **kw)
    assert out.tolist() == model.generate(x, **kw).tolist()
    skipping = torch.arange(12).view(1, -1) * 2
    with pytest.raises(ValueError, match="position_ids"):
        model.generate(x, position_ids=skipping, custom_generate=lede_generate, lede=ledes["ar"], **kw)


def test_a_filled_cache_is_refused(hook):
    from transformers import DynamicCache

    from lede_env.hf import lede_generate

    model, ledes = hook
    x = _ids(10)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(x[:, :4], past_key_values=cache, use_cache=True)
    with pytest.raises(ValueError, match="past_key_values already holds 4 positions"):
        lede_generate(model, x, generation_config=model.generation_config.__class__(max_new_tokens=4),
                      lede=ledes["ar"], past_key_values=cache)


class Ends:
    """A streamer that counts what it is given."""

    def __init__(self):
        self.puts, self.ends = 0, 0

    def put(self, value):
        self.puts += 1

    def end(self):
        self.ends += 1


def _hook_refusals(model, lede):
    from lede_env.hf import lede_generate

    x = _ids(10)
    yield "repetition_penalty", lambda s: model.generate(x, repetition_penalty=1.1, max_new_tokens=4, streamer=s,
                                                         custom_generate=lede_generate, lede=lede)
    yield "inputs_embeds", lambda s: model.generate(x, inputs_embeds=model.model.embed_tokens(x), max_new_tokens=4,
                                                    streamer=s, custom_generate=lede_generate, lede=lede)
    yield "context", lambda s: model.generate(x, max_new_tokens=400, streamer=s, custom_generate=lede_generate,
                                              lede=lede)


def _lede_refusals(lede):
    x = _ids(10)[0]

    def boom(tokens):
        if len(tokens) > 3:
            raise RuntimeError("a stop callback that fails mid-generation")

    yield "temperature", lambda s: lede.generate(input_ids=x, temperature=-1.0, streamer=s)
    yield "policy", lambda s: lede.generate(input_ids=x, policy="no-such-policy", streamer=s)
    yield "context", lambda s: lede.generate(input_ids=x, max_new_tokens=400, streamer=s)
    yield "stop callback", lambda s: lede.generate(input_ids=x, max_new_tokens=20, stop=boom, streamer=s)
    yield "decoder", lambda s: lede.decoder.generate(x, lede.policy, 0, streamer=s)


def test_every_refusal_ends_the_streamer_once(hook):
    model, ledes = hook
    lede = ledes["static:2,3"]
    cases = list(_hook_refusals(model, lede)) + list(_lede_refusals(lede))
    for what, call in cases:
        s = Ends()
        with pytest.raises((ValueError, RuntimeError)):
            call(s)
        assert s.ends == 1, what
    for call in (lambda s: lede.generate(input_ids=_ids(10)[0], max_new_tokens=8, streamer=s),
                 lambda s: _both_streamed(model, lede, s)):
        s = Ends()
        call(s)
        assert s.ends == 1 and s.puts >= 2


def _both_streamed(model, lede, s):
    from lede_env.hf import lede_generate

    x = _ids(10)
    return model.generate(x, max_new_tokens=8, streamer=s, custom_generate=lede_generate, lede=lede)


def test_a_text_iterator_streamers_reader_finishes_after_a_refusal(hook):
    """The reported case: a reader thread over a ``TextIteratorStreamer`` while ``generate`` is
    refused (``repetition_penalty``) finishes instead of waiting forever."""
    from transformers import TextIteratorStreamer

    model, ledes = hook
    lede = ledes["ar"]
    for what, call in list(_hook_refusals(model, lede)) + list(_lede_refusals(lede)):
        streamer = TextIteratorStreamer(lede.tokenizer, timeout=60)
        text = []
        reader = threading.Thread(target=lambda: text.extend(streamer), daemon=True)
        reader.start()
        with pytest.raises((ValueError, RuntimeError)):
            call(streamer)
        reader.join(timeout=60)
        assert not reader.is_alive(), what


def test_model_generation_config_sampling_is_honoured_or_refused_with_its_origin(hf_tiny):
    """Settings from the model's generation config are honoured (its do_sample/top_k) or refused
    with the setting and 'generation_config.json' named; settings of the call are named as the
    call's; a processor passed in logits_processor= is named as such; settings that ask for other
    outputs (several sequences, beams, a dict) are refused too."""
    from transformers import LogitsProcessorList, MinPLogitsWarper

    from lede_env.hf import lede_generate

    model, tok, lede = hf_tiny
    x = _chat(tok, "Say hello.")
    gc = model.generation_config
    old = {k: getattr(gc, k) for k in ("do_sample", "top_k", "repetition_penalty")}
    try:
        gc.do_sample, gc.top_k = True, 2
        out = _generate(model, x, max_new_tokens=6, custom_generate=lede_generate, lede=lede)
        assert all(t in top for t, top in zip(out[0, x.shape[1]:].tolist(), _top(model, out, x.shape[1], 2)))
        gc.repetition_penalty = 1.2
        with pytest.raises(ValueError, match=r"repetition_penalty=1.2 \(from the model's generation_config.json"):
            _generate(model, x, max_new_tokens=4, custom_generate=lede_generate, lede=lede)
    finally:
        for k, v in old.items():
            setattr(gc, k, v)
    with pytest.raises(ValueError, match=r"repetition_penalty=1.3 \(set in your generate\(\) call\)"):
        _generate(model, x, max_new_tokens=4, repetition_penalty=1.3, custom_generate=lede_generate, lede=lede)
    with pytest.raises(ValueError, match=r"min_p=0.1 \(set in your generate\(\) call\)"):
        _generate(model, x, max_new_tokens=4, do_sample=True, min_p=0.1, custom_generate=lede_generate, lede=lede)
    with pytest.raises(ValueError, match=r"MinPLogitsWarper \(passed in logits_processor=\)"):
        _generate(model, x, max_new_tokens=4, logits_processor=LogitsProcessorList([MinPLogitsWarper(0.1)]),
                  custom_generate=lede_generate, lede=lede)
    for kw, name in ((dict(do_sample=True, num_return_sequences=2), "num_return_sequences=2"),
                     (dict(num_beams=2), "num_beams=2"),
                     (dict(return_dict_in_generate=True), "return_dict_in_generate")):
        with pytest.raises(ValueError, match=name):
            _generate(model, x, max_new_tokens=4, custom_generate=lede_generate, lede=lede, **kw)

