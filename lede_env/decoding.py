"""The real self-speculative decoding loop (greedy, lossless).

Each round the policy picks an action (E, K) (:class:`~lede_env.mdp.ActionMap`); the decoder
drafts K tokens through layers 1..E and the exit head, verifies them with one pass of layers
E+1..L over the drafted positions (compute reuse: the draft already filled layers 1..E of the
shared KV cache, as in LayerSkip's self-speculation, arXiv 2404.16710), accepts the longest
agreeing prefix plus the verifier's next token, and crops every layer's cache to the accepted
length. Action 0 is one plain full-model step. The output equals greedy decoding
(``model.generate(do_sample=False)``) for every action sequence, in fp32. In bf16/fp16 the
guarantee is per position: every emitted token is the teacher-forced argmax up to rounding
near-ties (:func:`lede_env.equivalence.teacher_forced_check`).

The loop reads top to bottom: :meth:`SelfSpeculativeDecoder.generate` -> :meth:`_prefill`
-> per round :meth:`_ar_step` or :meth:`_draft` + :meth:`_verify` -> :func:`~lede_env.mdp.accept`
-> :meth:`LayerStack.crop`.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional, Protocol, Sequence, runtime_checkable

import torch

from .costs import CostProfile
from .exits import ExitHeads
from .mdp import ActionMap, ObservationBuilder, ObservationConfig, accept, clamp_draft_len
from .model import LayerStack


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
    """

    action: int
    exit_layer: int
    draft_len: int
    accepted: int
    emitted: int
    cost: float = 0.0
    seconds: float = 0.0
    policy_seconds: float = 0.0

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
    def acceptance_rate(self) -> float:
        """Accepted draft tokens / drafted tokens (nan when nothing was drafted)."""
        return self.accepted / self.drafted if self.drafted else float("nan")

    @property
    def tokens_per_round(self) -> float:
        """Mean tokens emitted per round (1.0 for AR)."""
        return len(self.tokens) / max(len(self.rounds), 1)

    @property
    def cost(self) -> float:
        """Total cost in AR-step units (the first token, from prefill, is free)."""
        return sum(r.cost for r in self.rounds)


@dataclass
class Sampling:
    """Temperature / nucleus sampling for :meth:`SelfSpeculativeDecoder.generate`.

    Drafts are sampled from the exit head's warped distribution q and accepted by speculative
    sampling (Leviathan et al., arXiv 2211.17192; Chen et al., arXiv 2302.01318): draft token d
    is kept with probability min(1, p(d) / q(d)); at the first rejection the token is drawn from
    the normalised residual max(0, p - q); after a fully accepted round the bonus token is drawn
    from p. Every emitted token is then distributed exactly as in plain sampling from the
    model's warped distribution p, whatever the actions.

    Attributes:
        temperature: > 0; logits are divided by it.
        top_p: nucleus mass in (0, 1]: the smallest set of most likely tokens whose probability
            reaches ``top_p`` is kept (applied to p and to q alike).
        seed: seed of the generation's own ``torch.Generator`` (``None``: nondeterministic).

    Raises:
        ValueError: temperature <= 0 or top_p outside (0, 1].
    """

    temperature: float = 1.0
    top_p: float = 1.0
    seed: Optional[int] = None

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0 (use sampling=None for greedy), got {self.temperature}.")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}.")

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """Warped distribution. [..., V] logits -> [..., V] float32 probabilities."""
        p = torch.softmax(logits.float() / self.temperature, -1)
        if self.top_p < 1:
            sp, idx = p.sort(-1, descending=True)
            drop = sp.cumsum(-1) - sp >= self.top_p  # keeps at least the most likely token
            sp = sp.masked_fill(drop, 0.0)
            p = torch.zeros_like(p).scatter_(-1, idx, sp)
            p = p / p.sum(-1, keepdim=True)
        return p


def speculative_verify(draft: Sequence[int], q: Sequence[torch.Tensor], q_ids: torch.Tensor, p: torch.Tensor,
                       generator: Optional[torch.Generator] = None) -> list[int]:
    """Speculative-sampling verification of one round, as "verifier tokens" for :func:`accept`.

    Args:
        draft: d_1..d_K draft tokens (full-vocabulary ids).
        q: K draft distributions, each [V_d] float32 over the draft vocabulary ``q_ids``.
        q_ids: [V_d] int64 full-vocabulary id of each draft-vocabulary entry.
        p: [n, V] float32 target distributions at the n = K or K + 1 verified positions.
        generator: random source.

    Returns:
        n tokens: d_1..d_a (accepted), then the token drawn at position a + 1 (from the residual
        after a rejection, or from p at the bonus position), then -1 placeholders (never emitted);
        :func:`~lede_env.mdp.accept` on it emits exactly the speculative-sampling output.
    """
    n = p.shape[0]
    out: list[int] = []
    for j in range(n):
        if j < len(draft):
            d = draft[j]
            qd = q[j][(q_ids == d).nonzero()[0, 0]]
            u = torch.rand((), generator=generator)
            if u * qd < p[j, d]:  # accept with probability min(1, p/q)
                out.append(d)
                continue
            resid = p[j].clone()
            resid.index_add_(0, q_ids, -q[j])
            resid.clamp_(min=0)
            if not float(resid.sum()) > 0:  # p == q up to rounding: any draw from p is right
                resid = p[j]
            out.append(int(torch.multinomial(resid / resid.sum(), 1, generator=generator)))
        else:
            out.append(int(torch.multinomial(p[j], 1, generator=generator)))
        break
    return out + [-1] * (n - len(out))


@runtime_checkable
class Policy(Protocol):
    """What the decoder and the env need from a policy (in the spirit of transformers'
    ``CandidateGenerator``: one method proposes, one learns how the round went).

    Attributes:
        needs_observation: if false, the decoder skips computing observations (``act`` gets None).
        stop_threshold: optional float attribute (read every round when present): drafting
            stops after the first draft token whose draft-head probability is below it, so the
            action's K is a cap (confidence-threshold drafting; the env's ``stop_threshold``).
    """

    needs_observation: bool

    def reset(self) -> None:
        """Called at the start of every generation / episode."""

    def act(self, obs: Optional[dict]) -> int:
        """Pick an action index for the next round."""

    def update(self, record: RoundRecord) -> None:
        """Told the outcome of the round just played."""


class SelfSpeculativeDecoder:
    """Greedy dynamic self-speculative decoder for a Llama-family model (batch size 1).

    Args:
        stack: the model's :class:`~lede_env.model.LayerStack`.
        heads: exit heads for the candidate exits.
        k_max: largest speculation length.
        eos_ids: tokens that end generation.
        bonus: verify K+1 positions (the last draft token also runs layers 1..E and a fully
            accepted round earns the verifier's bonus token) instead of K.
        profile: cost profile for :attr:`RoundRecord.cost` (optional).
        obs_config: observation layout (must match the policy's).
        reuse: verification runs only layers E+1..L on the drafted positions (their layers
            1..E are already in the KV cache from drafting); without it, verification drops
            those cache entries and runs the full model (the plain SSD baseline).

    Raises:
        ValueError: bad exits or k_max (from :class:`ActionMap` / :class:`ExitHeads`).
    """

    def __init__(self, stack: LayerStack, heads: ExitHeads, k_max: int = 8, eos_ids: Sequence[int] = (),
                 bonus: bool = True, profile: Optional[CostProfile] = None,
                 obs_config: Optional[ObservationConfig] = None, reuse: bool = True) -> None:
        self.stack = stack
        self.reuse = reuse
        self.heads = heads
        self.actions = ActionMap(heads.exit_layers, k_max)
        self.eos_ids = tuple(eos_ids)
        self.bonus = bonus
        self.profile = profile
        self.observer = ObservationBuilder(obs_config or ObservationConfig(), stack.hidden_size,
                                           len(heads.exit_layers), stack.num_layers, k_max,
                                           stack.head_weight.shape[0])
        self._exit_pos = {e: i for i, e in enumerate(heads.exit_layers)}
        self._sampling: Optional[Sampling] = None  # set for the duration of one generate() call
        self._generator: Optional[torch.Generator] = None
        self._draft_q: list[torch.Tensor] = []
        self._cuda = stack.device.type == "cuda"

    def clock(self) -> float:
        """Seconds (``time.perf_counter``) once the device's queued kernels are done: on a GPU
        every time read synchronises first, so round and prefill times are the kernels' times
        (the live env times its steps with it too)."""
        if self._cuda:
            torch.cuda.synchronize(self.stack.device)
        return time.perf_counter()

    # ---- forward pieces -------------------------------------------------------------------
    def _segments(self, first: int, last: int) -> list[int]:
        """Layer boundaries in (first, last] at which exit hiddens are tapped, ending with last."""
        cuts = [e for e in self.heads.exit_layers if first < e < last]
        return cuts + [last]

    def _forward(self, hidden, first, last, cache, start, taps: Optional[dict]):
        """Layers first+1..last; store each exit layer's output [1, q, d] in ``taps`` if given."""
        if taps is None:
            return self.stack.run(hidden, first, last, cache, start)
        rope = self.stack.positions(hidden, start)
        prev = first
        for cut in self._segments(first, last):
            hidden = self.stack.run(hidden, prev, cut, cache, start, rope)
            if cut in self._exit_pos:
                taps[cut] = hidden
            prev = cut
        return hidden

    def _verifier_tokens(self, hidden: torch.Tensor, draft: Sequence[int] = (),
                         q: Sequence[torch.Tensor] = ()) -> tuple[torch.Tensor, list[int]]:
        """Final norm of ``hidden`` [1, n, d] and the n verifier tokens: the full model's argmax
        (greedy), or speculative sampling against the draft distributions ``q``."""
        normed = self.stack.norm(hidden[0])  # [n, d]
        if self._sampling is None:
            return normed, self.stack.greedy_tokens(normed).tolist()
        p = self._sampling.probs(self.stack.head_logits(normed)).cpu()
        return normed, speculative_verify(draft, q, self._draft_ids_cpu, p, self._generator)

    def _prefill(self, ids: torch.Tensor, cache, want_obs: bool):
        taps = {} if want_obs else None
        h = self._forward(self.stack.embed(ids.view(1, -1)), 0, self.stack.num_layers, cache, 0, taps)
        normed, v = self._verifier_tokens(h[:, -1:])
        return v[0], normed[-1], ({e: t[0, -1] for e, t in taps.items()} if taps is not None else None)

    def _ar_step(self, token: int, pos: int, cache, want_obs: bool):
        taps = {} if want_obs else None
        x = self.stack.embed(torch.tensor([[token]], device=self.stack.device))
        h = self._forward(x, 0, self.stack.num_layers, cache, pos, taps)
        normed, v = self._verifier_tokens(h)
        return [], v, normed, taps

    def _draft(self, token: int, pos: int, E: int, K: int, cache, taps: Optional[dict],
               stop_threshold: Optional[float] = None):
        """Up to K draft passes of one token through layers 1..E (+1 pass of the last draft
        token when bonus and reuse).

        With ``stop_threshold``, drafting stops after the first draft token whose draft-head
        probability is below it (confidence-threshold drafting; K is a cap).

        Returns the draft tokens d_1..d_K' and the layer-E hiddens [1, n, d] of the n positions
        to verify; ``taps[e]`` gets [1, n, d] for exits e <= E. Under sampling, drafts are drawn
        from the head's warped distribution, kept in ``self._draft_q`` for verification.
        """
        i = self.heads.index(E)
        hs, draft, tap_lists, qs = [], [], {}, []
        extra_pass = self.bonus and self.reuse
        dev = self.stack.device
        cur = torch.tensor([[token]], device=dev)  # [1, 1] int64: greedy drafts stay on the device, so
        while True:                                 # a GPU queues the next pass without waiting for the token
            x = self.stack.embed(cur)
            local = {} if taps is not None else None
            h = self._forward(x, 0, E, cache, pos + len(hs), local)
            hs.append(h)
            if local is not None:
                local[E] = h
                for e, t in local.items():
                    tap_lists.setdefault(e, []).append(t)
            if len(draft) == K:  # that was the last draft token's pass for the bonus position
                break
            if self._sampling is not None:
                q = self._sampling.probs(self.heads.draft_logits(h[0, 0], i)).cpu()
                qs.append(q)
                k = torch.multinomial(q, 1, generator=self._generator)
                cur = self._draft_ids_cpu[k].view(1, 1).to(dev)
                if stop_threshold is not None and float(q.max()) < stop_threshold:
                    K = len(draft) + 1
            elif stop_threshold is None:
                cur = self.heads.draft_tokens(h[0, 0], i).view(1, 1)
            else:
                tok, prob = self.heads.draft_with_confidence(h[0, 0], i)
                cur = tok.view(1, 1)
                if float(prob) < stop_threshold:
                    K = len(draft) + 1
            draft.append(cur)
            if len(draft) == K and not extra_pass:
                break
        draft = torch.cat(draft, 1)[0].tolist() if draft else []  # one device-to-host copy per round
        if taps is not None:
            for e, ts in tap_lists.items():
                taps[e] = torch.cat(ts, 1)
        self._draft_q = qs
        return draft, torch.cat(hs, 1)

    def _verify(self, hidden: torch.Tensor, E: int, pos: int, cache, taps: Optional[dict], draft: Sequence[int]):
        h = self._forward(hidden, E, self.stack.num_layers, cache, pos, taps)
        return self._verifier_tokens(h, draft, self._draft_q)

    def _observe(self, normed_last, taps_at: dict, recent: list[int], generated: int, max_new: int):
        hid = torch.stack([taps_at[e] for e in self.heads.exit_layers])  # [n_exits, d]
        top1, ent, arg = self.heads.feature_stats(hid)
        pending = recent[-1]
        agree = (arg == pending).float()
        return self.observer.build(normed_last.float().cpu().numpy(), top1.cpu().numpy(), ent.cpu().numpy(),
                                   agree.cpu().numpy(), recent, generated / max_new)

    # ---- the loop -------------------------------------------------------------------------
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
        ctx = getattr(self.stack.model.config, "max_position_embeddings", None)
        if ctx is not None and ids.numel() + max_new_tokens + self.actions.k_max + 1 > ctx:
            raise ValueError(f"Prompt ({ids.numel()} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
                             f"model's context of {ctx} positions: shorten the prompt or lower max_new_tokens.")
        return ids

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, policy: Policy, max_new_tokens: int = 128,
                 sampling: Optional[Sampling] = None, streamer=None,
                 stop: Optional[Callable[[list[int]], Optional[int]]] = None) -> GenerationResult:
        """Generate, asking ``policy`` for (E, K) every round.

        Drives :meth:`rounds` with the policy: ``act`` on each observation, ``update`` with
        each :class:`RoundRecord`.

        Args:
            input_ids: [n] or [1, n] int64 prompt ids (batch size 1 only).
            policy: a :class:`Policy`.
            max_new_tokens: most tokens to generate (>= 1); never exceeded.
            sampling: ``None`` for greedy decoding, else a :class:`Sampling` (speculative
                sampling: the output is distributed as plain sampling from the model).
            streamer: a transformers ``BaseStreamer`` (e.g. ``TextStreamer``): gets the prompt
                ids once, then each round's emitted tokens as they are accepted, then ``end()``.
            stop: called with the tokens generated so far after every round; returns ``None`` to
                go on, or how many of them to keep, ending generation there (stop strings).

        Returns:
            A :class:`GenerationResult`; under greedy decoding ``tokens`` equals greedy
            decoding's output (up to ``stop``).

        Raises:
            ValueError: batch size > 1, an empty prompt, ``max_new_tokens < 1``, or a prompt that
                does not fit the model's context.
        """
        want_obs = bool(getattr(policy, "needs_observation", False))
        result = GenerationResult(tokens=[])
        events = self.rounds(input_ids, result, max_new_tokens, sampling, want_obs,
                             lambda: getattr(policy, "stop_threshold", None), streamer, stop, policy=policy)
        try:
            with self.stack.kernels_active():
                for _, obs in events:  # ("act", obs): the next round needs an action
                    _, rec = events.send(policy.act(obs))
                    policy.update(rec)
        finally:
            events.close()  # on an error, clears the generation's sampling state now
        return result

    def rounds(self, input_ids: torch.Tensor, result: GenerationResult, max_new_tokens: int = 128,
               sampling: Optional[Sampling] = None, want_obs: bool = True,
               stop_threshold: Optional[Callable[[], Optional[float]]] = None, streamer=None,
               stop: Optional[Callable[[list[int]], Optional[int]]] = None, final_observation: bool = False,
               policy: Optional[Policy] = None):
        """The decoding loop as a generator, one round at a time: whoever drives it picks the
        actions (:meth:`generate` asks a policy; the live env uses the actions given to ``step``).

        Protocol (events are ``(kind, payload)`` tuples)::

            events = dec.rounds(ids, result, 64)
            for kind, obs in events:            # ("act", obs): choose the next round's action
                _, rec = events.send(action)    # ("round", RoundRecord): the round just played
            # with final_observation=True the last event is ("end", obs), the state after the last round

        The prefill runs on the first ``next``; the generation ends (the generator is exhausted,
        or yields ``("end", obs)``) on EOS, at ``max_new_tokens`` or when ``stop`` says so. The
        caller must keep :meth:`LayerStack.kernels_active` and ``torch.no_grad`` around the
        resumptions (as :meth:`generate` does). ``result`` is filled in place: ``tokens``,
        ``rounds``, ``eos``, ``prefill_seconds`` as the rounds go, ``seconds`` at the end.
        :attr:`RoundRecord.seconds` of a round counts from the start of its observation to the
        end of its acceptance, the time the driver takes to choose the action included.

        Args:
            input_ids: [n] or [1, n] int64 prompt ids.
            result: an empty :class:`GenerationResult` to fill.
            max_new_tokens, sampling, streamer, stop: as in :meth:`generate`.
            want_obs: compute observations (else the "act" payload is ``None``) and charge the
                profile's feature/policy overhead.
            stop_threshold: called every round; returns the confidence-threshold of drafting
                (see :class:`Policy`) or ``None``.
            final_observation: after the last round, yield ``("end", obs)`` (the observation at
                the last emitted token; ``None`` without ``want_obs``).
            policy: reset when the generation starts (before the clock does), if given.

        Raises:
            ValueError: as :meth:`generate`, raised here (not at the first ``next``).
        """
        ids = self._check_prompt(input_ids, max_new_tokens)
        return self._rounds(ids, result, max_new_tokens, sampling, want_obs, stop_threshold or (lambda: None),
                            streamer, stop, final_observation, policy)

    def _rounds(self, ids: torch.Tensor, result: GenerationResult, max_new_tokens: int, sampling, want_obs: bool,
                stop_threshold, streamer, stop, final_observation: bool, policy):
        if policy is not None:
            policy.reset()
        self._sampling = sampling
        self._generator = None
        if sampling is not None:
            # speculative sampling draws on the CPU (distributions are copied there) so that a seed
            # gives the same tokens on every device
            self._draft_ids_cpu = self.heads.draft_ids.cpu()
            self._generator = torch.Generator(device="cpu")
            if sampling.seed is None:
                self._generator.seed()
            else:
                self._generator.manual_seed(int(sampling.seed))
        try:
            self.observer.reset()
            t0 = self.clock()
            cache = self.stack.new_cache()
            pending, normed_last, taps_at = self._prefill(ids, cache, want_obs)
            t_prefill = self.clock() - t0
            out = result.tokens
            out.append(pending)
            result.prefill_seconds = t_prefill
            seq = ids.tolist() + [pending]
            pos = ids.numel()  # position of the pending token (== cached positions)
            done = pending in self.eos_ids or max_new_tokens == 1
            result.eos = pending in self.eos_ids
            if stop is not None and (keep := stop(list(out))) is not None:
                del out[keep:]
                done, result.eos = True, False
            if streamer is not None:
                streamer.put(ids.view(1, -1).cpu())
                if out:
                    streamer.put(torch.tensor(out))
            end_at = (normed_last, taps_at)
            while not done:
                t_round = self.clock()
                obs = None
                if want_obs:
                    obs = self._observe(normed_last, taps_at, seq[-self.observer.config.recent_tokens:] or seq,
                                        len(out), max_new_tokens)
                action = yield ("act", obs)
                E, K = self.actions.decode(action)
                t_policy = self.clock() - t_round
                remaining = max_new_tokens - len(out)
                K = clamp_draft_len(K, remaining, self.bonus) if E else 0
                taps = {} if want_obs else None
                if K == 0:
                    E = 0
                    draft, verifier, normed, taps = self._ar_step(pending, pos, cache, want_obs)
                else:
                    draft, hidden_E = self._draft(pending, pos, E, K, cache, taps, stop_threshold())
                    K = len(draft)
                    if not self.reuse:
                        # Plain SSD: forget the draft's layers 1..E and verify with the full model.
                        self.stack.crop(cache, pos)
                        taps = {} if want_obs else None
                        n = K + 1 if self.bonus else K
                        verify_ids = torch.tensor([[pending] + draft[: n - 1]], device=self.stack.device)
                        hidden_E, E_from = self.stack.embed(verify_ids), 0
                    else:
                        E_from = E
                    normed, verifier = self._verify(hidden_E, E_from, pos, cache, taps, draft)
                oc = accept(draft, verifier, remaining, self.eos_ids)
                self.stack.crop(cache, pos + oc.advance)
                # The last verified position produced the new pending token.
                last = oc.advance - 1
                normed_last = normed[last]
                if want_obs:
                    taps_at = {e: t[0, last] for e, t in taps.items()}
                if oc.done and final_observation:
                    # the position that produced the last emitted token (an EOS can end a block early)
                    j = len(oc.emitted) - 1
                    end_at = (normed[j], {e: t[0, j] for e, t in taps.items()} if want_obs else None)
                out.extend(oc.emitted)
                seq.extend(oc.emitted)
                pos += oc.advance
                pending = seq[-1]
                cost = 0.0
                if self.profile is not None:
                    # the feature/policy overhead is paid only by policies that read observations
                    cost = self.profile.round_cost(E, K, oc.n_verify, self.reuse)
                    if not want_obs:
                        cost -= self.profile.overhead / self.profile.ar_step
                rec = RoundRecord(action=int(action), exit_layer=E, draft_len=K, accepted=oc.accepted,
                                  emitted=len(oc.emitted), cost=cost, seconds=self.clock() - t_round,
                                  policy_seconds=t_policy)
                result.rounds.append(rec)
                self.observer.record(rec.accepted, rec.draft_len, rec.exit_layer)
                yield ("round", rec)
                done = oc.done
                result.eos = oc.eos
                if stop is not None and (keep := stop(list(out))) is not None:
                    dropped = len(out) - keep
                    del out[keep:]
                    oc_emitted = oc.emitted[: max(len(oc.emitted) - dropped, 0)]
                    rec.emitted = len(oc_emitted)
                    done = True
                    result.eos = False
                else:
                    oc_emitted = oc.emitted
                if streamer is not None and oc_emitted:
                    streamer.put(torch.tensor(oc_emitted))
            if streamer is not None:
                streamer.end()
            result.seconds = self.clock() - t0
            if final_observation:
                obs = None
                if want_obs:
                    n_last, t_last = end_at
                    obs = self._observe(n_last, t_last, seq[-self.observer.config.recent_tokens:] or seq,
                                        len(out), max_new_tokens)
                yield ("end", obs)
        finally:
            self._sampling, self._generator, self._draft_q = None, None, []


class StaticPolicy:
    """The same action every round: static (E, K) self-speculation as in LayerSkip
    (arXiv 2404.16710) and transformers' ``assistant_early_exit``; action 0 = plain AR."""

    needs_observation = False

    def __init__(self, action: int) -> None:
        self.action = int(action)

    def reset(self) -> None:
        pass

    def act(self, obs: Optional[dict]) -> int:
        return self.action

    def update(self, record: RoundRecord) -> None:
        pass


class SequencePolicy:
    """Replays a fixed list of actions (then ``fallback``): for tests and oracle replays."""

    needs_observation = False

    def __init__(self, actions: Sequence[int], fallback: int = 0) -> None:
        self.actions = list(actions)
        self.fallback = fallback
        self._i = 0

    def reset(self) -> None:
        self._i = 0

    def act(self, obs: Optional[dict]) -> int:
        a = self.actions[self._i] if self._i < len(self.actions) else self.fallback
        self._i += 1
        return a

    def update(self, record: RoundRecord) -> None:
        pass


class PlanPolicy:
    """Plays a plan indexed by the number of tokens generated so far (``plan[g]``), as
    :func:`lede_env.replay.oracle_plan` returns: replays the oracle in the real decoder."""

    needs_observation = False

    def __init__(self, plan: Sequence[int]) -> None:
        self.plan = [int(a) for a in plan]
        self.reset()

    def reset(self) -> None:
        self._g = 1  # the prefill token

    def act(self, obs: Optional[dict]) -> int:
        return self.plan[self._g] if self._g < len(self.plan) else 0

    def update(self, record: RoundRecord) -> None:
        self._g += record.emitted


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
