"""``LEDE-Llama3-v0``: dynamic self-speculative decoding as a Gymnasium environment."""

from __future__ import annotations

import hashlib
import platform
import warnings
from contextlib import contextmanager
from dataclasses import asdict, replace
from typing import Any, Optional

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces

from .costs import CostProfile, analytic_profile, measure_profile
from .exits import ExitHeads
from .mdp import ActionMap, ObservationBuilder, ObservationConfig
from .model import KERNELS_VERSION, cache_dir
from .prompts import DEFAULT_CALIB, DEFAULT_MAX_NEW, DEFAULT_TRAIN
from .replay import ReplayRules, budget, oracle_plan, replay_round
from .traces import HeadSpec, ModelBundle, TraceSet, TraceSpec, get_bundle, get_heads, get_traces

REWARD_MODES = ("net", "ratio")


def get_profile(kind: str, bundle: ModelBundle, heads: ExitHeads, k_max: int, obs: ObservationConfig) -> CostProfile:
    """A cost profile: ``"analytic"``, ``"measured"`` (measured once on this machine and cached),
    a path to a JSON profile written by ``lede profile``, or the profile itself as a dict
    (:meth:`CostProfile.to_json`; datasets store it so a recovered env charges the same costs)."""
    if isinstance(kind, dict):
        return CostProfile(**kind)
    if kind == "analytic":
        return analytic_profile(bundle.stack, k_max, heads.draft_vocab, heads.translated)
    if kind == "measured":
        tag = hashlib.sha256(repr((heads.fingerprint(), k_max, asdict(obs), platform.node(),
                                   torch.get_num_threads(), bundle.stack.kernels, KERNELS_VERSION)).encode()).hexdigest()[:12]
        path = cache_dir() / "profiles" / bundle.slug / f"{tag}.json"
        if path.exists():
            try:
                return CostProfile.load(path)
            except ValueError:
                pass
        prof = measure_profile(bundle.stack, heads, k_max, overhead_fn=overhead_probe(bundle, heads, k_max, obs))
        prof.save(path)
        return prof
    return CostProfile.load(kind)


def overhead_probe(bundle: ModelBundle, heads: ExitHeads, k_max: int, obs: ObservationConfig):
    """A zero-argument callable doing one round's observation work and a typical policy forward
    (a 2 x 256 MLP Q-network), for :func:`~lede_env.costs.measure_profile`."""
    n_ex = len(heads.exit_layers)
    builder = ObservationBuilder(obs, bundle.stack.hidden_size, n_ex, bundle.stack.num_layers, k_max,
                                 bundle.stack.head_weight.shape[0])
    hid = torch.randn(n_ex, bundle.stack.hidden_size, dtype=bundle.stack.dtype)
    n_actions = 1 + n_ex * k_max
    mlp = torch.nn.Sequential(torch.nn.Linear(builder.flat_dim, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256),
                              torch.nn.ReLU(), torch.nn.Linear(256, n_actions))

    @torch.no_grad()
    def probe():
        top1, ent, arg = heads.feature_stats(hid)
        o = builder.build(hid[-1].numpy(), top1.numpy(), ent.numpy(), (arg == 0).float().numpy(), [1, 2, 3], 0.5)
        mlp(torch.from_numpy(builder.flatten(o)).unsqueeze(0)).argmax(-1)

    return probe


class LEDEEnv(gym.Env):
    """Dynamic self-speculative decoding of a Llama-family LLM, one draft/verify round per step.

    ## Description
    An episode is the greedy generation of one prompt. Each step is one round: the agent picks
    an exit layer E and a speculation length K; the decoder drafts K tokens with layers 1..E
    and an exit head, verifies them with one pass of the full model, and emits the longest
    agreeing prefix plus the verifier's next token. Output is always identical to greedy
    decoding; only the cost changes. The env replays rounds *exactly* from traces (greedy
    continuation + one teacher-forced pass; see ``lede_env.traces``), at microseconds a step.
    The MDP follows LEDE (arXiv 2606.03113); design notes in the project's docs.

    ## Action Space
    ``Discrete(1 + n_exits * k_max)``. Action 0: no draft, one plain full-model (AR) step.
    Action ``1 + i * k_max + (K - 1)``: exit layer ``exit_layers[i]``, speculation length K.
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

    With ``stop_threshold`` (a probability; default ``None``) the action's K is a cap:
    drafting stops after the first draft token whose draft-head probability is below the
    threshold (confidence-threshold drafting, Draft & Verify arXiv 2309.08168, Kangaroo arXiv
    2404.18911); that token is kept and verified, and the round is charged for the tokens
    actually drafted (``info["round"]["draft_len"]``). A policy object can carry its own
    ``stop_threshold`` attribute; :meth:`playing` applies it, as the real decoder does.

    ## Rewards
    A round's cost is in units of one AR step, from a cost profile (``cost_profile``:
    ``"analytic"`` from parameter counts, ``"measured"`` on this machine, a JSON path, or the profile as a dict). It
    charges drafting (K passes through layers 1..E + draft head, and layers 1..E once more
    for the last draft token when ``bonus``), verification (layers E+1..L on the verified
    positions + full LM head; layers 1..E are reused from the draft) and the per-round
    feature/policy overhead (an agent reading observations pays it; ``charging_overhead(False)``
    drops it for policies that read none, as the real decoder does). ``reward_mode``:

    - ``"net"`` (default): tokens emitted - cost. The undiscounted return is the number of AR
      steps saved (N - total cost); use a discount near 1.
    - ``"ratio"``: tokens emitted / cost (accepted tokens per unit of compute; an AR step earns
      ``1 / (1 + overhead)``). A *sum* of ratios rewards taking more rounds (always-AR scores N):
      use it with a small discount, as a per-round score.

    Judge policies by throughput (total tokens / total cost), not return.

    ## Starting State
    A prompt drawn uniformly from the trace set with ``self.np_random`` (``options={"prompt_index": i}``
    picks one). The first token comes from the prompt's forward pass (prefill) and is free;
    the first observation describes the last prompt position.

    ## Episode End
    Terminated when an EOS token is emitted (also inside an accepted block: emission stops
    there). Truncated when ``max_new_tokens`` tokens have been generated. No wrapper adds
    another limit.

    ## Arguments
    ``model`` (id/path, ``None`` = embedded SmolLM2-135M-Instruct), ``prompts`` (prompt spec,
    default ``"humaneval[0:24]"``), ``max_new_tokens`` (96), ``exit_layers`` (``None`` = every 2nd layer),
    ``k_max``, ``head_kind`` (``"affine-kl"``/``"affine"``/``"lens"``, see :mod:`lede_env.exits`), ``draft_vocab``, ``feature_vocab``,
    ``bonus`` (verify K+1 positions), ``reuse`` (verification skips layers 1..E), ``stop_threshold``, ``calib_prompts`` (prompts whose greedy continuations fit the exit heads; default
    ``"humaneval[100:132]"``, disjoint from the defaults for training and evaluation), ``reward_mode``, ``bonus``, ``cost_profile``, ``obs_hidden_dim``,
    ``obs_history``, ``obs_recent_tokens``, ``render_mode`` (``"ansi"``). All JSON-serialisable.
    ``trace_set`` / ``profile`` / ``eos_ids`` inject prebuilt objects (tests, tiny models).

    ## Example
    >>> import gymnasium as gym, lede_env
    >>> env = gym.make("LEDE-Llama3-v0")                      # doctest: +SKIP
    >>> obs, info = env.reset(seed=0)                         # doctest: +SKIP
    >>> obs, r, terminated, truncated, info = env.step(env.unwrapped.actions.encode(4, 2))  # doctest: +SKIP
    """

    metadata = {"render_modes": ["ansi"], "render_fps": 4}

    def __init__(
        self,
        model: Optional[str] = None,
        prompts: str = DEFAULT_TRAIN,
        max_new_tokens: int = DEFAULT_MAX_NEW,
        exit_layers: Optional[list[int]] = None,
        k_max: int = 8,
        head_kind: str = "affine",
        draft_vocab: Optional[int] = 8192,
        feature_vocab: int = 1024,
        calib_prompts: str = DEFAULT_CALIB,
        reward_mode: str = "net",
        bonus: bool = True,
        reuse: bool = True,
        stop_threshold: Optional[float] = None,
        cost_profile: "str | dict" = "analytic",
        obs_hidden_dim: int = 64,
        obs_history: int = 4,
        obs_recent_tokens: int = 8,
        render_mode: Optional[str] = None,
        trace_set: Optional[TraceSet] = None,
        profile: Optional[CostProfile] = None,
        eos_ids: Optional[tuple[int, ...]] = None,
        progress: bool = True,
    ) -> None:
        if reward_mode not in REWARD_MODES:
            raise ValueError(f"reward_mode={reward_mode!r}; choose one of {REWARD_MODES}.")
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(f"render_mode={render_mode!r}; choose one of {self.metadata['render_modes']} or None.")
        if not isinstance(max_new_tokens, int) or max_new_tokens < 2:
            raise ValueError(f"max_new_tokens must be an integer >= 2, got {max_new_tokens!r}.")
        self.obs_config = ObservationConfig(obs_hidden_dim, obs_history, obs_recent_tokens)
        if trace_set is None:
            spec = TraceSpec(model, prompts, max_new_tokens,
                             HeadSpec(tuple(exit_layers) if exit_layers else None, head_kind, draft_vocab,
                                      feature_vocab, calib_prompts))
            bundle = get_bundle(model)
            heads = get_heads(bundle, spec.heads, progress=progress)
            trace_set = get_traces(spec, progress=progress, bundle=bundle, heads=heads)
            if profile is None:
                profile = get_profile(cost_profile, bundle, heads, k_max, self.obs_config)
            eos_ids = bundle.eos_ids if eos_ids is None else eos_ids
        if profile is None:
            raise ValueError("A prebuilt trace_set needs a cost profile: pass profile=CostProfile(...).")
        if eos_ids is None:
            raise ValueError("A prebuilt trace_set needs eos_ids.")
        man = trace_set.manifest
        if int(man.get("max_new_tokens", max_new_tokens)) < max_new_tokens:
            warnings.warn(f"Traces hold at most {man['max_new_tokens']} new tokens; episodes are truncated there.")
        self.trace_set = trace_set
        self.profile = profile
        self.max_new_tokens = max_new_tokens
        self.reward_mode = reward_mode
        self.render_mode = render_mode
        self.actions = ActionMap(trace_set.exit_layers, k_max)
        if stop_threshold is not None and not 0.0 < float(stop_threshold) < 1.0:
            raise ValueError(f"stop_threshold={stop_threshold!r} must be a probability in (0, 1), or None.")
        self.rules = ReplayRules(self.actions, profile, bool(bonus), tuple(int(e) for e in eos_ids), bool(reuse),
                                 None if stop_threshold is None else float(stop_threshold))
        d = trace_set.traces[0].hidden.shape[1]
        self.observer = ObservationBuilder(self.obs_config, d, len(self.actions.exit_layers),
                                           trace_set.num_layers, k_max, int(man["model"]["vocab_size"]))
        self.playable = [i for i, t in enumerate(trace_set.traces) if budget(t, max_new_tokens) >= 2
                         and not (t.eos and t.n <= 1)]
        if not self.playable:
            raise ValueError("No trace has room for a round (every continuation is 1 token): "
                             "use other prompts or a larger max_new_tokens.")
        self.action_space = spaces.Discrete(self.actions.n)
        self.observation_space = self.observer.space()
        self._oracle_cache: dict[int, np.ndarray] = {}
        self._trace_index: Optional[int] = None
        self._done = True
        self._last_round: Optional[dict] = None

    # ---- helpers --------------------------------------------------------------------------
    @property
    def trace(self):
        """The current episode's trace (``None`` before the first reset)."""
        return None if self._trace_index is None else self.trace_set.traces[self._trace_index]

    def flatten_observation(self, obs: dict) -> np.ndarray:
        """[flat_dim] float32 vector of an observation (layout: ``self.observer.layout()``)."""
        return self.observer.flatten(obs)

    def _obs(self) -> dict:
        t, g = self.trace, self._g
        j = g - 1  # last verified local position: its output is the pending token generated[g-1]
        seq_tail = np.concatenate([t.prompt[-self.obs_config.recent_tokens:], t.generated[:g]])
        agree = (t.lens_arg[j] == t.generated[j]).astype(np.float32)
        return self.observer.build(t.hidden[j], t.top1[j], t.entropy[j], agree, seq_tail.tolist(),
                                   g / self.max_new_tokens)

    @contextmanager
    def charging_overhead(self, charge: bool):
        """Within this block, rounds are charged the per-round feature/policy overhead only if
        ``charge`` (policies that read no observation do not pay it in the real decoder)."""
        saved = self.rules
        if not charge:
            self.rules = saved.without_overhead()
            self._oracle_cache = {}
        try:
            yield self
        finally:
            if self.rules is not saved:
                self.rules = saved
                self._oracle_cache = {}

    @contextmanager
    def playing(self, policy):
        """Within this block, rounds follow ``policy``'s own rules: the feature/policy overhead
        is charged only if it reads observations (:meth:`charging_overhead`), and its
        ``stop_threshold`` attribute, when present, replaces the env's (confidence-threshold
        drafting, as the real decoder does for that policy)."""
        saved = self.rules
        if hasattr(policy, "stop_threshold"):
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
        oc, E, cost = replay_round(self.trace, self._g, action, self.rules, self._limit)
        n = len(oc.emitted)
        self._g += n
        reward = n - cost if self.reward_mode == "net" else n / cost
        terminated = oc.eos
        truncated = oc.done and not oc.eos
        self._done = oc.done
        self.observer.record(oc.accepted, oc.draft_len, E)
        rnd = {"action": int(action), "exit_layer": E, "draft_len": oc.draft_len, "accepted": oc.accepted,
               "emitted": n, "cost": cost}
        self._last_round = rnd
        obs = self._obs()  # g <= trace length always, so the last verified position exists
        info = {"round": rnd, "tokens_generated": self._g, "prompt_id": self.trace.id}
        return obs, float(reward), terminated, truncated, info

    def render(self):
        if self.render_mode != "ansi":
            return None
        r = self._last_round
        if r is None:
            return f"[{self.trace.id}] start, {self._g} token(s)"
        what = "AR step" if r["exit_layer"] == 0 else f"E={r['exit_layer']} K={r['draft_len']}"
        return (f"[{self.trace.id}] {what}: accepted {r['accepted']}, emitted {r['emitted']}, "
                f"cost {r['cost']:.3f}, total {self._g} tokens")

    def config(self) -> dict:
        """JSON-serialisable description of this env (for datasets and exported policies)."""
        return {"exit_layers": list(self.actions.exit_layers), "k_max": self.actions.k_max,
                "bonus": self.rules.bonus, "reuse": self.rules.reuse,
                "stop_threshold": self.rules.stop_threshold, "reward_mode": self.reward_mode, "max_new_tokens": self.max_new_tokens,
                "observation": asdict(self.obs_config), "observation_layout": self.observer.layout(),
                "trace_manifest": {k: v for k, v in self.trace_set.manifest.items() if k not in ("categories",)},
                "cost_profile": self.profile.to_json()}
