"""The real self-speculative decoding loop (greedy, lossless).

Each round the policy picks an action (E, K) (:class:`~lede_env.mdp.ActionMap`); the decoder
drafts K tokens through layers 1..E and the exit head, verifies them with one pass of layers
E+1..L over the drafted positions (compute reuse: the draft already filled layers 1..E of the
shared KV cache, as in LayerSkip's self-speculation, arXiv 2404.16710), accepts the longest
agreeing prefix plus the verifier's next token, and crops every layer's cache to the accepted
length. Action 0 is one plain full-model step, or, with ``context_draft`` on, a draft copied
from the context (prompt lookup, :mod:`lede_env.lookup`) verified by the full model when the
context has a match. The output equals greedy decoding
(``model.generate(do_sample=False)``) for every action sequence, in fp32. In bf16/fp16 the
guarantee is per position: every emitted token is the teacher-forced argmax up to rounding
near-ties (:func:`lede_env.equivalence.teacher_forced_check`).

The loop reads top to bottom: :meth:`SelfSpeculativeDecoder.generate` -> :meth:`~SelfSpeculativeDecoder.start`
(prefill) -> per round :meth:`~SelfSpeculativeDecoder.observe`, the policy, and
:meth:`~SelfSpeculativeDecoder.play_round`: a draft source proposes (:class:`Drafter`:
:class:`ExitDraft`, :class:`CopyDraft`), one verification pass (``_verify``),
:func:`~lede_env.mdp.accept`, :meth:`LayerStack.crop`; a tree action's round
(``_play_tree``: :class:`TreeDraft`'s token tree, one pass under a tree attention mask,
:func:`~lede_env.mdp.accept_tree`, :meth:`LayerStack.compact` to the accepted branch). The rules
of the round are one frozen :class:`~lede_env.rules.RoundRules`, shared with trace replay. Speculative sampling is in
:mod:`lede_env.sampling`, in-round stopping of drafts in :mod:`lede_env.stopping`.
"""

from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from .costs import CostProfile
from .datastore import NgramDatastore, with_datastore
from .exits import ExitHeads
from .lookup import DEFAULT_NGRAM, ContextIndex, context_match
from .mdp import (ActionMap, ObservationBuilder, ObservationConfig, ObservationHistory, accept, accept_tree,
                  context_observation, verified_positions)
from .metrics import RoundTotals, acceptance, tokens_per_round
from .layers import LayerStack
from .policies import PlanPolicy, Policy, SequencePolicy, StaticPolicy  # noqa: F401 - re-exported
from .policies import own_stop_rule, own_tree_prune, reads_observations
from .sampling import Sampling, SpeculativeSampler, speculative_verify  # noqa: F401 - re-exported
from .rules import RoundRules
from .stopping import StopRule, as_stop_rule
from .suffix_index import SuffixIndex, TokenTree


@dataclass
class RoundRecord:
    """One round of decoding.

    Attributes:
        action: the action index the policy chose.
        exit_layer: E (0 for an AR step).
        draft_len: K actually drafted (after clamping to the budget; 0 for AR).
        accepted: draft tokens emitted.
        emitted: tokens emitted this round.
        cost: round cost in AR-step units (from the cost profile; 0 when none is given).
        seconds: wall-clock time of the round, policy included.
        policy_seconds: time spent computing the observation and asking the policy.
        n_verify: positions verified.
        passes: draft passes run (``draft_len``, or one more when the stop rule dropped a draft
            token; 1 with ``draft_len`` 0 when it dropped the first one: the round verified the
            pending token alone, an AR step plus one draft-head call).
        tree: a tree action's round (``draft_len`` = the tree's nodes, ``n_verify`` = nodes + 1,
            charged with ``tree=True``; an empty tree is an AR step).
    """

    action: int
    exit_layer: int
    draft_len: int
    accepted: int
    emitted: int
    cost: float = 0.0
    seconds: float = 0.0
    policy_seconds: float = 0.0
    n_verify: int = 0
    passes: int = 0
    tree: bool = False

    @property
    def fully_accepted(self) -> bool:
        return self.draft_len > 0 and self.accepted >= self.draft_len

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class GenerationResult:
    """Output of one generation.

    Attributes:
        tokens: generated token ids (prompt excluded).
        rounds: one :class:`RoundRecord` per round.
        seconds: wall-clock time, prefill included.
        prefill_seconds: time of the prompt's forward pass.
        eos: generation ended on an EOS token.
    """

    tokens: list[int]
    rounds: list[RoundRecord] = field(default_factory=list)
    seconds: float = 0.0
    prefill_seconds: float = 0.0
    eos: bool = False

    @property
    def drafted(self) -> int:
        return sum(r.draft_len for r in self.rounds)

    @property
    def accepted(self) -> int:
        return sum(r.accepted for r in self.rounds)

    @property
    def totals(self) -> RoundTotals:
        """The rounds' sums (:class:`~lede_env.metrics.RoundTotals`) every metric follows from."""
        return RoundTotals.of(self.rounds)

    @property
    def acceptance_rate(self) -> float:
        """Accepted draft tokens / drafted tokens (:func:`lede_env.metrics.acceptance`; NaN when
        nothing was drafted)."""
        return acceptance(self.accepted, self.drafted)

    @property
    def tokens_per_round(self) -> float:
        """Tokens emitted by rounds / rounds, the prefill's token excluded
        (:func:`lede_env.metrics.tokens_per_round`: 1.0 for AR, NaN without rounds)."""
        return tokens_per_round(sum(r.emitted for r in self.rounds), len(self.rounds))

    @property
    def cost(self) -> float:
        """Total cost in AR-step units (the first token, from prefill, is free)."""
        return sum(r.cost for r in self.rounds)


@dataclass
class DecodeState:
    """Everything one generation carries from round to round (the decoder itself keeps none).

    Made by :meth:`SelfSpeculativeDecoder.start`, advanced by
    :meth:`SelfSpeculativeDecoder.play_round`.

    Attributes:
        result: the :class:`GenerationResult` being filled (``tokens``, ``rounds``, ``eos``).
        max_new_tokens: the token budget (never exceeded).
        eos_ids: tokens that end this generation.
        want_obs: observations are computed (and the profile's overhead charged).
        cache: the KV cache of every layer (``LayerStack.new_cache()``).
        seq: prompt and generated token ids; the last one is the pending token (emitted, not yet
            in the cache).
        pos: position of the pending token (= positions held by the cache).
        normed_last: [d] final normed hidden state at the last verified position.
        taps_at: exit layer -> [d] its hidden state at that position, for the exits whose head
            statistics the observation reads (``None`` when it reads none).
        sampler: the sampling state, ``None`` under greedy decoding.
        done: the generation has ended (EOS, budget, or a stop callback).
        context_at: ``(len(seq), max_len, context_match(seq, max_len, ...))`` computed by
            :meth:`~SelfSpeculativeDecoder.observe` for the observation's context features, reused
            by the round at that position when it copies up to the same ``max_len`` (the matcher
            picks the occurrence by ``max_len``).
        context_index: the n-gram index of ``seq`` context drafts are matched with
            (:class:`~lede_env.lookup.ContextIndex`; ``None`` without context drafts).
        history: this generation's rounds as observations read them
            (:class:`~lede_env.mdp.ObservationHistory`).
        suffix_index: the suffix index of ``seq`` tree actions draft from
            (:class:`~lede_env.suffix_index.SuffixIndex`, extended with every emitted token;
            ``None`` without tree actions; stale after :meth:`~SelfSpeculativeDecoder.cut`, which
            ends the generation).
        tree_prune: the static tree rule this generation's policy brings
            (:func:`~lede_env.policies.own_tree_prune`; ``None``: the rules' ``tree_prune``).
    """

    result: GenerationResult
    max_new_tokens: int
    eos_ids: tuple[int, ...]
    want_obs: bool
    cache: object
    seq: list[int]
    pos: int
    normed_last: torch.Tensor
    taps_at: Optional[dict]
    sampler: Optional[SpeculativeSampler] = None
    done: bool = False
    context_at: Optional[tuple] = None
    context_index: Optional[ContextIndex] = None
    history: Optional[ObservationHistory] = None
    suffix_index: Optional[SuffixIndex] = None
    tree_prune: Optional[object] = None

    @property
    def pending(self) -> int:
        """The last emitted token, input of the next round."""
        return self.seq[-1]

    @property
    def remaining(self) -> int:
        """Tokens the budget still allows."""
        return self.max_new_tokens - len(self.result.tokens)


class _EndOnce:
    """A streamer whose ``end()`` reaches the wrapped one once, whichever exit path calls it."""

    def __init__(self, streamer) -> None:
        self.streamer, self.ended = streamer, False

    def put(self, value) -> None:
        self.streamer.put(value)

    def end(self) -> None:
        if not self.ended:
            self.ended = True
            self.streamer.end()


def end_once(streamer):
    """``streamer`` (a transformers ``BaseStreamer`` or ``None``) wrapped so that its ``end()`` is
    delivered exactly once: every exit path of a generation, an error included, ends it (a
    ``TextIteratorStreamer``'s reader waits for ``end()``; ms-swift PR #10133)."""
    return streamer if streamer is None or isinstance(streamer, _EndOnce) else _EndOnce(streamer)


@dataclass
class Draft:
    """What a draft source proposes for one round.

    Attributes:
        tokens: the draft tokens d_1..d_K (K may be 0: the round verifies the pending token alone).
        exit_layer: E of an exit draft, 0 for a copy or an AR step.
        first: the layer the verification pass starts above (E when it reuses the draft's layers
            1..E, 0 for the full model).
        hidden: [1, n, d] layer-``first`` hiddens of the n positions to verify, or ``None``: the
            verification embeds the pending token and the draft tokens.
        passes: draft passes run (see :attr:`RoundRecord.passes`).
        tree: a tree action's :class:`~lede_env.suffix_index.TokenTree` (``tokens`` are its
            nodes' tokens), ``None`` for a single draft.
    """

    tokens: list[int]
    exit_layer: int = 0
    first: int = 0
    hidden: Optional[torch.Tensor] = None
    passes: int = 0
    tree: Optional[TokenTree] = None


class Drafter:
    """A draft source: proposes a round's draft and is told what was accepted (after the KV cache
    is cropped). One instance per decoder; per-generation state belongs in the
    :class:`DecodeState`, so one drafter serves interleaved generations."""

    def __init__(self, decoder: "SelfSpeculativeDecoder") -> None:
        self.decoder = decoder

    def propose(self, state: DecodeState, exit_layer: int, length: int, taps: Optional[dict],
                rule: StopRule) -> Draft:
        """A draft of at most ``length`` tokens for the round at ``state`` (``exit_layer``: the
        action's E, 0 for a copy); ``taps`` collects the observed exits' hiddens of the drafted
        positions, ``rule`` may end an exit draft early."""
        raise NotImplementedError

    def accepted(self, state: DecodeState, draft: Draft, outcome) -> None:
        """Told the round's :class:`~lede_env.mdp.RoundOutcome` (for sources that learn from it);
        exit and copy drafts read everything from the state and need nothing."""


class ExitDraft(Drafter):
    """Self-speculative drafts: K passes of layers 1..E and the exit head (LayerSkip, arXiv
    2404.16710). With compute reuse the verification continues from layer E over the drafted
    positions; without it (plain SSD) the draft's cache entries are dropped and the full model
    verifies."""

    def propose(self, state, exit_layer, length, taps, rule) -> Draft:
        dec = self.decoder
        tokens, hidden, passes = dec._draft(state, exit_layer, length, taps, rule)
        if dec.reuse:
            return Draft(tokens, exit_layer, exit_layer, hidden, passes)
        dec.stack.crop(state.cache, state.pos)  # forget the draft's layers 1..E
        if taps is not None:
            taps.clear()
        return Draft(tokens, exit_layer, 0, None, passes)


class CopyDraft(Drafter):
    """Copies from the context (prompt lookup, :mod:`lede_env.lookup`) or, where it has no match,
    the model's datastore (REST, arXiv 2311.08252), verified by the full model; no copy (length
    0 or no match) is a plain AR step."""

    def propose(self, state, exit_layer, length, taps, rule) -> Draft:
        if not length:
            return Draft([])
        seen = state.context_at  # the match observe() made for this position and length, if it made one
        match = seen[2] if seen and seen[:2] == (len(state.seq), length) else self.decoder._match(state, length)
        tokens = list(match[1])
        if tokens and state.sampler is not None:
            state.sampler.q.extend([None] * len(tokens))  # a copied token is a point-mass proposal
        return Draft(tokens)


class TreeDraft(Drafter):
    """Token trees of the most frequent continuations (SuffixDecoding, arXiv 2411.04975): the
    round's tree is :meth:`lede_env.rules.RoundRules.tree` (the one recipe trace replay uses too,
    with the static tree rule of the generation's policy or of the rules) over
    the generation's suffix index (:attr:`DecodeState.suffix_index`) and the decoder's datastore,
    seeded with the copy draft; verified in one pass with a tree attention mask (SpecInfer, arXiv
    2305.09781; :meth:`SelfSpeculativeDecoder.play_round`). An empty tree is an AR step."""

    def propose(self, state, exit_layer, length, taps, rule, depth: Optional[int] = None) -> Draft:
        """The tree of at most ``length`` nodes and ``depth`` levels (default: the rules'
        ``tree_depth``, clamped to the budget) as a :class:`Draft` (``tokens``: its nodes')."""
        if depth is None:
            depth = self.decoder.rules.plan_tree(self.decoder.actions.encode_tree(length), state.remaining)[1]
        tree = self.tree(state, length, depth)
        return Draft(tree.tokens.tolist(), tree=tree)

    def tree(self, state: DecodeState, budget: int, depth: int) -> TokenTree:
        """The round's :class:`~lede_env.suffix_index.TokenTree` (``budget`` nodes, ``depth``
        levels at most; a subclass may propose other trees, e.g. tests)."""
        rules = self.decoder.rules
        if state.tree_prune is not None:
            rules = replace(rules, tree_prune=state.tree_prune)
        return rules.tree(state.suffix_index, state.seq, budget, depth)


class SelfSpeculativeDecoder:
    """Greedy dynamic self-speculative decoder for a Llama-family model (batch size 1).

    One generation is :meth:`start` (prefill), then, per round, :meth:`observe` and
    :meth:`play_round` (draft, verify, accept, crop) until ``state.done``. :meth:`generate`
    drives them with a policy (stop strings, streaming and timing live there, once); the live env
    drives them with the actions given to ``step``. The decoder holds only configuration, so one
    decoder serves any number of generations, one after another or interleaved.

    Args:
        stack: the model's :class:`~lede_env.layers.LayerStack`.
        heads: exit heads for the candidate exits.
        k_max: largest speculation length.
        eos_ids: tokens that end generation (a generation may override them, see :meth:`start`).
        bonus: verify K+1 positions (the last draft token also runs layers 1..E and a fully
            accepted round earns the verifier's bonus token) instead of K.
        profile: cost profile for :attr:`RoundRecord.cost` (optional).
        obs_config: observation layout (must match the policy's).
        reuse: verification runs only layers E+1..L on the drafted positions (their layers
            1..E are already in the KV cache from drafting); without it, verification drops
            those cache entries and runs the full model (the plain SSD baseline).
        stop_rule: the in-round stop rule of policies that name none (``None``: draft the
            whole K; see :mod:`lede_env.stopping`).
        context_draft: most tokens of a context draft (prompt lookup, :mod:`lede_env.lookup`)
            that action 0 verifies when the context has a match; 0 (default): action 0 is a
            plain AR step. A context draft costs no layers: the full model verifies the pending
            token and the copied tokens in one pass, charged c(n) (n positions) by the profile.
        context_ngram: (shortest, longest) suffix lengths matched for context drafts.
        context_lengths: copy lengths of the context actions (see :class:`ActionMap`): with
            them the policy picks, round by round, how many copied tokens to verify.
        context_datastore: where the context has no match, context drafts come from this
            :class:`~lede_env.datastore.NgramDatastore` (the model's own earlier text; REST,
            arXiv 2311.08252); ``None``: no draft there.
        tree_budgets: node budgets of the tree actions (see :class:`ActionMap`; token trees from
            the generation's suffix index and the datastore, :class:`TreeDraft`).
        tree_depth: longest branch of a tree action's tree (tokens).

    Raises:
        ValueError: bad exits or k_max (from :class:`ActionMap` / :class:`ExitHeads`), a negative
            ``context_draft``, a bad ``context_ngram``, ``context_lengths`` or ``tree_budgets``.
    """

    def __init__(self, stack: LayerStack, heads: ExitHeads, k_max: int = 8, eos_ids: Sequence[int] = (),
                 bonus: bool = True, profile: Optional[CostProfile] = None,
                 obs_config: Optional[ObservationConfig] = None, reuse: bool = True, stop_rule=None,
                 context_draft: int = 0, context_ngram: tuple[int, int] = DEFAULT_NGRAM,
                 context_lengths: Sequence[int] = (), context_datastore: Optional[NgramDatastore] = None,
                 tree_budgets: Sequence[int] = (), tree_depth: int = 8) -> None:
        actions = ActionMap(heads.exit_layers, k_max, tuple(context_lengths), tuple(tree_budgets))
        rules = RoundRules(actions, profile, bonus, tuple(eos_ids), reuse, stop_rule=as_stop_rule(stop_rule),
                           context_draft=context_draft, context_ngram=context_ngram, datastore=context_datastore,
                           tree_depth=tree_depth)
        self._build(stack, heads, rules, obs_config)

    @classmethod
    def from_rules(cls, stack: LayerStack, heads: ExitHeads, rules: RoundRules,
                   obs_config: Optional[ObservationConfig] = None) -> "SelfSpeculativeDecoder":
        """The decoder that plays ``rules`` (:class:`~lede_env.rules.RoundRules`, the object trace
        replay plays too): how envs build their decoders (:meth:`lede_env.env.LEDEEnv.make_decoder`).

        Raises:
            ValueError: rules whose exits are not the heads'.
        """
        if tuple(rules.actions.exit_layers) != tuple(heads.exit_layers):
            raise ValueError(f"The rules' exits {list(rules.actions.exit_layers)} are not the heads' "
                             f"{list(heads.exit_layers)}.")
        dec = cls.__new__(cls)
        dec._build(stack, heads, replace(rules, stop_rule=rules.stop), obs_config)
        return dec

    def _build(self, stack: LayerStack, heads: ExitHeads, rules: RoundRules,
               obs_config: Optional[ObservationConfig]) -> None:
        #: the round's rules (frozen; a decoder is never changed after it is built)
        self.rules = rules
        self.stack = stack
        self.heads = heads
        k_max = rules.actions.k_max
        self.observer = ObservationBuilder(obs_config or ObservationConfig(), stack.hidden_size,
                                           len(heads.exit_layers), stack.num_layers, k_max,
                                           stack.head_weight.shape[0], tuple(heads.exit_layers))
        self._stat_exits = heads.exit_layers[: self.observer.stat_exits]  # exits whose head stats are observed
        # only those exits' hidden states are tapped: a forward pass cut at every exit costs a
        # call per segment (the compact observation without head statistics taps none)
        self._tap_exits = frozenset(self._stat_exits)
        self._cuda = stack.device.type == "cuda"
        self._lock = threading.RLock()  # one generate() at a time (see generate())
        #: the draft sources: exit-head drafts for (E, K > 0), copies from the context (and the
        #: datastore) for AR steps and context drafts, token trees for tree actions (:class:`Drafter`)
        self.drafters: dict[str, Drafter] = {"exit": ExitDraft(self), "copy": CopyDraft(self), "tree": TreeDraft(self)}

    # the rules' parts, read-only
    actions = property(lambda self: self.rules.actions, doc="The action map.")
    eos_ids = property(lambda self: self.rules.eos_ids, doc="Tokens that end generation.")
    bonus = property(lambda self: self.rules.bonus, doc="Verify K+1 positions (else K).")
    profile = property(lambda self: self.rules.profile, doc="The cost profile of round costs (``None``: 0).")
    reuse = property(lambda self: self.rules.reuse, doc="Verification reuses the draft's layers 1..E.")
    stop_rule = property(lambda self: self.rules.stop, doc="The in-round stop rule of policies that name none.")
    context_draft = property(lambda self: self.rules.context_draft, doc="Most tokens action 0 copies (0: AR step).")
    context_ngram = property(lambda self: self.rules.context_ngram, doc="(shortest, longest) suffix lengths matched.")
    datastore = property(lambda self: self.rules.datastore, doc="Drafts where the context has no match (or ``None``).")

    @property
    def copy_max(self) -> int:
        """Most tokens any action copies from the context (action 0's ``context_draft`` or the
        longest context action): the match length observations and rounds look up."""
        return self.rules.copy_max

    def clock(self) -> float:
        """Seconds (``time.perf_counter``) once the device's queued kernels are done: on a GPU
        every time read synchronises first, so round and prefill times are the kernels' times
        (the live env times its steps with it too)."""
        if self._cuda:
            torch.cuda.synchronize(self.stack.device)
        return time.perf_counter()

    # ---- one generation: start, observe, play a round ------------------------------------------
    def start(self, input_ids: torch.Tensor, max_new_tokens: int = 128, sampling: Optional[Sampling] = None,
              want_obs: bool = True, result: Optional[GenerationResult] = None,
              eos_ids: Optional[Sequence[int]] = None) -> DecodeState:
        """Prefill the prompt and emit the first token.

        Call inside ``torch.no_grad()`` and :meth:`LayerStack.kernels_active` (as :meth:`generate`
        does). The generation's observation history starts empty (it is the state's: one decoder
        serves interleaved generations).

        Args:
            input_ids: [n] or [1, n] int64 prompt ids.
            max_new_tokens, sampling: as in :meth:`generate`.
            want_obs: compute observations (and charge the profile's feature/policy overhead).
            result: an empty :class:`GenerationResult` to fill (a new one by default).
            eos_ids: this generation's end tokens (default: the decoder's).

        Returns:
            The generation's :class:`DecodeState`; ``done`` already if the first token ends it.

        Raises:
            ValueError: as :meth:`generate`.
        """
        ids = self._check_prompt(input_ids, max_new_tokens)
        result = GenerationResult(tokens=[]) if result is None else result
        sampler = SpeculativeSampler(sampling, self.heads.draft_ids) if sampling is not None else None
        cache = self.stack.new_cache()
        taps = {} if want_obs and self._tap_exits else None
        h = self._forward(self.stack.embed(ids.view(1, -1)), 0, self.stack.num_layers, cache, 0, taps)
        normed, v = self._verifier_tokens(h[:, -1:], sampler)
        first = v[0]
        eos = tuple(self.eos_ids if eos_ids is None else (int(e) for e in eos_ids))
        result.tokens.append(first)
        result.eos = first in eos
        seq = ids.tolist() + [first]
        return DecodeState(result, max_new_tokens, eos, want_obs, cache, seq, ids.numel(),
                           normed[-1], {e: t[0, -1] for e, t in taps.items()} if taps is not None else None, sampler,
                           done=result.eos or max_new_tokens == 1,
                           context_index=ContextIndex(self.context_ngram) if self.copy_max else None,
                           history=self.observer.new_history(),
                           suffix_index=SuffixIndex(seq) if self.actions.tree_budgets else None)

    def observe(self, state: DecodeState) -> Optional[dict]:
        """The observation at the last verified position (``None`` without ``want_obs``): the
        state a policy acts on before the next round, or after the last one."""
        if not state.want_obs:
            return None
        R = self.observer.config.recent_tokens
        if self._stat_exits:
            hid = torch.stack([state.taps_at[e] for e in self._stat_exits])  # [n_stat_exits, d]
            top1, ent, arg = self.heads.feature_stats(hid, len(self._stat_exits))
            top1, ent, agree = top1.cpu().numpy(), ent.cpu().numpy(), (arg == state.pending).float().cpu().numpy()
        else:  # a compact observation without head statistics: no head call at all
            top1 = ent = agree = np.zeros(0, np.float32)
        hidden = None if self.observer.compact else state.normed_last.float().cpu().numpy()
        ctx = (0.0, 0.0)
        if self.observer.config.context:
            match, ctx = context_observation(state.seq, self.copy_max, self.context_ngram, self.observer.config,
                                             state.context_index, self.datastore)
            state.context_at = (len(state.seq), self.copy_max, match)
        return self.observer.build(hidden, top1, ent, agree, state.seq[-R:] or state.seq,
                                   len(state.result.tokens) / state.max_new_tokens, ctx, state.history)

    def _match(self, state: DecodeState, max_len: int) -> tuple[int, list[int]]:
        """:func:`~lede_env.lookup.context_match` of the generation's sequence, from its index;
        where the context has no match, ``(0, the datastore's draft)`` (with a datastore)."""
        if state.context_index is None:
            match = context_match(state.seq, max_len, self.context_ngram)
        else:
            match = state.context_index.match(state.seq, max_len)
        return with_datastore(match, state.seq, max_len, self.datastore)

    def play_round(self, state: DecodeState, action: int, stop_rule=None) -> RoundRecord:
        """One round: draft with the action's (E, K), verify, accept, crop the cache (a tree
        action: :meth:`_play_tree`).

        Args:
            state: the generation (not ``done``).
            action: an action index of :attr:`actions`.
            stop_rule: ends the draft inside the round (a :class:`~lede_env.stopping.StopRule`,
                a probability threshold, or ``None``: the decoder's :attr:`stop_rule`).

        Returns:
            The round's :class:`RoundRecord` (appended to ``state.result.rounds``; its
            ``seconds`` and ``policy_seconds`` are the driver's to fill).
        """
        assert not state.done, "the generation has ended: call start() for a new one"
        budget, depth = self.rules.plan_tree(action, state.remaining)
        if budget:
            return self._play_tree(state, action, budget, depth)
        E, K, n_copy = self.rules.plan(action, state.remaining)
        taps = {} if state.want_obs and self._tap_exits else None
        rule = self.stop_rule if stop_rule is None else as_stop_rule(stop_rule)
        drafter = self.drafters["exit" if K else "copy"]
        draft = drafter.propose(state, E, K or n_copy, taps, rule)           # propose
        normed, verifier = self._verify(state, draft, taps)                  # verify
        oc = accept(draft.tokens, verifier, state.remaining, state.eos_ids)  # accept
        self.stack.crop(state.cache, state.pos + oc.advance)                 # crop
        drafter.accepted(state, draft, oc)
        E, K = draft.exit_layer, len(draft.tokens)
        cost = self.rules.cost(E, K, oc.n_verify, draft.passes, state.want_obs)
        return self._close_round(state, action, oc, normed, taps, range(oc.advance), draft, cost)

    def _play_tree(self, state: DecodeState, action: int, budget: int, depth: int) -> RoundRecord:
        """A tree action's round: the round's token tree (:class:`TreeDraft`), one pass of all L
        layers over the pending token (the root) and the n nodes under the tree attention mask
        with depth-based positions (:meth:`_verify_tree`), :func:`~lede_env.mdp.accept_tree`,
        and the KV cache compacted to the root and the accepted branch
        (:meth:`LayerStack.compact`). Charged ``rules.cost(0, n, n + 1, tree=True)``."""
        taps = {} if state.want_obs and self._tap_exits else None
        drafter = self.drafters["tree"]
        draft = drafter.propose(state, 0, budget, taps, self.stop_rule, depth=depth)        # propose
        tree = draft.tree
        normed, verifier = self._verify_tree(state, tree, taps)                             # verify
        oc, branch = accept_tree(draft.tokens, tree.parents.tolist(), verifier, state.remaining,
                                 state.eos_ids)                                             # accept
        rows = [0] + [1 + i for i in branch]  # verified rows kept: the root, then the branch's nodes
        self.stack.compact(state.cache, state.pos, rows)                                    # compact
        drafter.accepted(state, draft, oc)
        cost = self.rules.cost(0, len(tree), len(tree) + 1, 0, state.want_obs, tree=True)
        return self._close_round(state, action, oc, normed, taps, rows, draft, cost)

    def _close_round(self, state: DecodeState, action: int, oc, normed: torch.Tensor, taps: Optional[dict],
                     rows: Sequence[int], draft: Draft, cost: float) -> RoundRecord:
        """Advance ``state`` by the round's :class:`~lede_env.mdp.RoundOutcome` ``oc`` and record
        the round. ``rows[j]``: the verified row (of ``normed`` [n, d] and the taps) whose position
        the cache keeps at ``state.pos + j``."""
        # the next round starts from the last verified position (after the last emitted token
        # when the generation ends: an EOS can end a block early)
        row = rows[len(oc.emitted) - 1 if oc.done else oc.advance - 1]
        state.normed_last = normed[row]
        if taps is not None:
            state.taps_at = {e: t[0, row] for e, t in taps.items()}
        state.result.tokens.extend(oc.emitted)
        state.seq.extend(oc.emitted)
        if state.suffix_index is not None:
            for t in oc.emitted:
                state.suffix_index.extend(t)
        state.pos += oc.advance
        state.done, state.result.eos = oc.done, oc.eos
        rec = RoundRecord(action=int(action), exit_layer=draft.exit_layer, draft_len=len(draft.tokens),
                          accepted=oc.accepted, emitted=len(oc.emitted), cost=cost, n_verify=oc.n_verify,
                          passes=draft.passes, tree=draft.tree is not None)
        state.result.rounds.append(rec)
        state.history.record(rec.accepted, rec.draft_len, rec.exit_layer)
        return rec

    def _verify(self, state: DecodeState, draft: "Draft", taps: Optional[dict]) -> tuple[torch.Tensor, list[int]]:
        """One pass of layers ``draft.first + 1 .. L`` over the positions a round verifies (the
        pending token and the first draft tokens: ``verified_positions``), from the draft's
        layer-``first`` hiddens or, without them, the tokens' embeddings; ``taps`` gets the
        observed exits' hiddens above ``first``.

        Returns:
            ``(normed, verifier)``: [n, d] final normed hiddens and the verifier's n tokens
            (greedy, or speculative sampling's).
        """
        tokens = draft.tokens
        x = draft.hidden
        if x is None:
            n = verified_positions(len(tokens), self.bonus)
            x = self.stack.embed(torch.tensor([[state.pending] + tokens[: n - 1]], device=self.stack.device))
        h = self._forward(x, draft.first, self.stack.num_layers, state.cache, state.pos, taps)
        return self._verifier_tokens(h, state.sampler, tokens)

    def _verify_tree(self, state: DecodeState, tree: TokenTree, taps: Optional[dict]) -> tuple[torch.Tensor, list[int]]:
        """One pass of all L layers over the pending token (the root) and the tree's n nodes:
        every one attends to the cached prefix and the root, node i to its ancestors and itself
        (:meth:`TokenTree.attention_mask`), at positions ``pos`` (root) and ``pos + depth``
        (:meth:`TokenTree.positions`); the cache gains the n + 1 positions (compacted after).

        Returns:
            ``(normed, verifier)``: [n + 1, d] final normed hiddens (root first) and the n + 1
            verifier tokens (greedy argmaxes, or :meth:`SpeculativeSampler.verify_tree`'s draws).
        """
        n, dev = len(tree), self.stack.device
        x = self.stack.embed(torch.tensor([[state.pending] + tree.tokens.tolist()], device=dev))  # [1, n+1, d]
        rope = masks = None
        if n:
            local = torch.ones(n + 1, n + 1, dtype=torch.bool).tril_(0)
            local[1:, 1:] = tree.attention_mask()  # (and row 0: the root sees itself only; column 0: all)
            ids = torch.cat([torch.tensor([state.pos]), tree.positions(state.pos)])
            rope, masks = self.stack.tree_inputs(x, state.pos, local, ids)
        h = self._forward(x, 0, self.stack.num_layers, state.cache, state.pos, taps, rope, masks)
        normed = self.stack.norm(h[0])  # [n+1, d]
        if state.sampler is None:
            return normed, self.stack.greedy_tokens(normed).tolist()
        return normed, state.sampler.verify_tree(tree.tokens.tolist(), tree.parents.tolist(),
                                                 self.stack.head_logits(normed))

    def cut(self, state: DecodeState, keep: int) -> None:
        """End the generation after its first ``keep`` tokens (a stop string or stopping
        criterion matched there): drop the rest and clip the counters of every round that
        emitted a dropped token to the tokens it still contributes (a round emits its accepted
        drafts first, then the verifier's token). Drafted counts and costs stay: that work was
        done. ``eos`` stays only if the EOS token is still returned."""
        toks = state.result.tokens
        keep = max(0, min(int(keep), len(toks)))
        dropped = len(toks) - keep
        if dropped > 0:
            del toks[keep:]
            del state.seq[len(state.seq) - dropped:]
            start = 1  # token 0 comes from the prefill; each round emits the next ones in order
            for rec in state.result.rounds:
                kept = max(0, min(start + rec.emitted, keep) - start)
                start += rec.emitted
                rec.emitted, rec.accepted = kept, min(rec.accepted, kept)
            state.result.eos = False  # an EOS is always the last token: it was dropped
        state.done = True

    # ---- the driver ----------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, policy: Policy, max_new_tokens: int = 128,
                 sampling: Optional[Sampling] = None, streamer=None,
                 stop: Optional[Callable[[list[int]], Optional[int]]] = None,
                 eos_ids: Optional[Sequence[int]] = None) -> GenerationResult:
        """Generate, asking ``policy`` for (E, K) every round.

        Args:
            input_ids: [n] or [1, n] int64 prompt ids (batch size 1 only).
            policy: a :class:`Policy`; its optional ``stop_rule`` (or ``stop_threshold``) attribute,
                read every round, ends drafts inside the round (see :mod:`lede_env.stopping`).
            max_new_tokens: most tokens to generate (>= 1); never exceeded.
            sampling: ``None`` for greedy decoding, else a :class:`Sampling` (speculative
                sampling: the output is distributed as plain sampling from the model).
            streamer: a transformers ``BaseStreamer`` (e.g. ``TextStreamer``): gets the prompt
                ids once, then each round's emitted tokens as they are accepted, then ``end()``
                (once, also when the call raises).
            stop: called with the tokens generated so far after every round; returns ``None`` to
                go on, or how many of them to keep, ending generation there (stop strings).
            eos_ids: end tokens of this generation (default: the decoder's).

        Thread-safe, serialised: calls from several threads on one decoder run one after
        another (the observation history, :attr:`observer`, and the state of a policy shared
        between calls are per generation); generations on different decoders, also decoders
        sharing one model, run at the same time (:meth:`LayerStack.kernels_active`). Each gives
        what it gives alone.

        Returns:
            A :class:`GenerationResult`; under greedy decoding ``tokens`` equals greedy
            decoding's output (up to ``stop``). :attr:`RoundRecord.seconds` of a round counts
            from the start of its observation to the end of its acceptance.

        Raises:
            ValueError: batch size > 1, an empty prompt, ``max_new_tokens < 1``, or prompt +
                ``max_new_tokens`` more positions than the model's context
                (``config.max_position_embeddings``; exactly that many fit: drafts are clamped to
                the budget, so no pass writes past the last kept token's position).
        """
        want_obs = reads_observations(policy)
        streamer = end_once(streamer)
        try:
            self._check_prompt(input_ids, max_new_tokens)
            with self._lock:
                return self._generate(input_ids, policy, max_new_tokens, sampling, streamer, stop, eos_ids, want_obs)
        except BaseException:
            if streamer is not None:  # (a reader of a TextIteratorStreamer would wait forever)
                streamer.end()
            raise

    def _generate(self, input_ids, policy, max_new_tokens, sampling, streamer, stop, eos_ids, want_obs):
        policy.reset()
        with self.stack.kernels_active():
            t0 = self.clock()
            state = self.start(input_ids, max_new_tokens, sampling, want_obs, eos_ids=eos_ids)
            state.tree_prune = own_tree_prune(policy)
            result = state.result
            result.prefill_seconds = self.clock() - t0
            self._apply_stop(state, stop)
            if streamer is not None:
                streamer.put(torch.tensor([state.seq[: state.pos]]))  # the prompt, [1, n]
                if result.tokens:
                    streamer.put(torch.tensor(result.tokens))
            while not state.done:
                t_round = self.clock()
                action = policy.act(self.observe(state))
                t_policy = self.clock() - t_round
                n_before = len(result.tokens)
                rec = self.play_round(state, action, own_stop_rule(policy))  # None: the decoder's rule
                self._apply_stop(state, stop)
                rec.seconds, rec.policy_seconds = self.clock() - t_round, t_policy
                policy.update(rec)
                if streamer is not None and len(result.tokens) > n_before:
                    streamer.put(torch.tensor(result.tokens[n_before:]))
            if streamer is not None:
                streamer.end()
            result.seconds = self.clock() - t0
        return result

    def _apply_stop(self, state: DecodeState, stop) -> None:
        if stop is not None and (keep := stop(list(state.result.tokens))) is not None:
            self.cut(state, keep)

    # ---- forward pieces ------------------------------------------------------------------------
    def _segments(self, first: int, last: int) -> list[int]:
        """Layer boundaries in (first, last] at which the observed exits' hiddens are tapped,
        ending with last."""
        cuts = [e for e in self._stat_exits if first < e < last]
        return cuts + [last]

    def _forward(self, hidden, first, last, cache, start, taps: Optional[dict], rope=None, masks=None):
        """Layers first+1..last; store each exit layer's output [1, q, d] in ``taps`` if given.
        ``rope``, ``masks``: a tree's (:meth:`LayerStack.tree_inputs`), else causal."""
        if taps is None:
            return self.stack.run(hidden, first, last, cache, start, rope, masks)
        rope = self.stack.positions(hidden, start) if rope is None else rope
        prev = first
        for cut in self._segments(first, last):
            hidden = self.stack.run(hidden, prev, cut, cache, start, rope, masks)
            if cut in self._tap_exits:
                taps[cut] = hidden
            prev = cut
        return hidden

    def _verifier_tokens(self, hidden: torch.Tensor, sampler: Optional[SpeculativeSampler],
                         draft: Sequence[int] = ()) -> tuple[torch.Tensor, list[int]]:
        """Final norm of ``hidden`` [1, n, d] and the n verifier tokens: the full model's argmax
        (greedy), or speculative sampling against the round's draft distributions."""
        normed = self.stack.norm(hidden[0])  # [n, d]
        if sampler is None:
            return normed, self.stack.greedy_tokens(normed).tolist()
        return normed, sampler.verify(draft, self.stack.head_logits(normed))

    def _draft(self, state: DecodeState, E: int, K: int, taps: Optional[dict], rule: StopRule):
        """Up to K draft passes of one token through layers 1..E and the exit head (+1 pass of
        the last draft token when bonus and reuse); ``rule`` may drop a draft token as soon as
        the head has produced it (the draft ends before it, and the pass that produced it serves
        as the previous token's bonus pass) or end the draft after a kept token (K is a cap).

        Returns ``(draft, hidden, passes)``: the kept draft tokens d_1..d_K', the layer-E hiddens
        [1, n, d] of the n positions to verify (n = K'+1 with the bonus, else max(K', 1)), and the
        draft passes run (K', or K'+1 when a token was dropped); ``taps[e]`` gets [1, n, d] for
        exits e <= E. Under sampling, drafts are drawn from the head's warped distribution (the
        sampler keeps the kept tokens' distributions for verification). With ``"affine-kl-prev"``
        heads the first draft token comes from :meth:`~lede_env.exits.ExitHeads.first_logits`,
        which also reads the final hidden state of the last verified position.
        """
        i = self.heads.index(E)
        hs, draft, tap_lists, probs = [], [], {}, []
        extra_pass = self.bonus and self.reuse
        dev = self.stack.device
        stopping = rule.active
        first_head = self.heads.prev  # "affine-kl-prev": the first draft token has its own head
        passes = 0
        cur = torch.tensor([[state.pending]], device=dev)  # [1, 1] int64: greedy drafts stay on the device,
        while True:                                         # so a GPU queues the next pass without a sync
            x = self.stack.embed(cur)
            local = {} if taps is not None else None
            h = self._forward(x, 0, E, state.cache, state.pos + len(hs), local)
            hs.append(h)
            if local is not None:
                local[E] = h
                for e, t in local.items():
                    tap_lists.setdefault(e, []).append(t)
            if len(draft) == K:  # that was the last draft token's pass for the bonus position
                break
            passes += 1
            if first_head and not draft:  # a round's first draft token: its head reads final(t-1) too
                if state.sampler is not None:
                    tok, prob = state.sampler.draw_draft(self.heads.first_logits(h[0, 0], state.normed_last, i))
                    tok = tok.view(1, 1).to(dev)
                else:
                    tok, prob = self.heads.first_with_confidence(h[0, 0], state.normed_last, i)
                    tok = tok.view(1, 1)
            elif state.sampler is not None:
                tok, prob = state.sampler.draw_draft(self.heads.draft_logits(h[0, 0], i))
                tok = tok.view(1, 1).to(dev)
            elif not stopping:
                tok = self.heads.draft_tokens(h[0, 0], i).view(1, 1)
            else:
                tok, prob = self.heads.draft_with_confidence(h[0, 0], i)
                tok = tok.view(1, 1)
            if stopping:
                probs.append(float(prob))
                if not rule.keep(i, probs):  # dropped: the pass just run was the last kept token's own
                    if state.sampler is not None:
                        state.sampler.q.pop()
                    break
            draft.append(tok)
            cur = tok
            if stopping and rule.stop_after(i, probs):
                K = len(draft)
            if len(draft) == K and not extra_pass:
                break
        n = verified_positions(len(draft), self.bonus)
        hs = hs[:n]
        draft = torch.cat(draft, 1)[0].tolist() if draft else []  # one device-to-host copy per round
        if taps is not None:
            for e, ts in tap_lists.items():
                taps[e] = torch.cat(ts[:n], 1)
        return draft, torch.cat(hs, 1), passes

    def _check_prompt(self, input_ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        """[n] prompt ids on the model's device; raises ``ValueError`` as :meth:`generate` documents."""
        ids = input_ids.to(self.stack.device)
        if ids.dim() == 2:
            if ids.shape[0] != 1:
                raise ValueError(f"Batch size {ids.shape[0]} is not supported: lede decodes one sequence at a time.")
            ids = ids[0]
        if ids.numel() == 0:
            raise ValueError("The prompt is empty: give at least one token.")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}.")
        # A generation of m tokens after n prompt tokens gives its tokens positions n .. n+m-1 (the
        # last one is emitted, never fed). Drafts are clamped to the budget (clamp_draft_len), so
        # no draft or verify pass writes past position n+m-2: n + m positions always suffice.
        ctx = getattr(self.stack.model.config, "max_position_embeddings", None)
        n, need = ids.numel(), ids.numel() + max_new_tokens
        if ctx is not None and need > ctx:
            if n >= ctx:
                fix = f"shorten the prompt to at most {ctx - 1} tokens"
            elif max_new_tokens >= ctx:
                fix = f"lower max_new_tokens to {ctx - n}"
            else:
                fix = f"shorten the prompt to {ctx - max_new_tokens} tokens or lower max_new_tokens to {ctx - n}"
            raise ValueError(f"Prompt ({n} tokens) + max_new_tokens ({max_new_tokens}) = {need} positions exceeds "
                             f"the model's context of {ctx} positions: {fix}.")
        return ids


def greedy_reference(model, input_ids: torch.Tensor, max_new_tokens: int, eos_ids: Sequence[int],
                     **generate_kwargs) -> list[int]:
    """Plain greedy tokens from transformers' ``generate(do_sample=False)`` (the lossless reference).

    Args:
        generate_kwargs: more ``generate`` arguments, e.g. ``assistant_early_exit=E`` for
            transformers' own self-speculative decoding (also lossless under greedy decoding).

    Returns the generated ids (prompt excluded), ending at the first EOS if any.
    """
    ids = input_ids.view(1, -1).to(next(model.parameters()).device)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                         eos_token_id=list(eos_ids) or None, pad_token_id=(list(eos_ids) or [0])[0],
                         **generate_kwargs)
    gen = out[0, ids.shape[1]:].tolist()
    for j, t in enumerate(gen):
        if t in eos_ids:
            return gen[: j + 1]
    return gen
