"""Policies usable both in the env and in the real decoder (:class:`lede_env.decoding.Policy`).

- :class:`StaticPolicy` - one fixed (E, K) (LayerSkip, arXiv 2404.16710); re-exported.
- :class:`RandomPolicy` - uniform random actions (a behaviour policy for datasets).
- :class:`HeuristicPolicy` - transformers' assisted-generation schedule: K += 2 after a fully
  accepted round, K -= 1 otherwise, at a fixed exit.
- :class:`OraclePolicy` - the env's dynamic-programming oracle (trace env only).
- :class:`EpsilonPolicy` - another policy with epsilon-random exploration.
- :class:`ExportedPolicy` - a trained Q-network exported by :mod:`agents.export`.
- :class:`DELPolicy` - DEL-style (E, K) from running per-exit acceptance estimates.
- :class:`ConfidencePolicy` - confidence-threshold drafting at a fixed exit: draft until the
  draft head's top-1 probability falls below a threshold, K as a cap.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from lede_env.decoding import RoundRecord, StaticPolicy
from lede_env.mdp import ActionMap, ObservationBuilder, ObservationConfig, flatten_by_layout

__all__ = ["StaticPolicy", "RandomPolicy", "HeuristicPolicy", "OraclePolicy", "EpsilonPolicy", "ExportedPolicy",
           "DELPolicy", "ConfidencePolicy", "best_static_action", "policy_from_name", "POLICY_NAMES"]


class RandomPolicy:
    """Uniformly random actions from a seeded generator."""

    needs_observation = False

    def __init__(self, n_actions: int, seed: int = 0) -> None:
        self.n = n_actions
        self.rng = np.random.default_rng(seed)

    def reset(self) -> None:
        pass

    def act(self, obs: Optional[dict]) -> int:
        return int(self.rng.integers(self.n))

    def update(self, record: RoundRecord) -> None:
        pass


class HeuristicPolicy:
    """The +2/-1 speculation-length schedule of transformers' assisted generation
    (``AssistedCandidateGenerator.update_candidate_strategy``), at a fixed exit layer.

    Args:
        actions: the action map.
        exit_layer: E.
        k_start: initial K (transformers' default ``num_assistant_tokens`` is 20; capped at k_max).
    """

    needs_observation = False

    def __init__(self, actions: ActionMap, exit_layer: int, k_start: int = 5) -> None:
        self.actions = actions
        self.exit_layer = exit_layer
        self.k_start = min(k_start, actions.k_max)
        self.reset()

    def reset(self) -> None:
        self.k = self.k_start

    def act(self, obs: Optional[dict]) -> int:
        return self.actions.encode(self.exit_layer, self.k)

    def update(self, record: RoundRecord) -> None:
        if record.draft_len == 0:
            return
        if record.accepted >= record.draft_len:
            self.k = min(self.k + 2, self.actions.k_max)
        else:
            self.k = max(self.k - 1, 1)


class OraclePolicy:
    """Asks a trace env for its oracle action (best action sequence by dynamic programming).

    Only valid inside :class:`lede_env.env.LEDEEnv`; to replay the oracle in the real decoder,
    use the plan from :func:`lede_env.replay.oracle_plan` with a ``SequencePolicy``.
    """

    needs_observation = False

    def __init__(self, env) -> None:
        self.env = env.unwrapped

    def reset(self) -> None:
        pass

    def act(self, obs: Optional[dict]) -> int:
        return self.env.oracle_action()

    def update(self, record: RoundRecord) -> None:
        pass


class EpsilonPolicy:
    """With probability ``epsilon`` a uniformly random action, else ``base``'s."""

    def __init__(self, base, n_actions: int, epsilon: float, seed: int = 0) -> None:
        if not 0.0 <= epsilon <= 1.0:
            raise ValueError(f"epsilon must be in [0, 1], got {epsilon}.")
        self.base, self.n, self.epsilon = base, n_actions, epsilon
        self.rng = np.random.default_rng(seed)
        self.needs_observation = getattr(base, "needs_observation", False)

    def reset(self) -> None:
        self.base.reset()

    def act(self, obs: Optional[dict]) -> int:
        a = self.base.act(obs)  # always consulted, so stateful bases keep their state
        return int(self.rng.integers(self.n)) if self.rng.random() < self.epsilon else a

    def update(self, record: RoundRecord) -> None:
        self.base.update(record)


class ExportedPolicy:
    """A trained Q-network exported as TorchScript + JSON (see :mod:`agents.export`); runs
    without d3rlpy.

    Args:
        path: the ``.pt`` file or the folder holding ``policy.pt`` and ``policy.json``.
        runtime: ``"torchscript"`` (``policy.pt``) or ``"onnxruntime"`` (``policy.onnx``, from
            ``lede export --onnx``; needs the ``onnx`` extra).

    Raises:
        FileNotFoundError: missing files.
        ImportError: ``runtime="onnxruntime"`` without onnxruntime installed.
        ValueError: a config whose observation layout does not match ``expect_layout`` (checked
            by :meth:`check_compatible`).
    """

    needs_observation = True

    def __init__(self, path: str | Path, runtime: str = "torchscript") -> None:
        p = Path(path)
        folder = p if p.is_dir() else p.parent
        pt = folder / "policy.pt" if p.is_dir() else p
        cfg = folder / "policy.json"
        if not pt.exists() or not cfg.exists():
            raise FileNotFoundError(f"No exported policy at {path} (need policy.pt and policy.json; run `lede export`).")
        self.config = json.loads(cfg.read_text())
        self.runtime = runtime
        if runtime == "torchscript":
            self.module = torch.jit.load(str(pt), map_location="cpu").eval()
        elif runtime == "onnxruntime":
            onnx_path = folder / "policy.onnx"
            if not onnx_path.exists():
                raise FileNotFoundError(f"No policy.onnx in {folder}: export with `lede export --onnx`.")
            try:
                import onnxruntime as ort
            except ImportError as e:
                raise ImportError("runtime='onnxruntime' needs onnxruntime: pip install 'lede[onnx]'.") from e
            sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
            self.module = lambda x: torch.from_numpy(sess.run(None, {"obs": x.numpy()})[0])
        else:
            raise ValueError(f"runtime={runtime!r}; choose 'torchscript' or 'onnxruntime'.")
        self.actions = ActionMap(tuple(self.config["exit_layers"]), int(self.config["k_max"]))
        self.obs_config = ObservationConfig(**self.config["observation"])
        self.layout = [(k, list(s)) for k, s in self.config["observation_layout"]]
        self.flat_dim = int(sum(np.prod(s) for _, s in self.layout))

    def check_compatible(self, observer: ObservationBuilder, actions: ActionMap) -> None:
        """Raise ``ValueError`` unless this policy was trained for ``observer``'s layout and ``actions``."""
        if [(k, list(s)) for k, s in observer.layout()] != self.layout:
            raise ValueError(f"Exported policy expects observation layout {self.layout}, the decoder/env has "
                             f"{observer.layout()}: export it for this env or rebuild the env with its settings.")
        if actions != self.actions:
            raise ValueError(f"Exported policy was trained for exits {self.actions.exit_layers}, k_max "
                             f"{self.actions.k_max}; the decoder/env has {actions.exit_layers}, {actions.k_max}.")

    def reset(self) -> None:
        pass

    @torch.no_grad()
    def act(self, obs: Optional[dict]) -> int:
        if obs is None:
            raise ValueError("ExportedPolicy needs observations (needs_observation=True).")
        x = flatten_by_layout(obs, self.layout)
        return int(self.module(torch.from_numpy(x).unsqueeze(0)).reshape(-1)[0])

    def update(self, record: RoundRecord) -> None:
        pass


def best_static_action(env, max_episodes: Optional[int] = None) -> tuple[int, float]:
    """The static action with the best throughput on ``env``'s traces (LayerSkip's setting,
    chosen on training traces).

    Returns:
        ``(action, throughput)``; throughput = total tokens / total cost (AR = about 1.0).
    """
    from lede_env.replay import rollout, throughput

    u = env.unwrapped
    traces = [u.trace_set.traces[i] for i in u.playable][: max_episodes]
    rules = u.rules.without_overhead()  # a static policy computes no observation
    best = (0, -1.0)
    for a in range(u.actions.n):
        tp = throughput([rollout(t, rules, u.max_new_tokens, lambda g, a=a: a) for t in traces])
        if tp > best[1]:
            best = (a, tp)
    return best


class DELPolicy:
    """DEL-style dynamic exit and length (after DEL, arXiv 2504.05598): keep a running estimate
    of each exit's per-token acceptance and play, every round, the (E, K) with the highest
    expected tokens per unit of cost under the cost profile (AR when nothing beats it).

    The estimates are exponential moving averages of each exit's agreement with the verifier
    at the last verified position (``exit_stats[:, 2]`` of the observation, computed from the
    verification pass for every exit at once). Expected tokens of a round with acceptance alpha
    follow Leviathan et al. (arXiv 2211.17192): ``(1 - alpha^(K+1)) / (1 - alpha)`` with the bonus
    token, ``(1 - alpha^K) / (1 - alpha)`` plus the verifier's correction without it.

    Args:
        actions: the action map.
        profile: the cost profile used for round costs.
        bonus, reuse: the decoder's verification variant.
        prior: initial acceptance estimate for every exit.
        decay: EMA decay per round (0.9 = about 10 rounds of memory).
    """

    needs_observation = True

    def __init__(self, actions: ActionMap, profile, bonus: bool = True, reuse: bool = True, prior: float = 0.3,
                 decay: float = 0.9) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}.")
        self.actions, self.prior, self.decay = actions, float(prior), float(decay)
        self._k = np.arange(1, actions.k_max + 1)
        self._cost = np.array([[profile.round_cost(E, k, k + 1 if bonus else k, reuse) for k in self._k]
                               for E in actions.exit_layers])  # [n_exits, k_max], AR-step units
        self._ar = profile.round_cost(0, 0, 1)
        self.bonus = bonus
        self.reset()

    def reset(self) -> None:
        self.alpha = np.full(len(self.actions.exit_layers), self.prior)

    def act(self, obs: Optional[dict]) -> int:
        if obs is None:
            raise ValueError("DELPolicy needs observations (needs_observation=True).")
        agree = np.asarray(obs["exit_stats"], np.float64)[:, 2]
        self.alpha = self.decay * self.alpha + (1 - self.decay) * agree
        a = np.clip(self.alpha, 1e-6, 1 - 1e-6)[:, None]
        powers = a ** self._k[None, :]  # alpha^K
        if self.bonus:
            tokens = (1 - a * powers) / (1 - a)  # 1 + alpha + ... + alpha^K
        else:
            tokens = (1 - powers) / (1 - a) + (1 - powers)  # accepted prefix + correction unless all K accepted
        rate = tokens / self._cost
        i, k = np.unravel_index(np.argmax(rate), rate.shape)
        if rate[i, k] <= 1.0 / self._ar:
            return 0
        return self.actions.encode(self.actions.exit_layers[i], int(self._k[k]))

    def update(self, record: RoundRecord) -> None:
        pass


class ConfidencePolicy(StaticPolicy):
    """Confidence-threshold drafting: every round drafts from exit E until a draft token's
    draft-head top-1 probability falls below ``threshold`` (that token is kept), at most
    ``k_cap`` tokens. The rule of Draft & Verify (Zhang et al., arXiv 2309.08168) and Kangaroo
    (Liu et al., arXiv 2404.18911); AdaEDL (arXiv 2410.18351) stops on an entropy bound instead.

    The decoder and the env (:meth:`lede_env.env.LEDEEnv.playing`) read :attr:`stop_threshold`.

    Args:
        actions: the action map.
        exit_layer: E, one of ``actions.exit_layers``.
        k_cap: the most draft tokens per round (1..k_max).
        threshold: stop probability in (0, 1).

    Raises:
        ValueError: E not a candidate exit, K outside 1..k_max, threshold outside (0, 1).
    """

    def __init__(self, actions: ActionMap, exit_layer: int, k_cap: int, threshold: float) -> None:
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"threshold={threshold!r} must be a probability in (0, 1).")
        super().__init__(actions.encode(exit_layer, k_cap))
        self.stop_threshold = float(threshold)


#: the policy names :func:`policy_from_name` understands
POLICY_NAMES = "ar, static:E,K, heuristic:E, confidence:E,K,THRESHOLD, del, agent:PATH"
_USAGE = {"static": "static:E,K", "heuristic": "heuristic:E", "confidence": "confidence:E,K,THRESHOLD",
          "agent": "agent:PATH"}


def policy_from_name(name: str, actions: ActionMap, profile=None, bonus: bool = True, reuse: bool = True,
                     observer: Optional[ObservationBuilder] = None):
    """The policy named ``name`` (see :data:`POLICY_NAMES`), shared by ``lede evaluate`` and
    :class:`lede_env.generate.Lede`.

    Args:
        actions: the decoder's / env's action map.
        profile, bonus, reuse: the cost profile and verification variant (for ``del``).
        observer: the observation builder an exported agent must match (checked when given).

    Returns:
        the policy, or ``None`` for a name this function does not know (callers add their own).

    Raises:
        ValueError: a known kind with bad arguments (e.g. ``confidence:4,8``), or an exported
            agent whose exits or observation layout do not match.
        FileNotFoundError: ``agent:PATH`` without an exported policy there.
    """
    kind, _, arg = name.partition(":")
    args = arg.split(",") if arg else []
    try:
        if name == "ar":
            return StaticPolicy(0)
        if name == "del":
            return DELPolicy(actions, profile, bonus, reuse)
        if kind == "static" and len(args) == 2:
            return StaticPolicy(actions.encode(int(args[0]), int(args[1])))
        if kind == "heuristic" and len(args) == 1:
            return HeuristicPolicy(actions, int(args[0]))
        if kind == "confidence" and len(args) == 3:
            return ConfidencePolicy(actions, int(args[0]), int(args[1]), float(args[2]))
        if kind == "agent" and arg:
            p = ExportedPolicy(arg)
            if observer is not None:
                p.check_compatible(observer, actions)
            return p
    except (TypeError, ValueError) as e:
        raise ValueError(f"Bad policy {name!r} ({e}).") from None
    if kind in _USAGE:
        raise ValueError(f"Bad policy {name!r}: write {_USAGE[kind]}.")
    return None

