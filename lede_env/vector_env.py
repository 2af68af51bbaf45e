"""A native vector env of the trace MDP: N episodes replayed at once with array operations.

``gym.make_vec("LEDE-Llama3-v1", num_envs=N)`` builds :class:`TraceVectorEnv` (the registered
``vector_entry_point``); ``vectorization_mode="sync"`` or ``"async"`` still gives Gymnasium's
wrappers around N :class:`~lede_env.trace_env.TraceEnv`. Both step alike: the same observations,
rewards and episode ends for the same seeds and actions (tests/lede_env/test_vector_env.py).

Why it is fast: a trace round depends only on the trace, the position ``g`` and the action (the
greedy text fixes what every draft would accept), so the vector env plays every round of every
playable trace once, when it is built (:func:`round_tables`, :func:`lede_env.replay.replay_round`
itself, cached on disk), and an episode's step is then a table look-up. What an observation reads
of the text (the exits' statistics, the context match, progress, and the hidden state or tokens
of the full observation) is tabulated the same way; what it reads of the episode's own rounds
(history, per-exit running acceptance, the context drafts' running acceptance) is kept per
episode in arrays and updated as :class:`~lede_env.mdp.ObservationHistory` updates it.
"""

from __future__ import annotations

import hashlib
import sys
import warnings
from dataclasses import dataclass
from typing import Any, Optional

import gymnasium as gym
import numpy as np
from gymnasium.utils import seeding
from gymnasium.vector.utils import batch_space
from tqdm.auto import tqdm

from .mdp import ACCEPT_PRIOR
from .replay import budget, replay_round
from .storage import atomic_file, cache_dir
from .trace_env import TraceEnv, static_search_key

try:  # Gymnasium >= 1.1 names the autoreset modes; 1.0 always autoresets on the next step
    from gymnasium.vector import AutoresetMode
    NEXT_STEP: Any = AutoresetMode.NEXT_STEP
except ImportError:  # pragma: no cover - the lock holds 1.0
    NEXT_STEP = "NextStep"

#: bump when :func:`round_tables` changes what it stores
TABLE_VERSION = 1
#: per-round fields of the tables (int16: tokens, positions, layers; cost: float64 AR-step units)
_INT_FIELDS = ("emitted", "accepted", "draft_len", "n_verify", "exit_layer")


@dataclass(frozen=True)
class RoundTables:
    """Every round of every playable trace of a :class:`~lede_env.trace_env.TraceEnv`.

    Indexed ``[t, g, a]``: ``t`` the position of the trace in ``env.playable``, ``g`` tokens
    generated so far (1 .. its budget - 1; other entries are unused), ``a`` the action.

    Attributes:
        emitted, accepted, draft_len, n_verify, exit_layer: [T, G, A] int16, the round's
            :class:`~lede_env.mdp.RoundOutcome` fields and its exit layer (0: AR or copy).
        cost: [T, G, A] float64 round cost (AR-step units, the env's overhead charge included).
        done, eos: [T, G, A] bool, the episode ends (EOS, or EOS alone).
        limit: [T] int64 token budget of each trace (:func:`lede_env.replay.budget`).
    """

    emitted: np.ndarray
    accepted: np.ndarray
    draft_len: np.ndarray
    n_verify: np.ndarray
    exit_layer: np.ndarray
    cost: np.ndarray
    done: np.ndarray
    eos: np.ndarray
    limit: np.ndarray


def round_tables(env: TraceEnv, progress: bool = False, cache: bool = True) -> RoundTables:
    """Play :func:`~lede_env.replay.replay_round` for every playable trace, position and action of
    ``env`` under its current rules (about 11 us a round: 8 s for the v1 task's 64 training
    prompts); cached under ``$LEDE_CACHE_DIR/round_tables`` by what the rounds depend on (the
    best-static search's key of the traces and rules, with the overhead charged, the in-round
    stop rule and the token budget), written atomically; ``cache=False`` builds them afresh and
    writes nothing."""
    traces = [env.trace_set.traces[i] for i in env.playable]
    with np.printoptions(threshold=sys.maxsize, precision=17):  # (the stop rule's arrays in full)
        rest = repr((env.rules.stop, env.rules.tree_depth))
    key = hashlib.sha256((static_search_key(traces, env.rules, env.max_new_tokens) + rest).encode()).hexdigest()[:16]
    path = cache_dir() / "round_tables" / f"v{TABLE_VERSION}-{key}.npz"
    try:
        if cache:
            with np.load(path) as z:
                return RoundTables(**{k: z[k] for k in RoundTables.__dataclass_fields__})
    except (OSError, ValueError, KeyError):
        pass
    limits = np.array([budget(t, env.max_new_tokens) for t in traces], np.int64)
    T, G, A = len(traces), int(limits.max()) + 1, env.actions.n
    out = {k: np.zeros((T, G, A), np.int16) for k in _INT_FIELDS}
    out |= {"cost": np.zeros((T, G, A), np.float64), "done": np.ones((T, G, A), bool),
            "eos": np.zeros((T, G, A), bool)}
    for t, trace in enumerate(tqdm(traces, desc="round tables", disable=not progress)):
        limit = int(limits[t])
        for g in range(1, limit):
            for a in range(A):
                oc, E, cost = replay_round(trace, g, a, env.rules, limit)
                for k, v in zip(_INT_FIELDS, (len(oc.emitted), oc.accepted, oc.draft_len, oc.n_verify, E)):
                    out[k][t, g, a] = v
                out["cost"][t, g, a], out["done"][t, g, a], out["eos"][t, g, a] = cost, oc.done, oc.eos
    tables = RoundTables(**out, limit=limits)
    if not cache:
        return tables
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path, suffix=".npz") as tmp, open(tmp, "wb") as f:
        np.savez(f, **{k: getattr(tables, k) for k in RoundTables.__dataclass_fields__})
    return tables


class TraceVectorEnv(gym.vector.VectorEnv):
    """``num_envs`` episodes of the trace MDP (:class:`~lede_env.trace_env.TraceEnv`) stepped at
    once with array operations; ``gym.make_vec(id, num_envs=N)`` of a registered trace task.

    Steps as Gymnasium's ``SyncVectorEnv`` over N ``TraceEnv`` of the same settings does, value
    for value: sub-env ``i`` is seeded with ``seed + i`` (or ``seed[i]``), and an episode that
    ended is reset on the next step (autoreset mode "next step", declared in ``metadata``: that
    step's action is ignored, its reward is 0 and it returns the new episode's first
    observation).

    Observations are the single env's Dict, batched (each key gets a leading N). ``info`` holds
    arrays of N: ``prompt_index`` (the trace's index in ``trace_set``), ``tokens_generated``, and
    for the round just played ``action``, ``exit_layer``, ``draft_len``, ``accepted``, ``emitted``,
    ``n_verify``, ``cost`` (AR-step units), each with its ``_key`` mask (False where the env was
    reset instead).

    Args:
        num_envs: episodes stepped at once (>= 1).
        progress: show progress bars while the traces load and the round tables are built.
        **settings: the task, as ``gym.make(id, **settings)`` takes it (flat task settings; see
            :class:`~lede_env.env.LEDEEnv`).

    Raises:
        ValueError: ``num_envs < 1``; the live backend or wall-clock costs (their rounds are not a
            function of the trace); as :class:`~lede_env.trace_env.TraceEnv`.
    """

    metadata = {"autoreset_mode": NEXT_STEP, "render_modes": []}

    def __init__(self, num_envs: int = 1, progress: bool = True, **settings) -> None:
        if int(num_envs) < 1:
            raise ValueError(f"num_envs={num_envs} must be >= 1.")
        if settings.get("backend", "trace") != "trace":
            raise ValueError("TraceVectorEnv replays traces: for the live backend use "
                             "gym.make_vec(..., vectorization_mode='sync') or 'async'.")
        self.env = env = TraceEnv(progress=progress, **settings)
        self.num_envs = int(num_envs)
        self.single_observation_space = env.observation_space
        self.single_action_space = env.action_space
        self.observation_space = batch_space(env.observation_space, self.num_envs)
        self.action_space = batch_space(env.action_space, self.num_envs)
        self.tables = round_tables(env, progress)
        self._tabulate_observations()
        ob = env.observer
        self._k_max, self._layers, self._decay = ob.k_max, ob.num_layers, ob.config.decay
        self._H = ob.config.history
        self._exit_index = np.full(int(max(env.actions.exit_layers)) + 1, -1, np.int64)
        self._exit_index[list(env.actions.exit_layers)] = np.arange(len(env.actions.exit_layers))
        self._ctx_col = 2 if ob.config.context else None  # the running acceptance of context drafts
        self._lam = float(env.reward_lambda)
        self._mode = env.reward_mode
        n = self.num_envs
        self._rngs: list[Optional[np.random.Generator]] = [None] * n
        self._t = np.zeros(n, np.int64)
        self._g = np.ones(n, np.int64)
        self._autoreset = np.zeros(n, bool)
        self._hist = np.zeros((n, max(self._H, 1), 4), np.float64)
        self._alpha = np.full((n, ob.n_exits), ACCEPT_PRIOR, np.float64)
        self._judged = np.zeros((n, ob.n_exits), np.float64)
        self._ctx_alpha = np.full(n, ACCEPT_PRIOR, np.float64)
        self._started = False

    # ---- tables ---------------------------------------------------------------------------
    def _tabulate_observations(self) -> None:
        """``self._static[key]``: [T, G, ...] the observation at every position of every playable
        trace as the single env builds it before any round (what it reads of the text); the
        episode's own rounds are added per step."""
        env, G = self.env, self.tables.emitted.shape[1]
        self._dynamic = {"history", "experience"}
        keys = [k for k in env.observation_space.spaces if k not in self._dynamic]
        self._static = {k: np.zeros((len(env.playable), G) + env.observation_space[k].shape,
                                    env.observation_space[k].dtype) for k in keys}
        saved = env._trace_index, env.__dict__.get("_g"), env.__dict__.get("_history")
        try:
            for t, idx in enumerate(env.playable):
                env._trace_index = idx
                top = min(int(self.tables.limit[t]), env.trace_set.traces[idx].n)
                for g in range(1, top + 1):
                    env._g, env._history = g, env.observer.new_history()
                    obs = env._obs()
                    for k in keys:
                        self._static[k][t, g] = obs[k]
        finally:
            env._trace_index, env._g, env._history = saved

    # ---- the gym API ----------------------------------------------------------------------
    def reset(self, *, seed=None, options: Optional[dict] = None):
        """Reset every sub-env: ``seed`` an int (sub-env i gets ``seed + i``), a list of N seeds
        or ``None``; ``options={"prompt_index": i}`` plays trace ``i`` in every sub-env (as the
        single env's option).

        Raises:
            ValueError: a seed list of the wrong length; a ``prompt_index`` that is not playable.
        """
        n = self.num_envs
        if seed is None or isinstance(seed, (int, np.integer)):
            seeds = [None if seed is None else int(seed) + i for i in range(n)]
        else:
            seeds = list(seed)
            if len(seeds) != n:
                raise ValueError(f"reset(seed=...) got {len(seeds)} seeds for {n} envs.")
        for i, s in enumerate(seeds):
            if s is not None or self._rngs[i] is None:
                self._rngs[i], _ = seeding.np_random(s)
        self._start(np.arange(n), options or {})
        self._autoreset[:] = False
        self._started = True
        return self._observation(), self._reset_info(np.ones(n, bool))

    def step(self, actions):
        """One round in every sub-env (the ones whose episode ended last step are reset instead).

        Args:
            actions: [N] int actions of the single env's action space.

        Raises:
            RuntimeError: before :meth:`reset`.
            ValueError: an action outside the action space, or not N of them.
        """
        if not self._started:
            raise RuntimeError("Call reset() before step().")
        a = np.asarray(actions)
        if a.shape != (self.num_envs,) or not np.issubdtype(a.dtype, np.integer) or \
                (a < 0).any() or (a >= self.single_action_space.n).any():
            raise ValueError(f"step() takes {self.num_envs} integer actions in 0..{self.single_action_space.n - 1}, "
                             f"got {actions!r}.")
        a = a.astype(np.int64)
        play = ~self._autoreset
        tb, t, g = self.tables, self._t, self._g
        emitted, accepted, draft_len = tb.emitted[t, g, a], tb.accepted[t, g, a], tb.draft_len[t, g, a]
        E, cost = tb.exit_layer[t, g, a], tb.cost[t, g, a]
        done, eos = tb.done[t, g, a] & play, tb.eos[t, g, a] & play
        if self._mode == "relative":
            reward = emitted - self._lam * cost
        elif self._mode == "net":
            reward = emitted - cost
        else:
            reward = emitted / cost
        reward = np.where(play, reward, 0.0)
        self._record(play, accepted.astype(np.float64), draft_len.astype(np.float64), E)
        self._g = np.where(play, g + emitted, g)
        info = {"tokens_generated": self._g.copy()}
        for k, v in (("action", a), ("exit_layer", E), ("draft_len", draft_len), ("accepted", accepted),
                     ("emitted", emitted), ("n_verify", tb.n_verify[t, g, a]), ("cost", cost)):
            info[k], info["_" + k] = np.where(play, v, 0), play.copy()
        resets = np.flatnonzero(self._autoreset)
        if resets.size:
            self._start(resets, {})
        info |= self._reset_info(self._autoreset)
        self._autoreset = done
        return self._observation(), reward, eos, done & ~eos, info

    # ---- internals ------------------------------------------------------------------------
    def _start(self, envs: np.ndarray, options: dict) -> None:
        """New episodes in sub-envs ``envs``: the trace drawn as the single env draws it."""
        env = self.env
        pos = {idx: t for t, idx in enumerate(env.playable)}
        for i in envs.tolist():
            if "prompt_index" in options:
                idx = int(options["prompt_index"])
                if idx not in pos:
                    raise ValueError(f"prompt_index {idx} is not a playable trace (0..{len(env.trace_set) - 1}, "
                                     "with room for at least one round).")
            else:
                idx = int(env.playable[self._rngs[i].integers(len(env.playable))])
            self._t[i] = pos[idx]
        self._g[envs] = 1
        self._hist[envs] = 0.0
        self._alpha[envs] = ACCEPT_PRIOR
        self._judged[envs] = 0.0
        self._ctx_alpha[envs] = ACCEPT_PRIOR

    def _record(self, play: np.ndarray, accepted: np.ndarray, draft_len: np.ndarray, E: np.ndarray) -> None:
        """:meth:`lede_env.mdp.ObservationHistory.record` of every played round, in arrays."""
        full = ((draft_len > 0) & (accepted >= draft_len)).astype(np.float64)
        row = np.stack([accepted / self._k_max, draft_len / self._k_max, E / self._layers, full], -1)
        self._hist[play] = np.concatenate([self._hist[play, 1:], row[play, None]], 1)
        judged = accepted + (accepted < draft_len)
        with np.errstate(divide="ignore", invalid="ignore"):
            w = self._decay ** judged
            share = accepted / judged
        credit = play & (draft_len > 0)
        ctx = credit & (E == 0)
        self._ctx_alpha[ctx] = w[ctx] * self._ctx_alpha[ctx] + (1 - w[ctx]) * share[ctx]
        i = self._exit_index[np.minimum(E, len(self._exit_index) - 1)]
        ex = credit & (E > 0) & (E < len(self._exit_index)) & (i >= 0)
        rows, cols = np.flatnonzero(ex), i[ex]
        self._alpha[rows, cols] = w[ex] * self._alpha[rows, cols] + (1 - w[ex]) * share[ex]
        self._judged[rows, cols] += judged[ex]

    def _observation(self) -> dict:
        t, g = self._t, self._g
        obs = {k: v[t, g] for k, v in self._static.items()}
        if self._ctx_col is not None:
            obs["context"][:, self._ctx_col] = np.clip(self._ctx_alpha, 0.0, 1.0)
        if self._H:
            obs["history"] = self._hist[:, -self._H:].astype(np.float32)
        else:
            obs["history"] = np.zeros((self.num_envs, 0, 4), np.float32)
        if "experience" in self.single_observation_space.spaces:
            obs["experience"] = np.stack([self._alpha, self._judged / (self._judged + 8.0)], -1).astype(np.float32)
        return obs

    def _reset_info(self, mask: np.ndarray) -> dict:
        idx = np.asarray(self.env.playable, np.int64)[self._t]
        return {"prompt_index": np.where(mask, idx, -1), "_prompt_index": mask.copy()}

    def close_extras(self, **kwargs) -> None:
        if "env" in self.__dict__:  # (not when __init__ raised)
            self.env.close()


def make_vector_env(num_envs: int = 1, **settings) -> TraceVectorEnv:
    """The ``vector_entry_point`` of the registered trace tasks (:class:`TraceVectorEnv`).

    Raises:
        ValueError: as :class:`TraceVectorEnv`.
    """
    if settings.pop("max_episode_steps", None) is not None:
        warnings.warn("max_episode_steps is not applied by TraceVectorEnv (an episode ends with its trace).")
    return TraceVectorEnv(num_envs=num_envs, **settings)


__all__ = ["RoundTables", "TraceVectorEnv", "make_vector_env", "round_tables"]
