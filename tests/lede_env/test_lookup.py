"""Context drafts (prompt lookup): the matcher on edge cases, lossless decoding with context
drafts for every action sequence, speculative sampling with point-mass proposals, their cost."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lede_env.costs import CostProfile
from lede_env.decoding import SelfSpeculativeDecoder, SequencePolicy, StaticPolicy, greedy_reference
from lede_env.exits import ExitHeads
from lede_env.lookup import context_draft
from lede_env.mdp import accept
from lede_env.sampling import speculative_verify

from ..conftest import decode_cases, make_tiny


def test_no_match_proposes_nothing():
    assert context_draft([1, 2, 3, 4, 5], 4) == []
    assert context_draft([7], 4) == [] and context_draft([], 4) == []
    assert context_draft([1, 2, 1, 2], 0) == []


def test_match_at_the_very_end_proposes_what_exists():
    # suffix (1, 2) occurred at 0; what followed it is 3 and then the suffix itself
    assert context_draft([1, 2, 3, 1, 2], 8) == [3, 1, 2]
    # the only earlier occurrence ends right before the suffix: one token follows
    assert context_draft([4, 1, 2, 1, 2], 8, ngram=(2, 2)) == [1, 2]


def test_overlapping_matches_and_runs():
    # a b a b a b: the 3-gram (b a b) occurred at 1, followed by a b
    assert context_draft([1, 2, 1, 2, 1, 2], 4) == [1, 2]
    # a run of one token repeats itself
    assert context_draft([9, 9, 9, 9], 2) == [9]
    # in a longer loop an earlier occurrence copies max_len tokens of it (the most recent one
    # would copy 1 token, resp. the 2 of one period)
    assert context_draft([3] + [9] * 9, 4) == [9, 9, 9, 9]
    assert context_draft([1, 2] * 5, 4) == [1, 2, 1, 2]
    # the most recent occurrence that has max_len tokens after it, not an older one
    assert context_draft([1, 2, 5, 6, 7, 8, 1, 2, 3, 4, 9, 1, 2], 2, ngram=(2, 2)) == [3, 4]


def test_longest_ngram_first_then_longest_span_then_most_recent():
    seq = [5, 1, 2, 3, 9, 7, 2, 3, 8, 6, 1, 2, 3]
    assert context_draft(seq, 1) == [9]  # (1, 2, 3) beats the more recent (2, 3)
    # of the two (2, 3), the one preceded by 1, as the text's is: span 3 against 2
    assert context_draft(seq, 1, ngram=(2, 2)) == [9]
    # equal spans: the most recent
    assert context_draft([1, 2, 4, 1, 2, 5, 1, 2], 1, ngram=(2, 2)) == [5]
    # a longer span wins over a more recent occurrence, among those followed by max_len tokens
    assert context_draft([7, 1, 2, 3, 4, 8, 1, 2, 5, 6, 7, 1, 2], 2, ngram=(2, 2)) == [3, 4]
    # but an occurrence followed by more of the max_len tokens comes first (the one at 9 has the
    # longer span, 4, and only 5 tokens after it)
    assert context_draft([5, 1, 2, 7, 7, 7, 7, 3, 9, 1, 2, 8, 3, 9, 1, 2], 6, ngram=(2, 2)) == [7, 7, 7, 7, 3, 9]
    assert context_draft([5, 1, 2, 7, 7, 7, 7, 3, 9, 1, 2, 8, 3, 9, 1, 2], 5, ngram=(2, 2)) == [8, 3, 9, 1, 2]


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="ngram"):
        context_draft([1, 2, 3], 2, ngram=(3, 2))
    with pytest.raises(ValueError, match="ngram"):
        context_draft([1, 2, 3], 2, ngram=(0, 2))
    with pytest.raises(ValueError, match="max_len"):
        context_draft([1, 2, 3], -1)
    b = make_tiny()
    with pytest.raises(ValueError, match="context_draft"):
        SelfSpeculativeDecoder(b.stack, ExitHeads(b.stack, (1, 2)), 4, b.eos_ids, context_draft=-1)


MODELS = {}


def _model(num_layers, seed):
    if (num_layers, seed) not in MODELS:
        MODELS[(num_layers, seed)] = make_tiny(num_layers=num_layers, seed=seed)
    return MODELS[(num_layers, seed)]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(**decode_cases(max_new=24), ctx=st.integers(0, 6), repeat=st.integers(0, 12), lo=st.integers(1, 3),
       lengths=st.lists(st.integers(1, 9), max_size=4, unique=True).map(sorted))
def test_output_equals_greedy_with_context_drafts(num_layers, seed, prompt, actions, k_max, bonus, reuse, max_new,
                                                  data, ctx, repeat, lo, lengths):
    """Every action sequence, with context drafts of up to 0-6 tokens on action 0, context
    actions of up to 1-9 copied tokens and prompts that repeat themselves (so matches happen),
    emits greedy decoding's tokens."""
    b = _model(num_layers, seed)
    L = b.stack.num_layers
    exits = data.draw(st.lists(st.integers(1, L - 1), min_size=1, max_size=L - 1, unique=True).map(sorted))
    heads = ExitHeads(b.stack, exits)
    dec = SelfSpeculativeDecoder(b.stack, heads, k_max, b.eos_ids, bonus, reuse=reuse, context_draft=ctx,
                                 context_ngram=(lo, 3), context_lengths=lengths)
    ids = torch.tensor(prompt + prompt[:repeat])
    ref = greedy_reference(b.model, ids, max_new, b.eos_ids)
    out = dec.generate(ids, SequencePolicy([a % dec.actions.n for a in actions]), max_new)
    assert out.tokens == ref
    assert sum(r.emitted for r in out.rounds) + 1 == len(out.tokens)
    for r in out.rounds:
        if r.exit_layer == 0:  # action 0 copies up to ctx, a context action up to its length
            E, K = dec.actions.decode(r.action)
            assert r.draft_len <= (K if E == 0 and K else ctx) and r.passes == 0
            assert r.n_verify == (1 if r.draft_len == 0 else r.draft_len + (1 if bonus else 0))


def test_context_drafts_are_proposed_and_accepted_on_repetitive_text():
    """The tiny model's greedy continuation of a repeated prompt loops: context drafts are
    proposed, accepted, and save rounds (the law above is not vacuous); the cost of a context
    round is c(n) of the profile."""
    b = _model(4, 0)
    heads = ExitHeads(b.stack, (1, 2, 3))
    ids = torch.tensor([5, 6, 7, 8, 9, 5, 6, 7, 8, 9, 5, 6])
    ref = greedy_reference(b.model, ids, 48, b.eos_ids)
    prof = CostProfile(num_layers=4, layer=[1.0, 1.5, 2.0, 2.5, 3.0], head=[2.0, 3.0, 4.0, 5.0, 6.0], draft_head=0.1)
    dec = SelfSpeculativeDecoder(b.stack, heads, 4, b.eos_ids, profile=prof, context_draft=4)
    out = dec.generate(ids, StaticPolicy(0), 48)
    assert out.tokens == ref
    ctx = [r for r in out.rounds if r.draft_len > 0]
    assert ctx and sum(r.accepted for r in ctx) > 0 and len(out.rounds) < len(out.tokens) - 1
    for r in out.rounds:  # c(n) = (4 layers x layer[n] + head[n]) / (4 x 1 + 2)
        assert r.cost == pytest.approx((4 * prof.layer[r.n_verify - 1] + prof.head[r.n_verify - 1]) / 6.0)


def test_context_actions_copy_up_to_their_own_length():
    """On a looping continuation, the context action of length m verifies at most m copied
    tokens and reaches m; action 0 without context_draft is a plain AR step; each round costs
    c(n) of the profile for the positions it verified."""
    b = _model(4, 0)
    heads = ExitHeads(b.stack, (1, 2, 3))
    ids = torch.tensor([5, 6, 7, 8, 9, 5, 6, 7, 8, 9, 5, 6])
    ref = greedy_reference(b.model, ids, 48, b.eos_ids)
    prof = CostProfile(num_layers=4, layer=[1.0 + 0.5 * k for k in range(9)], head=[2.0 + k for k in range(9)],
                       draft_head=0.1)
    dec = SelfSpeculativeDecoder(b.stack, heads, 4, b.eos_ids, profile=prof, context_lengths=(2, 7))
    assert dec.actions.n == 1 + 2 + 3 * 4 and dec.copy_max == 7
    for action, cap in ((0, 0), (1, 2), (2, 7)):
        out = dec.generate(ids, StaticPolicy(action), 48)
        assert out.tokens == ref
        lens = [r.draft_len for r in out.rounds]
        assert max(lens) == cap and all(r.exit_layer == 0 for r in out.rounds)
        for r in out.rounds:
            assert r.cost == pytest.approx((4 * prof.layer[r.n_verify - 1] + prof.head[r.n_verify - 1]) / 6.0)


def test_point_mass_proposals_keep_the_target_distribution():
    """A copied token d is accepted with probability p(d); on rejection the token is drawn from
    p without d: the first emitted token follows p (chi-square over 30,000 trials), for a likely
    and for an unlikely copied token."""
    g = torch.Generator().manual_seed(0)
    V = 8
    p = torch.softmax(torch.randn(2, V, generator=g) * 1.5, -1)
    P = p.double().numpy()
    P /= P.sum(1, keepdims=True)
    q_ids = torch.arange(4)
    for d in (int(p[0].argmax()), int(p[0].argmin())):
        counts = np.zeros(V)
        for _ in range(30_000):
            v = speculative_verify([d], [None], q_ids, p, g)
            counts[accept([d], v, remaining=10, eos_ids=()).emitted[0]] += 1
        from scipy.stats import chisquare

        assert chisquare(counts, P[0] * counts.sum()).pvalue > 1e-3


def test_decoder_sampling_with_context_drafts_matches_plain_sampling():
    """Tokens 2 and 3 of sampled generations from a repeated prompt have the same distribution
    with context drafts as under AR sampling (two-sample chi-square, 400 seeded runs each)."""
    from scipy.stats import chi2_contingency

    from lede_env.sampling import Sampling

    b = _model(3, 1)
    heads = ExitHeads(b.stack, (1, 2), "lens", draft_vocab=64)
    plain = SelfSpeculativeDecoder(b.stack, heads, 3, ())
    ctx = SelfSpeculativeDecoder(b.stack, heads, 3, (), context_draft=3, context_ngram=(1, 2))
    ids = torch.tensor([5, 9, 17, 5, 9, 17, 5])
    ar = [plain.generate(ids, StaticPolicy(0), 3, sampling=Sampling(1.0, 1.0, s)).tokens for s in range(400)]
    runs = [ctx.generate(ids, StaticPolicy(0), 3, sampling=Sampling(1.0, 1.0, 10_000 + s)) for s in range(400)]
    assert sum(r.drafted for r in runs) > 0
    for pos in (1, 2):
        a = np.bincount([t[pos] for t in ar], minlength=128)
        c = np.bincount([r.tokens[pos] for r in runs], minlength=128)
        keep = (a + c) >= 10
        table = np.stack([np.append(a[keep], a[~keep].sum()), np.append(c[keep], c[~keep].sum())])
        table = table[:, table.sum(0) > 0]
        assert chi2_contingency(table).pvalue > 1e-3


def test_context_features_and_their_running_acceptance():
    from lede_env.lookup import context_match
    from lede_env.mdp import ObservationBuilder, ObservationConfig, context_features

    def features(seq, context_draft):
        return context_features(context_match(seq, context_draft, (2, 3)), context_draft, 3)

    # (1, 2, 3) matched (3 of at most 3); after its earlier occurrence only 3 tokens follow (of 4)
    assert features([7, 1, 2, 3, 1, 2, 3], 4) == (1.0, 0.75, 0.0, 0.0, 0.0)
    assert features([1, 2, 3, 9, 8, 1, 2, 3], 4) == (1.0, 1.0, 0.0, 0.0, 0.0)
    assert features([1, 2, 3, 4], 4) == (0.0, 0.0, 0.0, 0.0, 0.0)
    assert features([5, 1, 2, 7, 1, 2], 0) == (2 / 3, 0.0, 0.0, 0.0, 0.0)  # a match, no drafts wanted
    ob = ObservationBuilder(ObservationConfig(kind="compact", context=True), 8, 2, 4, 4, 16, (1, 2))
    assert ("context", [3]) in ob.layout() and ob.space()["context"].shape == (3,)
    z = np.zeros(2, np.float32)
    o = ob.build(None, z, z, z, [1], 0.5, (1.0, 0.5))
    np.testing.assert_allclose(o["context"], [1.0, 0.5, 0.3])  # the prior
    hist = ob.new_history()
    hist.record(accepted=2, draft_len=2, exit_layer=0)  # a context draft, fully accepted
    after = float(ob.build(None, z, z, z, [1], 0.5, history=hist)["context"][2])
    assert after == pytest.approx(0.8 ** 2 * 0.3 + (1 - 0.8 ** 2) * 1.0)
    hist.record(accepted=0, draft_len=0, exit_layer=0)  # a plain AR step: no evidence
    assert float(ob.build(None, z, z, z, [1], 0.5, history=hist)["context"][2]) == pytest.approx(after)
    assert "context" not in ObservationBuilder(ObservationConfig(kind="compact"), 8, 2, 4, 4, 16, (1, 2)).space().spaces


def test_match_agreement_counts_occurrences_and_where_their_continuations_part():
    """Occurrences of the matched n-gram and the common prefix of what followed the copied one
    and the most recent other one, worked out by hand."""
    from lede_env.lookup import match_agreement
    from lede_env.mdp import ObservationBuilder, ObservationConfig, context_features

    # (1, 2) occurred at 0 and 4; max_len 4 copies from 4 (3, 5, 1, 2); the one at 0 went on 3, 4: 1 token agrees
    assert match_agreement([1, 2, 3, 4, 1, 2, 3, 5, 1, 2], 4, (2, 3)) == (2, 1)
    # (1, 2) at 0 and 3; max_len 2 copies from 3 (3, 1, 2 up to the end); from 0: 3, 1, 2, 3, 1, 2: all 3 agree
    assert match_agreement([1, 2, 3, 1, 2, 3, 1, 2], 2, (2, 2)) == (2, 3)
    assert match_agreement([1, 2, 3, 1, 2, 3, 1, 2], 2, (2, 2), depth=2) == (2, 2)
    assert match_agreement([7, 8, 9, 7, 8], 4, (2, 3)) == (1, 0)  # one occurrence: nothing to agree with
    assert match_agreement([1, 2, 3], 4, (2, 3)) == (0, 0)  # no match
    assert match_agreement([1], 4, (2, 3)) == (0, 0)
    with pytest.raises(ValueError):
        match_agreement([1, 2, 1, 2], -1)
    # features: (occurrences - 1, at most 3) / 3 and agreement / AGREE_DEPTH (8)
    assert context_features((2, [3, 5, 1, 2]), 4, 3, (2, 1)) == (2 / 3, 1.0, 1 / 3, 1 / 8, 0.0)
    assert context_features((3, [3]), 4, 3, (9, 8))[2:4] == (1.0, 1.0)
    ob = ObservationBuilder(ObservationConfig(kind="compact", context=True, context_agreement=True), 8, 2, 4, 4, 16,
                            (1, 2))
    assert ("context", [5]) in ob.layout() and ob.space()["context"].shape == (5,)
    z = np.zeros(2, np.float32)
    np.testing.assert_allclose(ob.build(None, z, z, z, [1], 0.5, (1.0, 0.5, 1 / 3, 0.25))["context"],
                               [1.0, 0.5, 0.3, 1 / 3, 0.25])


def test_match_span_extends_the_matched_ngram_backwards_while_the_texts_agree():
    """The span is the matched n-gram plus the tokens before it that agree with those before the
    copied occurrence, capped; its feature is span / SPAN_CAP, the last of the context key."""
    from lede_env.lookup import SPAN_CAP, match_span
    from lede_env.mdp import ObservationBuilder, ObservationConfig, context_features

    # "9 1 2 3" occurred before "4"; the text ends with "9 1 2 3": trigram 1 2 3 + 9 agree -> 4
    assert match_span([9, 1, 2, 3, 4, 5, 8, 9, 1, 2, 3], 2, (2, 3)) == ((3, [4, 5]), 4)
    # the token before the n-gram differs (7 vs 9): the span is the n-gram alone
    assert match_span([9, 1, 2, 3, 4, 5, 7, 1, 2, 3], 2, (2, 3)) == ((3, [4, 5]), 3)
    assert match_span([1, 2, 3], 2, (2, 3)) == ((0, []), 0)  # no match
    # a repeated block: the span runs back to the start of the copy, up to the cap
    block = list(range(10, 60))
    (n, toks), span = match_span(block + block[:45], 4, (2, 3))
    assert (n, toks, span) == (3, [55, 56, 57, 58], SPAN_CAP)
    assert match_span(block + block[:45], 4, (2, 3), cap=100)[1] == 45
    assert context_features((3, [4, 5]), 4, 3, span=4)[4] == 4 / SPAN_CAP
    assert context_features((3, [4, 5]), 4, 3, span=99)[4] == 1.0
    ob = ObservationBuilder(ObservationConfig(kind="compact", context=True, context_span=True), 8, 2, 4, 4, 16, (1, 2))
    assert ("context", [4]) in ob.layout()
    z = np.zeros(2, np.float32)
    np.testing.assert_allclose(ob.build(None, z, z, z, [1], 0.5, (1.0, 0.5, 0.0, 0.0, 0.25))["context"],
                               [1.0, 0.5, 0.3, 0.25])


def test_agent_folder_names(tmp_path):
    """``agent:PATH``, ``agent-unguarded:PATH`` and a bare folder name the same exported agent
    (Lede reads its exits, heads and context drafter from there); a named folder without one
    is an error, any other name is not an agent."""
    from lede_env.generate import _policy_name, agent_path

    (tmp_path / "policy.json").write_text("{}")
    for name in (f"agent:{tmp_path}", f"agent-unguarded:{tmp_path}", str(tmp_path)):
        assert agent_path(name) == tmp_path
    with pytest.raises(ValueError, match="policy.json missing"):
        agent_path(f"agent-unguarded:{tmp_path / 'nothing'}")
    assert agent_path("static:2,1") is None
    # the name that builds the policy: a bare folder is the guarded agent, a prefix is kept
    assert _policy_name(str(tmp_path)) == f"agent:{tmp_path}"
    assert _policy_name(f"agent-unguarded:{tmp_path}") == f"agent-unguarded:{tmp_path}"
    assert _policy_name("del") == "del"


@settings(max_examples=200, deadline=None)
@given(seq=st.lists(st.integers(0, 5), min_size=0, max_size=60), cuts=st.lists(st.integers(1, 60), max_size=4),
       max_len=st.integers(0, 9), lo=st.integers(1, 3), extra=st.integers(0, 2))
def test_the_context_index_matches_like_context_match_as_the_sequence_grows(seq, cuts, max_len, lo, extra):
    """Grown token by token, chunk by chunk, and cut shorter (stop strings), the index proposes
    exactly what a scan of the whole sequence does."""
    from lede_env.lookup import (ContextIndex, context_match, match_agreement, match_and_agreement, match_details,
                                 match_span)

    ngram = (lo, lo + extra)
    index = ContextIndex(ngram)
    for end in sorted(set(cuts + [len(seq)])) + [len(seq) // 2, len(seq)]:  # the last two: a cut, then regrowth
        part = seq[:end]
        assert index.match(part, max_len) == context_match(part, max_len, ngram)
        assert index.agreement(part, max_len) == match_agreement(part, max_len, ngram)
        both = (context_match(part, max_len, ngram), match_agreement(part, max_len, ngram))
        assert index.match_and_agreement(part, max_len) == match_and_agreement(part, max_len, ngram) == both
        assert index.match_and_span(part, max_len) == match_span(part, max_len, ngram)
        assert index.details(part, max_len) == match_details(part, max_len, ngram)
        assert match_span(part, max_len, ngram)[0] == context_match(part, max_len, ngram)
    with pytest.raises(ValueError):
        index.match(seq, -1)
    with pytest.raises(ValueError):
        index.agreement(seq, -1)
