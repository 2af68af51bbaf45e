"""The token tree a tree action verifies: one recipe for trace replay, the live env and the decoder.

A tree action (:attr:`lede_env.mdp.ActionMap.tree_budgets`) drafts a :class:`TokenTree` of the
most frequent continuations of the text so far (SuffixDecoding, arXiv 2411.04975) from two suffix
indexes (:mod:`lede_env.suffix_index`): one over the generation's own sequence (prompt and
generated tokens, pending token last; extended as tokens are emitted) and one over the model's
datastore (memoised per datastore). The single copy draft that a context action would make
(prompt lookup, then the datastore: :func:`lede_env.datastore.with_datastore`) is the tree's first
branch, so a tree never loses the copy's tokens. The tree follows from the text alone, so a trace
replays it exactly.

This module holds data and pure functions only (and the datastore index memo).
"""

from __future__ import annotations

from typing import Optional, Sequence

from .datastore import NgramDatastore, with_datastore
from .lookup import DEFAULT_NGRAM, context_match
from .suffix_index import SuffixIndex, TokenTree, draft_tree

_DATASTORE_INDEX: dict[str, SuffixIndex] = {}


def datastore_index(datastore: NgramDatastore) -> SuffixIndex:
    """The suffix index of ``datastore``'s sequences (one document each), built once per process
    and datastore fingerprint (0.25-0.33 s for the embedded model's 122k tokens)."""
    key = datastore.fingerprint()
    if key not in _DATASTORE_INDEX:
        _DATASTORE_INDEX[key] = SuffixIndex.of_documents(datastore.sequences)
    return _DATASTORE_INDEX[key]


def seed_length(budget: int, depth: int) -> int:
    """Tokens of the copy draft that seeds a tree of ``budget`` nodes and ``depth`` levels:
    half the budget (at least 1), at most ``depth``."""
    return min(depth, max(1, budget // 2))


def round_tree(context: SuffixIndex, seq: Sequence[int], budget: int, depth: int,
               datastore: Optional[NgramDatastore] = None, ngram: tuple[int, int] = DEFAULT_NGRAM) -> TokenTree:
    """The token tree of a tree action's round.

    Args:
        context: the suffix index of ``seq`` (the generation's prompt and generated tokens).
        seq: prompt and generated token ids, the pending token (the tree's root) last.
        budget: most nodes (the action's tree budget; 0: an empty tree).
        depth: longest branch (tokens; :meth:`lede_env.rules.RoundRules.plan_tree` clamps it to the
            token budget; 0: an empty tree).
        datastore: the model's datastore (its index joins the context's; its drafts seed the tree
            where the context has no match), or ``None``.
        ngram: (shortest, longest) suffix lengths of the seeding copy draft's context match.

    Returns:
        A :class:`~lede_env.suffix_index.TokenTree` of at most ``budget`` nodes and ``depth``
        levels whose first branch is the copy draft of :func:`seed_length` tokens.
    """
    if budget <= 0 or depth <= 0:
        return TokenTree.empty()
    n = seed_length(budget, depth)
    copy = with_datastore(context_match(seq, n, ngram), seq, n, datastore)[1]
    indexes = [context] if datastore is None else [context, datastore_index(datastore)]
    return draft_tree(indexes, seq, budget, depth, seed=copy)


__all__ = ["datastore_index", "round_tree", "seed_length"]
