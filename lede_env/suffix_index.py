"""A suffix index over token ids, and token trees of the most frequent continuations.

Copy drafts (:mod:`lede_env.lookup`, :mod:`lede_env.datastore`) propose one continuation per
round; when its first token is wrong the round is an AR step plus overhead. A *token tree*
proposes several candidate continuations at once, verified in one forward pass with a tree
attention mask (SpecInfer, arXiv 2305.09781; Medusa, arXiv 2401.10774): the longest branch that
agrees with the model is accepted. SuffixDecoding (arXiv 2411.04975) builds such trees from
suffix trees over the prompt, the text generated so far and earlier outputs, scoring each
candidate node by how often its continuation followed the matched suffix.

:class:`SuffixIndex` is a suffix automaton (Blumer et al. 1985; the online construction of
Crochemore & Hancart) over token ids: one or more documents (matches never cross a document
boundary), extended one token at a time as tokens are emitted (amortised O(1) automaton updates;
the occurrence counts are updated along the new token's suffix-link chain, see
:meth:`SuffixIndex.extend`). Every state knows how many times its strings occur, so the
continuations of a matched suffix come with exact counts. :meth:`SuffixIndex.tree` (one index)
and :func:`draft_tree` (several: the context's index and the datastore's) grow a
:class:`TokenTree` best-first by estimated path probability within a node budget.

This module holds data and pure functions only.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

#: longest suffix of a context that :meth:`SuffixIndex.match` looks for (tokens)
MAX_MATCH = 32


@dataclass(frozen=True)
class TokenTree:
    """A tree of draft tokens after the pending token (the root, not stored).

    Nodes are in topological order (a parent before its children) and siblings hold distinct
    tokens, so every path from the root is a distinct candidate continuation.

    Attributes:
        tokens: (n,) int64 token id of each node.
        parents: (n,) int64 index of each node's parent, -1 for children of the root.
        depth: (n,) int64 depth of each node (1 for children of the root).
        counts: (n,) int64 occurrences of the node's continuation (the matched suffix followed by
            the path to the node) in the indexed text, summed over the indexes that proposed it.
        scores: (n,) float64 estimated probability that the path to the node is the text's
            continuation (the product of each step's share of what followed its parent; the
            largest over the indexes). Sources: SuffixDecoding (arXiv 2411.04975) section 3.
    """

    tokens: torch.Tensor
    parents: torch.Tensor
    depth: torch.Tensor
    counts: torch.Tensor
    scores: torch.Tensor

    @classmethod
    def empty(cls) -> "TokenTree":
        """The tree without nodes (nothing to draft)."""
        z = torch.zeros(0, dtype=torch.int64)
        return cls(z, z.clone(), z.clone(), z.clone(), torch.zeros(0, dtype=torch.float64))

    def __len__(self) -> int:
        return int(self.tokens.numel())

    def attention_mask(self) -> torch.Tensor:
        """(n, n) bool tree attention mask: node i attends to node j iff j is i or an ancestor
        of i (SpecInfer's topology-aware causal mask, arXiv 2305.09781 section 4.2). Every node
        also attends to the root and the cached prefix, which the mask does not hold."""
        n = len(self)
        mask = torch.eye(n, dtype=torch.bool)
        par = self.parents.tolist()
        for i, p in enumerate(par):  # topological order: the parent's row is final
            if p >= 0:
                mask[i] |= mask[p]
        return mask

    def positions(self, start: int = 0) -> torch.Tensor:
        """(n,) int64 depth-based position ids: ``start + depth``, where ``start`` is the root's
        (the pending token's) position; siblings share a position."""
        return self.depth + int(start)

    def children(self, node: int) -> list[int]:
        """Indices of the children of ``node`` (-1: the root), in index order."""
        return torch.nonzero(self.parents == int(node)).flatten().tolist()

    def path(self, node: int) -> list[int]:
        """The tokens from the root's first child down to ``node``."""
        out, par, tok = [], self.parents.tolist(), self.tokens.tolist()
        while node >= 0:
            out.append(tok[node])
            node = par[node]
        return out[::-1]

    def accepted(self, target: Sequence[int]) -> list[int]:
        """Node indices of the longest branch whose tokens are a prefix of ``target`` (the
        verifier's tokens: greedy, the text's continuation), root excluded; ``[]``: the first
        token of every branch differs. Siblings are distinct, so the branch is unique."""
        kids: dict[tuple[int, int], int] = {}
        for i, (p, t) in enumerate(zip(self.parents.tolist(), self.tokens.tolist())):
            kids[(p, t)] = i
        out, node = [], -1
        for t in target:
            node = kids.get((node, int(t)), -2)
            if node == -2:
                break
            out.append(node)
        return out


class SuffixIndex:
    """Suffix automaton over token-id documents, extended one token at a time.

    Args:
        tokens: the first document's token ids (e.g. the prompt); more documents with
            :meth:`add_document`, more tokens of the last one with :meth:`extend`.
        max_match: longest context suffix :meth:`match` looks for (tokens, >= 1).

    Raises:
        ValueError: ``max_match < 1``.
    """

    def __init__(self, tokens: Sequence[int] = (), max_match: int = MAX_MATCH) -> None:
        if int(max_match) < 1:
            raise ValueError(f"max_match={max_match} must be >= 1.")
        self.max_match = int(max_match)
        self._next: list[dict[int, int]] = [{}]  # state -> token -> state
        self._link: list[int] = [-1]  # suffix link (root: -1)
        self._len: list[int] = [0]  # longest string of the state
        self._cnt: list[int] = [0]  # occurrences (end positions) of the state's strings
        self._last = 0
        self._docs = 0
        self._tokens = 0
        self._memo: dict[int, tuple[int, list[tuple[int, int, int]]]] = {}
        if len(tokens):
            self.add_document(tokens)

    @classmethod
    def of_documents(cls, documents: Sequence[Sequence[int]], max_match: int = MAX_MATCH) -> "SuffixIndex":
        """The index of several documents (e.g. a datastore's sequences); matches and
        continuations never cross a document boundary. Built in one pass, O(total tokens).

        Raises:
            ValueError: as the constructor.
        """
        idx = cls(max_match=max_match)
        for doc in documents:
            idx._last = 0
            idx._docs += 1
            for t in np.asarray(doc, dtype=np.int64).tolist():
                idx._add(t, online=False)
        idx._recount()
        return idx

    def add_document(self, tokens: Sequence[int]) -> None:
        """Start a new document holding ``tokens`` (later :meth:`extend` calls go on it)."""
        self._last = 0
        self._docs += 1
        for t in np.asarray(tokens, dtype=np.int64).tolist():
            self._add(t, online=True)

    def extend(self, token: int) -> None:
        """Append ``token`` to the last document (a new one if there is none).

        The automaton's update is amortised O(1) (online suffix-automaton construction); the
        occurrence counts gain the new end position on every state of the new state's
        suffix-link chain: O(1 + states on that chain), which is the number of distinct
        occurrence classes among the text's repeated suffixes (a few in text that repeats
        little; it grows with the length of a loop the text is in)."""
        if not self._docs:
            self._docs = 1
        self._add(int(token), online=True)

    def _add(self, c: int, online: bool) -> None:
        """One token onto the last document (generalised suffix automaton); ``online``: update
        the counts now (else only mark the prefix state and :meth:`_recount` later)."""
        nxt, link, ln = self._next, self._link, self._len
        last = self._last
        q = nxt[last].get(c)
        if q is not None:  # the extended prefix already occurs (a later document)
            cur = q if ln[q] == ln[last] + 1 else self._clone(last, q, c, online)
        else:
            cur = self._state(ln[last] + 1, {}, 0)
            p = last
            while p != -1 and c not in nxt[p]:
                nxt[p][c] = cur
                p = link[p]
            if p == -1:
                link[cur] = 0
            else:
                q = nxt[p][c]
                link[cur] = q if ln[p] + 1 == ln[q] else self._clone(p, q, c, online)
        self._last = cur
        self._tokens += 1
        if self._memo:
            self._memo.clear()
        if online:
            v, cnt = cur, self._cnt
            while v > 0:
                cnt[v] += 1
                v = link[v]
        else:
            self._cnt[cur] += 1

    def _state(self, length: int, nxt: dict, cnt: int) -> int:
        self._next.append(nxt)
        self._link.append(-1)
        self._len.append(length)
        self._cnt.append(cnt)
        return len(self._len) - 1

    def _clone(self, p: int, q: int, c: int, online: bool) -> int:
        """Split state ``q`` at length ``len(p) + 1`` (the clone takes ``q``'s transitions, link
        and, online, its count: the new end position is added by the chain walk)."""
        nxt, link = self._next, self._link
        clone = self._state(self._len[p] + 1, dict(nxt[q]), self._cnt[q] if online else 0)
        link[clone] = link[q]
        link[q] = clone
        while p != -1 and nxt[p].get(c) == q:
            nxt[p][c] = clone
            p = link[p]
        return clone

    def _recount(self) -> None:
        """Occurrence counts from the prefix-state marks: each state adds its count to its
        suffix link's, longest states first (a counting sort by length, O(states))."""
        ln, link, cnt = self._len, self._link, self._cnt
        order = np.argsort(-np.asarray(ln, dtype=np.int64), kind="stable").tolist()
        for v in order:
            if v > 0:
                cnt[link[v]] += cnt[v]
        cnt[0] = 0

    @property
    def states(self) -> int:
        """States of the automaton (at most 2 x tokens)."""
        return len(self._len)

    @property
    def tokens(self) -> int:
        """Tokens indexed, over all documents."""
        return self._tokens

    def count(self, pattern: Sequence[int]) -> int:
        """Occurrences of ``pattern`` (token ids) inside the documents; the empty pattern occurs
        at every indexed token (the count is the number of tokens)."""
        v = 0
        for t in pattern:
            v = self._next[v].get(int(t), -1)
            if v < 0:
                return 0
        return self._cnt[v] if v else self._tokens

    def match(self, context: Sequence[int]) -> tuple[int, int]:
        """``(length, state)``: the longest suffix of ``context`` (at most ``max_match`` tokens)
        that occurs in the documents followed by at least one token, and its automaton state
        (the input of :meth:`continuations` and :meth:`tree`). ``(0, 0)``: no token of the
        context occurs with a continuation (state 0, the root, continues with any indexed
        token). O(``max_match``).

        A context that is the index's own last document (the prompt and the tokens generated
        so far) always occurs at its end, where nothing follows it: the match is the longest
        suffix that also occurred earlier."""
        nxt, link, ln = self._next, self._link, self._len
        v = length = 0
        for t in np.asarray(context[-self.max_match:], dtype=np.int64).tolist():
            while v and t not in nxt[v]:
                v = link[v]
                length = ln[v]
            v2 = nxt[v].get(t)
            if v2 is None:
                v, length = 0, 0
            else:
                v, length = v2, length + 1
        while v and not nxt[v]:  # occurs only where nothing follows: a shorter suffix
            v = link[v]
            length = ln[v]
        return length, v

    def _children(self, v: int) -> tuple[int, list[tuple[int, int, int]]]:
        """``(total, [(count, token, state), ...])`` of state ``v``'s continuations, most
        frequent first (ties: lowest token id); total = their counts' sum. Cached until the
        next token is added."""
        hit = self._memo.get(v)
        if hit is None:
            cnt = self._cnt
            kids = sorted(((cnt[u], t, u) for t, u in self._next[v].items()), key=lambda x: (-x[0], x[1]))
            hit = (sum(k[0] for k in kids), kids)
            self._memo[v] = hit
        return hit

    def continuations(self, state: int, depth: int = 1) -> dict[tuple[int, ...], int]:
        """Every continuation of 1..``depth`` tokens of the strings of ``state`` with its
        occurrence count: ``{tokens: count}`` (exhaustive; for tests and small depths)."""
        out: dict[tuple[int, ...], int] = {}
        stack = [(state, ())]
        while stack:
            v, path = stack.pop()
            if len(path) >= depth:
                continue
            for c, t, u in self._children(v)[1]:
                out[path + (t,)] = c
                stack.append((u, path + (t,)))
        return out

    def tree(self, context: Sequence[int], budget: int, max_depth: int = 8, min_match: int = 1) -> TokenTree:
        """:func:`draft_tree` of this index alone.

        Raises:
            ValueError: as :func:`draft_tree`.
        """
        return draft_tree([self], context, budget, max_depth, min_match)


def draft_tree(indexes: Sequence[SuffixIndex], context: Sequence[int], budget: int, max_depth: int = 8,
               min_match: int = 1, seed: Sequence[int] = ()) -> TokenTree:
    """The token tree of the most probable continuations of ``context`` over ``indexes``.

    Each index matches the longest suffix of ``context`` that it holds with a continuation
    (:meth:`SuffixIndex.match`; an index whose match is shorter than ``min_match`` proposes
    nothing). A node's probability under an index is the product, along its path, of each
    token's share of the continuations of its parent; its score is the largest over the
    indexes that hold its path, its count the sum of their occurrence counts. The tree grows
    best-first by score (SuffixDecoding's greedy expansion, arXiv 2411.04975 section 3; ties:
    the shallower node, then the lower token id, then the earlier parent) until ``budget`` nodes or no candidate is left; a node
    deeper than ``max_depth`` is never added.

    Args:
        indexes: the suffix indexes to draw from (e.g. the context's and the datastore's).
        context: prompt and generated token ids, the pending token (the root) last.
        budget: most nodes (0: an empty tree).
        max_depth: longest branch (tokens, >= 1).
        min_match: shortest suffix match an index needs to propose (tokens, >= 0; 0 lets an
            index without a match propose its most frequent tokens).
        seed: a branch added first, whatever its score (e.g. a single copy draft, so the tree
            contains it); cut to ``budget`` and ``max_depth``.

    Returns:
        A :class:`TokenTree` of at most ``budget`` nodes.

    Raises:
        ValueError: a negative ``budget`` or ``min_match``, or ``max_depth < 1``.
    """
    if budget < 0 or max_depth < 1 or min_match < 0:
        raise ValueError(f"budget={budget} must be >= 0, max_depth={max_depth} >= 1 and min_match={min_match} >= 0.")
    roots = []
    for idx in indexes:
        length, v = idx.match(context)
        if length >= min_match and (v or idx.tokens):
            roots.append((idx, v, 1.0))
    return _grow(roots, budget, max_depth, list(seed)[: min(budget, max_depth)])


def _grow(roots: list, budget: int, max_depth: int, seed: list[int]) -> TokenTree:
    """Best-first growth (see :func:`draft_tree`): ``roots`` = ``[(index, state, prob)]`` of the
    root; a node's sources are the indexes holding its path, with their states and probabilities."""
    toks: list[int] = []
    pars: list[int] = []
    deps: list[int] = []
    cnts: list[int] = []
    scores: list[float] = []
    srcs: list[list] = []  # per node: [(index, state, prob)]
    heap: list = []
    taken: set = set()

    def add(parent: int, token: int) -> None:
        step = _step(roots if parent < 0 else srcs[parent], token)
        toks.append(token), pars.append(parent), cnts.append(sum(s[3] for s in step))
        scores.append(max((s[2] for s in step), default=0.0))
        deps.append(1 if parent < 0 else deps[parent] + 1)
        srcs.append([s[:3] for s in step])
        taken.add((parent, token))
        if deps[-1] < max_depth:
            _push_children(heap, len(toks) - 1, deps[-1] + 1, srcs[-1], budget)

    for t in seed:  # a forced branch
        add(len(toks) - 1, int(t))
    _push_children(heap, -1, 1, roots, budget)  # (the root's other children compete for the rest)
    while heap and len(toks) < budget:
        _, _, t, par = heapq.heappop(heap)
        if (par, t) not in taken:  # (the same child proposed by another index, or a seeded node)
            add(par, t)
    return _as_tree(toks, pars, deps, cnts, scores)


def _step(sources: list, token: int) -> list:
    """``[(index, state, prob, count)]``: the sources (``(index, state, prob)``) holding a
    continuation by ``token``, with the state, probability and occurrence count after it."""
    out = []
    for i, v, p in sources:
        u = i._next[v].get(token)
        if u is not None:
            c = i._cnt[u]
            out.append((i, u, p * c / i._children(v)[0], c))
    return out


def _push_children(heap: list, node: int, depth: int, sources: list, budget: int) -> None:
    """Push the up-to-``budget`` most frequent continuations of ``node`` (at ``depth``) under
    each source (``(index, state, prob)``) as heap entries ``(-score, depth, token, node)``
    (ties: the shallower child, then the lower token, then the earlier node)."""
    for i, v, p in sources:
        total, kids = i._children(v)
        for c, t, u in kids[:budget]:
            heapq.heappush(heap, (-p * c / total, depth, t, node))


def _as_tree(toks, pars, deps, cnts, scores) -> TokenTree:
    i64 = torch.int64
    return TokenTree(torch.tensor(toks, dtype=i64), torch.tensor(pars, dtype=i64), torch.tensor(deps, dtype=i64),
                     torch.tensor(cnts, dtype=i64), torch.tensor(scores, dtype=torch.float64))


__all__ = ["MAX_MATCH", "SuffixIndex", "TokenTree", "draft_tree"]
