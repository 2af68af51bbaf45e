"""The LEDE environment: dynamic self-speculative decoding as a Gymnasium environment.

:class:`LEDEEnv` holds what both backends share (arguments and their checks, spaces, the reward,
rendering, config, the in-round rules and the decoder that plays them); each registered id has
its own class on top of it:

- ``LEDE-Llama3-v0``: :class:`lede_env.trace_env.TraceEnv`, exact replay from traces;
- ``LEDE-Llama3-Live-v0``: :class:`lede_env.live_env.LiveEnv`, the real decoder.

``LEDEEnv(backend=...)`` makes the class ``backend`` names; dataset env specs name
``lede_env.env:LEDEEnv`` with a ``backend`` keyword, so every dataset recovers its env.
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from typing import Any, Optional, Sequence

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from .calibration import HeadSpec
from .costs import CostProfile
from .continuations import get_datastore
from .datastore import NgramDatastore, spec_for
from .decoding import SelfSpeculativeDecoder
from .exits import ExitHeads
from .mdp import ActionMap
from .model import ModelBundle
from .policies import own_stop_rule, own_tree_prune, reads_observations
from .config import BACKENDS, COST_SOURCES, REWARD_MODES, STOP_RULES, TaskConfig  # noqa: F401 - re-exported
from .stopping import CalibratedStop
from .task import env_settings, observation_config
from .traces import TraceSet

#: objects an env plays instead of loading them (:meth:`LEDEEnv.with_objects`), not task settings
OBJECT_KEYS = ("bundle", "heads", "trace_set", "profile", "eos_ids", "datastore")


@dataclass(frozen=True)
class EnvObjects:
    """Objects injected into an env (:meth:`LEDEEnv.with_objects`); ``None``: the env builds it."""

    bundle: Optional[ModelBundle] = None
    heads: Optional[ExitHeads] = None
    trace_set: Optional[TraceSet] = None
    profile: Optional[CostProfile] = None
    eos_ids: Optional[tuple[int, ...]] = None
    datastore: Optional[NgramDatastore] = None


def head_spec(config: TaskConfig) -> HeadSpec:
    """The exit heads a task config asks for (:class:`~lede_env.calibration.HeadSpec`)."""
    h = config.heads
    return HeadSpec(h.exit_layers, h.kind, h.draft_vocab, h.feature_vocab, h.calib_prompts)


def task_config(config: Optional[TaskConfig], settings: dict, backend: Optional[str] = None) -> TaskConfig:
    """The task config an env is built from: ``config`` (default: the defaults) with the flat
    ``settings`` changed; ``backend`` (the class's) where neither names one.

    Raises:
        TypeError: ``config`` that is not a :class:`~lede_env.config.TaskConfig`; a setting that is
            an object (named, with the constructor that takes it) or not a task setting.
        ValueError: as :class:`~lede_env.config.TaskConfig`.
    """
    if config is not None and not isinstance(config, TaskConfig):
        raise TypeError(f"config must be a lede_env.config.TaskConfig, got {type(config).__name__}: give flat "
                        "settings as keyword arguments (LEDEEnv(k_max=4, ...)) or TaskConfig.from_kwargs(...).")
    objects = [k for k in settings if k in OBJECT_KEYS or (k == "context_datastore" and isinstance(
        settings[k], NgramDatastore))]
    if "context_datastore" in settings and not isinstance(settings["context_datastore"], (bool, np.bool_, NgramDatastore)):
        raise ValueError(f"context_datastore={settings['context_datastore']!r}; give True (the model's default "
                         "datastore) or False (a lede_env.datastore.NgramDatastore goes to "
                         "LEDEEnv.with_objects(datastore=...)).")
    if objects:
        raise TypeError(f"{', '.join(objects)}: objects are not task settings; build the env with "
                        f"LEDEEnv.with_objects(config, {'=..., '.join(objects)}=...) (a datastore as datastore=...).")
    settings = dict(settings)
    if settings.get("backend") is None:
        settings.pop("backend", None)
        if config is None and backend is not None:
            settings["backend"] = backend
    if "context_datastore" in settings:
        settings["context_datastore"] = bool(settings["context_datastore"])
    if config is None:
        return TaskConfig.from_kwargs(**settings)
    return config.replace(**settings) if settings else config


#: backend name -> its env class (each class registers itself when its module is imported, as
#: ``import lede_env`` does: this module imports neither)
BACKEND_CLASSES: dict[str, type] = {}


def env_class(backend: Optional[str]) -> type:
    """The env class of ``backend``: :class:`~lede_env.live_env.LiveEnv` for ``"live"``, else
    :class:`~lede_env.trace_env.TraceEnv` (whose config rejects an unknown backend by name)."""
    return BACKEND_CLASSES.get(backend or "trace", BACKEND_CLASSES["trace"])


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
    One class per registered id, both built on this one (spaces, reward, rendering, config and
    the shared rules); ``LEDEEnv(backend=...)`` makes the one ``backend`` names, so env specs
    that name ``lede_env.env:LEDEEnv`` (every dataset's) load either kind:

    - ``backend="trace"`` (default, ``LEDE-Llama3-v0``, :class:`~lede_env.trace_env.TraceEnv`):
      rounds are replayed *exactly* from traces (greedy continuation + one teacher-forced pass;
      see ``lede_env.traces``), at microseconds a step. Greedy decoding only; costs from the cost
      profile.
    - ``backend="live"`` (``LEDE-Llama3-Live-v0``, :class:`~lede_env.live_env.LiveEnv`): each step runs one real round of
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
    ``Discrete(1 + C + T + n_exits * k_max)``. Action 0: no exit draft, one plain full-model (AR)
    step, or with ``context_draft`` a context draft of up to that many copied tokens. Actions
    ``1 .. C`` (``C = len(context_lengths)``, default none): a context draft of up to
    ``context_lengths[j - 1]`` copied tokens, ``(E, K) = (0, length)``; the policy then picks how
    many copied tokens to verify. Actions ``1 + C .. C + T`` (``T = len(tree_budgets)``, default
    none): a token tree of at most ``tree_budgets[j - 1 - C]`` nodes and ``tree_depth`` levels
    (:func:`lede_env.trees.round_tree`; SuffixDecoding, arXiv 2411.04975) verified in one pass, the
    longest branch that matches accepted (SpecInfer, arXiv 2305.09781); the observation's history
    records it as a context draft of that many nodes. Action ``1 + C + T + i * k_max + (K - 1)``:
    exit layer ``exit_layers[i]``, speculation length K.
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
    :class:`~lede_env.mdp.ObservationBuilder`): what the rounds already computed, a fraction of
    the full observation's cost a round (``docs/experiments.md``, "Observations").

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
    ``k_max``, ``head_kind`` (``"affine-kl"``/``"affine-kl-prev"``/``"affine"``/``"lens"``, see :mod:`lede_env.exits`), ``draft_vocab``, ``feature_vocab``,
    ``bonus`` (verify K+1 positions), ``reuse`` (verification skips layers 1..E), ``stop_threshold``, ``calib_prompts`` (prompts whose greedy continuations fit the exit heads; default
    the multi-domain ``DEFAULT_CALIB``, disjoint from the defaults for training and evaluation), ``reward_mode``,
    ``reward_lambda`` (``"auto"`` or a throughput), ``stop_rule`` (``None`` or ``"calibrated"``), ``obs_kind``
    (``"full"``/``"compact"``), ``obs_stat_exits``, ``obs_context_agreement`` (with context drafts: the
    ``context`` key also holds the matched n-gram's occurrences and how far their continuations
    agree, :func:`lede_env.lookup.match_agreement`), ``obs_context_span`` (with context drafts: the
    ``context`` key also holds the matched span, :func:`lede_env.lookup.match_span`), ``context_draft`` (most tokens action 0 copies from
    the context; 0 = plain AR step), ``context_lengths`` (context actions, see Action Space),
    ``tree_budgets`` and ``tree_depth`` (tree actions, see Action Space; the trace backend replays
    them exactly),
    ``context_datastore`` (with context drafts: where the context has no match, the draft comes
    from the model's datastore of its own earlier text, :mod:`lede_env.datastore`; ``True`` loads
    the store that goes with ``calib_prompts``, :func:`lede_env.datastore.spec_for`, or give a
    :class:`~lede_env.datastore.NgramDatastore`),
    ``bonus``, ``cost_profile``, ``obs_hidden_dim``,
    ``obs_history``, ``obs_recent_tokens``, ``render_mode`` (``"ansi"``), ``backend``
    (``"trace"``/``"live"``), ``temperature`` (>= 0; 0 = greedy; > 0 needs the live backend),
    ``top_p`` (in (0, 1], nucleus sampling when ``temperature > 0``), ``top_k`` (keep the k most
    likely tokens when ``temperature > 0``, ties kept, as :class:`~lede_env.sampling.Sampling`;
    ``None`` or 0: off), ``cost``
    (``"profile"``/``"wallclock"``; wall-clock needs the live backend). All JSON-serialisable;
    with the live backend ``prompts`` may also be a list of prompts as token-id lists.
    These are the flat keys of a :class:`~lede_env.config.TaskConfig`, the thin way in: ``LEDEEnv(config)``
    takes the config itself (``LEDEEnv(config, k_max=4)`` changes a setting of it), and
    ``env.unwrapped.task_config`` is the task an env plays, resolved (its exits, its lambda).
    Objects are not settings: :meth:`with_objects` injects prebuilt traces (``trace_set``,
    ``profile``, ``eos_ids``; tests, tiny models), a loaded model and exit heads (``bundle``,
    ``heads``; live backend) and a datastore (``datastore``).
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
    #: ``"trace"`` or ``"live"``: which backend a subclass is (set by each)
    backend: str

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if "backend" in cls.__dict__:
            BACKEND_CLASSES[cls.backend] = cls

    def __new__(cls, config: Optional[TaskConfig] = None, *args, backend: Optional[str] = None, **kwargs):
        """``LEDEEnv(...)`` makes the env of the config's (or ``backend``'s) backend (see
        :func:`env_class`); a subclass makes itself."""
        if cls is LEDEEnv:
            cls = env_class(backend if backend is not None or not isinstance(config, TaskConfig) else config.backend)
        return super().__new__(cls)

    def __init__(self, config: Optional[TaskConfig] = None, progress: bool = True, render_mode: Optional[str] = None,
                 **settings) -> None:
        """Build the env of a task config.

        Args:
            config: the task (:class:`~lede_env.config.TaskConfig`; ``None``: the defaults).
            progress: show progress bars while the model, heads and traces load.
            render_mode: ``None`` or ``"ansi"``.
            **settings: flat task settings (:data:`~lede_env.config.FLAT_KEYS`), the thin way in
                (``gym.make(id, **settings)``, dataset env specs): they build the config, or change
                the given one (:meth:`TaskConfig.replace`).

        Raises:
            TypeError: a keyword that is not a task setting, or an object (a model, heads,
                traces, a profile, a datastore: :meth:`with_objects` takes those).
            ValueError: as :class:`~lede_env.config.TaskConfig`, and as each backend's ``_load``.
        """
        objects = self.__dict__.pop("_objects", None) or EnvObjects()
        config = task_config(config, settings, self.backend)
        if config.backend != self.backend:
            raise ValueError(f"backend={config.backend!r} given to {type(self).__name__}, the {self.backend} env: use "
                             f"LEDEEnv(backend={config.backend!r}, ...) or {env_class(config.backend).__name__}.")
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(f"render_mode={render_mode!r}; choose one of {self.metadata['render_modes']} or None.")
        if objects.profile is not None:  # the profile charged is part of the task
            config = replace(config, reward=replace(config.reward, cost_profile=objects.profile.to_json()))
        #: the task this env plays (every setting, resolved once loaded; objects injected by
        #: :meth:`with_objects` aside)
        self.task_config = config
        flat = config.to_kwargs()
        self.temperature, self.top_p, self.top_k = config.sampling.temperature, config.sampling.top_p, config.sampling.top_k
        self.cost = config.reward.cost
        self.obs_config = observation_config(flat)
        #: the cost profile as given (a name, a path or a dict; an injected ``profile``: its dict),
        #: the ``cost_profile`` of :meth:`task_settings`
        self.cost_profile_spec = config.reward.cost_profile
        self._objects = objects
        self._best_static: Optional[tuple[int, float]] = None
        self._charge_overhead = True
        self._oracle_cache: dict[int, np.ndarray] = {}
        self._done = True
        self._last_round: Optional[dict] = None
        self.max_new_tokens = config.max_new_tokens
        self.reward_mode = config.reward.mode
        self.render_mode = render_mode
        self._load(objects, progress)
        self._finish_rules(self.heads)
        self.action_space = spaces.Discrete(self.actions.n)
        self.observation_space = self.observer.space()
        # resolved: the exits the heads or traces have and the lambda "auto" gave, so that the
        # env this config builds elsewhere (from its JSON, a dataset, an agent) plays the same task
        self.task_config = replace(config, heads=replace(config.heads, exit_layers=tuple(self.actions.exit_layers)),
                                   reward=replace(config.reward, lambda_=self.reward_lambda))

    @classmethod
    def with_objects(cls, config: Optional[TaskConfig] = None, *, bundle: Optional[ModelBundle] = None,
                     heads: Optional[ExitHeads] = None, trace_set: Optional[TraceSet] = None,
                     profile: Optional[CostProfile] = None, eos_ids: Optional[Sequence[int]] = None,
                     datastore: Optional[NgramDatastore] = None, progress: bool = True,
                     render_mode: Optional[str] = None, **settings) -> "LEDEEnv":
        """The env of a task config, playing objects already built instead of loading them.

        Args:
            config, progress, render_mode, settings: as ``LEDEEnv(...)``.
            bundle: a loaded model (:class:`~lede_env.model.ModelBundle`; live backend).
            heads: exit heads (:class:`~lede_env.exits.ExitHeads`; live backend, or beside a
                ``trace_set`` for ``stop_rule="calibrated"`` and :meth:`make_decoder`).
            trace_set: prebuilt traces (:class:`~lede_env.traces.TraceSet`; trace backend, with
                ``profile`` and ``eos_ids``).
            profile: the cost profile (:class:`~lede_env.costs.CostProfile`); the config's
                ``cost_profile`` becomes its dict.
            eos_ids: tokens that end generation (default: the model's).
            datastore: where the context has no match, context drafts copy from it
                (:class:`~lede_env.datastore.NgramDatastore`; turns ``context_datastore`` on).

        Raises:
            ValueError: objects the backend does not take (see each backend), and as ``LEDEEnv(...)``.
        """
        if datastore is not None:
            if not isinstance(datastore, NgramDatastore):
                raise ValueError(f"datastore={datastore!r}: give a lede_env.datastore.NgramDatastore (or "
                                 "context_datastore=True for the model's default datastore).")
            settings["context_datastore"] = True
        env = LEDEEnv.__new__(cls, config, **settings)
        env._objects = EnvObjects(bundle, heads, trace_set, profile,
                                  None if eos_ids is None else tuple(int(e) for e in eos_ids), datastore)
        env.__init__(config, progress=progress, render_mode=render_mode, **settings)
        return env

    # ---- what each backend provides ------------------------------------------------------------
    def _load(self, objects: "EnvObjects", progress: bool) -> None:
        """Load what the backend plays (from ``self.task_config`` and the injected ``objects``) and
        set ``bundle``, ``heads``, ``profile``, ``actions``, ``rules`` and ``playable``, and
        ``observer`` here or in :meth:`_finish_rules`.

        Raises:
            ValueError: objects or settings this backend does not take, or that do not fit together.
        """
        raise NotImplementedError

    def _default_lambda(self) -> float:
        """The relative reward's lambda for ``reward_lambda="auto"``."""
        raise NotImplementedError

    def _reset(self, options: dict) -> tuple[dict, dict]:
        """Start an episode (``np_random`` already seeded): ``(observation, info)``, see :meth:`reset`."""
        raise NotImplementedError

    def _step(self, action) -> tuple:
        """Play one round of a running episode: gymnasium's 5-tuple, see :meth:`step`."""
        raise NotImplementedError

    @property
    def prompt_id(self) -> Optional[str]:
        """Id of the current episode's prompt (``None`` before the first reset)."""
        raise NotImplementedError

    @property
    def generated(self) -> list[int]:
        """Token ids generated so far in the current episode (the prefill token first; empty
        before the first reset)."""
        raise NotImplementedError

    # ---- shared rules ------------------------------------------------------------------------
    def _finish_rules(self, heads: Optional[ExitHeads]) -> None:
        """Turn on context drafts, resolve the reward's lambda and build the named stop rule."""
        rules = self.task_config.rules
        store = self._objects.datastore
        if store is None and rules.context_datastore:
            if self.bundle is None:
                raise ValueError("context_datastore=True needs the model to load its datastore: give a "
                                 "lede_env.datastore.NgramDatastore with a prebuilt trace_set "
                                 "(LEDEEnv.with_objects(datastore=...)).")
            store = get_datastore(self.bundle, spec_for(self.task_config.heads.calib_prompts), progress=False)
        self.rules = replace(self.rules, context_draft=rules.context_draft, datastore=store)
        lam = self.task_config.reward.lambda_
        self.reward_lambda = float(lam) if lam != "auto" else self._default_lambda()
        if rules.stop_rule == "calibrated":
            if heads is None or heads.acceptance is None:
                raise ValueError("stop_rule='calibrated' needs exit heads with an acceptance calibration (fitted "
                                 "on calibration continuations; not the plain logit lens with the full vocabulary).")
            rule = CalibratedStop.from_profile(heads.acceptance, self.rules.profile, self.actions.exit_layers,
                                               self.actions.k_max, self.reward_lambda, self.rules.bonus,
                                               self.rules.reuse)
            self.rules = replace(self.rules, stop_rule=rule)

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
        return SelfSpeculativeDecoder.from_rules(bundle.stack, heads,
                                                 replace(self.rules, profile=self.profile if profile else None),
                                                 self.obs_config)

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

    def flatten_observation(self, obs: dict) -> np.ndarray:
        """[flat_dim] float32 vector of an observation (layout: ``self.observer.layout()``)."""
        return self.observer.flatten(obs)

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
        own stop rule (:func:`~lede_env.policies.own_stop_rule`) and static tree rule
        (:func:`~lede_env.policies.own_tree_prune`), when it has them, replace the env's (as the
        real decoder does for that policy)."""
        saved = self.rules
        rule, prune = own_stop_rule(policy), own_tree_prune(policy)
        if rule is not None or prune is not None:
            self.rules = replace(saved, stop_rule=saved.stop_rule if rule is None else rule,
                                 tree_prune=saved.tree_prune if prune is None else prune)
            self._oracle_cache = {}
        try:
            with self.charging_overhead(reads_observations(policy)):
                yield self
        finally:
            if self.rules is not saved:
                self.rules = saved
                self._oracle_cache = {}

    # ---- gym API --------------------------------------------------------------------------
    def reset(self, *, seed: Optional[int] = None, options: Optional[dict[str, Any]] = None):
        super().reset(seed=seed)
        return self._reset(options or {})

    def step(self, action):
        if self._done:
            raise RuntimeError("The episode has ended (or reset() was never called): call reset() before step().")
        return self._step(action)

    def _round_info(self, action, exit_layer: int, draft_len: int, accepted: int, emitted: int, n_verify: int,
                    cost: float) -> dict:
        """``info["round"]`` of a round just played (also what :meth:`render` shows)."""
        self._last_round = {"action": int(action), "exit_layer": exit_layer, "draft_len": draft_len,
                            "accepted": accepted, "emitted": emitted, "n_verify": n_verify, "cost": cost}
        return self._last_round

    def render(self):
        if self.render_mode != "ansi":
            return None
        r = self._last_round
        pid = self.prompt_id
        n = len(self.generated)
        if r is None:
            return f"[{pid}] start, {n} token(s)"
        what = (("AR step" if r["draft_len"] == 0 else f"context draft K={r['draft_len']}") if r["exit_layer"] == 0
                else f"E={r['exit_layer']} K={r['draft_len']}")
        if self.actions.tree_budget(r["action"]):
            what = f"tree of {r['draft_len']} nodes"
        return (f"[{pid}] {what}: accepted {r['accepted']}, emitted {r['emitted']}, "
                f"cost {r['cost']:.3f}, total {n} tokens")

    def task_settings(self) -> dict:
        """Every task setting of this env (:data:`lede_env.task.TASK_KEYS`: what fixes its
        observation, actions, rules and costs), resolved and JSON-serialisable:
        ``LEDEEnv(**env.task_settings(), model=..., prompts=...)`` rebuilds the same task on other
        prompts. What ``lede export`` writes (:func:`lede_env.task.env_settings`)."""
        return env_settings(self)

    def config(self) -> dict:
        """JSON-serialisable description of this env (for datasets and exported policies)."""
        out = {"exit_layers": list(self.actions.exit_layers), "k_max": self.actions.k_max,
               "bonus": self.rules.bonus, "reuse": self.rules.reuse,
               "stop_threshold": self.rules.stop_threshold, "stop_rule": self.rules.stop.describe(),
               "context_draft": self.rules.context_draft, "context_ngram": list(self.rules.context_ngram),
               "context_lengths": list(self.actions.context_lengths),
               **({"tree_budgets": list(self.actions.tree_budgets), "tree_depth": self.rules.tree_depth,
                   "tree_prune": None if self.rules.tree_prune is None else self.rules.tree_prune.describe()}
                  if self.actions.tree_budgets else {}),
               "context_datastore": None if self.rules.datastore is None else self.rules.datastore.fingerprint(),
               "reward_mode": self.reward_mode, "reward_lambda": self.reward_lambda, "max_new_tokens": self.max_new_tokens,
               "observation": asdict(self.obs_config), "observation_layout": self.observer.layout(),
               "cost_profile": self.profile.to_json()}
        return out


def _builder_signature() -> inspect.Signature:
    """``LEDEEnv(config, progress, render_mode, **settings)`` with the settings spelled out (their
    defaults the config's), so that ``inspect.signature(LEDEEnv)`` lists every keyword an env spec
    may hold (recipes list the env keys from it, tests bind stored specs to it)."""
    P = inspect.Parameter
    head = [P("config", P.POSITIONAL_OR_KEYWORD, default=None, annotation=Optional[TaskConfig]),
            P("progress", P.POSITIONAL_OR_KEYWORD, default=True, annotation=bool),
            P("render_mode", P.POSITIONAL_OR_KEYWORD, default=None, annotation=Optional[str])]
    defaults = TaskConfig().to_kwargs() | {"backend": None}
    return inspect.Signature(head + [P(k, P.KEYWORD_ONLY, default=v) for k, v in defaults.items()])


LEDEEnv.__signature__ = _builder_signature()
