"""Exact replay of self-speculative rounds over a trace, and the dynamic-programming oracle.

Tree rounds (:meth:`lede_env.rules.RoundRules.plan_tree`) replay exactly too: the tree follows
from the prompt and the greedy text so far (:func:`lede_env.trees.round_tree`), and the accepted
branch from the greedy continuation. Trees are memoised per trace (:class:`TraceTrees`), since
the oracle and the best-static search replay every position under every action.
"""

from __future__ import annotations

import weakref
from dataclasses import replace
from typing import Optional, Sequence

import numpy as np

from .datastore import with_datastore
from .lookup import context_match
from .mdp import RoundOutcome, accept, verified_positions
from .metrics import throughput as metric_throughput
from .rules import RoundRules
from .stopping import as_stop_rule
from .suffix_index import SuffixIndex, TokenTree
from .traces import Trace

_NO_DRAFT = -1  # a draft position past the end of the trace (never matches)
_UNKNOWN = -2  # a verifier position past an EOS (never emitted)


def budget(trace: Trace, max_new_tokens: int) -> int:
    """Tokens an episode on ``trace`` may generate: ``max_new_tokens``, or the trace's length if
    it stopped (without EOS) earlier."""
    return max_new_tokens if trace.eos else min(max_new_tokens, trace.n)


def replay_round(trace: Trace, g: int, action: int, rules: RoundRules, limit: int) -> tuple[RoundOutcome, int, float]:
    """One round on ``trace`` after ``g`` generated tokens (pending token ``generated[g-1]``).

    Args:
        limit: the episode's token budget (see :func:`budget`).

    Returns:
        ``(outcome, exit_layer, cost)``; ``exit_layer`` is 0 when the round was an AR step or a
        context draft (action 0, a context action, or K clamped to 0 by the budget); a round whose stop rule dropped its first
        draft token keeps its E with ``draft_len`` 0 (it verified the pending token alone).
    """
    remaining = limit - g
    nodes, depth = rules.plan_tree(action, remaining)
    if nodes:
        return replay_tree_round(trace, g, nodes, depth, rules, limit)
    E, K, n_ctx = rules.plan(action, remaining)
    N = trace.n
    passes = 0
    if K == 0:  # an AR step, or a context draft verified by the full model
        draft: list[int] = []
        if n_ctx:
            seq = np.concatenate([trace.prompt, trace.generated[:g]])  # pending token last, as in the decoder
            draft = with_datastore(context_match(seq, n_ctx, rules.context_ngram), seq, n_ctx, rules.datastore)[1]
        n = verified_positions(len(draft), rules.bonus) if draft else 1
        K = len(draft)
        verifier = [int(trace.generated[g + j]) if g + j < N else _UNKNOWN for j in range(n)]
    else:
        i = rules.actions.exit_layers.index(E)
        probs, tokens = trace.draft_prob[g:g + K, i], trace.draft[g:g + K, i]
        if trace.draft_first is not None and g < N:  # the round's first draft token has its own head
            probs, tokens = probs.copy(), tokens.copy()
            probs[0], tokens[0] = trace.draft_first_prob[g, i], trace.draft_first[g, i]
        K, passes = rules.stop.draft(i, probs, K)
        n = verified_positions(K, rules.bonus)  # a dropped first draft verifies the pending token alone
        draft = [int(tokens[j]) if g + j < N else _NO_DRAFT for j in range(K)]
        verifier = [int(trace.generated[g + j]) if g + j < N else _UNKNOWN for j in range(n)]
    oc = accept(draft, verifier, remaining, rules.eos_ids)
    return oc, E, rules.cost(E, K, oc.n_verify, passes)


def replay_tree_round(trace: Trace, g: int, nodes: int, depth: int, rules: RoundRules,
                      limit: int) -> tuple[RoundOutcome, int, float]:
    """A tree round on ``trace`` after ``g`` generated tokens: the tree of at most ``nodes``
    nodes and ``depth`` levels (:meth:`RoundRules.plan_tree`, :meth:`RoundRules.tree`) over the
    prompt and ``generated[:g]``, verified in one pass (SpecInfer, arXiv 2305.09781).

    Returns:
        ``(outcome, 0, cost)`` as :func:`replay_round`; see :func:`tree_outcome`; cost
        ``rules.cost(0, n, n + 1, tree=True)`` for a tree of n nodes.
    """
    N = trace.n
    # (a position past the trace's end follows its EOS: never reached; the oracle's sweep visits it)
    tree = trace_trees(trace).tree(g, nodes, depth, rules) if g <= N else TokenTree.empty()
    target = [int(trace.generated[g + j]) if g + j < N else _UNKNOWN for j in range(int(depth) + 1)]
    oc = tree_outcome(tree, target, limit - g, rules.eos_ids)
    return oc, 0, rules.cost(0, oc.draft_len, oc.n_verify, 0, tree=True)


def tree_outcome(tree: TokenTree, target: Sequence[int], remaining: int, eos_ids: Sequence[int]) -> RoundOutcome:
    """The greedy accept rule for a token tree (lossless): the longest branch whose tokens are a
    prefix of ``target`` (the verifier's greedy tokens; :meth:`TokenTree.accepted`), then the
    verifier's token after it, truncated at EOS and at ``remaining`` as
    :func:`lede_env.mdp.accept` does.

    Args:
        tree: the round's tree (n nodes).
        target: the verifier's tokens from the pending position on, at least the tree's depth + 1
            of them (or up to the end of the text).
        remaining: tokens still allowed (>= 1).
        eos_ids: token ids that end generation.

    Returns:
        A :class:`~lede_env.mdp.RoundOutcome` with ``accepted`` = the branch's emitted draft
        tokens, ``draft_len`` = n (the nodes verified) and ``n_verify`` = n + 1.
    """
    branch = tree.accepted(target)
    draft = tree.path(branch[-1]) if branch else []
    oc = accept(draft, list(target[: len(draft) + 1]), remaining, eos_ids)
    return replace(oc, draft_len=len(tree), n_verify=len(tree) + 1)


class TraceTrees:
    """The round trees of one trace, memoised (exact: each is :meth:`RoundRules.tree` over the
    suffix index of ``prompt + generated[:g]``).

    The first request for a (budget, depth, rules) at the unclamped depth builds that tree at
    every position in one pass over the trace, extending one suffix index token by token
    (:meth:`SuffixIndex.extend`), so the oracle's backward sweep and the best-static search pay
    one index build per trace; depths clamped near the end of the budget (a few positions) are
    built from a fresh index of their prefix. Get it with :func:`trace_trees`.
    """

    def __init__(self, trace: Trace) -> None:
        self._trace = weakref.ref(trace)
        self._sweeps: dict[tuple, list[TokenTree]] = {}
        self._single: dict[tuple, TokenTree] = {}
        self._stores: dict[int, object] = {}  # the datastores keyed by id, kept alive so an id is never reused

    def _key(self, nodes: int, depth: int, rules: RoundRules) -> tuple:
        ds = rules.datastore
        self._stores.setdefault(id(ds), ds)
        return int(nodes), int(depth), id(ds), rules.context_ngram, rules.tree_prune

    def tree(self, g: int, nodes: int, depth: int, rules: RoundRules) -> TokenTree:
        """The tree of the round after ``g`` generated tokens (1 <= g <= the trace's length).

        Raises:
            ValueError: ``g`` outside 1..the trace's length, or as :meth:`RoundRules.tree`.
        """
        t = self._trace()
        if not 1 <= g <= t.n:
            raise ValueError(f"g={g} is outside 1..{t.n} (a round needs its pending token generated[g-1]).")
        key = self._key(nodes, depth, rules)
        if depth == rules.tree_depth:
            if key not in self._sweeps:
                self._sweeps[key] = self._sweep(t, nodes, depth, rules)
            return self._sweeps[key][g - 1]
        k = (g, *key)
        if k not in self._single:
            seq = np.concatenate([t.prompt, t.generated[:g]]).tolist()
            self._single[k] = rules.tree(SuffixIndex(seq), seq, nodes, depth)
        return self._single[k]

    @staticmethod
    def _sweep(t: Trace, nodes: int, depth: int, rules: RoundRules) -> list[TokenTree]:
        seq = t.prompt.tolist()
        index, out = SuffixIndex(seq), []
        for tok in t.generated.tolist():
            index.extend(int(tok))
            seq.append(int(tok))
            out.append(rules.tree(index, seq, nodes, depth))
        return out


_TREES: dict[int, TraceTrees] = {}


def trace_trees(trace: Trace) -> TraceTrees:
    """The :class:`TraceTrees` memo of ``trace`` (one per trace object, dropped with it)."""
    key = id(trace)
    memo = _TREES.get(key)
    if memo is None or memo._trace() is not trace:
        memo = _TREES[key] = TraceTrees(trace)
        weakref.finalize(trace, _TREES.pop, key, None)
    return memo


def stopped_draft_len(probs, K: int, stop_threshold: Optional[float]) -> int:
    """Draft tokens a round produces under confidence-threshold drafting (see
    :meth:`lede_env.stopping.StopRule.draft_len`, which every rule implements).

    Args:
        probs: draft-head probabilities of the first draft tokens (fewer than ``K`` past the
            end of a trace; drafting continues there). They are the greedy path's: after a
            draft token that verification will reject, the real decoder drafts from a wrong
            prefix whose probabilities a trace does not hold, so K' is exact only up to the
            first rejected draft token (the emitted tokens are exact always).
        K: the action's speculation length (the cap).
        stop_threshold: stop after the first token with probability below it (``None``: never).

    Returns:
        K' in 1..K: the position of the first low-confidence token (kept: it was drafted and is
        verified), else K.
    """
    return as_stop_rule(stop_threshold).draft_len(0, probs, K)


def oracle_plan(trace: Trace, rules: RoundRules, max_new_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """The cheapest action sequence for a trace, by dynamic programming (Bellman's equation of
    the ``net`` reward with discount 1: minimise total cost; the token count is fixed).

    Returns:
        ``(best_action, cost_to_go)``: [limit] int64 and [limit + 1] float64 arrays indexed by
        the number of tokens generated so far ``g`` (entries for g = 0 are unused).
    """
    limit = budget(trace, max_new_tokens)
    best = np.zeros(limit, np.int64)
    ctg = np.zeros(limit + 1, np.float64)
    for g in range(limit - 1, 0, -1):
        best_c, best_a = np.inf, 0
        for a in range(rules.actions.n):
            oc, _, cost = replay_round(trace, g, a, rules, limit)
            c = cost + (0.0 if oc.done else ctg[g + len(oc.emitted)])
            if c < best_c - 1e-12:
                best_c, best_a = c, a
        ctg[g], best[g] = best_c, best_a
    return best, ctg


def rollout(trace: Trace, rules: RoundRules, max_new_tokens: int, choose) -> dict:
    """Play a whole episode on ``trace`` with ``choose(g) -> action``; return totals
    (``tokens``, ``cost``, ``rounds``, ``accepted``, ``drafted``).

    This is the trace-only fast path of the oracle and the best-static search (one rollout per
    candidate action and trace), kept apart from the gym episode loop
    (:func:`lede_env.episodes.play_episode`) on purpose: it plays :func:`replay_round` directly,
    without the env's observations, rewards and infos, which cost more than the round itself.
    Its totals equal that loop's on the trace env for the same actions (overhead not charged).
    """
    limit = budget(trace, max_new_tokens)
    g, cost, rounds, acc, drafted = 1, 0.0, 0, 0, 0
    done = limit <= 1 or (trace.eos and trace.n == 1)
    while not done:
        oc, E, c = replay_round(trace, g, choose(g), rules, limit)
        g += len(oc.emitted)
        cost += c
        rounds += 1
        acc += oc.accepted
        drafted += oc.draft_len
        done = oc.done
    return {"tokens": g - 1, "cost": cost, "rounds": rounds, "accepted": acc, "drafted": drafted}


def throughput(results: Sequence[dict]) -> float:
    """Total round tokens / total cost (tokens per AR-step unit) over several episodes
    (:func:`lede_env.metrics.throughput`; NaN at zero cost)."""
    return metric_throughput(sum(r["tokens"] for r in results), sum(r["cost"] for r in results))


def useful_actions(rules: RoundRules) -> list[int]:
    """The actions whose best case can beat an AR step under ``rules``' cost profile: action 0,
    and every (E, K) whose round, all K drafts accepted, emits more tokens per unit of cost than
    AR (``(K + 1) / cost(E, K) > 1 / cost(AR)``, with the bonus token; ``K / cost`` without it).
    A tree of at most B nodes emits at most ``min(depth, n) + 1`` tokens when it verifies n
    nodes (one branch is accepted), so a tree action is kept if some n <= B has
    ``(min(tree_depth, n) + 1) / cost_tree(n) > 1 / cost(AR)``.
    The rest can never pay, whatever the text: offline learners only spread value over them."""
    prof, acts = rules.profile, rules.actions
    ar = prof.round_cost(0, 0, 1, rules.reuse)
    keep = [0]
    for a in range(1, acts.n):
        B = acts.tree_budget(a)
        if B:
            if any((min(rules.tree_depth, n) + 1) / prof.round_cost(0, n, n + 1, rules.reuse, tree=True) > 1.0 / ar
                   for n in range(1, B + 1)):
                keep.append(a)
            continue
        E, K = acts.decode(a)
        n = verified_positions(K, rules.bonus)  # also the tokens of a fully accepted round
        if n / prof.round_cost(E, K, n, rules.reuse) > 1.0 / ar:
            keep.append(a)
    return keep


def best_static(traces: Sequence[Trace], rules: RoundRules, max_new_tokens: int,
                candidates: Optional[Sequence[int]] = None) -> tuple[int, float]:
    """The static action with the best throughput over ``traces`` (LayerSkip's setting, chosen on
    training traces), under ``rules`` as given (drop the overhead for a policy that reads no
    observation: :meth:`RoundRules.without_overhead`).

    Args:
        candidates: actions to try (default: every action).

    Returns:
        ``(action, throughput)``; throughput = total tokens / total cost (AR = about 1.0).
    """
    best = (0, -1.0)
    for a in (range(rules.actions.n) if candidates is None else candidates):
        tp = throughput([rollout(t, rules, max_new_tokens, lambda g, a=a: a) for t in traces])
        if tp > best[1]:
            best = (int(a), tp)
    return best
