"""Speculative sampling keeps the model's distribution, also through transformers' ``generate``
(``custom_generate=lede_generate``, with the settings transformers fills in, e.g. top_k=50);
streaming, stop callbacks and ``stop_strings`` (the same tokens as plain ``generate``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import chi2_contingency, chisquare

from lede_env.decoding import Sampling, SelfSpeculativeDecoder, SequencePolicy, StaticPolicy, speculative_verify
from lede_env.exits import ExitHeads
from lede_env.mdp import accept

from ..conftest import CollectStreamer, make_tiny
from ..conftest import chat_input_ids as _chat, generate_unmasked as _generate, top_tokens as _top


def pooled_chisquare(counts: dict, exact: dict, min_expected: float = 5.0) -> float:
    """p-value of a chi-square goodness-of-fit test of ``counts`` (cell -> observed count) against
    ``exact`` (cell -> probability, summing to 1 over every possible cell): cells expecting fewer
    than ``min_expected`` samples are pooled into one."""
    n = sum(counts.values())
    big = [c for c in exact if exact[c] * n >= min_expected]
    assert len(big) >= 3
    obs = [counts.get(c, 0) for c in big]
    exp = [exact[c] * n for c in big]
    rest = n - sum(exp)
    if rest > 1e-6 * n or n - sum(obs) > 0:
        obs.append(n - sum(obs))
        exp.append(max(rest, 1e-12))
    exp = np.array(exp)
    return float(chisquare(obs, exp * n / exp.sum()).pvalue)


def test_speculative_verify_emits_tokens_distributed_as_p():
    """First emitted token of a K=2 round over 30,000 trials follows p[0] (chi-square), with q a
    different distribution over a truncated draft vocabulary."""
    g = torch.Generator().manual_seed(0)
    V, Vd = 10, 6
    p = torch.softmax(torch.randn(3, V, generator=g) * 1.5, -1)
    q_ids = torch.tensor([0, 2, 3, 5, 7, 9])
    q = [torch.softmax(torch.randn(Vd, generator=g) * 1.5, -1) for _ in range(2)]
    counts = np.zeros(V)
    second = np.zeros(V)
    n_second = 0
    for _ in range(30_000):
        draft = [int(q_ids[torch.multinomial(q[j], 1, generator=g)]) for j in range(2)]
        v = speculative_verify(draft, q, q_ids, p, g)
        oc = accept(draft, v, remaining=10, eos_ids=())
        counts[oc.emitted[0]] += 1
        if oc.accepted >= 1:  # given d_1 was accepted, the next token follows p[1]
            second[oc.emitted[1]] += 1
            n_second += 1
    P = p.double().numpy()
    P /= P.sum(1, keepdims=True)
    assert chisquare(counts, P[0] * counts.sum()).pvalue > 1e-3
    assert chisquare(second, P[1] * n_second).pvalue > 1e-3
    assert counts[[1, 4, 6, 8]].sum() > 0  # tokens outside the draft vocabulary come from the residual


def _tokens(dec, policy, seed, n):
    return dec.generate(torch.tensor([5, 9, 17]), policy, n, sampling=Sampling(0.7, 1.0, seed)).tokens


def test_decoder_sampling_matches_plain_sampling():
    """Tokens 2 and 3 (produced by speculative rounds at E=1, K=3) have the same distribution as
    under AR sampling (two-sample chi-square over 400 seeded generations each)."""
    b = make_tiny(num_layers=3, seed=1)
    heads = ExitHeads(b.stack, (1, 2), "lens", draft_vocab=64)
    dec = SelfSpeculativeDecoder(b.stack, heads, 3, ())
    spec = StaticPolicy(dec.actions.encode(1, 3))
    ar = [_tokens(dec, StaticPolicy(0), s, 3) for s in range(400)]
    sp = [_tokens(dec, spec, 10_000 + s, 3) for s in range(400)]
    for pos in (1, 2):
        a = np.bincount([t[pos] for t in ar], minlength=128)
        c = np.bincount([t[pos] for t in sp], minlength=128)
        keep = (a + c) >= 10
        table = np.stack([np.append(a[keep], a[~keep].sum()), np.append(c[keep], c[~keep].sum())])
        table = table[:, table.sum(0) > 0]
        assert chi2_contingency(table).pvalue > 1e-3


def test_sampling_is_seeded_and_validated():
    b = make_tiny()
    heads = ExitHeads(b.stack, (1, 2, 3), "lens")
    dec = SelfSpeculativeDecoder(b.stack, heads, 4, b.eos_ids)
    acts = SequencePolicy([5, 9, 0, 12, 3] * 5)
    assert _tokens(dec, acts, 3, 16) == _tokens(dec, acts, 3, 16)
    assert _tokens(dec, acts, 3, 16) != _tokens(dec, acts, 4, 16)
    for bad in (dict(temperature=0.0), dict(top_p=0.0), dict(top_p=1.5)):
        with pytest.raises(ValueError):
            Sampling(**bad)
    probs = Sampling(1.0, top_p=0.5).probs(torch.tensor([3.0, 2.0, 1.0, 0.0]))
    assert probs[0] > 0 and probs[2:].sum() == 0  # only the nucleus keeps mass


def test_stop_and_streamer_end_generation_exactly_there():
    b = make_tiny()
    heads = ExitHeads(b.stack, (1, 2, 3), "lens")
    dec = SelfSpeculativeDecoder(b.stack, heads, 4, b.eos_ids)
    full = dec.generate(torch.tensor([5, 9, 17]), StaticPolicy(dec.actions.encode(2, 4)), 20).tokens

    for keep_at in (1, 5, 7):
        s = CollectStreamer()
        out = dec.generate(torch.tensor([5, 9, 17]), StaticPolicy(dec.actions.encode(2, 4)), 20, streamer=s,
                           stop=lambda toks, k=keep_at: k if len(toks) >= k else None)
        assert out.tokens == full[:keep_at]
        assert s.chunks[0] == [5, 9, 17] and sum(s.chunks[1:], []) == full[:keep_at] and s.ended


def _hf_warped(model, ids, temperature, top_k, top_p=1.0):
    """transformers' own next-token distribution of ``model`` after ``ids`` under its sampling
    warpers (``TemperatureLogitsWarper``, ``TopKLogitsWarper``, ``TopPLogitsWarper``), float64."""
    from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    warp = LogitsProcessorList([TemperatureLogitsWarper(temperature), TopKLogitsWarper(top_k)]
                               + ([TopPLogitsWarper(top_p)] if top_p < 1 else []))
    x = torch.tensor([list(ids)])
    with torch.no_grad():
        scores = warp(x, model(x).logits[:, -1].double())
    return torch.softmax(scores, -1)[0]


def test_sampling_probs_warp_as_transformers_does():
    """Sampling.probs (used for p and for q alike) equals softmax of transformers' temperature,
    top-k, top-p warpers, ties at the k-th logit included; top_k 0/None is off, bad values fail."""
    from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 40, generator=g) * 2
    logits[0, :5] = logits[0].max() + 1  # a tie straddling the k-th position: transformers keeps all of them
    for k, top_p in ((4, 1.0), (7, 0.8), (1, 1.0), (40, 0.9), (100, 1.0)):
        ref = LogitsProcessorList([TemperatureLogitsWarper(0.7), TopKLogitsWarper(k)]
                                  + ([TopPLogitsWarper(top_p)] if top_p < 1 else []))(None, logits.clone())
        mine = Sampling(0.7, top_p, top_k=k).probs(logits)
        assert torch.allclose(mine, torch.softmax(ref, -1), atol=1e-6), (k, top_p)
    assert (Sampling(1.0, top_k=4).probs(logits)[0] > 0).sum() == 5  # the tie is kept
    for off in (0, None):
        assert torch.allclose(Sampling(0.7, top_k=off).probs(logits), torch.softmax(logits / 0.7, -1))
    for bad in (-1, 2.5, True):
        with pytest.raises(ValueError, match="top_k"):
            Sampling(0.7, top_k=bad)


def test_decoder_sampling_with_top_k_follows_the_models_top_k_distribution():
    """With top_k (and top_p) the decoder's first three tokens, produced by the prefill and by
    speculative rounds at E=1, K=2 over a truncated draft vocabulary (acceptance, residual and
    bonus draws), follow the model's own top-k warped distribution: every sample lies in its
    support and the joint of (t0, t1, t2) over 1,000 seeded generations passes a chi-square test
    against the exact joint computed with transformers' warpers."""
    b = make_tiny(num_layers=3, seed=1)
    heads = ExitHeads(b.stack, (1, 2), "lens", draft_vocab=64)
    dec = SelfSpeculativeDecoder(b.stack, heads, 3, ())
    pol = StaticPolicy(dec.actions.encode(1, 3))
    prompt, T, k, top_p = [5, 9, 17], 0.8, 4, 0.95
    samples = [tuple(dec.generate(torch.tensor(prompt), pol, 4, sampling=Sampling(T, top_p, 20_000 + s, top_k=k))
                     .tokens[:3]) for s in range(1000)]
    assert dec.generate(torch.tensor(prompt), pol, 4, sampling=Sampling(T, seed=0, top_k=k)).rounds[0].draft_len == 2
    exact = {}  # (t0, t1, t2) -> probability under the model's own warped distribution
    p0 = _hf_warped(b.model, prompt, T, k, top_p)
    for t0 in p0.nonzero()[:, 0].tolist():
        p1 = _hf_warped(b.model, prompt + [t0], T, k, top_p)
        for t1 in p1.nonzero()[:, 0].tolist():
            p2 = _hf_warped(b.model, prompt + [t0, t1], T, k, top_p)
            for t2 in p2.nonzero()[:, 0].tolist():
                exact[(t0, t1, t2)] = float(p0[t0] * p1[t1] * p2[t2])
    assert all(s in exact for s in samples)  # never a token outside the top-k (or nucleus) of its position
    counts = {c: samples.count(c) for c in set(samples)}
    assert pooled_chisquare(counts, exact) > 1e-3


# ---- through transformers' generate with custom_generate=lede_generate ---------------------
def test_sampling_through_transformers_with_its_default_top_k(hf_tiny):
    """A user's first call (do_sample=True, temperature=0.7: transformers fills in top_k=50) works,
    also with top_p, and every token lies in the top 50 of its position; an explicit top_k=3 is
    applied exactly (every token in the top 3)."""
    from lede_env.hf import lede_generate

    model, tok, lede = hf_tiny
    x = _chat(tok, "What is the capital of France?")
    for kw in (dict(temperature=0.7), dict(temperature=0.7, top_p=0.9), dict(top_k=3), dict(top_k=0)):
        for s in range(3):
            torch.manual_seed(s)
            out = _generate(model, x, max_new_tokens=8, do_sample=True, custom_generate=lede_generate, lede=lede, **kw)
            assert out.shape == (1, x.shape[1] + 8) and out[0, : x.shape[1]].tolist() == x[0].tolist()
            k = kw.get("top_k", 50)
            if k:
                assert all(t in top for t, top in zip(out[0, x.shape[1]:].tolist(), _top(model, out, x.shape[1], k)))
    torch.manual_seed(5)
    a = _generate(model, x, max_new_tokens=8, do_sample=True, custom_generate=lede_generate, lede=lede)
    torch.manual_seed(5)
    b = _generate(model, x, max_new_tokens=8, do_sample=True, custom_generate=lede_generate, lede=lede)
    assert a.tolist() == b.tolist()  # torch.manual_seed reproduces a run, as with transformers' own sampling


def test_sampling_through_transformers_is_distributed_as_its_own_sampling(hf_tiny):
    """do_sample=True, temperature=0.8, top_k=3 through lede_generate (E=1, K=2 rounds): the
    joint of the first two tokens over 300 seeded calls follows the model's own distribution
    under transformers' warpers (chi-square)."""
    from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper

    from lede_env.hf import lede_generate

    model, tok, lede = hf_tiny
    x = _chat(tok, "Name a prime number.")
    n = x.shape[1]
    warp = LogitsProcessorList([TemperatureLogitsWarper(0.8), TopKLogitsWarper(3)])

    def dist(seq):
        with torch.no_grad():
            return torch.softmax(warp(seq, model(seq).logits[:, -1].double()), -1)[0]

    exact = {}
    p0 = dist(x)
    for t0 in p0.nonzero()[:, 0].tolist():
        p1 = dist(torch.cat([x, torch.tensor([[t0]])], 1))
        for t1 in p1.nonzero()[:, 0].tolist():
            exact[(t0, t1)] = float(p0[t0] * p1[t1])
    counts = dict.fromkeys(exact, 0)
    for s in range(300):
        torch.manual_seed(1000 + s)
        out = _generate(model, x, max_new_tokens=3, do_sample=True, temperature=0.8, top_k=3,
                        custom_generate=lede_generate, lede=lede)
        pair = tuple(out[0, n:n + 2].tolist())
        assert pair in exact  # never outside the top 3 of its position
        counts[pair] += 1
    assert pooled_chisquare(counts, exact) > 1e-3


def test_stop_strings_through_transformers_give_plain_generates_tokens(hf_tiny):
    """stop_strings with and without tokenizer= (transformers does not pass it on): the same ids
    as plain generate, for strings ending inside a token, spanning tokens, or absent; a streamer
    gets the prompt once, then exactly the generated tokens."""
    from lede_env.hf import lede_generate

    model, tok, lede = hf_tiny
    for prompt in ("What is the capital of France? Answer with one word.", "Write a haiku about caches."):
        x = _chat(tok, prompt)
        n = x.shape[1]
        ref = _generate(model, x, max_new_tokens=12, do_sample=False)
        text = tok.decode(ref[0, n:])
        assert len(text) > 8
        for stop in (text[2:7], text[len(text) // 2: len(text) // 2 + 3], text[-4:], "\x00never"):
            plain = _generate(model, x, max_new_tokens=12, stop_strings=[stop], tokenizer=tok)
            mine = _generate(model, x, max_new_tokens=12, stop_strings=[stop], tokenizer=tok,
                             custom_generate=lede_generate, lede=lede)
            assert mine.tolist() == plain.tolist(), stop
            bare = _generate(model, x, max_new_tokens=12, stop_strings=[stop], custom_generate=lede_generate, lede=lede)
            assert bare.tolist() == plain.tolist(), stop

    s = CollectStreamer()
    out = _generate(model, x, max_new_tokens=10, custom_generate=lede_generate, lede=lede, streamer=s)
    assert s.chunks[0] == x[0].tolist() and sum(s.chunks[1:], []) == out[0, n:].tolist() and s.ended

