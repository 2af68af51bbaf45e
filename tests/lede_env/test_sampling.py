"""Speculative sampling keeps the model's distribution; streaming and stop callbacks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import chi2_contingency, chisquare

from lede_env.decoding import Sampling, SelfSpeculativeDecoder, SequencePolicy, StaticPolicy, speculative_verify
from lede_env.exits import ExitHeads
from lede_env.mdp import accept

from ..conftest import make_tiny


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

    class Collect:
        def __init__(self):
            self.chunks, self.ended = [], False

        def put(self, value):
            self.chunks.append(value.reshape(-1).tolist())

        def end(self):
            self.ended = True

    for keep_at in (1, 5, 7):
        s = Collect()
        out = dec.generate(torch.tensor([5, 9, 17]), StaticPolicy(dec.actions.encode(2, 4)), 20, streamer=s,
                           stop=lambda toks, k=keep_at: k if len(toks) >= k else None)
        assert out.tokens == full[:keep_at]
        assert s.chunks[0] == [5, 9, 17] and sum(s.chunks[1:], []) == full[:keep_at] and s.ended
