"""Exact replay of self-speculative rounds over a trace, and the dynamic-programming oracle."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional, Sequence

import numpy as np

from .costs import CostProfile
from .datastore import NgramDatastore, with_datastore
from .lookup import DEFAULT_NGRAM, context_match
from .mdp import ActionMap, RoundOutcome, accept, clamp_draft_len, verified_positions
from .metrics import throughput as metric_throughput
from .stopping import StopRule, as_stop_rule
from .traces import Trace

_NO_DRAFT = -1  # a draft position past the end of the trace (never matches)
_UNKNOWN = -2  # a verifier position past an EOS (never emitted)


@dataclass(frozen=True)
class ReplayRules:
    """What a replayed round needs besides the trace.

    Attributes:
        actions: the action map.
        profile: the cost profile (round costs in AR-step units).
        bonus: verify K+1 positions (True) or K (False).
        eos_ids: tokens that end generation.
        reuse: verification reuses the draft's layers 1..E (compute reuse).
        stop_threshold: confidence-threshold drafting (Draft & Verify, arXiv 2309.08168;
            Kangaroo, arXiv 2404.18911): a round stops drafting after the first draft token
            whose draft-head probability is below it, so K is a cap; ``None`` drafts all K.
        stop_rule: any :class:`~lede_env.stopping.StopRule` (e.g. the calibrated rule); takes
            precedence over ``stop_threshold``.
        context_draft: most tokens of a context draft (prompt lookup) on action 0, as the
            decoder's ``context_draft`` (0: action 0 is a plain AR step). The draft follows from
            the prompt and the greedy continuation so far, so a trace replays it exactly.
        context_ngram: (shortest, longest) suffix lengths matched.
        datastore: where the context has no match, a context draft comes from this
            :class:`~lede_env.datastore.NgramDatastore` (the model's own earlier text), as in the
            decoder; ``None``: no draft there.

    Context actions (``actions.context_lengths``) copy up to their own length instead.
    """

    actions: ActionMap
    profile: CostProfile
    bonus: bool
    eos_ids: tuple[int, ...]
    reuse: bool = True
    stop_threshold: Optional[float] = None
    stop_rule: Optional[StopRule] = None
    context_draft: int = 0
    context_ngram: tuple[int, int] = DEFAULT_NGRAM
    datastore: Optional[NgramDatastore] = None

    @property
    def stop(self) -> StopRule:
        """The in-round stop rule in force (``stop_rule``, else the threshold's, else none)."""
        if self.stop_rule is not None:
            return self.stop_rule
        return as_stop_rule(self.stop_threshold)

    @property
    def copy_max(self) -> int:
        """Most tokens any action copies from the context (see
        :attr:`~lede_env.decoding.SelfSpeculativeDecoder.copy_max`)."""
        return max(self.context_draft, self.actions.max_copy)

    def without_overhead(self) -> "ReplayRules":
        """The same rules for a policy that computes no observation (static, heuristic, oracle,
        AR): the profile's per-round feature/policy overhead is not charged."""
        return replace(self, profile=replace(self.profile, overhead=0.0))


def budget(trace: Trace, max_new_tokens: int) -> int:
    """Tokens an episode on ``trace`` may generate: ``max_new_tokens``, or the trace's length if
    it stopped (without EOS) earlier."""
    return max_new_tokens if trace.eos else min(max_new_tokens, trace.n)


def replay_round(trace: Trace, g: int, action: int, rules: ReplayRules, limit: int) -> tuple[RoundOutcome, int, float]:
    """One round on ``trace`` after ``g`` generated tokens (pending token ``generated[g-1]``).

    Args:
        limit: the episode's token budget (see :func:`budget`).

    Returns:
        ``(outcome, exit_layer, cost)``; ``exit_layer`` is 0 when the round was an AR step or a
        context draft (action 0, a context action, or K clamped to 0 by the budget); a round whose stop rule dropped its first
        draft token keeps its E with ``draft_len`` 0 (it verified the pending token alone).
    """
    E, K = rules.actions.decode(action)
    remaining = limit - g
    copy = (K or rules.context_draft) if E == 0 else rules.context_draft  # context draft cap if K ends at 0
    K = clamp_draft_len(K, remaining, rules.bonus) if E else 0
    N = trace.n
    passes = 0
    if K == 0:  # an AR step, or a context draft verified by the full model
        E = 0
        n_ctx = clamp_draft_len(copy, remaining, rules.bonus)
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
    return oc, E, rules.profile.round_cost(E, K, oc.n_verify, rules.reuse, passes)


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


def oracle_plan(trace: Trace, rules: ReplayRules, max_new_tokens: int) -> tuple[np.ndarray, np.ndarray]:
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


def rollout(trace: Trace, rules: ReplayRules, max_new_tokens: int, choose) -> dict:
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


def useful_actions(rules: ReplayRules) -> list[int]:
    """The actions whose best case can beat an AR step under ``rules``' cost profile: action 0,
    and every (E, K) whose round, all K drafts accepted, emits more tokens per unit of cost than
    AR (``(K + 1) / cost(E, K) > 1 / cost(AR)``, with the bonus token; ``K / cost`` without it).
    The rest can never pay, whatever the text: offline learners only spread value over them."""
    prof, acts = rules.profile, rules.actions
    ar = prof.round_cost(0, 0, 1, rules.reuse)
    keep = [0]
    for a in range(1, acts.n):
        E, K = acts.decode(a)
        n = verified_positions(K, rules.bonus)  # also the tokens of a fully accepted round
        if n / prof.round_cost(E, K, n, rules.reuse) > 1.0 / ar:
            keep.append(a)
    return keep


def best_static(traces: Sequence[Trace], rules: ReplayRules, max_new_tokens: int,
                candidates: Optional[Sequence[int]] = None) -> tuple[int, float]:
    """The static action with the best throughput over ``traces`` (LayerSkip's setting, chosen on
    training traces), under ``rules`` as given (drop the overhead for a policy that reads no
    observation: :meth:`ReplayRules.without_overhead`).

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
