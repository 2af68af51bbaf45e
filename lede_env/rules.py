"""The rules of a round, one frozen object shared by trace replay and the real decoder.

:class:`RoundRules` says what an action does (the action map), how a round drafts (bonus token,
layer reuse, in-round stop rule, context drafts and the datastore behind them), what ends
generation and what a round costs. :func:`lede_env.replay.replay_round` and
:meth:`lede_env.decoding.SelfSpeculativeDecoder.play_round` open a round with the same
:meth:`RoundRules.plan` and charge it with the same :meth:`RoundRules.cost`.

This module holds data and pure functions only.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Optional

from .costs import CostProfile
from .lookup import DEFAULT_NGRAM, check_ngram
from .mdp import ActionMap, clamp_draft_len
from .stopping import StopRule, as_stop_rule
from .suffix_index import SuffixIndex, TokenTree
from .trees import TreePrune, round_tree

if TYPE_CHECKING:
    from .datastore import NgramDatastore


@dataclass(frozen=True)
class RoundRules:
    """What a round needs besides the text (a trace, or the decoder's model and KV cache).

    Attributes:
        actions: the action map (:class:`~lede_env.mdp.ActionMap`).
        profile: the cost profile (round costs in AR-step units); ``None``: rounds cost 0 (a
            decoder whose caller charges costs itself). Trace replay needs one.
        bonus: verify K+1 positions (True) or K (False).
        eos_ids: tokens that end generation.
        reuse: verification reuses the draft's layers 1..E (compute reuse, LayerSkip arXiv
            2404.16710); without it the full model verifies (the plain SSD baseline).
        stop_threshold: confidence-threshold drafting (Draft & Verify, arXiv 2309.08168;
            Kangaroo, arXiv 2404.18911): a round stops drafting after the first draft token
            whose draft-head probability is below it, so K is a cap; ``None`` drafts all K.
        stop_rule: any :class:`~lede_env.stopping.StopRule` (e.g. the calibrated rule); takes
            precedence over ``stop_threshold``.
        context_draft: most tokens of a context draft (prompt lookup) on action 0 (0: action 0
            is a plain AR step). The draft follows from the prompt and the greedy continuation
            so far, so a trace replays it exactly.
        context_ngram: (shortest, longest) suffix lengths matched.
        datastore: where the context has no match, a context draft comes from this
            :class:`~lede_env.datastore.NgramDatastore` (the model's own earlier text; REST,
            arXiv 2311.08252); ``None``: no draft there.
        tree_depth: longest branch of a tree action's token tree (tokens;
            :meth:`plan_tree`, :func:`lede_env.trees.round_tree`).
        tree_prune: the static tree rule (:class:`~lede_env.trees.TreePrune`): a tree round
            verifies only the prefix of its tree that pays under the cost profile; ``None``: the
            whole tree. It changes which nodes are verified, so it is a rule of the round
            (trace replay and the decoder apply it in :meth:`tree`), like ``stop_rule``.

    Context actions (``actions.context_lengths``) copy up to their own length instead.

    Raises:
        ValueError: a negative ``context_draft`` or a bad ``context_ngram``.
    """

    actions: ActionMap
    profile: Optional[CostProfile]
    bonus: bool = True
    eos_ids: tuple[int, ...] = ()
    reuse: bool = True
    stop_threshold: Optional[float] = None
    stop_rule: Optional[StopRule] = None
    context_draft: int = 0
    context_ngram: tuple[int, int] = DEFAULT_NGRAM
    datastore: Optional["NgramDatastore"] = None
    tree_depth: int = 8
    tree_prune: Optional[TreePrune] = None

    def __post_init__(self) -> None:
        if self.context_draft < 0:
            raise ValueError(f"context_draft={self.context_draft} must be >= 0 (0: no context drafts).")
        object.__setattr__(self, "context_draft", int(self.context_draft))
        object.__setattr__(self, "context_ngram", check_ngram(self.context_ngram))
        object.__setattr__(self, "eos_ids", tuple(int(e) for e in self.eos_ids))

    @property
    def stop(self) -> StopRule:
        """The in-round stop rule in force (``stop_rule``, else the threshold's, else none)."""
        if self.stop_rule is not None:
            return self.stop_rule
        return as_stop_rule(self.stop_threshold)

    @property
    def copy_max(self) -> int:
        """Most tokens any action copies from the context (action 0's ``context_draft`` or the
        longest context action): the match length observations and rounds look up."""
        return max(self.context_draft, self.actions.max_copy)

    def without_overhead(self) -> "RoundRules":
        """The same rules for a policy that computes no observation (static, heuristic, oracle,
        AR): the profile's per-round feature/policy overhead is not charged."""
        return self if self.profile is None else replace(self, profile=replace(self.profile, overhead=0.0))

    def plan(self, action: int, remaining: int) -> tuple[int, int, int]:
        """How a round opens: ``(E, K, n_copy)`` for ``action`` with ``remaining`` tokens of budget.

        ``K`` is the exit draft's length clamped to the budget (:func:`~lede_env.mdp.clamp_draft_len`);
        when it is 0 (action 0, a context action, or K clamped away) the round is an AR step or a
        context draft: ``E = 0`` and ``n_copy`` is the most tokens it copies (a context action's
        length, else ``context_draft``, clamped to the budget; 0: a plain AR step). Otherwise
        ``n_copy`` is 0.

        Raises:
            ValueError: an action outside the action map.
        """
        E, K = self.actions.decode(action)
        copy = (K or self.context_draft) if E == 0 else self.context_draft  # context draft cap if K ends at 0
        K = clamp_draft_len(K, remaining, self.bonus) if E else 0
        if K:
            return E, K, 0
        return 0, 0, clamp_draft_len(copy, remaining, self.bonus)

    def plan_tree(self, action: int, remaining: int) -> tuple[int, int]:
        """How a tree action's round opens: ``(budget, depth)``, the most nodes and the longest
        branch of its tree with ``remaining`` tokens of budget (the depth clamped as a draft
        length is, :func:`~lede_env.mdp.clamp_draft_len`; ``(0, 0)`` then, or for any action that
        is not a tree action: see :meth:`plan`).

        Raises:
            ValueError: an action outside the action map.
        """
        budget = self.actions.tree_budget(action)
        depth = clamp_draft_len(self.tree_depth, remaining, self.bonus) if budget else 0
        return (budget, depth) if depth else (0, 0)

    def tree(self, context: SuffixIndex, seq, budget: int, depth: int) -> TokenTree:
        """The token tree of a tree round opened by :meth:`plan_tree` (``(budget, depth)``):
        :func:`lede_env.trees.round_tree` with these rules' datastore, n-gram range and
        ``tree_prune``. ``context`` indexes ``seq`` (prompt and generated ids, pending token last).

        Raises:
            ValueError: as :func:`~lede_env.trees.round_tree`.
        """
        return round_tree(context, seq, budget, depth, self.datastore, self.context_ngram, self.tree_prune)

    def cost(self, exit_layer: int, draft_len: int, n_verify: int, passes: int = 0, overhead: bool = True,
             tree: bool = False) -> float:
        """A round's cost in AR-step units (:meth:`~lede_env.costs.CostProfile.round_cost`; 0
        without a profile), the per-round feature/policy overhead charged only if ``overhead``.
        A tree action's round is ``(0, nodes, nodes + 1, tree=True)``: the full model verifies the
        pending token and the tree's nodes under a tree attention mask."""
        if self.profile is None:
            return 0.0
        cost = self.profile.round_cost(exit_layer, draft_len, n_verify, self.reuse, passes, tree=tree)
        return cost if overhead else cost - self.profile.overhead / self.profile.ar_step


__all__ = ["RoundRules"]
