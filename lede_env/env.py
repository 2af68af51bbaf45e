"""``LEDE-Llama3-v0``: dynamic self-speculative decoding as a Gymnasium environment."""

from __future__ import annotations

import math
import statistics
import warnings
from contextlib import contextmanager
from dataclasses import asdict, replace
from typing import Any, Optional

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces

from .costs import CostProfile, get_profile
from .decoding import GenerationResult, Sampling, SelfSpeculativeDecoder
from .exits import ExitHeads
from .lookup import context_match, match_agreement
from .mdp import ActionMap, ObservationBuilder, ObservationConfig, context_features
from .model import describe_model
from .prompts import DEFAULT_CALIB, DEFAULT_MAX_NEW, DEFAULT_TRAIN, load_prompts
from .replay import ReplayRules, best_static, budget, oracle_plan, replay_round, useful_actions
from .stopping import NO_STOP, CalibratedStop
from .calibration import HeadSpec, get_heads
from .continuations import encode_prompts
from .model import ModelBundle, get_bundle
from .traces import TraceSet, TraceSpec, get_traces

REWARD_MODES = ("relative", "net", "ratio")
#: in-round stop rules the env builds by name (``stop_rule=``)
STOP_RULES = ("calibrated",)
BACKENDS = ("trace", "live")
COST_SOURCES = ("profile", "wallclock")


class LEDEEnv(gym.Env):
    """Dynamic self-speculative decoding of a Llama-family LLM, one draft/verify round per step.

    ## Description
    An episode is the greedy generation of one prompt. Each step is one round: the agent picks
    an exit layer E and a speculation length K; the decoder drafts K tokens with layers 1..E
    and an exit head, verifies them with one pass of the full model, and emits the longest
    agreeing prefix plus the verifier's next token. Output is always identical to greedy
    decoding; only the cost changes. The MDP follows LEDE (arXiv 2606.03113); design notes in
    the project's docs.

    ## Backends
    - ``backend="trace"`` (default, ``LEDE-Llama3-v0``): rounds are replayed *exactly* from
      traces (greedy continuation + one teacher-forced pass; see ``lede_env.traces``), at
      microseconds a step. Greedy decoding only; costs from the cost profile.
    - ``backend="live"`` (``LEDE-Llama3-Live-v0``): each step runs one real round of
      :class:`~lede_env.decoding.SelfSpeculativeDecoder` (draft, verify, accept) on the loaded
      model, at the model's speed. Same spaces, observation features and reward modes; under
      greedy decoding (``temperature=0``) it gives the trace backend's tokens, accepted counts,
      observations and profile rewards for the same actions. With ``temperature > 0`` (and
      ``top_p``) it decodes by speculative sampling: drafts are sampled from the exit head and
      accepted with probability min(1, p/q), so every emitted token is distributed as plain
      sampling from the model whatever the actions, and acceptance is random. The sampling
      seed of an episode is drawn from ``self.np_random``, so ``reset(seed=s)`` followed by the
      same actions reproduces the episode (tokens, observations, profile rewards) on the same
      machine. ``cost="wallclock"`` charges a round its measured time instead of the profile
      (see Rewards). No traces are built; prompts are the same prompt specs, encoded with the
      model's chat template as for traces. :meth:`oracle_action` is unavailable (the oracle
      needs greedy traces). ``env.unwrapped.generated`` holds the episode's tokens so far
      (both backends).

    ## Action Space
    ``Discrete(1 + C + n_exits * k_max)``. Action 0: no exit draft, one plain full-model (AR)
    step, or with ``context_draft`` a context draft of up to that many copied tokens. Actions
    ``1 .. C`` (``C = len(context_lengths)``, default none): a context draft of up to
    ``context_lengths[j - 1]`` copied tokens, ``(E, K) = (0, length)``; the policy then picks how
    many copied tokens to verify. Action ``1 + C + i * k_max + (K - 1)``: exit layer
    ``exit_layers[i]``, speculation length K.
    ``env.unwrapped.actions`` (:class:`~lede_env.mdp.ActionMap`) maps both ways
    (``decode(a) -> (E, K)``, ``encode(E, K) -> a``). K is clamped so that no token is drafted
    that the ``max_new_tokens`` budget could not emit (K = 0 then means an AR step).

    ## Observation Space
    ``Dict`` (see :class:`~lede_env.mdp.ObservationBuilder`; ``flatten_observation`` gives the
    float32 vector used by d3rlpy and exported policies, without ``tokens``):

    ========== ============== ======= ==============================================================
    key        shape          dtype   meaning
    ========== ============== ======= ==============================================================
    hidden     (h,)           float32 final normed hidden state at the last verified position,
                                      through a fixed seeded projection to h = ``obs_hidden_dim``
    exit_stats (n_exits, 3)   float32 per exit there: its head's top-1 probability, entropy (nats,
                                      feature vocabulary), 1.0 if its argmax equals the verifier's
    history    (H, 4)         float32 last H rounds: accepted/k_max, K/k_max, E/L, fully accepted
    tokens     (R,)           int64   last R token ids, pending token last, 0-padded
    progress   (1,)           float32 tokens generated / max_new_tokens
    ========== ============== ======= ==============================================================

    With ``obs_kind="compact"`` the observation is instead ``exit_stats`` (S, 3) of the S =
    ``obs_stat_exits`` shallowest exits only (no such key when S = 0), ``experience`` (n_exits, 2) float32 (per exit:
    running per-token acceptance of its drafts in this episode, prior 0.3, and the evidence it
    rests on, judged / (judged + 8)), ``history`` and ``progress`` (see
    :class:`~lede_env.mdp.ObservationBuilder`): what the rounds already computed, about 0.3 ms a
    round with the policy instead of about 2 ms.

    With ``stop_rule="calibrated"`` the action's K is a cap and every draft token is looked at
    before it is kept (:class:`~lede_env.stopping.CalibratedStop`): kept only while the
    calibrated probability that it and all kept tokens are accepted exceeds lambda x the cost of
    keeping it; a round whose first draft token is dropped verifies the pending token alone (an
    AR step plus one draft-head call; ``info["round"]`` keeps its E with ``draft_len`` 0).

    With ``stop_threshold`` (a probability; default ``None``) the action's K is a cap:
    drafting stops after the first draft token whose draft-head probability is below the
    threshold (confidence-threshold drafting, Draft & Verify arXiv 2309.08168, Kangaroo arXiv
    2404.18911); that token is kept and verified, and the round is charged for the tokens
    actually drafted (``info["round"]["draft_len"]``). A policy object can carry its own
    ``stop_threshold`` attribute; :meth:`playing` applies it, as the real decoder does. Trace
    replay knows draft probabilities only along the greedy path: after a rejected draft token
    the real decoder keeps drafting from the wrong prefix, so there the replayed drafted count
    (and the round's cost) can differ from the live decoder's; emitted tokens never do.

    ## Rewards
    A round's cost is in units of one AR step, from a cost profile (``cost_profile``:
    ``"analytic"`` from parameter counts, ``"measured"`` on this machine, a JSON path, or the profile as a dict). It
    charges drafting (K passes through layers 1..E + draft head, and layers 1..E once more
    for the last draft token when ``bonus``), verification (layers E+1..L on the verified
    positions + full LM head; layers 1..E are reused from the draft) and the per-round
    feature/policy overhead (an agent reading observations pays it; ``charging_overhead(False)``
    drops it for policies that read none, as the real decoder does). With the live backend and
    ``cost="wallclock"``, a round's cost is instead its measured wall-clock time (the decoder's
    round, plus computing the next observation unless ``charging_overhead(False)``; the agent's
    own time between steps is not seen by the env; ``info["round"]["seconds"]``) divided by the
    seconds of one AR step (``env.unwrapped.ar_seconds``: the median of 32 AR rounds timed the
    same way at construction, under the env's sampling settings), so an AR step not charged the
    overhead costs about 1. Wall-clock costs are positive, noisy and machine-dependent: an
    episode's rewards are not reproducible. ``reward_mode``:

    - ``"relative"`` (default): tokens emitted - lambda * cost, lambda = ``reward_lambda``
      (``"auto"``: the best static (E, K)'s throughput on this env's traces, whole K drafted, no
      overhead, at least 1; 1.0 with the live backend, which has no traces; the resolved value is
      ``env.unwrapped.reward_lambda`` and goes into dataset env specs). Every episode emits the
      same N tokens, so throughput is maximised by minimising total cost, and a round raises
      throughput above lambda exactly when its reward is positive (Dinkelbach's method for ratio
      objectives; the relative reward of average-reward semi-Markov processes): the per-round
      optimum is the throughput optimum, so use a small discount. The undiscounted return is
      N - lambda * total cost.
    - ``"net"``: tokens emitted - cost (lambda = 1). The undiscounted return is the number of AR
      steps saved (N - total cost); use a discount near 1 (with a small one it prefers long
      drafts whenever throughput is above 1).
    - ``"ratio"``: tokens emitted / cost (accepted tokens per unit of compute; an AR step earns
      ``1 / (1 + overhead)``). A *sum* of ratios rewards taking more rounds (always-AR scores N):
      use it with a small discount, as a per-round score.

    Judge policies by throughput (total tokens / total cost), not return.

    ## Starting State
    A prompt drawn uniformly from the trace set (live: the prompt set) with ``self.np_random``
    (``options={"prompt_index": i}`` picks one). The first token comes from the prompt's forward
    pass (prefill) and is free; the first observation describes the last prompt position. Live
    backend: if the first token (sampled, under sampling) is an EOS, the episode has no round;
    a drawn prompt is then drawn again (up to 8 times), a prompt given by ``prompt_index`` raises
    ``ValueError``.

    ## Episode End
    Terminated when an EOS token is emitted (also inside an accepted block: emission stops
    there). Truncated when ``max_new_tokens`` tokens have been generated. No wrapper adds
    another limit.

    ## Arguments
    ``model`` (id/path, ``None`` = embedded SmolLM2-135M-Instruct), ``prompts`` (prompt spec,
    default ``DEFAULT_TRAIN``: code, instructions, math, translation), ``max_new_tokens`` (96), ``exit_layers`` (``None`` = every 2nd layer),
    ``k_max``, ``head_kind`` (``"affine-kl"``/``"affine"``/``"lens"``, see :mod:`lede_env.exits`), ``draft_vocab``, ``feature_vocab``,
    ``bonus`` (verify K+1 positions), ``reuse`` (verification skips layers 1..E), ``stop_threshold``, ``calib_prompts`` (prompts whose greedy continuations fit the exit heads; default
    the multi-domain ``DEFAULT_CALIB``, disjoint from the defaults for training and evaluation), ``reward_mode``,
    ``reward_lambda`` (``"auto"`` or a throughput), ``stop_rule`` (``None`` or ``"calibrated"``), ``obs_kind``
    (``"full"``/``"compact"``), ``obs_stat_exits``, ``obs_context_agreement`` (with context drafts: the
    ``context`` key also holds the matched n-gram's occurrences and how far their continuations
    agree, :func:`lede_env.lookup.match_agreement`), ``context_draft`` (most tokens action 0 copies from
    the context; 0 = plain AR step), ``context_lengths`` (context actions, see Action Space),
    ``bonus``, ``cost_profile``, ``obs_hidden_dim``,
    ``obs_history``, ``obs_recent_tokens``, ``render_mode`` (``"ansi"``), ``backend``
    (``"trace"``/``"live"``), ``temperature`` (>= 0; 0 = greedy; > 0 needs the live backend),
    ``top_p`` (in (0, 1], nucleus sampling when ``temperature > 0``), ``top_k`` (keep the k most
    likely tokens when ``temperature > 0``, ties kept, as :class:`~lede_env.sampling.Sampling`;
    ``None`` or 0: off), ``cost``
    (``"profile"``/``"wallclock"``; wall-clock needs the live backend). All JSON-serialisable;
    with the live backend ``prompts`` may also be a list of prompts as token-id lists.
    ``trace_set`` / ``profile`` / ``eos_ids`` inject prebuilt objects (tests, tiny models);
    ``bundle`` / ``heads`` inject a loaded model and exit heads for the live backend.
    ``device`` (``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"auto"``; ``None``: ``$LEDE_DEVICE`` or
    cpu) and ``dtype`` (``"fp32"``, ``"bf16"``, ``"fp16"``; ``None``: bf16 on CUDA, fp32 on CPU)
    choose where the model runs when the env loads it (traces are built there; the dtype is part
    of the traces' and cost profiles' cache keys, since bf16 changes the greedy continuation).

    Raises:
        ValueError: an unknown ``reward_mode``, ``backend`` or ``cost``; ``temperature < 0``,
            ``top_p`` outside (0, 1], ``top_k`` not a non-negative integer; sampling or wall-clock
            cost with the trace backend; bad
            ``max_new_tokens``, ``k_max``, ``stop_threshold``; an empty prompt set.

    ## Example
    >>> import gymnasium as gym, lede_env
    >>> env = gym.make("LEDE-Llama3-v0")                      # doctest: +SKIP
    >>> obs, info = env.reset(seed=0)                         # doctest: +SKIP
    >>> obs, r, terminated, truncated, info = env.step(env.unwrapped.actions.encode(4, 2))  # doctest: +SKIP
    >>> live = gym.make("LEDE-Llama3-Live-v0", temperature=0.7, cost="wallclock")  # doctest: +SKIP
    """

    metadata = {"render_modes": ["ansi"], "render_fps": 4}

    def __init__(
        self,
        model: Optional[str] = None,
        prompts: "str | list[list[int]]" = DEFAULT_TRAIN,
        max_new_tokens: int = DEFAULT_MAX_NEW,
        exit_layers: Optional[list[int]] = None,
        k_max: int = 8,
        head_kind: str = "affine-kl",
        draft_vocab: Optional[int] = 8192,
        feature_vocab: int = 1024,
        calib_prompts: str = DEFAULT_CALIB,
        reward_mode: str = "relative",
        bonus: bool = True,
        reuse: bool = True,
        stop_threshold: Optional[float] = None,
        cost_profile: "str | dict" = "analytic",
        obs_hidden_dim: int = 64,
        obs_history: int = 4,
        obs_recent_tokens: int = 8,
        reward_lambda: "float | str" = "auto",
        stop_rule: Optional[str] = None,
        context_draft: int = 0,
        context_lengths: tuple = (),
        obs_kind: str = "full",
        obs_stat_exits: int = 1,
        obs_context_agreement: bool = False,
        render_mode: Optional[str] = None,
        trace_set: Optional[TraceSet] = None,
        profile: Optional[CostProfile] = None,
        eos_ids: Optional[tuple[int, ...]] = None,
        progress: bool = True,
        backend: str = "trace",
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: Optional[int] = None,
        cost: str = "profile",
        bundle: Optional[ModelBundle] = None,
        heads: Optional[ExitHeads] = None,
        device: Optional[str] = None,
        dtype: Optional[str] = None,
    ) -> None:
        if reward_mode not in REWARD_MODES:
            raise ValueError(f"reward_mode={reward_mode!r}; choose one of {REWARD_MODES}.")
        if stop_rule is not None and stop_rule not in STOP_RULES:
            raise ValueError(f"stop_rule={stop_rule!r}; choose one of {STOP_RULES} or None (stop_threshold= for a "
                             "fixed probability threshold).")
        if stop_rule is not None and stop_threshold is not None:
            raise ValueError("Give stop_rule or stop_threshold, not both.")
        if isinstance(context_draft, bool) or not isinstance(context_draft, (int, np.integer)) or context_draft < 0:
            raise ValueError(f"context_draft={context_draft!r} must be an integer >= 0 (most tokens a context draft "
                             "copies on action 0; 0: action 0 is a plain AR step).")
        if not (reward_lambda == "auto" or (isinstance(reward_lambda, (int, float)) and not isinstance(reward_lambda, bool)
                                            and math.isfinite(reward_lambda) and reward_lambda > 0)):
            raise ValueError(f"reward_lambda={reward_lambda!r}; give 'auto' (the best static throughput on the "
                             "env's traces) or a throughput > 0 in tokens per AR-step unit.")
        if backend not in BACKENDS:
            raise ValueError(f"backend={backend!r}; choose 'trace' (exact greedy replay from traces) or 'live' "
                             "(the real decoder on the loaded model; sampling, wall-clock cost).")
        if cost not in COST_SOURCES:
            raise ValueError(f"cost={cost!r}; choose 'profile' (the cost profile, deterministic) or 'wallclock' "
                             "(measured round time / AR step time, live backend only).")
        try:
            temperature, top_p = float(temperature), float(top_p)
        except (TypeError, ValueError):
            raise ValueError(f"temperature and top_p must be numbers, got {temperature!r}, {top_p!r}.") from None
        if not (math.isfinite(temperature) and temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature}.")
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (1 = no nucleus truncation), got {top_p}.")
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 0):
            raise ValueError(f"top_k must be an integer >= 0 (the most likely tokens kept when sampling; 0 or None: "
                             f"off), got {top_k!r}.")
        self.top_k = int(top_k) if top_k else None  # 0 and None both mean off
        if backend == "trace" and temperature > 0:
            raise ValueError(f"temperature={temperature}: traces replay greedy decoding only; use backend='live' "
                             "(or gym.make('LEDE-Llama3-Live-v0', ...)) to sample.")
        if backend == "trace" and cost != "profile":
            raise ValueError("cost='wallclock' measures real rounds: use backend='live' (LEDE-Llama3-Live-v0).")
        self.backend, self.temperature, self.top_p, self.cost = backend, temperature, top_p, cost
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(f"render_mode={render_mode!r}; choose one of {self.metadata['render_modes']} or None.")
        if not isinstance(max_new_tokens, int) or max_new_tokens < 2:
            raise ValueError(f"max_new_tokens must be an integer >= 2, got {max_new_tokens!r}.")
        self.obs_config = ObservationConfig(obs_hidden_dim, obs_history, obs_recent_tokens, kind=obs_kind,
                                            stat_exits=obs_stat_exits,
                                            context=int(context_draft) > 0 or bool(context_lengths),
                                            context_agreement=bool(obs_context_agreement)
                                            and (int(context_draft) > 0 or bool(context_lengths)))
        self._stop_name, self._lambda_arg = stop_rule, reward_lambda
        self._context_draft = int(context_draft)
        self._context_lengths = tuple(context_lengths)
        ActionMap((), 1, self._context_lengths)  # a bad context_lengths raises here, before anything loads
        self._best_static: Optional[tuple[int, float]] = None
        self._charge_overhead = True
        self._oracle_cache: dict[int, np.ndarray] = {}
        self._done = True
        self._last_round: Optional[dict] = None
        self._state = None
        if backend == "live":
            if trace_set is not None:
                raise ValueError("trace_set is for the trace backend; the live backend decodes its prompts: "
                                 "pass prompts=... (a prompt spec or token-id lists).")
            if bundle is None:
                bundle = get_bundle(model, device, dtype)
            self._init_live(model, prompts, max_new_tokens, exit_layers, k_max,
                            HeadSpec(tuple(exit_layers) if exit_layers else None, head_kind, draft_vocab,
                                     feature_vocab, calib_prompts),
                            reward_mode, bonus, reuse, stop_threshold, cost_profile, render_mode, profile, eos_ids,
                            bundle, heads, progress)
            return
        self.bundle, self.heads = None, heads
        if bundle is not None or (heads is not None and trace_set is None):
            raise ValueError("bundle/heads are for the live backend; the trace backend takes trace_set=... instead "
                             "(with heads=... only for stop_rule='calibrated').")
        if trace_set is None:
            spec = TraceSpec(model, prompts, max_new_tokens,
                             HeadSpec(tuple(exit_layers) if exit_layers else None, head_kind, draft_vocab,
                                      feature_vocab, calib_prompts), device, dtype)
            bundle = get_bundle(model, device, dtype)
            heads = get_heads(bundle, spec.heads, progress=progress)
            trace_set = get_traces(spec, progress=progress, bundle=bundle, heads=heads)
            self.bundle, self.heads = bundle, heads
            if profile is None:
                profile = get_profile(cost_profile, bundle, heads, k_max, self.obs_config)
            eos_ids = bundle.eos_ids if eos_ids is None else eos_ids
        if profile is None:
            raise ValueError("A prebuilt trace_set needs a cost profile: pass profile=CostProfile(...).")
        if eos_ids is None:
            raise ValueError("A prebuilt trace_set needs eos_ids.")
        man = trace_set.manifest
        cut = [t.n for t in trace_set.traces if not t.eos and t.n < max_new_tokens]  # stopped by their length limit
        if cut:
            warnings.warn(f"Traces hold at most {max(cut)} new tokens for {len(cut)} prompts that had not ended; "
                          "episodes are truncated there.")
        self.trace_set = trace_set
        self.profile = profile
        self.max_new_tokens = max_new_tokens
        self.reward_mode = reward_mode
        self.render_mode = render_mode
        self.actions = ActionMap(trace_set.exit_layers, k_max, self._context_lengths)
        if stop_threshold is not None and not 0.0 < float(stop_threshold) < 1.0:
            raise ValueError(f"stop_threshold={stop_threshold!r} must be a probability in (0, 1), or None.")
        self.rules = ReplayRules(self.actions, profile, bool(bonus), tuple(int(e) for e in eos_ids), bool(reuse),
                                 None if stop_threshold is None else float(stop_threshold))
        d = trace_set.traces[0].hidden.shape[1]
        self.observer = ObservationBuilder(self.obs_config, d, len(self.actions.exit_layers),
                                           trace_set.num_layers, k_max, int(man["model"]["vocab_size"]),
                                           tuple(self.actions.exit_layers))
        self.playable = [i for i, t in enumerate(trace_set.traces) if budget(t, max_new_tokens) >= 2
                         and not (t.eos and t.n <= 1)]
        if not self.playable:
            raise ValueError("No trace has room for a round (every continuation is 1 token): "
                             "use other prompts or a larger max_new_tokens.")
        self.action_space = spaces.Discrete(self.actions.n)
        self.observation_space = self.observer.space()
        self._trace_index: Optional[int] = None
        self._finish_rules(heads)

    def _finish_rules(self, heads: Optional[ExitHeads]) -> None:
        """Turn on context drafts, resolve the reward's lambda and build the named stop rule (both
        backends)."""
        self.rules = replace(self.rules, context_draft=self._context_draft)
        if self.backend == "live":
            self.decoder.context_draft = self._context_draft
        if self._lambda_arg != "auto":
            self.reward_lambda = float(self._lambda_arg)
        elif self.trace_set is not None:
            # a per-round reward of tokens - lambda * cost then favours exactly the rounds that beat
            # the best static (E, K) on the env's own traces
            self.reward_lambda = max(1.0, self.best_static()[1])
        else:
            self.reward_lambda = 1.0  # live backend: no traces to measure a static on; AR's throughput
        if self._stop_name == "calibrated":
            if heads is None or heads.acceptance is None:
                raise ValueError("stop_rule='calibrated' needs exit heads with an acceptance calibration (fitted "
                                 "on calibration continuations; not the plain logit lens with the full vocabulary).")
            rule = CalibratedStop.from_profile(heads.acceptance, self.rules.profile, self.actions.exit_layers,
                                               self.actions.k_max, self.reward_lambda, self.rules.bonus,
                                               self.rules.reuse)
            self.rules = replace(self.rules, stop_rule=rule)
            if self.backend == "live":
                self.decoder.stop_rule = rule

    def best_static(self) -> tuple[int, float]:
        """The static action with the best throughput over this env's playable traces, as a static
        (E, K) is defined (whole K drafted, no feature/policy overhead; LayerSkip's setting): the
        baseline of the relative reward's lambda, of ``trace_q`` and of ``static:best``. Computed
        once (trace backend only; only actions that can beat AR are tried, which changes nothing:
        the others never do).

        Returns:
            ``(action, throughput)``; throughput = total tokens / total cost (AR = about 1.0).

        Raises:
            RuntimeError: the live backend (no traces).
        """
        if self.trace_set is None:
            raise RuntimeError("best_static() replays traces: use the trace backend (LEDE-Llama3-v0).")
        if self._best_static is None:
            rules = replace(self.rules.without_overhead(), stop_rule=NO_STOP)
            traces = [self.trace_set.traces[i] for i in self.playable]
            self._best_static = best_static(traces, rules, self.max_new_tokens, useful_actions(rules))
        return self._best_static

    def make_decoder(self, bundle: Optional[ModelBundle] = None, heads: Optional[ExitHeads] = None,
                     profile: bool = True) -> SelfSpeculativeDecoder:
        """The real decoder that plays this env's MDP: same exits, K_max, verification variant,
        observation layout and in-round stop rule, round costs from the env's profile. The one
        way the CLI, the demo, the benchmarks and the notebooks build a decoder for an env.

        Args:
            bundle, heads: the model and exit heads (default: those the env loaded; an env made
                from a prebuilt ``trace_set`` needs them given).
            profile: charge round costs from the env's cost profile (else costs are 0).

        Raises:
            ValueError: no model or heads known to the env and none given.
        """
        bundle = bundle or self.bundle
        heads = heads or self.heads
        if bundle is None or heads is None:
            raise ValueError("This env was built from a prebuilt trace_set: pass bundle= and heads= to make_decoder.")
        return SelfSpeculativeDecoder(bundle.stack, heads, self.actions.k_max, self.rules.eos_ids, self.rules.bonus,
                                      self.profile if profile else None, self.obs_config, reuse=self.rules.reuse,
                                      stop_rule=self.rules.stop, context_draft=self.rules.context_draft,
                                      context_ngram=self.rules.context_ngram,
                                      context_lengths=self.actions.context_lengths)

    def round_reward(self, emitted: int, cost: float) -> float:
        """The reward :meth:`step` gives a round that emitted ``emitted`` tokens at ``cost``
        (AR-step units), under this env's reward mode and lambda; used to check recorded rounds
        whose costs no replay reproduces (wall-clock datasets)."""
        return self._reward(emitted, cost)

    def _reward(self, emitted: int, cost: float) -> float:
        """A round's reward (see the class docstring's Rewards)."""
        if self.reward_mode == "relative":
            return emitted - self.reward_lambda * cost
        if self.reward_mode == "net":
            return emitted - cost
        return emitted / cost

    def _init_live(self, model, prompts, max_new_tokens, exit_layers, k_max, head_spec: HeadSpec, reward_mode, bonus,
                   reuse, stop_threshold, cost_profile, render_mode, profile, eos_ids, bundle, heads, progress):
        """Load the model, heads and prompts of the live backend and build its decoder."""
        if isinstance(prompts, str):
            listed = load_prompts(prompts)
            ids = encode_prompts(bundle, listed, max_new_tokens)
            self.prompts = [(p.id, p.category, list(map(int, x))) for p, x in zip(listed, ids)]
        elif isinstance(prompts, (list, tuple)) and prompts and all(
                isinstance(x, (list, tuple)) and x and all(isinstance(t, (int, np.integer)) for t in x)
                for x in prompts):
            self.prompts = [(str(i), "default", list(map(int, x))) for i, x in enumerate(prompts)]
        else:
            raise ValueError("prompts must be a prompt spec (e.g. 'humaneval[0:24]') or, for the live backend, a "
                             "non-empty list of non-empty token-id lists.")
        if heads is None:
            heads = get_heads(bundle, head_spec, progress=progress)
        elif exit_layers and tuple(exit_layers) != tuple(heads.exit_layers):
            raise ValueError(f"exit_layers={list(exit_layers)} differ from the given heads' {list(heads.exit_layers)}.")
        if profile is None:
            profile = get_profile(cost_profile, bundle, heads, k_max, self.obs_config)
        eos_ids = tuple(int(e) for e in (bundle.eos_ids if eos_ids is None else eos_ids))
        if stop_threshold is not None and not 0.0 < float(stop_threshold) < 1.0:
            raise ValueError(f"stop_threshold={stop_threshold!r} must be a probability in (0, 1), or None.")
        self.bundle, self.heads = bundle, heads
        self.trace_set = None
        self.profile = profile
        self.max_new_tokens = max_new_tokens
        self.reward_mode = reward_mode
        self.render_mode = render_mode
        # profile=None: the env charges costs itself (its rules may drop the overhead, see charging_overhead)
        self.decoder = SelfSpeculativeDecoder(bundle.stack, heads, k_max, eos_ids, bool(bonus), None,
                                              self.obs_config, reuse=bool(reuse), context_lengths=self._context_lengths)
        self.actions = self.decoder.actions
        self.rules = ReplayRules(self.actions, profile, bool(bonus), eos_ids, bool(reuse),
                                 None if stop_threshold is None else float(stop_threshold))
        self.observer = self.decoder.observer
        self.playable = list(range(len(self.prompts)))
        self.manifest = {"backend": "live", "model": {"name": bundle.name} | describe_model(bundle.model),
                         "exit_layers": list(heads.exit_layers),
                         "heads": {"kind": heads.kind, "draft_vocab": heads.draft_vocab,
                                   "feature_vocab": heads.feature_vocab, "fingerprint": heads.fingerprint()},
                         "prompts": prompts if isinstance(prompts, str) else "token ids",
                         "prompt_ids": [p[0] for p in self.prompts], "max_new_tokens": max_new_tokens,
                         "eos_ids": list(eos_ids), "temperature": self.temperature, "top_p": self.top_p,
                         "top_k": self.top_k, "cost": self.cost}
        self.action_space = spaces.Discrete(self.actions.n)
        self.observation_space = self.observer.space()
        self._prompt_index: Optional[int] = None
        self._result: Optional[GenerationResult] = None
        self._finish_rules(heads)
        self.ar_seconds = self._measure_ar_seconds() if self.cost == "wallclock" else None

    def _sampling(self, seed: int) -> Optional[Sampling]:
        return Sampling(self.temperature, self.top_p, seed, self.top_k) if self.temperature > 0 else None

    @contextmanager
    def _decoding(self):
        with torch.no_grad(), self.decoder.stack.kernels_active():
            yield

    def _measure_ar_seconds(self, steps: int = 32) -> float:
        """Median seconds of one AR step on this machine, timed as :meth:`step` times a round
        (the decoder's round, without the next observation), under the env's sampling settings:
        the unit of wall-clock costs. The first generation warms up and is not counted."""
        times: list[float] = []
        for i in range(len(self.prompts) * 2 + 1):
            with self._decoding():
                state = self.decoder.start(torch.tensor(self.prompts[i % len(self.prompts)][2]),
                                           min(self.max_new_tokens, steps + 1), self._sampling(i), want_obs=True)
                while not state.done:
                    self.decoder.observe(state)
                    t0 = self.decoder.clock()
                    self.decoder.play_round(state, 0)
                    if i > 0:
                        times.append(self.decoder.clock() - t0)
            if len(times) >= steps:
                break
        if not times:
            raise ValueError("Cannot measure an AR step: every prompt ends at its first token; use other prompts.")
        return float(statistics.median(times))

    # ---- helpers --------------------------------------------------------------------------
    @property
    def trace(self):
        """The current episode's trace (``None`` before the first reset, and with the live backend)."""
        if self.backend == "live" or self._trace_index is None:
            return None
        return self.trace_set.traces[self._trace_index]

    @property
    def manifest(self) -> dict:
        """What the env plays: the trace set's manifest (trace backend), or the model, heads,
        prompts and sampling settings (live backend)."""
        return self._manifest if self.backend == "live" else self.trace_set.manifest

    @manifest.setter
    def manifest(self, value: dict) -> None:
        self._manifest = value

    @property
    def generated(self) -> list[int]:
        """Token ids generated so far in the current episode (the prefill token first; empty
        before the first reset)."""
        if self.backend == "live":
            return [] if self._result is None else list(self._result.tokens)
        return [] if self.trace is None else self.trace.generated[: self._g].tolist()

    def flatten_observation(self, obs: dict) -> np.ndarray:
        """[flat_dim] float32 vector of an observation (layout: ``self.observer.layout()``)."""
        return self.observer.flatten(obs)

    def _obs(self) -> dict:
        t, g = self.trace, self._g
        j = g - 1  # last verified local position: its output is the pending token generated[g-1]
        seq_tail = np.concatenate([t.prompt[-self.obs_config.recent_tokens:], t.generated[:g]])
        agree = (t.lens_arg[j] == t.generated[j]).astype(np.float32)
        ctx = (0.0, 0.0)
        if self.obs_config.context:
            cd, ngram = self.rules.copy_max, self.rules.context_ngram
            seq = np.concatenate([t.prompt, t.generated[:g]])
            ctx_agree = match_agreement(seq, cd, ngram) if self.obs_config.context_agreement else (0, 0)
            ctx = context_features(context_match(seq, cd, ngram), cd, ngram[1], ctx_agree)
        return self.observer.build(t.hidden[j], t.top1[j], t.entropy[j], agree, seq_tail.tolist(),
                                   g / self.max_new_tokens, ctx)

    @contextmanager
    def charging_overhead(self, charge: bool):
        """Within this block, rounds are charged the per-round feature/policy overhead only if
        ``charge`` (policies that read no observation do not pay it in the real decoder)."""
        saved, saved_charge = self.rules, self._charge_overhead
        if not charge:
            self.rules = saved.without_overhead()
            self._charge_overhead = False
            self._oracle_cache = {}
        try:
            yield self
        finally:
            self._charge_overhead = saved_charge
            if self.rules is not saved:
                self.rules = saved
                self._oracle_cache = {}

    @contextmanager
    def playing(self, policy):
        """Within this block, rounds follow ``policy``'s own rules: the feature/policy overhead
        is charged only if it reads observations (:meth:`charging_overhead`), and its
        ``stop_rule`` (or ``stop_threshold``) attribute, when present, replaces the env's
        in-round stop rule (as the real decoder does for that policy)."""
        saved = self.rules
        if getattr(policy, "stop_rule", None) is not None:
            self.rules = replace(saved, stop_rule=policy.stop_rule)
            self._oracle_cache = {}
        elif hasattr(policy, "stop_threshold"):
            self.rules = replace(saved, stop_threshold=policy.stop_threshold)
            self._oracle_cache = {}
        try:
            with self.charging_overhead(bool(getattr(policy, "needs_observation", False))):
                yield self
        finally:
            if self.rules is not saved:
                self.rules = saved
                self._oracle_cache = {}

    def oracle_action(self) -> int:
        """The oracle's action in the current state (best action sequence for this trace by
        dynamic programming; an upper bound no causal policy can pass)."""
        if self.backend == "live":
            raise RuntimeError("The oracle needs greedy traces, which the live backend has none of: use "
                               "backend='trace' (LEDE-Llama3-v0) for oracle actions.")
        if self._done:
            raise RuntimeError("oracle_action() needs a running episode: call reset() first.")
        i = self._trace_index
        if i not in self._oracle_cache:
            self._oracle_cache[i] = oracle_plan(self.trace, self.rules, self.max_new_tokens)[0]
        return int(self._oracle_cache[i][self._g])

    # ---- gym API --------------------------------------------------------------------------
    def reset(self, *, seed: Optional[int] = None, options: Optional[dict[str, Any]] = None):
        super().reset(seed=seed)
        options = options or {}
        if self.backend == "live":
            return self._reset_live(options)
        if "prompt_index" in options:
            idx = int(options["prompt_index"])
            if idx not in self.playable:
                raise ValueError(f"prompt_index {idx} is not a playable trace (0..{len(self.trace_set) - 1}, "
                                 "with room for at least one round).")
        else:
            idx = int(self.playable[self.np_random.integers(len(self.playable))])
        self._trace_index = idx
        self._limit = budget(self.trace, self.max_new_tokens)
        self._g = 1
        self._done = False
        self._last_round = None
        self.observer.reset()
        return self._obs(), {"prompt_id": self.trace.id, "prompt_index": idx, "category": self.trace.category}

    def step(self, action):
        if self._done:
            raise RuntimeError("The episode has ended (or reset() was never called): call reset() before step().")
        if self.backend == "live":
            return self._step_live(action)
        oc, E, cost = replay_round(self.trace, self._g, action, self.rules, self._limit)
        n = len(oc.emitted)
        self._g += n
        reward = self._reward(n, cost)
        terminated = oc.eos
        truncated = oc.done and not oc.eos
        self._done = oc.done
        self.observer.record(oc.accepted, oc.draft_len, E)
        rnd = {"action": int(action), "exit_layer": E, "draft_len": oc.draft_len, "accepted": oc.accepted,
               "emitted": n, "n_verify": oc.n_verify, "cost": cost}
        self._last_round = rnd
        obs = self._obs()  # g <= trace length always, so the last verified position exists
        info = {"round": rnd, "tokens_generated": self._g, "prompt_id": self.trace.id}
        return obs, float(reward), terminated, truncated, info

    # ---- live backend ---------------------------------------------------------------------
    def _close_episode(self) -> None:
        self._state = None

    def _reset_live(self, options: dict):
        self._close_episode()
        pinned = "prompt_index" in options
        if pinned:
            idx = int(options["prompt_index"])
            if idx not in self.playable:
                raise ValueError(f"prompt_index {idx} is not a prompt of this env (0..{len(self.prompts) - 1}).")
        for _ in range(1 if pinned else 8):
            if not pinned:
                idx = int(self.playable[self.np_random.integers(len(self.playable))])
            sampling = self._sampling(int(self.np_random.integers(2**63 - 1)))
            self._prompt_index = idx
            self._result = GenerationResult(tokens=[])
            with self._decoding():
                self._state = self.decoder.start(torch.tensor(self.prompts[idx][2]), self.max_new_tokens, sampling,
                                                 want_obs=True, result=self._result)
                obs = self.decoder.observe(self._state)
            if not self._state.done:
                break
            self._close_episode()
        else:
            raise ValueError(f"prompt {self.prompts[idx][0]!r} (index {idx}) ends at its first token (EOS): the "
                             "episode would have no round; choose another prompt_index or other prompts.")
        self._done = False
        self._last_round = None
        pid, cat, _ = self.prompts[idx]
        return obs, {"prompt_id": pid, "prompt_index": idx, "category": cat}

    def _step_live(self, action):
        self.actions.decode(action)  # a bad action raises here, leaving the episode playable
        with self._decoding():
            t0 = self.decoder.clock()
            rec = self.decoder.play_round(self._state, int(action), self.rules.stop)
            t1 = self.decoder.clock()
            obs = self.decoder.observe(self._state)  # the next round's observation, or the final one
            t2 = self.decoder.clock()
        E, K = rec.exit_layer, rec.draft_len
        if self.cost == "profile":
            cost = self.rules.profile.round_cost(E, K, rec.n_verify, self.rules.reuse, rec.passes)
        else:
            cost = ((t1 - t0) + ((t2 - t1) if self._charge_overhead else 0.0)) / self.ar_seconds
        n = rec.emitted
        reward = self._reward(n, cost)
        self._done = self._state.done
        terminated = self._done and self._result.eos
        truncated = self._done and not self._result.eos
        if self._done:
            self._close_episode()
        rnd = {"action": int(action), "exit_layer": E, "draft_len": K, "accepted": rec.accepted, "emitted": n,
               "n_verify": rec.n_verify, "cost": cost}
        if self.cost == "wallclock":  # (kept out of the info of deterministic envs)
            rnd["seconds"] = t2 - t0
        self._last_round = rnd
        info = {"round": rnd, "tokens_generated": len(self._result.tokens),
                "prompt_id": self.prompts[self._prompt_index][0]}
        return obs, float(reward), terminated, truncated, info

    def close(self):
        if self.backend == "live":
            self._close_episode()
        super().close()

    def render(self):
        if self.render_mode != "ansi":
            return None
        r = self._last_round
        pid = self.prompts[self._prompt_index][0] if self.backend == "live" else self.trace.id
        n = len(self.generated)
        if r is None:
            return f"[{pid}] start, {n} token(s)"
        what = (("AR step" if r["draft_len"] == 0 else f"context draft K={r['draft_len']}") if r["exit_layer"] == 0
                else f"E={r['exit_layer']} K={r['draft_len']}")
        return (f"[{pid}] {what}: accepted {r['accepted']}, emitted {r['emitted']}, "
                f"cost {r['cost']:.3f}, total {n} tokens")

    def config(self) -> dict:
        """JSON-serialisable description of this env (for datasets and exported policies)."""
        out = {"exit_layers": list(self.actions.exit_layers), "k_max": self.actions.k_max,
               "bonus": self.rules.bonus, "reuse": self.rules.reuse,
               "stop_threshold": self.rules.stop_threshold, "stop_rule": self.rules.stop.describe(),
               "context_draft": self.rules.context_draft, "context_ngram": list(self.rules.context_ngram),
               "context_lengths": list(self.actions.context_lengths),
               "reward_mode": self.reward_mode, "reward_lambda": self.reward_lambda, "max_new_tokens": self.max_new_tokens,
               "observation": asdict(self.obs_config), "observation_layout": self.observer.layout(),
               "cost_profile": self.profile.to_json()}
        if self.backend == "trace":
            out["trace_manifest"] = {k: v for k, v in self.trace_set.manifest.items() if k not in ("categories",)}
        else:
            out.update(backend="live", temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, cost=self.cost,
                       ar_seconds=self.ar_seconds, manifest=self.manifest)
        return out
