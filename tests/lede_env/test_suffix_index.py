"""The suffix index: exact continuations and counts against brute force, incremental
extension equal to a build from scratch, token trees consistent with their parents and budget."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lede_env.suffix_index import SuffixIndex, TokenTree, draft_tree

tokens = st.lists(st.integers(0, 3), max_size=24)
documents = st.lists(tokens, min_size=1, max_size=4)


def brute_count(docs, pattern) -> int:
    n = len(pattern)
    return sum(1 for d in docs for i in range(len(d) - n + 1) if list(d[i:i + n]) == list(pattern))


def brute_match(docs, context, max_match):
    """Longest suffix of context (<= max_match) that occurs followed by a token in a document."""
    for n in range(min(len(context), max_match), 0, -1):
        suf = list(context[len(context) - n:])
        if any(list(d[i:i + n]) == suf for d in docs for i in range(len(d) - n)):
            return n
    return 0


def brute_continuations(docs, prefix, depth):
    out = {}
    for d in docs:
        for i in range(len(d) - len(prefix) + 1):
            if list(d[i:i + len(prefix)]) == list(prefix):
                for k in range(1, depth + 1):
                    if i + len(prefix) + k <= len(d):
                        key = tuple(d[i + len(prefix): i + len(prefix) + k])
                        out[key] = out.get(key, 0) + 1
    return out


@settings(max_examples=150, deadline=None)
@given(documents, st.lists(st.integers(0, 3), max_size=5))
def test_counts_are_exact(docs, pattern):
    idx = SuffixIndex.of_documents(docs)
    assert idx.count(pattern) == (brute_count(docs, pattern) if pattern else sum(map(len, docs)))
    assert idx.tokens == sum(map(len, docs)) and idx.states <= 2 * idx.tokens + 1


@settings(max_examples=150, deadline=None)
@given(documents, tokens, st.integers(1, 6))
def test_match_and_continuations_are_exactly_the_texts(docs, context, max_match):
    idx = SuffixIndex.of_documents(docs, max_match=max_match)
    length, state = idx.match(context)
    assert length == brute_match(docs, context, max_match)
    suffix = context[len(context) - length:] if length else []
    assert idx.continuations(state, 3) == brute_continuations(docs, suffix, 3)


@settings(max_examples=150, deadline=None)
@given(documents, st.data())
def test_incremental_extension_equals_a_build_from_scratch(docs, data):
    inc = SuffixIndex()
    for d in docs:
        cut = data.draw(st.integers(0, len(d)))
        inc.add_document(d[:cut])
        for t in d[cut:]:
            inc.extend(t)
    scratch = SuffixIndex.of_documents(docs)
    assert inc.states == scratch.states and inc.tokens == scratch.tokens
    for _ in range(10):
        pattern = data.draw(st.lists(st.integers(0, 3), min_size=1, max_size=4))
        assert inc.count(pattern) == scratch.count(pattern) == brute_count(docs, pattern)
    context = data.draw(tokens)
    assert inc.match(context)[0] == scratch.match(context)[0]
    a, b = inc.tree(context, 8, 4), scratch.tree(context, 8, 4)
    for x, y in zip((a.tokens, a.parents, a.counts, a.scores), (b.tokens, b.parents, b.counts, b.scores)):
        assert torch.equal(x, y)


def test_single_document_extension_keeps_the_context_match():
    text = [5, 1, 2, 3, 9, 7, 1, 2, 3]
    idx = SuffixIndex(text[:4])
    for t in text[4:]:
        idx.extend(t)
    assert idx.match(text) == (3, idx.match(text)[1])  # "1 2 3" occurred before, followed by 9
    assert idx.continuations(idx.match(text)[1], 2) == {(9,): 1, (9, 7): 1}
    assert idx.count([1, 2, 3]) == 2 and idx.count([3, 1]) == 0


def check_tree(tree: TokenTree, budget: int, max_depth: int) -> None:
    n = len(tree)
    assert n <= budget
    for x in (tree.tokens, tree.parents, tree.depth, tree.counts):
        assert x.dtype == torch.int64 and x.shape == (n,)
    par, dep = tree.parents.tolist(), tree.depth.tolist()
    for i, p in enumerate(par):
        assert -1 <= p < i  # parents come first
        assert dep[i] == (1 if p < 0 else dep[p] + 1) <= max_depth
        if p >= 0:
            assert tree.scores[i] <= tree.scores[p] + 1e-12 and tree.counts[i] <= tree.counts[p]
    sibs = list(zip(par, tree.tokens.tolist()))
    assert len(set(sibs)) == n  # distinct tokens among siblings
    mask = tree.attention_mask()
    assert mask.shape == (n, n) and mask.dtype == torch.bool
    for i in range(n):
        anc, j = {i}, par[i]
        while j >= 0:
            anc.add(j)
            j = par[j]
        assert set(torch.nonzero(mask[i]).flatten().tolist()) == anc
        assert mask[i].sum() == dep[i]
    assert torch.equal(tree.positions(7), tree.depth + 7)


@settings(max_examples=150, deadline=None)
@given(documents, tokens, st.integers(0, 12), st.integers(1, 5))
def test_tree_is_consistent_and_within_budget(docs, context, budget, max_depth):
    idx = SuffixIndex.of_documents(docs)
    tree = idx.tree(context, budget, max_depth)
    check_tree(tree, budget, max_depth)
    length, state = idx.match(context)
    suffix = context[len(context) - length:] if length else []
    conts = brute_continuations(docs, suffix, max_depth) if length else {}
    for i in range(len(tree)):  # every node is a continuation, with its exact count
        assert conts[tuple(tree.path(i))] == int(tree.counts[i])
    if budget >= len(conts):  # a budget for everything: the tree holds every continuation
        assert len(tree) == len(conts)


@settings(max_examples=100, deadline=None)
@given(documents, tokens, tokens, st.integers(0, 12), st.lists(st.integers(0, 3), max_size=4))
def test_tree_over_two_indexes(docs, prompt, context, budget, seed):
    ctx_index = SuffixIndex(prompt + context)
    store = SuffixIndex.of_documents(docs)
    text = prompt + context
    tree = draft_tree([ctx_index, store], text, budget, 4, seed=seed)
    check_tree(tree, budget, 4)
    seeded = seed[: min(budget, 4)]
    assert tree.tokens[: len(seeded)].tolist() == seeded  # the seed branch comes first
    # counts add up over the indexes that hold the path
    for i in range(len(seeded), len(tree)):
        path = tree.path(i)
        c = 0
        for idx in (ctx_index, store):
            length, _ = idx.match(text)
            if length >= 1:
                c += idx.count(list(text[len(text) - length:]) + path)
        assert c == int(tree.counts[i]) > 0


def test_accepted_branch_and_errors():
    idx = SuffixIndex([1, 2, 3, 1, 2, 4, 1, 2, 3, 5, 1, 2])
    tree = idx.tree([9, 1, 2], 8, 4)
    assert tree.tokens[0] == 3 and tree.counts[0] == 2  # "1 2" went on with 3 twice, 4 once
    best = tree.accepted([3, 5, 0])
    assert tree.path(best[-1]) == [3, 5]
    assert tree.accepted([7]) == [] and len(TokenTree.empty()) == 0
    assert TokenTree.empty().attention_mask().shape == (0, 0)
    with pytest.raises(ValueError):
        draft_tree([idx], [1], -1)
    with pytest.raises(ValueError):
        SuffixIndex(max_match=0)


def test_tree_actions_sit_between_context_and_exit_actions():
    from lede_env.mdp import ActionMap
    from lede_env.rules import RoundRules

    m = ActionMap((2, 4), 3, (1, 4), (4, 8))
    assert m.n == 1 + 2 + 2 + 2 * 3
    assert [m.tree_budget(a) for a in range(m.n)] == [0, 0, 0, 4, 8, 0, 0, 0, 0, 0, 0]
    assert m.encode_tree(8) == 4 and m.decode(4) == (0, 0)
    assert m.decode(m.first_exit_action) == (2, 1) and m.encode(4, 3) == m.n - 1
    rules = RoundRules(m, None, tree_depth=6)
    assert rules.plan_tree(3, remaining=100) == (4, 6)
    assert rules.plan_tree(3, remaining=3) == (4, 2)  # (bonus: the verifier's token needs room)
    assert rules.plan_tree(3, remaining=1) == (0, 0) and rules.plan_tree(5, remaining=100) == (0, 0)


def test_round_tree_starts_with_the_copy_draft_and_keeps_its_budget():
    from lede_env.suffix_index import SuffixIndex
    from lede_env.trees import round_tree

    seq = [1, 2, 3, 4, 1, 2, 5, 6, 1, 2]  # "1 2" was followed by 3 and by 5; the latest copy is 5 6
    tree = round_tree(SuffixIndex(seq), seq, budget=4, depth=3)
    assert len(tree) <= 4 and int(tree.depth.max()) <= 3
    assert tree.path(2) == [5, 6, 1]  # the copy draft of seed_length(4, 3) = 3 tokens is the first branch
    assert {tuple(tree.path(i)) for i in range(len(tree))} >= {(3,), (5,), (5, 6)}
    assert len(round_tree(SuffixIndex(seq), seq, budget=0, depth=3)) == 0
