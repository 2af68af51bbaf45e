"""Token-tree rounds in the real decoder (issue 37 part 3): the tree accept rule, lossless output for
any tree and any action sequence, the KV cache after compaction, observations after a tree round,
and speculative sampling over a tree."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy.stats import chi2_contingency, chisquare

from lede_env.datastore import NgramDatastore
from lede_env.decoding import (Sampling, SelfSpeculativeDecoder, SequencePolicy, StaticPolicy, TreeDraft,
                               greedy_reference)
from lede_env.exits import ExitHeads
from lede_env.mdp import accept_tree, tree_branch
from lede_env.sampling import speculative_tree_verify
from lede_env.suffix_index import TokenTree

from ..conftest import make_tiny

MODELS: dict = {}


def model(num_layers=4, seed=0):
    if (num_layers, seed) not in MODELS:
        MODELS[num_layers, seed] = make_tiny(num_layers=num_layers, seed=seed)
    return MODELS[num_layers, seed]


def make_tree(tokens, parents) -> TokenTree:
    """A :class:`TokenTree` of the given nodes (parents before children)."""
    depth = []
    for p in parents:
        depth.append(1 if p < 0 else depth[p] + 1)
    z = torch.tensor(tokens, dtype=torch.int64)
    return TokenTree(z, torch.tensor(parents, dtype=torch.int64), torch.tensor(depth, dtype=torch.int64),
                     torch.ones_like(z), torch.ones(len(tokens), dtype=torch.float64))


def random_tree(data, budget, depth, greedy, vocab=range(3, 12)) -> TokenTree:
    """A hypothesis-drawn tree of at most ``budget`` nodes and ``depth`` levels; it holds the first
    ``g`` tokens of ``greedy`` (the continuation greedy decoding gives) as one branch, ``g``
    drawn (0: none), its nodes interleaved in any order with random ones over ``vocab``."""
    g = data.draw(st.integers(0, min(depth, budget, len(greedy))))
    tokens, parents, depths, seen, chain = [], [], [], set(), []
    for _ in range(4 * budget):
        if len(tokens) == budget:
            break
        if len(chain) < g and data.draw(st.booleans()):
            p, t = (chain[-1] if chain else -1), greedy[len(chain)]
            chain.append(len(tokens))
        elif data.draw(st.integers(0, 3)) == 0:
            break
        else:
            p = data.draw(st.integers(-1, len(tokens) - 1))
            t = data.draw(st.sampled_from(list(vocab) + list(greedy[:depth])))
            if (p >= 0 and depths[p] >= depth) or (p, t) in seen:
                continue
        if (p, t) in seen:  # (a random node took the greedy token's place: the greedy branch goes on there)
            chain[-1] = next(i for i in range(len(tokens)) if (parents[i], tokens[i]) == (p, t))
            continue
        seen.add((p, t))
        tokens.append(int(t))
        parents.append(p)
        depths.append(1 if p < 0 else depths[p] + 1)
    return make_tree(tokens, parents)


class DrawnTrees(TreeDraft):
    """Proposes hypothesis-drawn trees (:func:`random_tree`) that may or may not hold the greedy
    continuation ``reference`` (the tokens the generation will emit)."""

    def __init__(self, decoder, data, reference):
        super().__init__(decoder)
        self.data, self.reference = data, reference

    def tree(self, state, budget, depth):
        done = len(state.result.tokens)
        return random_tree(self.data, budget, depth, self.reference[done:])


# ---- the accept rule ------------------------------------------------------------------------
# root children 10 (node 0) and 20 (node 1); 10 -> 11 (node 2) -> 12 (node 3); 20 -> 21 (node 4)
TOKENS, PARENTS = [10, 20, 11, 12, 21], [-1, -1, 0, 2, 1]


def test_tree_accept_rule_on_hand_made_cases():
    # verifier rows: root, node 0 .. node 4
    oc, branch = accept_tree(TOKENS, PARENTS, [10, 11, 5, 12, 9, 7], 100, ())
    assert (oc.emitted, oc.accepted, oc.draft_len, oc.n_verify, oc.advance, oc.done, oc.eos, branch) == \
        ([10, 11, 12, 9], 3, 5, 6, 4, False, False, [0, 2, 3])
    oc, branch = accept_tree(TOKENS, PARENTS, [20, 0, 21, 0, 0, 3], 100, ())  # the second branch
    assert (oc.emitted, oc.accepted, oc.advance, branch) == ([20, 21, 3], 2, 3, [1, 4])
    oc, branch = accept_tree(TOKENS, PARENTS, [99, 11, 0, 12, 9, 7], 100, ())  # no child of the root
    assert (oc.emitted, oc.accepted, oc.advance, branch) == ([99], 0, 1, [])
    oc, _ = accept_tree(TOKENS, PARENTS, [10, 11, 5, 12, 9, 7], 100, (11,))  # an EOS inside the branch
    assert (oc.emitted, oc.accepted, oc.advance, oc.done, oc.eos) == ([10, 11], 2, 4, True, True)
    oc, _ = accept_tree(TOKENS, PARENTS, [10, 11, 5, 12, 9, 7], 100, (9,))  # the verifier's token is EOS
    assert (oc.emitted, oc.accepted, oc.done, oc.eos) == ([10, 11, 12, 9], 3, True, True)
    oc, _ = accept_tree(TOKENS, PARENTS, [10, 11, 5, 12, 9, 7], 2, ())  # the budget ends the round
    assert (oc.emitted, oc.accepted, oc.advance, oc.done, oc.eos) == ([10, 11], 2, 4, True, False)
    oc, _ = accept_tree(TOKENS, PARENTS, [10, 11, 5, 12, 9, 7], 4, ())  # exactly the budget
    assert (oc.emitted, oc.done) == ([10, 11, 12, 9], True)
    oc, branch = accept_tree([], [], [7], 5, ())  # an empty tree: an AR step
    assert (oc.emitted, oc.accepted, oc.draft_len, oc.n_verify, oc.advance, branch) == ([7], 0, 0, 1, 1, [])
    with pytest.raises(ValueError, match="n \\+ 1 verifier"):
        tree_branch(TOKENS, PARENTS, [10, 11])


# ---- lossless: any tree, any action sequence ---------------------------------------------------
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(num_layers=st.sampled_from([2, 3, 4]), seed=st.integers(0, 2),
       prompt=st.lists(st.integers(3, 12), min_size=1, max_size=12),
       actions=st.lists(st.integers(0, 10_000), min_size=1, max_size=30),
       budgets=st.sampled_from([(1,), (3, 8), (2, 5, 16)]), depth=st.integers(1, 6), bonus=st.booleans(),
       max_new=st.integers(1, 24), drawn=st.booleans(), store=st.booleans(), data=st.data())
def test_output_equals_greedy_for_any_tree_and_action_sequence(num_layers, seed, prompt, actions, budgets, depth,
                                                               bonus, max_new, drawn, store, data):
    """Tree rounds (drawn trees, or the decoder's own from its suffix index and, with ``store``, a
    datastore holding the greedy text) mixed with AR, copy and exit rounds give greedy decoding's
    tokens, and their records count what the tree verified."""
    b = model(num_layers, seed)
    heads = ExitHeads(b.stack, tuple(range(1, b.stack.num_layers)))
    ids = torch.tensor(prompt)
    ref = greedy_reference(b.model, ids, max_new, b.eos_ids)
    datastore = NgramDatastore([prompt + ref], ngram=(1, 3), min_count=1) if store else None
    dec = SelfSpeculativeDecoder(b.stack, heads, 3, b.eos_ids, bonus, context_lengths=(2,), tree_budgets=budgets,
                                 tree_depth=depth, context_datastore=datastore)
    if drawn:
        dec.drafters["tree"] = DrawnTrees(dec, data, ref)
    first, last = dec.actions.first_tree_action, dec.actions.first_exit_action
    acts = [a % dec.actions.n if a % 3 == 0 else first + a % (last - first) for a in actions]  # 2/3 tree actions
    out = dec.generate(ids, SequencePolicy(acts), max_new)
    assert out.tokens == ref
    for r in out.rounds:
        if r.tree:
            assert r.exit_layer == 0 and r.n_verify == r.draft_len + 1 and r.draft_len <= budgets[-1]
            assert r.accepted <= r.draft_len and r.accepted <= r.emitted <= r.accepted + 1
    assert sum(r.emitted for r in out.rounds) + 1 == len(out.tokens)


def test_tree_rounds_accept_several_branches_deep():
    """The decoder's own trees (suffix index over a repetitive prompt) have several nodes and accept
    tokens, so the law above is not vacuous; the output is greedy."""
    b = model(4, 0)
    dec = SelfSpeculativeDecoder(b.stack, ExitHeads(b.stack, (1, 2, 3)), 4, b.eos_ids, tree_budgets=(8,))
    ids = torch.tensor([5, 6, 7, 8, 9, 5, 6, 7, 3, 5, 6, 4, 8, 9, 5])
    out = dec.generate(ids, StaticPolicy(dec.actions.encode_tree(8)), 24)
    assert out.tokens == greedy_reference(b.model, ids, 24, b.eos_ids)
    assert all(r.tree for r in out.rounds) and max(r.draft_len for r in out.rounds) > 1
    assert sum(r.accepted for r in out.rounds) > 0


# ---- the cache after compaction, and the observation there ---------------------------------------
def _fresh(stack, tokens):
    """KV cache and final normed hiddens [n, d] of a fresh prefill of ``tokens``, taps per layer."""
    cache = stack.new_cache()
    h = stack.embed(torch.tensor([tokens]))
    outs = [h]
    for layer in range(stack.num_layers):
        h = stack.run(h, layer, layer + 1, cache, 0)
        outs.append(h)
    return cache, stack.norm(h[0]), outs


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2), prompt=st.lists(st.integers(3, 12), min_size=1, max_size=10),
       rounds=st.integers(1, 3), budget=st.sampled_from([4, 9]), data=st.data())
def test_cache_after_a_tree_round_equals_a_fresh_prefill(seed, prompt, rounds, budget, data):
    """After tree rounds (drawn trees, greedy branch or not), every layer's keys and values, the
    final normed hidden and the observed exits' hiddens at the last position equal a fresh
    prefill of the accepted text (float32, atol 1e-5)."""
    b = model(4, seed)
    heads = ExitHeads(b.stack, (1, 2, 3))
    dec = SelfSpeculativeDecoder(b.stack, heads, 4, b.eos_ids, tree_budgets=(budget,), tree_depth=4)
    ids = torch.tensor(prompt)
    ref = greedy_reference(b.model, ids, 30, b.eos_ids)
    dec.drafters["tree"] = DrawnTrees(dec, data, ref)
    with torch.no_grad(), b.stack.kernels_active():
        state = dec.start(ids, 30, want_obs=True)
        for _ in range(rounds):
            if state.done:
                break
            dec.play_round(state, dec.actions.encode_tree(budget))
        cache, normed, outs = _fresh(b.stack, state.seq[:-1])
    assert state.seq[len(prompt):] == ref[: len(state.seq) - len(prompt)]
    for got, want in zip(state.cache.layers, cache.layers):
        assert got.get_seq_length() == want.get_seq_length() == state.pos
        torch.testing.assert_close(got.keys, want.keys, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got.values, want.values, atol=1e-5, rtol=1e-5)
    if not state.done:  # (at the end the state keeps the row of the last emitted token's prediction)
        torch.testing.assert_close(state.normed_last, normed[-1], atol=1e-5, rtol=1e-5)
        for e, t in state.taps_at.items():
            torch.testing.assert_close(t, outs[e][0, -1], atol=1e-5, rtol=1e-5)
        assert dec.observe(state) is not None


def test_compact_keeps_the_given_offsets_in_order():
    b = model(2, 0)
    st_ = b.stack
    with torch.no_grad():
        cache = st_.new_cache()
        st_.run(st_.embed(torch.tensor([[3, 4, 5, 6, 7, 8]])), 0, st_.num_layers, cache, 0)
        before = [layer.keys.clone() for layer in cache.layers]
        st_.compact(cache, 2, [0, 2, 3])
    for k0, layer in zip(before, cache.layers):
        assert layer.get_seq_length() == 5
        assert torch.equal(layer.keys, k0[..., [0, 1, 2, 4, 5], :])
    with pytest.raises(ValueError, match="increasing"):
        st_.compact(cache, 1, [2, 1])
    with pytest.raises(ValueError, match="past a layer's 5 cached"):
        st_.compact(cache, 2, [0, 3])


def test_a_tree_round_on_sliding_window_models_is_greedy():
    """Tree masks follow the layers' sliding windows (positions past the window are not seen)."""
    from .test_model_families import bundle as family_bundle

    for family in ("mistral-window", "qwen2-window"):
        b = family_bundle(family)
        dec = SelfSpeculativeDecoder(b.stack, ExitHeads(b.stack, (1, 2, 3)), 4, b.eos_ids, tree_budgets=(6,))
        ids = torch.tensor([5, 6, 7, 8, 9, 5, 6, 7, 3, 5, 6, 4, 8, 9, 5, 6, 7, 8])
        out = dec.generate(ids, SequencePolicy([1, 0, 1, 3, 1] * 10), 30)
        assert out.tokens == greedy_reference(b.model, ids, 30, b.eos_ids), family


# ---- speculative sampling over a tree -------------------------------------------------------------
def test_speculative_tree_verify_emits_tokens_distributed_as_p():
    """Over 30,000 trials of the tree above (V = 24): the first emitted token follows p at the
    root and, when it is node 0's token (10), the second follows p at node 0 (chi-square)."""
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(6, 24, generator=g) * 1.5, -1)
    p[0, [10, 20]] += 0.3  # the root's children are likely
    p[0] /= p[0].sum()
    first, second = np.zeros(24), np.zeros(24)
    for _ in range(30_000):
        v = speculative_tree_verify(TOKENS, PARENTS, p, g)
        oc, branch = accept_tree(TOKENS, PARENTS, v, 100, ())
        first[oc.emitted[0]] += 1
        if oc.emitted[0] == 10:
            second[oc.emitted[1]] += 1
    for obs, want in ((first, p[0]), (second, p[1])):
        want = want.double().numpy()
        assert chisquare(obs, want / want.sum() * obs.sum()).pvalue > 1e-3
    with pytest.raises(ValueError, match="rows"):
        speculative_tree_verify(TOKENS, PARENTS, p[:3], g)


def test_decoder_tree_sampling_matches_plain_sampling():
    """Tokens 2 and 3 (the first tree round's), have the distribution of AR sampling (two-sample
    chi-square over 400 seeded generations each); the trees hold the likely continuations (drawn
    from the model's own top tokens), so tree branches are accepted often."""
    b = model(3, 1)
    dec = SelfSpeculativeDecoder(b.stack, ExitHeads(b.stack, (1, 2), "lens", draft_vocab=64), 3, (),
                                 tree_budgets=(6,), tree_depth=2)
    prompt = [5, 9, 17]

    def top(seq, k):
        return b.model(torch.tensor([seq])).logits[0, -1].topk(k).indices.tolist()

    class TopTrees(TreeDraft):  # the model's 3 most likely next tokens, and 2 after the likeliest
        def tree(self, state, budget, depth):
            first = top(state.seq, 3)
            second = top(state.seq + first[:1], 2) if depth >= 2 else []
            return make_tree(first + second, [-1, -1, -1] + [0] * len(second))

    dec.drafters["tree"] = TopTrees(dec)
    tree_action = dec.actions.encode_tree(6)
    ar = [dec.generate(torch.tensor(prompt), StaticPolicy(0), 4, sampling=Sampling(0.9, 1.0, s)).tokens
          for s in range(400)]
    tr = [dec.generate(torch.tensor(prompt), StaticPolicy(tree_action), 4, sampling=Sampling(0.9, 1.0, 10_000 + s))
          for s in range(400)]
    assert sum(r.accepted for out in tr for r in out.rounds) > 50
    tr = [out.tokens for out in tr]
    for pos in (1, 2):
        a = np.bincount([t[pos] for t in ar], minlength=128)
        c = np.bincount([t[pos] for t in tr], minlength=128)
        keep = (a + c) >= 10
        table = np.stack([np.append(a[keep], a[~keep].sum()), np.append(c[keep], c[~keep].sum())])
        table = table[:, table.sum(0) > 0]
        assert chi2_contingency(table).pvalue > 1e-3


# ---- the live env -------------------------------------------------------------------------------
def test_live_env_plays_tree_actions_losslessly(tiny):
    """``LEDE-Llama3-Live-v0`` with tree budgets: the action space holds the tree actions, its
    decoder plays the config's tree depth, tree rounds are charged as verifies of nodes + 1
    positions, and the episode's tokens are greedy decoding's."""
    from lede_env.env import LEDEEnv

    b, heads, ts, prof = tiny
    env = LEDEEnv.with_objects(backend="live", bundle=b, heads=heads, prompts=[t.prompt.tolist() for t in ts.traces],
                               progress=False, k_max=4, max_new_tokens=24, profile=prof, context_lengths=(2,),
                               tree_budgets=(4, 8), tree_depth=3)
    acts = env.unwrapped.actions
    assert (acts.tree_budgets, env.unwrapped.decoder.rules.tree_depth) == ((4, 8), 3)
    assert env.action_space.n == acts.n == 1 + 1 + 2 + 3 * 4
    for idx in range(2):
        env.reset(seed=idx, options={"prompt_index": idx})
        done, t = False, 0
        while not done:
            a = [acts.encode_tree(8), 0, acts.encode_tree(4), 1, acts.encode(2, 2)][t % 5]
            _, _, te, tr, info = env.step(a)
            rnd, done, t = info["round"], te or tr, t + 1
            if acts.tree_budget(a):
                assert rnd["n_verify"] == rnd["draft_len"] + 1 and rnd["exit_layer"] == 0
                assert rnd["cost"] == pytest.approx(prof.round_cost(0, rnd["draft_len"], rnd["n_verify"], tree=True))
        prompt = torch.tensor(ts.traces[idx].prompt.tolist())
        assert env.unwrapped.generated == greedy_reference(b.model, prompt, 24, b.eos_ids)


# ---- costs ----------------------------------------------------------------------------------------
def test_tree_verify_is_timed_and_charged_as_a_copy_verify(tiny):
    """``measure_tree_verify`` times both passes per node count (and leaves a consistent cache);
    a profile charges a tree of n nodes as a copy verify of n + 1 positions."""
    from lede_env.costs import heap_tree, measure_tree_verify

    b, heads, ts, prof = tiny
    t = heap_tree(5)
    assert t.parents.tolist() == [-1, -1, 0, 0, 1] and t.depth.tolist() == [1, 1, 2, 2, 2]
    times = measure_tree_verify(b.stack, (2, 5), context=16, repeats=2)
    assert set(times) == {2, 5} and all(v[k] > 0 for v in times.values() for k in ("copy", "tree", "tree_median"))
    for n in (0, 3, 8):
        assert prof.round_cost(0, n, n + 1, tree=True) == prof.round_cost(0, n, n + 1)
