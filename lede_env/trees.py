"""The token tree a tree action verifies: one recipe for trace replay, the live env and the decoder.

A tree action (:attr:`lede_env.mdp.ActionMap.tree_budgets`) drafts a :class:`TokenTree` of the
most frequent continuations of the text so far (SuffixDecoding, arXiv 2411.04975) from two suffix
indexes (:mod:`lede_env.suffix_index`): one over the generation's own sequence (prompt and
generated tokens, pending token last; extended as tokens are emitted) and one over the model's
datastore (memoised per datastore). The single copy draft that a context action would make
(prompt lookup, then the datastore: :func:`lede_env.datastore.with_datastore`) is the tree's first
branch, so a tree never loses the copy's tokens. The tree follows from the text alone, so a trace
replays it exactly.

A round's tree may be pruned by :class:`TreePrune` (the static tree rule, a round-rules setting:
:attr:`lede_env.rules.RoundRules.tree_prune`): of the grown tree it keeps the prefix, in node
order, whose expected tokens pay for its verification cost under the cost profile.

This module holds data and pure functions only (and the datastore index memo).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from .datastore import NgramDatastore, with_datastore
from .lookup import DEFAULT_NGRAM, context_match
from .suffix_index import SuffixIndex, TokenTree, draft_tree

#: bumped whenever :func:`round_tree` builds another tree from the same text (cache keys, e.g. the
#: best-static search's: :func:`lede_env.trace_env.static_search_key`)
TREE_RECIPE_VERSION = 2  # 2: the copy seeds all but one node of the budget (1: half)

_DATASTORE_INDEX: dict[str, SuffixIndex] = {}
#: the index of a datastore object already seen (``id -> (datastore, index)``; the datastore is kept
#: so that its id is never reused): its fingerprint hashes every token, milliseconds a round
_SEEN: dict[int, tuple[NgramDatastore, SuffixIndex]] = {}


def datastore_index(datastore: NgramDatastore) -> SuffixIndex:
    """The suffix index of ``datastore``'s sequences (one document each), built once per process
    and datastore fingerprint (0.25-0.33 s for the embedded model's 122k tokens); a datastore
    object seen before is found by identity (a datastore does not change once built)."""
    seen = _SEEN.get(id(datastore))
    if seen is not None and seen[0] is datastore:
        return seen[1]
    key = datastore.fingerprint()
    if key not in _DATASTORE_INDEX:
        _DATASTORE_INDEX[key] = SuffixIndex.of_documents(datastore.sequences)
    _SEEN[id(datastore)] = (datastore, _DATASTORE_INDEX[key])
    return _DATASTORE_INDEX[key]


def seed_length(budget: int, depth: int) -> int:
    """Tokens of the copy draft that seeds a tree of ``budget`` nodes and ``depth`` levels:
    all but one node of the budget (at least 1), at most ``depth``. (Half the budget gave 1 %
    less throughput to a tree of 4 nodes, on the training and the held-out traces alike:
    ``docs/experiments.md``, "Token trees from a suffix index".)"""
    return min(depth, max(1, budget - 1))


@dataclass(frozen=True)
class TreePrune:
    """The static tree rule: keep the prefix of a round's tree that maximises expected tokens
    minus ``lam`` x its cost (SuffixDecoding's speculation size adapted to the match's
    probabilities, arXiv 2411.04975 section 3; the per-round criterion of Dinkelbach's method for
    a throughput objective, as :class:`lede_env.stopping.CalibratedStop` applies to exit drafts).

    A tree's nodes are in insertion order (the seeding copy first, then best-first by score), so
    every prefix is a tree. Siblings hold distinct tokens, so the accepted branch's length is the
    number of nodes whose path is a prefix of the continuation: a round verifying the first ``n``
    nodes emits, in expectation, ``1 + sum(scores[:n])`` tokens (scores taken as the paths'
    probabilities) and costs ``costs[n]``. The rule keeps the ``n`` maximising
    ``1 + sum(scores[:n]) - lam * costs[n]`` (the smallest such ``n``), which adds a node while
    its score pays for the marginal verified position ``lam * (costs[n + 1] - costs[n])``, and
    also sees past a step in the kernel table.

    Attributes:
        lam: the throughput aimed at (tokens per AR-step unit, > 0; e.g. the best static
            action's on training traces).
        costs: ``costs[n]`` = the round cost (AR-step units) of a tree of ``n`` nodes
            (``n = 0 .. max nodes``; ``costs[0]`` an AR step), from :meth:`from_profile`.

    Raises:
        ValueError: ``lam`` not a positive finite number, or ``costs`` empty, not finite or
            negative.
    """

    lam: float
    costs: tuple[float, ...]

    def __post_init__(self) -> None:
        if not (isinstance(self.lam, (int, float, np.floating)) and math.isfinite(self.lam) and self.lam > 0):
            raise ValueError(f"TreePrune lam={self.lam!r} must be a positive finite throughput (tokens per AR-step "
                             "unit), e.g. the best static action's.")
        costs = tuple(float(c) for c in self.costs)
        if not costs or not all(math.isfinite(c) and c >= 0 for c in costs):
            raise ValueError(f"TreePrune costs={self.costs!r} must be finite round costs >= 0 of trees of 0, 1, ... "
                             "nodes: build them with TreePrune.from_profile(profile, max_nodes, lam).")
        object.__setattr__(self, "lam", float(self.lam))
        object.__setattr__(self, "costs", costs)

    @classmethod
    def from_profile(cls, profile, max_nodes: int, lam: float, reuse: bool = True) -> "TreePrune":
        """The rule for trees of up to ``max_nodes`` nodes under a
        :class:`~lede_env.costs.CostProfile` (a tree of n nodes: ``round_cost(0, n, n + 1,
        tree=True)``; the per-round overhead is the same for every n and changes nothing).

        Raises:
            ValueError: ``max_nodes < 1``, or as the constructor.
        """
        if int(max_nodes) < 1:
            raise ValueError(f"max_nodes={max_nodes} must be >= 1 (the largest tree budget).")
        return cls(float(lam), tuple(profile.round_cost(0, n, n + 1, reuse, tree=True)
                                     for n in range(int(max_nodes) + 1)))

    def keep(self, scores: Sequence[float]) -> int:
        """How many of the first nodes to keep, given their ``scores`` in node order.

        Raises:
            ValueError: more nodes than the cost table covers.
        """
        n = len(scores)
        if n >= len(self.costs):
            raise ValueError(f"A tree of {n} nodes, but TreePrune's cost table covers {len(self.costs) - 1}: build "
                             "it with max_nodes >= the largest tree budget.")
        gain = 1.0 + np.concatenate([[0.0], np.cumsum(np.asarray(scores, np.float64))])
        return int(np.argmax(gain - self.lam * np.asarray(self.costs[: n + 1])))

    def apply(self, tree: TokenTree) -> TokenTree:
        """The first :meth:`keep` nodes of ``tree`` (a prefix in node order is a tree).

        Raises:
            ValueError: as :meth:`keep`.
        """
        n = self.keep(tree.scores.tolist())
        if n == len(tree):
            return tree
        return TokenTree(tree.tokens[:n], tree.parents[:n], tree.depth[:n], tree.counts[:n], tree.scores[:n])

    def describe(self) -> dict:
        """JSON-serialisable description (for env configs and reports)."""
        return {"kind": "tree-prune", "lambda": self.lam, "max_nodes": len(self.costs) - 1}


def round_tree(context: SuffixIndex, seq: Sequence[int], budget: int, depth: int,
               datastore: Optional[NgramDatastore] = None, ngram: tuple[int, int] = DEFAULT_NGRAM,
               prune: Optional[TreePrune] = None) -> TokenTree:
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
        prune: the static tree rule (:attr:`lede_env.rules.RoundRules.tree_prune`): keep only
            the prefix of the grown tree that pays (:meth:`TreePrune.apply`); ``None``: the whole
            tree.

    Returns:
        A :class:`~lede_env.suffix_index.TokenTree` of at most ``budget`` nodes and ``depth``
        levels whose first branch is the copy draft of :func:`seed_length` tokens (or a prefix
        of that tree, pruned).

    Raises:
        ValueError: ``prune``'s cost table covers fewer than ``budget`` nodes.
    """
    if budget <= 0 or depth <= 0:
        return TokenTree.empty()
    n = seed_length(budget, depth)
    copy = with_datastore(context_match(seq, n, ngram), seq, n, datastore)[1]
    indexes = [context] if datastore is None else [context, datastore_index(datastore)]
    tree = draft_tree(indexes, seq, budget, depth, seed=copy)
    return tree if prune is None else prune.apply(tree)


__all__ = ["TREE_RECIPE_VERSION", "TreePrune", "datastore_index", "round_tree", "seed_length"]
