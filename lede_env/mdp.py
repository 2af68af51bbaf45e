"""The pieces of the MDP shared by the trace environment and the real decoder.

- :class:`ActionMap` - ``Discrete(1 + n_exits * n_lengths)`` <-> (exit layer E, speculation length K).
- :class:`RoundOutcome` - what one draft/verify round does, given the draft and verifier tokens
  (the single accept rule used by both the env's replay and the live decoder); :func:`accept`
  for one draft, :func:`accept_tree` for a token tree.
- :class:`ObservationBuilder` - the observation dict and its flat float32 layout.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field, replace
from typing import Optional, Sequence

import numpy as np
from gymnasium import spaces

from .datastore import with_datastore
from .lookup import AGREE_DEPTH, SPAN_CAP, context_match, match_details


@dataclass(frozen=True)
class ActionMap:
    """Maps action indices to (exit layer, speculation length) pairs and back.

    Action 0 = no exit draft: one plain full-model step, or, in a decoder or env with
    ``context_draft`` on, a context draft of up to that many tokens (prompt lookup,
    :mod:`lede_env.lookup`). Actions ``1 .. C`` (``C = len(context_lengths)``) = a context draft
    of up to ``context_lengths[j - 1]`` copied tokens, ``(E, K) = (0, length)``: the policy
    picks how many copied tokens to verify (a plain step where the context has no match).
    Actions ``1 + C .. C + T`` (``T = len(tree_budgets)``) = a token tree of at most
    ``tree_budgets[j - 1 - C]`` nodes (:func:`lede_env.suffix_index.round_tree`), verified in one
    pass with a tree attention mask; :meth:`tree_budget` names the budget, :meth:`decode` gives
    ``(0, 0)`` for them (no exit layer, no single draft). Action
    ``1 + C + T + i * k_max + (K - 1)`` = exit layer ``exit_layers[i]``, speculation length K
    (1 <= K <= k_max).

    Raises:
        ValueError: ``k_max`` outside 1..64, or ``context_lengths`` / ``tree_budgets`` not
            strictly increasing integers in 1..64.
    """

    exit_layers: tuple[int, ...]
    k_max: int
    context_lengths: tuple[int, ...] = ()
    tree_budgets: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.k_max, (int, np.integer)) or not 1 <= self.k_max <= 64:
            raise ValueError(f"k_max={self.k_max!r} must be an integer in 1..64 (the paper caps K at 12).")
        cl = tuple(self.context_lengths)
        if any(isinstance(c, bool) or not isinstance(c, (int, np.integer)) or not 1 <= c <= 64 for c in cl) or \
                any(b <= a for a, b in zip(cl, cl[1:])):
            raise ValueError(f"context_lengths={self.context_lengths!r} must be strictly increasing integers in "
                             "1..64 (most copied tokens each context action verifies), e.g. (1, 2, 3, 4, 6, 8).")
        object.__setattr__(self, "context_lengths", tuple(int(c) for c in cl))
        tb = tuple(self.tree_budgets)
        if any(isinstance(b, bool) or not isinstance(b, (int, np.integer)) or not 1 <= b <= 64 for b in tb) or \
                any(b <= a for a, b in zip(tb, tb[1:])):
            raise ValueError(f"tree_budgets={self.tree_budgets!r} must be strictly increasing integers in 1..64 "
                             "(most nodes each tree action verifies), e.g. (4, 8).")
        object.__setattr__(self, "tree_budgets", tuple(int(b) for b in tb))

    @property
    def n(self) -> int:
        """Number of actions."""
        return 1 + len(self.context_lengths) + len(self.tree_budgets) + len(self.exit_layers) * self.k_max

    @property
    def first_tree_action(self) -> int:
        """Index of the first tree action (after action 0 and the context actions)."""
        return 1 + len(self.context_lengths)

    @property
    def first_exit_action(self) -> int:
        """Index of the first exit action (after action 0, the context and the tree actions)."""
        return 1 + len(self.context_lengths) + len(self.tree_budgets)

    def tree_budget(self, action) -> int:
        """Most nodes of the token tree a tree action verifies; 0 for any other action.

        Raises:
            TypeError, ValueError: as :meth:`decode`.
        """
        self.decode(action)
        j = int(action) - self.first_tree_action
        return self.tree_budgets[j] if 0 <= j < len(self.tree_budgets) else 0

    def decode(self, action) -> tuple[int, int]:
        """Action index -> ``(E, K)``: ``(0, 0)`` for action 0, ``(0, length)`` for a context
        action, ``(exit layer, K)`` for an exit action.

        Raises:
            TypeError: a non-integer action.
            ValueError: an action outside ``0 .. n-1``.
        """
        if isinstance(action, np.ndarray) and action.shape == ():
            action = action.item()
        if isinstance(action, bool) or not isinstance(action, (int, np.integer)):
            raise TypeError(f"Action must be an integer in 0..{self.n - 1}, got {action!r} ({type(action).__name__}).")
        a = int(action)
        if not 0 <= a < self.n:
            raise ValueError(f"Action {a} is outside 0..{self.n - 1} (1 + {len(self.context_lengths)} context "
                             f"lengths + {len(self.tree_budgets)} tree budgets + {len(self.exit_layers)} exits x "
                             f"{self.k_max} lengths).")
        if a == 0:
            return 0, 0
        if a < self.first_tree_action:
            return 0, self.context_lengths[a - 1]
        if a < self.first_exit_action:
            return 0, 0  # a tree action (tree_budget names its budget)
        i, k = divmod(a - self.first_exit_action, self.k_max)
        return self.exit_layers[i], k + 1

    def encode_tree(self, budget: int) -> int:
        """Tree budget -> its tree action. Raises ``ValueError`` if not in the map."""
        if budget not in self.tree_budgets:
            raise ValueError(f"Tree budget {budget} is not one of {self.tree_budgets}.")
        return self.first_tree_action + self.tree_budgets.index(budget)

    def encode(self, exit_layer: int, k: int) -> int:
        """``(E, K)`` -> action index; ``(0, 0)`` -> 0, ``(0, length)`` -> that context action
        (tree actions: :meth:`encode_tree`). Raises ``ValueError`` if not in the map."""
        if exit_layer == 0 and k == 0:
            return 0
        if exit_layer == 0:
            if k not in self.context_lengths:
                raise ValueError(f"Context-draft length {k} is not one of {self.context_lengths}.")
            return 1 + self.context_lengths.index(k)
        if exit_layer not in self.exit_layers:
            raise ValueError(f"Exit layer {exit_layer} is not one of {self.exit_layers}.")
        if not 1 <= k <= self.k_max:
            raise ValueError(f"Speculation length K={k} is outside 1..{self.k_max}.")
        return self.first_exit_action + self.exit_layers.index(exit_layer) * self.k_max + (k - 1)

    @property
    def max_copy(self) -> int:
        """The longest context draft a context action asks for (0 without context actions)."""
        return max(self.context_lengths, default=0)


@dataclass
class RoundOutcome:
    """Result of the accept rule for one round.

    Attributes:
        emitted: tokens appended to the output this round (after EOS / budget truncation).
        accepted: draft tokens among ``emitted``.
        draft_len: K actually drafted (after clamping to the remaining budget).
        n_verify: positions verified (K+1 with the bonus token, K without; 1 for AR).
        advance: positions the KV cache keeps beyond the old pending position (= untruncated
            emitted count).
        done: EOS emitted or budget reached.
        eos: EOS emitted.
    """

    emitted: list[int]
    accepted: int
    draft_len: int
    n_verify: int
    advance: int
    done: bool
    eos: bool


def verified_positions(k: int, bonus: bool) -> int:
    """Positions a round verifies when it keeps ``k`` draft tokens: k + 1 with the bonus token
    (the last draft token also passes layers 1..E), k without it; a round that keeps none
    verifies the pending token alone (1)."""
    return k + 1 if bonus else max(k, 1)


def clamp_draft_len(k: int, remaining: int, bonus: bool) -> int:
    """Never draft tokens that could not be emitted: with ``remaining`` tokens left in the budget,
    K is clamped to ``remaining - 1`` (bonus) or ``remaining`` (no bonus); 0 means an AR step."""
    return max(0, min(k, remaining - 1 if bonus else remaining))


def accept(draft: Sequence[int], verifier: Sequence[int], remaining: int, eos_ids: Sequence[int]) -> RoundOutcome:
    """The greedy accept rule (lossless).

    Args:
        draft: d_1..d_K draft tokens.
        verifier: v_1..v_n verifier argmax tokens at the n verified positions (n = K or K+1;
            for an AR step K = 0 and n = 1).
        remaining: tokens still allowed by ``max_new_tokens`` (>= 1).
        eos_ids: token ids that end generation.

    Returns:
        The round's :class:`RoundOutcome`: the longest agreeing prefix d_1..d_a, then v_{a+1}
        if it was verified; truncated at the first EOS and at ``remaining``.
    """
    K, n = len(draft), len(verifier)
    a = 0
    while a < K and a < n and draft[a] == verifier[a]:
        a += 1
    tokens = list(draft[:a]) + ([verifier[a]] if a < n else [])
    advance = len(tokens)
    eos = False
    for j, t in enumerate(tokens):
        if t in eos_ids:
            tokens = tokens[: j + 1]
            eos = True
            break
    tokens = tokens[:remaining]
    done = eos or len(tokens) >= remaining
    return RoundOutcome(emitted=tokens, accepted=min(a, len(tokens)), draft_len=K, n_verify=n, advance=advance,
                        done=done, eos=eos)


def tree_branch(tokens: Sequence[int], parents: Sequence[int], verifier: Sequence[int]) -> list[int]:
    """The accepted branch of a token tree: from the root, descend to the child whose token is the
    verifier's token at the current node while there is one (SpecInfer's tree verification,
    arXiv 2305.09781; siblings hold distinct tokens, so the walk is unique).

    Args:
        tokens: the n nodes' tokens (topological order, a parent before its children).
        parents: each node's parent index, -1 for the root's children.
        verifier: n + 1 tokens, the verifier's at the root (index 0) and at node i (index i + 1):
            greedy argmaxes, or one draw per node from the target distribution (speculative
            sampling; rows the walk never reaches may hold anything).

    Returns:
        Node indices of the accepted branch, root excluded, in order (``[]``: no child of the
        root matches).

    Raises:
        ValueError: ``tokens`` and ``parents`` of different lengths, or not n + 1 verifier tokens.
    """
    n = len(tokens)
    if len(parents) != n or len(verifier) != n + 1:
        raise ValueError(f"tree_branch: {n} tokens, {len(parents)} parents and {len(verifier)} verifier tokens; "
                         "give one parent per node and n + 1 verifier tokens (the root's first).")
    kids = {(int(p), int(t)): i for i, (p, t) in enumerate(zip(parents, tokens))}
    branch, node = [], -1
    while (child := kids.get((node, int(verifier[node + 1])))) is not None:
        branch.append(child)
        node = child
    return branch


def accept_tree(tokens: Sequence[int], parents: Sequence[int], verifier: Sequence[int], remaining: int,
                eos_ids: Sequence[int]) -> tuple[RoundOutcome, list[int]]:
    """The accept rule of a token-tree round (lossless; :func:`accept`'s rule over a tree).

    The accepted branch (:func:`tree_branch`) d_1..d_a is emitted, then the verifier's token at
    its last node (at the root when a = 0), truncated at the first EOS and at ``remaining``
    exactly as :func:`accept` truncates.

    Args:
        tokens, parents, verifier: as :func:`tree_branch` (n nodes, n + 1 verifier tokens).
        remaining: tokens still allowed by ``max_new_tokens`` (>= 1).
        eos_ids: token ids that end generation.

    Returns:
        ``(outcome, branch)``: the :class:`RoundOutcome` (``draft_len`` = n nodes, ``accepted``
        = branch tokens among the emitted, ``n_verify`` = n + 1, ``advance`` = a + 1: the root and
        the branch's nodes stay in the KV cache) and the branch's node indices (untruncated).

    Raises:
        ValueError: as :func:`tree_branch`.
    """
    branch = tree_branch(tokens, parents, verifier)
    path = [int(tokens[i]) for i in branch]
    oc = accept(path, path + [int(verifier[branch[-1] + 1 if branch else 0])], remaining, eos_ids)
    return replace(oc, draft_len=len(tokens), n_verify=len(tokens) + 1), branch


#: observation layouts (:class:`ObservationConfig`)
OBSERVATION_KINDS = ("full", "compact")
#: prior of the running per-exit acceptance estimates of the compact observation
ACCEPT_PRIOR = 0.3


@dataclass
class ObservationConfig:
    """Observation layout.

    Attributes:
        hidden_dim: width of the hidden-state context; a fixed seeded Gaussian projection of the
            final normed hidden state (0 keeps the full width d). ``"full"`` kind only.
        history: past rounds summarised in ``history``.
        recent_tokens: recent token ids in ``tokens``. ``"full"`` kind only.
        seed: seed of the projection matrix.
        kind: ``"full"`` (the hidden-state context and every exit's head statistics: a head call
            per exit per round) or ``"compact"`` (only what the rounds already computed plus the
            shallowest ``stat_exits`` exits' head statistics, and running per-exit acceptance:
            the generation's own experience; far cheaper). What each costs a round:
            ``docs/experiments.md`` ("Observations").
        stat_exits: ``"compact"`` only: how many of the shallowest exits' statistics to include.
        decay: ``"compact"`` only: per-round decay of the running acceptance estimates.
        context: add the ``context`` key (features of the context drafter, see
            :class:`ObservationBuilder`); envs with context drafts turn it on.
        context_agreement: the ``context`` key also holds how many earlier occurrences the
            matched n-gram has and how far their continuations agree
            (:func:`lede_env.lookup.match_agreement`); 2 more features.
        context_span: the ``context`` key also holds the matched span
            (:func:`lede_env.lookup.match_span`: how many tokens at the end of the text agree
            with those before the copied continuation); 1 more feature.
    """

    hidden_dim: int = 64
    history: int = 4
    recent_tokens: int = 8
    seed: int = 0
    kind: str = "full"
    stat_exits: int = 1
    decay: float = 0.8
    context: bool = False
    context_agreement: bool = False
    context_span: bool = False

    def __post_init__(self) -> None:
        for name in ("hidden_dim", "history", "recent_tokens", "stat_exits"):
            if getattr(self, name) < 0:
                raise ValueError(f"ObservationConfig.{name} must be >= 0, got {getattr(self, name)}.")
        if self.kind not in OBSERVATION_KINDS:
            raise ValueError(f"Observation kind {self.kind!r}; choose one of {OBSERVATION_KINDS}.")
        if not 0.0 <= self.decay < 1.0:
            raise ValueError(f"ObservationConfig.decay must be in [0, 1), got {self.decay}.")


@dataclass
class ObservationBuilder:
    """Builds observations and keeps the round history of one episode.

    Observation keys (all float32 except ``tokens``):

    ========== ==================== =========================================================
    key        shape                meaning
    ========== ==================== =========================================================
    hidden     [h]                  final normed hidden state at the last verified position,
                                    projected (h = ``hidden_dim``, or d)
    exit_stats [n_exits, 3]         per exit at that position: its head's top-1 probability,
                                    entropy (nats, over the feature vocabulary), and 1.0 if
                                    its argmax equals the verifier's token there, else 0.0
    history    [H, 4]               last H rounds, newest last: accepted / k_max,
                                    K / k_max, E / L, 1.0 if fully accepted (zeros before)
    tokens     [R] int64            last R tokens of the sequence, pending token last (0-padded)
    progress   [1]                  tokens generated / max_new_tokens
    ========== ==================== =========================================================

    The ``"compact"`` kind (:attr:`ObservationConfig.kind`) keeps ``history`` and ``progress``
    and replaces the rest with what costs nothing extra:

    ========== ==================== =========================================================
    exit_stats [S, 3]               the same statistics for the S = ``stat_exits`` shallowest
                                    exits only
    experience [n_exits, 2]         per exit: running per-token acceptance of its drafts in
                                    this generation (accepted / (accepted + 1 if a draft token
                                    was rejected); decayed per use, prior 0.3), and how much
                                    evidence it rests on (tokens judged / (tokens judged + 8))
    ========== ==================== =========================================================

    With :attr:`ObservationConfig.context` (either kind), about the context drafter (prompt
    lookup, :mod:`lede_env.lookup`) at the current position:

    ========== ==================== =========================================================
    context    [3]                  length of the longest n-gram suffix that occurred before
                                    / the longest tried (0: no match, action 0 is a plain
                                    step); tokens action 0 would copy / the context-draft
                                    maximum; running per-token acceptance of context drafts
                                    in this generation (as ``experience``, prior 0.3)
    context    [+2]                 with :attr:`ObservationConfig.context_agreement`, also:
                                    (earlier occurrences of the matched n-gram - 1, at most
                                    3) / 3; tokens on which the copied occurrence's
                                    continuation agrees with the most recent other one's
                                    / ``lede_env.lookup.AGREE_DEPTH`` (0 for one occurrence)
    context    [+1]                 with :attr:`ObservationConfig.context_span`, last: the
                                    matched span / ``lede_env.lookup.SPAN_CAP``
    ========== ==================== =========================================================
    """

    config: ObservationConfig
    d_model: int
    n_exits: int
    num_layers: int
    k_max: int
    vocab_size: int
    exit_layers: tuple[int, ...] = ()
    _proj: Optional[np.ndarray] = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.compact and len(self.exit_layers) != self.n_exits:
            raise ValueError(f"The compact observation credits experience per exit: give the {self.n_exits} "
                             f"exit_layers (got {list(self.exit_layers)}).")
        h = self.config.hidden_dim
        if h:
            rng = np.random.default_rng(self.config.seed)
            self._proj = (rng.standard_normal((self.d_model, h)) / np.sqrt(h)).astype(np.float32)
        self._exit_of = {int(e): i for i, e in enumerate(self.exit_layers)}

    @property
    def hidden_width(self) -> int:
        return self.config.hidden_dim or self.d_model

    @property
    def compact(self) -> bool:
        return self.config.kind == "compact"

    @property
    def stat_exits(self) -> int:
        """Exits whose head statistics the observation holds (the first ones of the candidates)."""
        return min(self.config.stat_exits, self.n_exits) if self.compact else self.n_exits

    @property
    def context_width(self) -> int:
        """Features in the ``context`` key (3, + 2 with ``context_agreement``, + 1 with ``context_span``)."""
        return 3 + 2 * self.config.context_agreement + self.config.context_span

    def space(self) -> spaces.Dict:
        """The gymnasium Dict observation space."""
        H, R = self.config.history, self.config.recent_tokens
        inf = np.inf
        ctx = {"context": spaces.Box(0.0, 1.0, (self.context_width,), np.float32)} if self.config.context else {}
        if self.compact:
            stats = {"exit_stats": spaces.Box(0.0, inf, (self.stat_exits, 3), np.float32)} if self.stat_exits else {}
            return spaces.Dict(stats | {
                "experience": spaces.Box(0.0, 1.0, (self.n_exits, 2), np.float32),
                "history": spaces.Box(0.0, 1.0, (H, 4), np.float32),
                "progress": spaces.Box(0.0, 1.0, (1,), np.float32),
            } | ctx)
        return spaces.Dict({
            "hidden": spaces.Box(-inf, inf, (self.hidden_width,), np.float32),
            "exit_stats": spaces.Box(0.0, inf, (self.n_exits, 3), np.float32),
            "history": spaces.Box(0.0, 1.0, (H, 4), np.float32),
            "tokens": spaces.Box(0, self.vocab_size - 1, (R,), np.int64),
            "progress": spaces.Box(0.0, 1.0, (1,), np.float32),
        } | ctx)

    def layout(self) -> list[tuple[str, list[int]]]:
        """Keys and shapes concatenated (in this order) by :meth:`flatten`; ``tokens`` is left out."""
        ctx = [("context", [self.context_width])] if self.config.context else []
        if self.compact:
            stats = [("exit_stats", [self.stat_exits, 3])] if self.stat_exits else []
            return stats + [("experience", [self.n_exits, 2]), ("history", [self.config.history, 4]),
                            ("progress", [1])] + ctx
        return [("hidden", [self.hidden_width]), ("exit_stats", [self.n_exits, 3]),
                ("history", [self.config.history, 4]), ("progress", [1])] + ctx

    @property
    def flat_dim(self) -> int:
        return int(sum(np.prod(s) for _, s in self.layout()))

    def new_history(self) -> "ObservationHistory":
        """An empty round history for one episode (generation): what :meth:`build` reads besides
        the round's features. Each generation keeps its own, so a builder serves interleaved ones."""
        return ObservationHistory(self)

    def build(self, hidden: np.ndarray, top1: np.ndarray, entropy: np.ndarray, agree: np.ndarray,
              recent: Sequence[int], progress: float, context: Sequence[float] = (0.0, 0.0, 0.0, 0.0, 0.0),
              history: Optional["ObservationHistory"] = None) -> dict[str, np.ndarray]:
        """Assemble one observation.

        Args:
            hidden: [d] float final normed hidden state at the last verified position (unused,
                may be ``None``, for the compact kind).
            top1, entropy, agree: [n_exits] per-exit features at that position (the compact kind
                reads the first :attr:`stat_exits` of them; it may be given only those).
            recent: token ids, pending token last.
            progress: tokens generated / max_new_tokens.
            context: (match length / longest n-gram, copyable tokens / context-draft maximum,
                occurrences feature, agreement feature, span feature), read with
                :attr:`ObservationConfig.context` (the 3rd and 4th with ``context_agreement``,
                the 5th with ``context_span``; see :func:`context_features`).
            history: the episode's rounds so far (:meth:`new_history`; ``None``: no round yet).
        """
        hs = self.new_history() if history is None else history
        H, R = self.config.history, self.config.recent_tokens
        hist = np.zeros((H, 4), np.float32)
        if H:
            rows = list(hs.rows)[-H:]
            if rows:
                hist[H - len(rows):] = np.asarray(rows, np.float32)
        stats = np.stack([top1, entropy, agree], -1).astype(np.float32)
        progress = np.array([min(max(progress, 0.0), 1.0)], np.float32)
        ctx = {}
        if self.config.context:
            feats = ([context[0], context[1], hs.ctx_alpha]
                     + (list(context[2:4]) if self.config.context_agreement else [])
                     + ([context[4]] if self.config.context_span else []))
            ctx = {"context": np.array(feats, np.float32).clip(0.0, 1.0)}
        if self.compact:
            exp = np.stack([hs.alpha, hs.judged / (hs.judged + 8.0)], -1).astype(np.float32)
            out = {"exit_stats": stats[: self.stat_exits]} if self.stat_exits else {}
            return out | {"experience": exp, "history": hist, "progress": progress} | ctx
        hidden = np.asarray(hidden, dtype=np.float32)
        if self._proj is not None:
            hidden = hidden @ self._proj
        toks = np.zeros(R, np.int64)
        if R:
            r = list(recent)[-R:]
            if r:
                toks[R - len(r):] = r
        return {"hidden": hidden.astype(np.float32), "exit_stats": stats, "history": hist, "tokens": toks,
                "progress": progress} | ctx

    def flatten(self, obs: dict[str, np.ndarray]) -> np.ndarray:
        """[flat_dim] float32 vector for libraries that need a Box (d3rlpy, exported policies)."""
        return flatten_by_layout(obs, self.layout())


class ObservationHistory:
    """The rounds of one episode (generation) as an observation reads them: the last rounds'
    (accepted, K, E, fully accepted) rows and, per exit and for context drafts, the running
    per-token acceptance (prior 0.3, decayed per judged token) and the tokens judged.

    Made by :meth:`ObservationBuilder.new_history`; the trace env keeps one per episode, the
    decoder one per :class:`~lede_env.decoding.DecodeState`.

    Attributes:
        rows: deque of [4] tuples (accepted / k_max, K / k_max, E / L, fully accepted), the last
            ``max(history, 1)`` rounds.
        alpha: [n_exits] float64 running acceptance per exit.
        judged: [n_exits] float64 draft tokens judged per exit (accepted, plus the rejected one).
        ctx_alpha: running acceptance of context drafts.
    """

    def __init__(self, builder: ObservationBuilder) -> None:
        self._b = builder
        self.rows: deque = deque(maxlen=max(builder.config.history, 1))
        self.alpha = np.full(builder.n_exits, ACCEPT_PRIOR, np.float64)
        self.judged = np.zeros(builder.n_exits, np.float64)
        self.ctx_alpha = ACCEPT_PRIOR

    def record(self, accepted: int, draft_len: int, exit_layer: int) -> None:
        """Append one round (and credit its exit's, or the context drafter's, experience:
        ``accepted`` tokens accepted, then one rejected if ``accepted < draft_len``).

        A tree round is recorded as a context draft (``exit_layer`` 0): ``draft_len`` its nodes,
        ``accepted`` its accepted branch's length. The row's fractions are clipped to 1 (a tree
        or a copy may verify more than ``k_max`` tokens)."""
        b = self._b
        full = 1.0 if draft_len > 0 and accepted >= draft_len else 0.0
        self.rows.append((min(accepted / b.k_max, 1.0), min(draft_len / b.k_max, 1.0), exit_layer / b.num_layers,
                          full))
        i = b._exit_of.get(int(exit_layer))
        if draft_len > 0 and (i is not None or exit_layer == 0):
            judged = accepted + (0 if accepted >= draft_len else 1)
            w = b.config.decay ** judged
            if i is None:  # a context draft
                self.ctx_alpha = w * self.ctx_alpha + (1 - w) * (accepted / judged)
            else:
                self.alpha[i] = w * self.alpha[i] + (1 - w) * (accepted / judged)
                self.judged[i] += judged


def context_features(match: tuple[int, Sequence[int]], context_draft: int, longest: int,
                     agreement: tuple[int, int] = (0, 0), span: int = 0) -> tuple[float, ...]:
    """The ``context`` observation's features other than the running acceptance, from a context
    match at the end of the sequence (:func:`lede_env.lookup.context_match` with
    ``max_len=context_draft``), its :func:`lede_env.lookup.match_agreement` and
    :func:`lede_env.lookup.match_span`: (matched n-gram length / ``longest`` tried, tokens a
    context draft would copy / ``context_draft``, (occurrences - 1, at most 3) / 3,
    agreement / ``AGREE_DEPTH``, span / ``SPAN_CAP``). The same function serves the trace env and
    the decoder, so both see the same values."""
    n, toks = match
    occ, agree = agreement
    return (n / longest, (len(toks) / context_draft if context_draft else 0.0), min(max(occ - 1, 0), 3) / 3.0,
            agree / AGREE_DEPTH, min(span, SPAN_CAP) / SPAN_CAP)


def context_observation(seq: Sequence[int], context_draft: int, ngram: tuple[int, int], config: "ObservationConfig",
                        index=None, datastore=None) -> tuple[tuple[int, list[int]], tuple[float, ...]]:
    """``(match, features)`` at the end of ``seq``: the context match a draft of up to
    ``context_draft`` tokens copies, and :func:`context_features` with the agreement and span
    that ``config`` asks for, from one look-up in ``index`` (a
    :class:`~lede_env.lookup.ContextIndex` of ``seq``) or one scan of ``seq``. Where the context
    has no match, a ``datastore`` (:class:`~lede_env.datastore.NgramDatastore`) proposes the
    draft instead: the match is then ``(0, its tokens)``, so the features show a draft
    (tokens / ``context_draft``) with no matched n-gram. The trace env and the decoder both build
    the ``context`` key with it."""
    if config.context_agreement or config.context_span:
        match, agree, span = (index.details(seq, context_draft) if index is not None
                              else match_details(seq, context_draft, ngram))
    else:  # the match alone: one dictionary look-up, no agreement or span computed
        match = index.match(seq, context_draft) if index is not None else context_match(seq, context_draft, ngram)
        agree, span = (0, 0), 0
    match = with_datastore(match, seq, context_draft, datastore)
    return match, context_features(match, context_draft, ngram[1], agree, span)


def flatten_by_layout(obs: dict, layout) -> np.ndarray:
    """Concatenate ``obs[key]`` for each ``(key, shape)`` of ``layout`` into one float32 vector."""
    return np.concatenate([np.asarray(obs[k], np.float32).reshape(-1) for k, _ in layout])
