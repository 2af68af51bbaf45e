"""Drafts from the context: prompt lookup (n-gram matching against the prompt and the text so far).

Much of what users generate repeats their own context: code repeats names and lines it was
given, an answer quotes its passage, a translation copies names and numbers, a long answer
repeats its own phrases. A draft copied from the context costs no layers at all (prompt lookup
decoding, transformers' ``prompt_lookup_num_tokens``; LLMA, arXiv 2304.04487). lede proposes one
whenever the last ``n`` tokens (longest ``n`` first, from ``ngram[1]`` down to ``ngram[0]``)
occurred before: the tokens that followed one of their earlier occurrences, up to ``max_len``.
Of the :data:`CHOOSE_AMONG` most recent occurrences, the draft copies the one followed by the
most tokens (up to ``max_len``), then the one whose preceding tokens agree longest with the text
(:func:`match_span`), then the most recent. In a loop of period p (a repeated line, a run of one
token) the most recent occurrence is followed by only p tokens before the suffix itself; an
earlier one copies ``max_len`` tokens of the loop. Preferring the longest span (the occurrence in
the same passage as the text being written, as suffix-tree drafters do: SuffixDecoding, arXiv
2411.04975) raised the copied tokens accepted per context draft on the greedy continuations of
the default training and held-out prompts, against copying the most recent occurrence. The full
model verifies the copy like any draft, so the output does not change. How often the context
has a match per category, and how much of a copy is accepted: ``docs/experiments.md``
("Drafters: context drafts and the datastore").
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

#: default n-gram lengths (shortest, longest) matched against the context
DEFAULT_NGRAM = (2, 3)
#: tokens over which two occurrences' continuations are compared (:func:`match_agreement`)
AGREE_DEPTH = 8
#: longest matched span :func:`match_span` measures (tokens)
SPAN_CAP = 32
#: most recent occurrences of the matched n-gram compared when choosing the one a draft copies
CHOOSE_AMONG = 16


def check_ngram(ngram: tuple[int, int]) -> tuple[int, int]:
    """``ngram`` as ``(shortest, longest)`` ints. Raises ``ValueError`` unless 1 <= shortest <= longest."""
    lo, hi = int(ngram[0]), int(ngram[1])
    if not 1 <= lo <= hi:
        raise ValueError(f"ngram=({lo}, {hi}) must satisfy 1 <= shortest <= longest.")
    return lo, hi


def context_draft(seq: Sequence[int], max_len: int, ngram: tuple[int, int] = DEFAULT_NGRAM) -> list[int]:
    """The context draft after ``seq``: up to ``max_len`` tokens that followed an earlier
    occurrence of ``seq``'s last ``n`` tokens, for the longest ``n`` in ``ngram[1] .. ngram[0]``
    that occurs; ``[]`` when none does. Of the :data:`CHOOSE_AMONG` most recent occurrences, the
    one followed by the most tokens (up to ``max_len``), then with the longest span
    (:func:`match_span`), then the most recent.

    Occurrences may overlap the suffix itself (in ``a b a b a b`` the suffix ``a b`` matched at
    position 2 proposes ``a b``; in a longer loop an earlier occurrence copies ``max_len`` tokens
    of it); a match near the end proposes only the tokens that exist.

    Args:
        seq: prompt and generated token ids, the pending token (the newest) last.
        max_len: most tokens to propose (0 proposes nothing).
        ngram: (shortest, longest) suffix lengths tried, 1 <= shortest <= longest.

    Returns:
        The proposed token ids (at most ``max_len``).

    Raises:
        ValueError: a bad ``ngram`` range or a negative ``max_len``.
    """
    return context_match(seq, max_len, ngram)[1]


def context_match(seq: Sequence[int], max_len: int, ngram: tuple[int, int] = DEFAULT_NGRAM) -> tuple[int, list[int]]:
    """``(n, tokens)``: the length ``n`` of the longest suffix in ``ngram`` that occurred before
    (0: none) and the :func:`context_draft` it proposes (up to ``max_len`` tokens; ``[]`` when
    ``max_len`` is 0). The observation's context features read ``n`` even where no draft is
    wanted. Raises ``ValueError`` as :func:`context_draft`."""
    a, n, hits, chosen = _scan(seq, max_len, ngram)
    return (n, a[chosen + n: chosen + n + max_len].tolist()) if n else (0, [])


def _scan(seq: Sequence[int], max_len: int, ngram: tuple[int, int]) -> tuple[np.ndarray, int, list[int], int]:
    """``(seq as int64 array, n, ascending start positions of the matched n-gram's earlier
    occurrences, the one a draft copies)``, the match of :func:`context_match`; ``n = 0``: none."""
    lo, hi = check_ngram(ngram)
    if max_len < 0:
        raise ValueError(f"max_len={max_len} must be >= 0.")
    a = np.asarray(seq, dtype=np.int64)
    L = len(a)
    if L < 2:
        return a, 0, [], -1
    for n in range(min(hi, L - 1), lo - 1, -1):
        # windows starting at 0 .. L-1-n: each is followed by at least one token, and the suffix
        # itself (starting at L-n) is not among them
        windows = np.lib.stride_tricks.sliding_window_view(a[: L - 1], n)
        hits = np.flatnonzero((windows == a[L - n:]).all(axis=1))
        if hits.size:
            hits = hits.tolist()
            return a, n, hits, _choose(a, n, hits, max_len)
    return a, 0, [], -1


def _choose(a: Sequence[int], n: int, hits: Sequence[int], max_len: int) -> int:
    """The occurrence a draft copies, of the ascending start positions ``hits`` of the matched
    n-gram: among the last :data:`CHOOSE_AMONG`, the one followed by the most tokens (up to
    ``max_len``), then the longest span, then the most recent."""
    L = len(a)
    recent = hits[-CHOOSE_AMONG:]
    most = max(min(L - h - n, max_len) for h in recent)
    tied = [h for h in recent if min(L - h - n, max_len) == most]  # spans only where the token count ties
    return tied[-1] if len(tied) == 1 else max(tied, key=lambda h: (_span(a, n, h, SPAN_CAP), h))


def _lcp(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of ``a`` and ``b``."""
    k = 0
    for x, y in zip(a, b):
        if x != y:
            break
        k += 1
    return k


def _agreement(seq: Sequence[int], n: int, hits: Sequence[int], chosen: int, depth: int) -> tuple[int, int]:
    """``(occurrences, agreement)`` given the ascending start positions ``hits`` of the matched
    n-gram and the chosen one (see :func:`match_agreement`)."""
    others = [h for h in hits if h != chosen]
    if not others:
        return len(hits), 0
    o = others[-1]
    return len(hits), _lcp(seq[chosen + n: chosen + n + depth], seq[o + n: o + n + depth])


def match_agreement(seq: Sequence[int], max_len: int, ngram: tuple[int, int] = DEFAULT_NGRAM,
                    depth: int = AGREE_DEPTH) -> tuple[int, int]:
    """How far a context draft can be trusted, from the context alone: ``(occurrences,
    agreement)`` of :func:`context_match`'s match.

    ``occurrences`` counts the earlier occurrences of the matched n-gram suffix (0: no match);
    ``agreement`` is the length of the common prefix (at most ``depth`` tokens) of what followed
    the occurrence the draft copies and what followed the most recent other occurrence (0 with a
    single occurrence). Where earlier occurrences went on differently, the copied tokens are
    often rejected right where they part; where they went on alike, copies run long. (REST, arXiv
    2311.08252, and LLMA, arXiv 2304.04487, choose drafts among several retrieved continuations by
    such agreement; here it is an observation feature the policy reads.) Over whole episodes
    neither a fixed rule on these features nor ``trace_q`` with them beat the best fixed copy
    length (``benchmarks/bench.py agent-vs-static --context-agreement 1``; ``docs/experiments.md``,
    "Context agreement features"), so envs leave them off by default.

    Args:
        seq, max_len, ngram: as :func:`context_match` (``max_len`` picks the copied occurrence).
        depth: most tokens compared.

    Returns:
        ``(occurrences, agreement)``, both ints.

    Raises:
        ValueError: as :func:`context_match`.
    """
    return match_and_agreement(seq, max_len, ngram, depth)[1]


def match_and_agreement(seq: Sequence[int], max_len: int, ngram: tuple[int, int] = DEFAULT_NGRAM,
                        depth: int = AGREE_DEPTH) -> tuple[tuple[int, list[int]], tuple[int, int]]:
    """``(context_match(seq, max_len, ngram), match_agreement(seq, max_len, ngram, depth))`` from
    one scan of ``seq`` (an observation with the agreement features needs both). Raises
    ``ValueError`` as :func:`context_match`."""
    match, agreement, _ = match_details(seq, max_len, ngram, depth)
    return match, agreement


def match_details(seq: Sequence[int], max_len: int, ngram: tuple[int, int] = DEFAULT_NGRAM,
                  depth: int = AGREE_DEPTH, cap: int = SPAN_CAP
                  ) -> tuple[tuple[int, list[int]], tuple[int, int], int]:
    """``(context_match, match_agreement, span)`` of ``seq`` from one scan (see
    :func:`match_agreement` and :func:`match_span`). Raises ``ValueError`` as
    :func:`context_match`."""
    return _details(*_scan(seq, max_len, ngram), max_len, depth, cap)


def _details(a: Sequence[int], n: int, hits: Sequence[int], chosen: int, max_len: int, depth: int, cap: int
             ) -> tuple[tuple[int, list[int]], tuple[int, int], int]:
    """``((n, copied tokens), (occurrences, agreement), span)`` of a found match (``n = 0``: none)."""
    if not n:
        return (0, []), (0, 0), 0
    toks = a[chosen + n: chosen + n + max_len]  # an array's slice (a scan) or a list's (the index)
    toks = toks.tolist() if isinstance(toks, np.ndarray) else toks
    return (n, toks), _agreement(a, n, hits, chosen, depth), _span(a, n, chosen, cap)


def _span(a: Sequence[int], n: int, chosen: int, cap: int) -> int:
    """Length of the common suffix of ``a`` and ``a[: chosen + n]`` (the matched n-gram and as
    many tokens before it as agree), at least ``n``, at most ``cap``."""
    L, k = len(a), n
    while k < cap and chosen + n - k - 1 >= 0 and a[chosen + n - k - 1] == a[L - k - 1]:
        k += 1
    return min(k, cap)


def match_span(seq: Sequence[int], max_len: int, ngram: tuple[int, int] = DEFAULT_NGRAM,
               cap: int = SPAN_CAP) -> tuple[tuple[int, list[int]], int]:
    """``(context_match(seq, max_len, ngram), span)``: ``span`` is how many tokens at the end of
    ``seq`` agree with the tokens before the copied continuation: the matched n-gram extended
    backwards while the two sequences agree (0 without a match; at most ``cap``).

    A long span means the text is running through a passage it has seen (a quoted sentence, a
    repeated block of code), and the copy keeps being accepted; a span of 2-3 is often a
    coincidence: the longer the span, the more of a copy is accepted (measured per span in
    ``docs/experiments.md``, "Which occurrence a context draft copies, and the matched span").
    SuffixDecoding (arXiv 2411.04975) sets its speculation length
    from the match length the same way; here it is an observation feature
    (:attr:`~lede_env.mdp.ObservationConfig.context_span`) the policy reads.

    Raises:
        ValueError: as :func:`context_match`.
    """
    match, _, span = match_details(seq, max_len, ngram, cap=cap)
    return match, span


class ContextIndex:
    """:func:`context_match` for a growing sequence, in time independent of its length.

    :func:`context_match` scans the whole sequence for every n-gram length each round (a
    noticeable share of a round at a few hundred tokens, ``docs/experiments.md``). This index
    keeps, for every n-gram length in ``ngram``, the start positions of each n-gram that is
    followed by at least one token, and adds the new ones as the sequence grows: a match is a
    dictionary look-up and a comparison of at most :data:`CHOOSE_AMONG` occurrences. It returns
    exactly what :func:`context_match` returns for the same sequence (tested).

    Args:
        ngram: (shortest, longest) suffix lengths matched.

    Raises:
        ValueError: a bad ``ngram``.
    """

    def __init__(self, ngram: tuple[int, int] = DEFAULT_NGRAM) -> None:
        self.lo, self.hi = check_ngram(ngram)
        self._seq: list[int] = []
        self._starts: dict[tuple[int, ...], list[int]] = {}  # n-gram -> ascending start positions

    def sync(self, seq: Sequence[int]) -> None:
        """Index ``seq``, which extends the sequence indexed so far (a shorter ``seq``, e.g. after
        a stop string cut it, is indexed afresh)."""
        if len(seq) < len(self._seq) or (self._seq and seq[len(self._seq) - 1] != self._seq[-1]):
            self._seq, self._starts = [], {}
        old = len(self._seq)
        self._seq.extend(int(t) for t in seq[old:])
        s = self._seq
        # an n-gram starting at p is indexed once a token follows it: p + n <= len - 1
        for n in range(self.lo, self.hi + 1):
            for p in range(max(old - n, 0), len(s) - n):
                self._starts.setdefault(tuple(s[p:p + n]), []).append(p)

    def match(self, seq: Sequence[int], max_len: int) -> tuple[int, list[int]]:
        """``context_match(seq, max_len, ngram)`` (``seq`` as for :meth:`sync`, which it calls).

        Raises:
            ValueError: a negative ``max_len``.
        """
        n, hits, chosen = self._find(seq, max_len)
        return (n, self._seq[chosen + n: chosen + n + max_len]) if n else (0, [])

    def agreement(self, seq: Sequence[int], max_len: int, depth: int = AGREE_DEPTH) -> tuple[int, int]:
        """``match_agreement(seq, max_len, ngram, depth)``, from the index.

        Raises:
            ValueError: a negative ``max_len``.
        """
        return self.match_and_agreement(seq, max_len, depth)[1]

    def match_and_agreement(self, seq: Sequence[int], max_len: int, depth: int = AGREE_DEPTH
                            ) -> tuple[tuple[int, list[int]], tuple[int, int]]:
        """``(self.match(seq, max_len), self.agreement(seq, max_len, depth))`` from one look-up.

        Raises:
            ValueError: a negative ``max_len``.
        """
        match, agreement, _ = self.details(seq, max_len, depth)
        return match, agreement

    def match_and_span(self, seq: Sequence[int], max_len: int, cap: int = SPAN_CAP
                       ) -> tuple[tuple[int, list[int]], int]:
        """:func:`match_span` from the index.

        Raises:
            ValueError: a negative ``max_len``.
        """
        match, _, span = self.details(seq, max_len, cap=cap)
        return match, span

    def details(self, seq: Sequence[int], max_len: int, depth: int = AGREE_DEPTH, cap: int = SPAN_CAP
                ) -> tuple[tuple[int, list[int]], tuple[int, int], int]:
        """:func:`match_details` from the index (one look-up).

        Raises:
            ValueError: a negative ``max_len``.
        """
        return _details(self._seq, *self._find(seq, max_len), max_len, depth, cap)

    def _find(self, seq: Sequence[int], max_len: int) -> tuple[int, list[int], int]:
        """``(n, start positions of the matched n-gram, the chosen one)``; ``(0, [], -1)``: none."""
        if max_len < 0:
            raise ValueError(f"max_len={max_len} must be >= 0.")
        self.sync(seq)
        s, L = self._seq, len(self._seq)
        if L < 2:
            return 0, [], -1
        for n in range(min(self.hi, L - 1), self.lo - 1, -1):
            hits = self._starts.get(tuple(s[L - n:]))
            if hits:
                return n, hits, _choose(s, n, hits, max_len)
        return 0, [], -1
