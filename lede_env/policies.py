"""Policies: what picks (E, K) every round, in the decoder and in the env.

Every policy follows :class:`Policy` (in the spirit of transformers' ``CandidateGenerator``: one
method proposes, one learns how the round went); :class:`BasePolicy` gives the no-op defaults.
None of them needs an RL library: an exported agent runs from its TorchScript (or ONNX) file.

- :class:`StaticPolicy` - one fixed (E, K) (LayerSkip, arXiv 2404.16710); action 0 = plain AR.
- :class:`SequencePolicy`, :class:`PlanPolicy` - replay a list of actions / an oracle plan.
- :class:`RandomPolicy` - uniform random actions (a behaviour policy for datasets).
- :class:`HeuristicPolicy` - transformers' assisted-generation schedule: K += 2 after a fully
  accepted round, K -= 1 otherwise, at a fixed exit.
- :class:`EpsilonPolicy` - another policy with epsilon-random exploration.
- :class:`DesignPolicy` - random actions held for runs of rounds (timing rounds for the cost
  profile, :mod:`lede_env.loop_profile`).
- :class:`PredictorPolicy` - a trained agent before export (its ``predict`` on flat observations).
- :class:`ExportedPolicy` - a trained Q-network exported by ``agents.export``.
- :class:`DELPolicy` - DEL-style (E, K) from running per-exit acceptance estimates.
- :class:`ConfidencePolicy` - confidence-threshold drafting at a fixed exit: draft until the
  draft head's top-1 probability falls below a threshold, K as a cap.
- :class:`TreeRulePolicy` - the static tree rule: the largest tree action every round, its tree
  pruned to the nodes that pay under the cost profile (:class:`lede_env.trees.TreePrune`).
- :class:`GuardedPolicy` - a safety net around any policy: falls back to AR while the policy's
  realised throughput (measured wall clock in the live decoder, profile costs in the trace env)
  is below AR's (``guarded:NAME`` wraps any named policy).

:func:`policy_from_name` builds them from the names ``lede generate``/``lede evaluate`` take.
What needs the traces' hindsight (the oracle, the best-static search) lives in ``agents``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional, Protocol, Sequence, runtime_checkable

import numpy as np
import torch

from .mdp import ActionMap, ObservationBuilder, ObservationConfig, flatten_by_layout, verified_positions
from .stopping import NO_STOP, DropStop, ThresholdStop, as_stop_rule
from .trees import TreePrune

if TYPE_CHECKING:
    from .decoding import RoundRecord

__all__ = ["Policy", "BasePolicy", "StaticPolicy", "SequencePolicy", "PlanPolicy", "RandomPolicy",
           "HeuristicPolicy", "EpsilonPolicy", "DesignPolicy", "PredictorPolicy", "ExportedPolicy", "DELPolicy", "ConfidencePolicy", "CopyElseDraftPolicy",
           "TreeRulePolicy", "GuardedPolicy", "policy_from_name", "copy_lengths", "tree_budgets_of", "own_tree_prune",
           "split_policies", "POLICY_NAMES"]


@runtime_checkable
class Policy(Protocol):
    """What the decoder and the env need from a policy (in the spirit of transformers'
    ``CandidateGenerator``: one method proposes, one learns how the round went).

    Attributes:
        needs_observation: if false, the decoder skips computing observations (``act`` gets None).
        stop_rule: optional :class:`~lede_env.stopping.StopRule` the policy's rounds follow
            (``None`` or absent: the env's or decoder's own; :func:`own_stop_rule`).
        stop_threshold: optional float attribute (read every round when present): drafting
            stops after the first draft token whose draft-head probability is below it, so the
            action's K is a cap (confidence-threshold drafting; the env's ``stop_threshold``).
    """

    needs_observation: bool

    def reset(self) -> None:
        """Called at the start of every generation / episode."""

    def act(self, obs: Optional[dict]) -> int:
        """Pick an action index for the next round."""

    def update(self, record: "RoundRecord") -> None:
        """Told the outcome of the round just played."""


def reads_observations(policy) -> bool:
    """Whether ``policy`` reads observations (:attr:`Policy.needs_observation`; a policy object
    that does not declare it reads none): the decoder computes them, and charges the per-round
    feature/policy overhead, only then."""
    return bool(getattr(policy, "needs_observation", False))


def own_stop_rule(policy):
    """The in-round stop rule ``policy`` brings (its ``stop_rule``, else a rule from its
    ``stop_threshold``), or ``None``: the env's or decoder's own applies. The one reading of a
    policy's stop rule, shared by the decoder and the env (:meth:`lede_env.env.LEDEEnv.playing`)."""
    rule = getattr(policy, "stop_rule", None)
    if rule is None and getattr(policy, "stop_threshold", None) is not None:
        rule = as_stop_rule(policy.stop_threshold)
    return rule


def own_tree_prune(policy):
    """The static tree rule (:class:`~lede_env.trees.TreePrune`) ``policy`` brings (its
    ``tree_prune`` attribute), or ``None``: the env's or decoder's own
    (:attr:`lede_env.rules.RoundRules.tree_prune`) applies. Read like :func:`own_stop_rule`."""
    return getattr(policy, "tree_prune", None)


class BasePolicy:
    """Defaults for :class:`Policy`: no observation needed, the env's or decoder's in-round stop
    rule, ``reset`` and ``update`` do nothing. Subclasses implement :meth:`act` and override the
    rest only where they keep state."""

    needs_observation = False
    #: the in-round stop rule this policy plays under (``None``: the env's or decoder's own)
    stop_rule = None

    def reset(self) -> None:
        """Called at the start of every generation / episode."""

    def act(self, obs: Optional[dict]) -> int:  # pragma: no cover - abstract
        raise NotImplementedError(f"{type(self).__name__} must implement act(obs).")

    def update(self, record: "RoundRecord") -> None:
        """Told the outcome of the round just played."""


class StaticPolicy(BasePolicy):
    """The same action every round: static (E, K) self-speculation as in LayerSkip
    (arXiv 2404.16710) and transformers' ``assistant_early_exit``; action 0 = plain AR.

    Args:
        action: the action index.
        stop_rule: how drafts end inside a round (default :data:`~lede_env.stopping.NO_STOP`:
            the whole K, as a static (E, K) is defined; the env's own rule does not apply).
    """

    def __init__(self, action: int, stop_rule=NO_STOP) -> None:
        self.action = int(action)
        self.stop_rule = stop_rule

    def act(self, obs: Optional[dict]) -> int:
        return self.action


class SequencePolicy(BasePolicy):
    """Replays a fixed list of actions (then ``fallback``): for tests and oracle replays."""

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


class PlanPolicy(BasePolicy):
    """Plays a plan indexed by the number of tokens generated so far (``plan[g]``), as
    :func:`lede_env.replay.oracle_plan` returns: replays the oracle in the real decoder."""

    def __init__(self, plan: Sequence[int]) -> None:
        self.plan = [int(a) for a in plan]
        self.reset()

    def reset(self) -> None:
        self._g = 1  # the prefill token

    def act(self, obs: Optional[dict]) -> int:
        return self.plan[self._g] if self._g < len(self.plan) else 0

    def update(self, record: "RoundRecord") -> None:
        self._g += record.emitted


class RandomPolicy(BasePolicy):
    """Uniformly random actions from a seeded generator."""

    def __init__(self, n_actions: int, seed: int = 0) -> None:
        self.n = n_actions
        self.rng = np.random.default_rng(seed)

    def act(self, obs: Optional[dict]) -> int:
        return int(self.rng.integers(self.n))


class HeuristicPolicy(BasePolicy):
    """The +2/-1 speculation-length schedule of transformers' assisted generation
    (``AssistedCandidateGenerator.update_candidate_strategy``), at a fixed exit layer.

    Args:
        actions: the action map.
        exit_layer: E.
        k_start: initial K (transformers' default ``num_assistant_tokens`` is 20; capped at k_max).
    """

    def __init__(self, actions: ActionMap, exit_layer: int, k_start: int = 5) -> None:
        self.actions = actions
        self.exit_layer = exit_layer
        self.k_start = min(k_start, actions.k_max)
        self.reset()

    def reset(self) -> None:
        self.k = self.k_start

    def act(self, obs: Optional[dict]) -> int:
        return self.actions.encode(self.exit_layer, self.k)

    def update(self, record: "RoundRecord") -> None:
        if record.draft_len == 0:
            return
        if record.accepted >= record.draft_len:
            self.k = min(self.k + 2, self.actions.k_max)
        else:
            self.k = max(self.k - 1, 1)


class EpsilonPolicy(BasePolicy):
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

    def update(self, record: "RoundRecord") -> None:
        self.base.update(record)


class DesignPolicy(BasePolicy):
    """Random actions for timing rounds, held for runs of 1..``max_run`` rounds (policies repeat
    actions, and a round after rounds of its own kind runs faster than one after others): each
    run plays action 0 (an AR step, or a context draft where the context matches) with
    probability ``p_action0``, else an (E, K) drawn uniformly.

    With ``probe`` (a callable on the observation, e.g. a Q-network's forward pass on the
    flattened observation) the decoder computes observations and the probe runs every round, so
    the rounds' ``policy_seconds`` time an agent's per-round overhead inside the loop.

    Args:
        n_actions: size of the action space.
        p_action0: probability that a run plays action 0.
        seed: seeds the draws.
        max_run: longest run of one action (rounds).
        probe: ``probe(obs)`` called every round, or ``None``.

    Raises:
        ValueError: ``n_actions`` or ``max_run`` below 1.
    """

    def __init__(self, n_actions: int, p_action0: float = 0.3, seed: int = 0, max_run: int = 8,
                 probe=None) -> None:
        if n_actions < 1 or max_run < 1:
            raise ValueError(f"n_actions={n_actions} and max_run={max_run} must be >= 1.")
        self.n, self.p0, self.max_run = int(n_actions), float(p_action0), int(max_run)
        self.rng = np.random.default_rng(seed)
        self._action, self._left = 0, 0
        self.probe = probe
        self.needs_observation = probe is not None

    def act(self, obs) -> int:
        if self.probe is not None:
            self.probe(obs)
        if self._left == 0:
            draw0 = self.n == 1 or self.rng.random() < self.p0
            self._action = 0 if draw0 else int(self.rng.integers(1, self.n))
            self._left = int(self.rng.integers(1, self.max_run + 1))
        self._left -= 1
        return self._action


class PredictorPolicy(BasePolicy):
    """A trained agent that is not exported yet, acting on Dict observations: each round the
    observation is flattened in ``layout``'s order and ``predict`` picks the action (a d3rlpy
    algorithm's or :class:`agents.sb3.SB3Agent`'s ``predict``; :func:`agents.train.greedy_q_policy`).

    Args:
        predict: ``predict(x) -> actions`` for a batch ``x`` of flat observations, float32
            ``(1, flat_dim)``; the first entry is the action index.
        layout: ``[(key, shape), ...]``, the observation's keys in the learner's order
            (:func:`lede_env.mdp.flat_layout`).
    """

    needs_observation = True

    def __init__(self, predict: Callable[[np.ndarray], Sequence[int]], layout) -> None:
        self.predict, self.layout = predict, layout

    def act(self, obs: Optional[dict]) -> int:
        if obs is None:
            raise ValueError("PredictorPolicy needs observations (needs_observation=True).")
        return int(self.predict(flatten_by_layout(obs, self.layout)[None])[0])


class ExportedPolicy(BasePolicy):
    """A trained Q-network exported as TorchScript + JSON (see ``agents.export``); runs
    without d3rlpy.

    Args:
        path: the ``.pt`` file or the folder holding ``policy.pt`` and ``policy.json``.
        runtime: ``"auto"`` (default: ``"numpy"`` where the TorchScript module is a
            standardise -> MLP -> masked-argmax network, as ``trace_q`` exports are, else
            ``"torchscript"``), ``"numpy"`` (the same network evaluated with numpy from the
            module's own weights; raises ``ValueError`` for any other network),
            ``"torchscript"`` (``policy.pt``) or ``"onnxruntime"`` (``policy.onnx``, from
            ``lede export --onnx``; needs the ``onnx`` extra).

    Inside the decoding loop a call into TorchScript costs many times what it costs timed alone
    (each round's weight stream through the caches leaves the interpreter and dispatcher code
    cold); the numpy twin avoids most of that (measured in ``docs/experiments.md``); both give
    the same action.

    Raises:
        FileNotFoundError: missing files.
        ImportError: ``runtime="onnxruntime"`` without onnxruntime installed.
        ValueError: a config whose observation layout does not match ``expect_layout`` (checked
            by :meth:`check_compatible`).
    """

    needs_observation = True

    RUNTIMES = ("auto", "numpy", "torchscript", "onnxruntime")

    def __init__(self, path: str | Path, runtime: str = "auto") -> None:
        p = Path(path)
        folder = p if p.is_dir() else p.parent
        pt = folder / "policy.pt" if p.is_dir() else p
        cfg = folder / "policy.json"
        if not pt.exists() or not cfg.exists():
            raise FileNotFoundError(f"No exported policy at {path} (need policy.pt and policy.json; run `lede export`).")
        self.config = json.loads(cfg.read_text())
        self.runtime = runtime
        if runtime not in self.RUNTIMES:
            raise ValueError(f"runtime={runtime!r}; choose one of {self.RUNTIMES}.")
        if runtime in ("auto", "numpy", "torchscript"):
            self.module = torch.jit.load(str(pt), map_location="cpu").eval()
            twin = numpy_mlp_twin(self.module) if runtime != "torchscript" else None
            if runtime == "numpy" and twin is None:
                raise ValueError(f"runtime='numpy': {pt} is not a standardise -> MLP -> masked-argmax network "
                                 "(a trace_q export); use runtime='torchscript'.")
            self.runtime = "numpy" if twin is not None else "torchscript"
            self._twin = twin
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
            self._twin = None
        self.actions = ActionMap(tuple(self.config["exit_layers"]), int(self.config["k_max"]),
                                 tuple(self.config.get("context_lengths", ())), tuple(self.config.get("tree_budgets", ())))
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

    @torch.no_grad()
    def act(self, obs: Optional[dict]) -> int:
        if obs is None:
            raise ValueError("ExportedPolicy needs observations (needs_observation=True).")
        x = flatten_by_layout(obs, self.layout)
        if self._twin is not None:
            return self._twin(x)
        return int(self.module(torch.from_numpy(x).unsqueeze(0)).reshape(-1)[0])


class GreedyMLP(torch.nn.Module):
    """Standardise -> MLP -> masked argmax: the greedy policy ``trace_q`` exports
    ([N, D] float32 -> [N] int64 actions), and the shape :func:`numpy_mlp_twin` evaluates.

    Args:
        net: a ``torch.nn.Sequential`` of ``Linear`` and ``ReLU`` layers, [N, D] -> [N, A].
        mean, std: [D] float32 observation standardisation.
        mask: [A] bool, the actions it may choose (the others get a -1e9 penalty).
    """

    def __init__(self, net: torch.nn.Module, mean: torch.Tensor, std: torch.Tensor, mask: torch.Tensor) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)
        self.register_buffer("penalty", torch.where(mask, torch.zeros_like(mask, dtype=torch.float32),
                                                    torch.full(mask.shape, -1e9)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.net((x - self.mean) / self.std) + self.penalty).argmax(-1)


def numpy_mlp_twin(module) -> Optional[Callable[[np.ndarray], int]]:
    """A numpy function ``flat [D] float32 -> action`` computing the same greedy action as
    ``module``, where ``module`` is a standardise -> MLP -> masked-argmax network (buffers
    ``mean``, ``std``, ``penalty``; ``net`` a sequence of Linear and ReLU layers, as
    ``agents.trace_q`` exports); ``None`` for any other module. The twin is checked against the
    module on random inputs before it is returned (``None`` if any action differs)."""
    try:
        mean = module.mean.detach().numpy().astype(np.float32)
        std = module.std.detach().numpy().astype(np.float32)
        penalty = module.penalty.detach().numpy().astype(np.float32)
        layers = []
        for child in module.net.children():
            kind = getattr(child, "original_name", type(child).__name__)
            if kind == "Linear":
                layers.append((child.weight.detach().numpy().T.copy(), child.bias.detach().numpy().copy()))
            elif kind == "ReLU":
                layers.append(None)
            else:
                return None
    except (AttributeError, RuntimeError):
        return None
    if not layers or layers[-1] is None:
        return None

    def act(x: np.ndarray) -> int:
        h = (np.asarray(x, np.float32) - mean) / std
        for layer in layers:
            h = np.maximum(h, 0.0) if layer is None else h @ layer[0] + layer[1]
        return int(np.argmax(h + penalty))

    g = np.random.default_rng(0)
    xs = (g.standard_normal((32, mean.shape[-1])) * std + mean).astype(np.float32)
    with torch.no_grad():
        ref = module(torch.from_numpy(xs)).reshape(-1).numpy()
    if any(act(x) != int(a) for x, a in zip(xs, ref)):
        return None
    return act


class DELPolicy(BasePolicy):
    """DEL-style dynamic exit and length (after DEL, arXiv 2504.05598): keep a running estimate
    of each exit's per-token acceptance and play, every round, the (E, K) with the highest
    expected tokens per unit of cost under the cost profile (AR when nothing beats it).

    The estimates are exponential moving averages of each exit's agreement with the verifier
    at the last verified position (``exit_stats[:, 2]`` of the full observation, computed from
    the verification pass for every exit at once); with the compact observation, its running
    per-exit acceptance of the drafts played (``experience[:, 0]``). Expected tokens of a round with acceptance alpha
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
        self._cost = np.array([[profile.round_cost(E, k, verified_positions(k, bonus), reuse) for k in self._k]
                               for E in actions.exit_layers])  # [n_exits, k_max], AR-step units
        self._ar = profile.round_cost(0, 0, 1)
        self.bonus = bonus
        self.reset()

    def reset(self) -> None:
        self.alpha = np.full(len(self.actions.exit_layers), self.prior)

    def act(self, obs: Optional[dict]) -> int:
        if obs is None:
            raise ValueError("DELPolicy needs observations (needs_observation=True).")
        if "experience" in obs:  # compact observation: the observer keeps per-exit running acceptance
            self.alpha = np.asarray(obs["experience"], np.float64)[:, 0]
        else:
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
        super().__init__(actions.encode(exit_layer, k_cap), ThresholdStop(float(threshold)))
        self.stop_threshold = float(threshold)


class CopyElseDraftPolicy(BasePolicy):
    """Copy where there is something to copy, else draft one token at a shallow exit: the
    action that copies up to ``copy_len`` tokens from the context (or the datastore) where the
    observation's ``context`` key shows a draft, else exit ``exit_layer`` with K = 1, the draft
    token dropped (a plain AR step) where its draft-head probability is below ``drop_below``
    (:class:`~lede_env.stopping.DropStop`). A hand-written causal rule over the two draft
    sources lede has: copies cost no layers and are accepted far more often where they exist,
    exit drafts are the only drafts where they do not.

    Args:
        actions: the action map (with ``copy_len`` among its context lengths).
        copy_len: the copy action's most tokens.
        exit_layer: E, one of ``actions.exit_layers``.
        drop_below: probability in (0, 1).

    Raises:
        ValueError: no copy action of ``copy_len`` tokens, E not a candidate exit, or a threshold
            outside (0, 1).
    """

    needs_observation = True

    def __init__(self, actions: ActionMap, copy_len: int, exit_layer: int, drop_below: float) -> None:
        if copy_len not in actions.context_lengths:
            raise ValueError(f"copy_len={copy_len} is not one of the context lengths {actions.context_lengths} "
                             "(give the env context_lengths=... with it).")
        self.copy = actions.encode(0, copy_len)
        self.exit_action = actions.encode(exit_layer, 1)
        self.stop_rule = DropStop(float(drop_below))

    def act(self, obs: Optional[dict]) -> int:
        if obs is None or "context" not in obs:
            raise ValueError("CopyElseDraftPolicy reads the observation's context key (an env with context drafts).")
        return self.copy if obs["context"][1] > 0 else self.exit_action


class TreeRulePolicy(StaticPolicy):
    """The static tree rule: one tree action every round, its tree pruned by ``prune`` (the
    prefix whose expected tokens pay for its verification, :class:`~lede_env.trees.TreePrune`;
    SuffixDecoding's adaptive speculation size, arXiv 2411.04975). It reads no observation; the
    pruning changes which nodes are verified, so the env and the decoder apply it as a round rule
    (:func:`own_tree_prune`).

    Args:
        actions: the action map (must have the tree budget).
        budget: the tree action's node budget (a prune table covering it).
        prune: the rule, e.g. ``TreePrune.from_profile(profile, budget, lam)``.

    Raises:
        ValueError: ``budget`` not a tree budget of ``actions``, or a ``prune`` table shorter
            than ``budget``.
    """

    def __init__(self, actions: ActionMap, budget: int, prune: TreePrune) -> None:
        super().__init__(actions.encode_tree(int(budget)))
        if len(prune.costs) <= int(budget):
            raise ValueError(f"The prune table covers {len(prune.costs) - 1} nodes, fewer than the budget {budget}: "
                             "build it with TreePrune.from_profile(profile, max_nodes=budget, lam=...).")
        self.tree_prune = prune


class GuardedPolicy(BasePolicy):
    """A safety net around another policy: when the base policy's realised throughput over its
    last ``window`` rounds falls below that of the ``fallback`` action (default action 0: plain AR
    decoding, or context drafts where the decoder has them on; an exported agent's is the best
    static action of its training traces), play the fallback for a while, then try the base
    again (waits double after each failure, up to ``max_wait`` rounds; a good window resets them).
    In the spirit of TapOut (arXiv 2511.02017) and BanditSpec (arXiv 2505.15141), which switch
    between speculation strategies online; here the arms are the learned policy and the
    fallback. It only chooses actions, so the output is unchanged.

    Throughput is tokens emitted per unit of time, compared with that of the last 16 rounds
    that played the fallback action, measured one of two ways (``clock``):

    - ``"wallclock"``: measured seconds of each round (policy included). When a window ends and
      no action-0 round has been seen yet, the guard plays ``probe`` of them to measure it. This
      is the truth on the machine at hand, whatever the cost profile assumes (on the CPU
      reference machine the profile rated exit-draft rounds cheaper than they ran,
      ``docs/experiments.md``).
    - ``"cost"``: the rounds' cost-profile costs (:attr:`RoundRecord.cost`, AR-step units);
      deterministic, as the trace env needs. Before any action-0 round, AR's 1 token per AR
      step is the reference.
    - ``"auto"`` (default): wall clock for rounds that carry seconds (the live decoder), else
      costs (the trace env), else nothing is judged.

    Args:
        base: the guarded policy (consulted every round, so its own state stays current).
        window: base rounds per check.
        floor: the share of action 0's throughput below which the base falls back.
        wait: AR rounds after the first failure.
        max_wait: the longest wait.
        clock: ``"auto"``, ``"wallclock"`` or ``"cost"``.
        probe: fallback rounds played to measure its time when none has been seen (wall clock).
        fallback: the action played when the base falls back (and whose rounds are the reference).

    Attributes:
        fallback_rounds: fallback rounds played by the guard in the current generation (probes
            included).

    Raises:
        ValueError: a window or wait below 1, ``max_wait < wait``, a floor <= 0, an unknown clock
            or ``probe < 1``.
    """

    CLOCKS = ("auto", "wallclock", "cost")

    def __init__(self, base, window: int = 16, floor: float = 1.0, wait: int = 8, max_wait: int = 64,
                 clock: str = "auto", probe: int = 3, fallback: int = 0) -> None:
        if window < 1 or wait < 1 or max_wait < wait or not floor > 0 or probe < 1:
            raise ValueError(f"GuardedPolicy needs window >= 1, 1 <= wait <= max_wait, floor > 0 and probe >= 1; "
                             f"got {window}, {wait}, {max_wait}, {floor}, {probe}.")
        if clock not in self.CLOCKS:
            raise ValueError(f"GuardedPolicy clock={clock!r}; choose one of {self.CLOCKS}.")
        self.base, self.window, self.floor, self.wait0, self.max_wait = base, window, float(floor), wait, max_wait
        self.clock, self.probe, self.fallback = clock, probe, int(fallback)
        self.needs_observation = bool(getattr(base, "needs_observation", False))
        self.reset()

    @property
    def stop_rule(self):
        """The base policy's in-round stop rule (or threshold), so drafts stop as it asks."""
        rule = getattr(self.base, "stop_rule", None)
        return rule if rule is not None else getattr(self.base, "stop_threshold", None)

    @property
    def tree_prune(self):
        """The base policy's static tree rule (:func:`own_tree_prune`), so its trees are pruned as
        it asks."""
        return own_tree_prune(self.base)

    def reset(self) -> None:
        self.base.reset()
        self._hist: list[tuple[int, float, float]] = []  # (emitted, cost, seconds) of base rounds
        self._ref: list[tuple[int, float, float]] = []  # the same of the last action-0 rounds
        self._left = 0  # AR rounds still to play
        self._wait = self.wait0
        self.fallback_rounds = 0

    def act(self, obs: Optional[dict]) -> int:
        a = self.base.act(obs)
        if self._left > 0:
            return self.fallback
        return a

    def update(self, record: "RoundRecord") -> None:
        self.base.update(record)
        if record.action == self.fallback:  # the fallback's own record (action 0: an AR step or a context draft)
            self._ref = (self._ref + [(record.emitted, record.cost, record.seconds)])[-16:]
        if self._left > 0:
            self._left -= 1
            self.fallback_rounds += 1
            return
        self._hist.append((record.emitted, record.cost, record.seconds))
        if len(self._hist) < self.window:
            return
        wall = self.clock == "wallclock" or (self.clock == "auto" and all(s > 0 for _, _, s in self._hist))
        i = 2 if wall else 1  # the rounds' seconds, or their costs
        ref = [(r[0], r[i]) for r in self._ref if r[i] > 0]
        if wall and not ref:  # measure action 0 first; judge this window after
            self._left = self.probe
            return
        spent = sum(r[i] for r in self._hist)
        rate = sum(r[0] for r in self._hist) / spent if spent > 0 else float("inf")
        ref_rate = sum(t for t, _ in ref) / sum(x for _, x in ref) if ref else 1.0  # cost: AR's 1 per AR step
        # (before any fallback round in cost mode; a context fallback only does better)
        self._hist = []
        if rate < self.floor * ref_rate:
            self._left = self._wait
            self._wait = min(2 * self._wait, self.max_wait)
        else:
            self._wait = self.wait0


#: the policy names :func:`policy_from_name` understands
POLICY_NAMES = ("ar, static:E,K, heuristic:E, confidence:E,K,THRESHOLD, copy-else:M,E,THRESHOLD, del, tree:B, "
                "tree-rule:B,LAMBDA, agent:PATH, agent-unguarded:PATH, "
                "guarded:NAME (any of these inside the GuardedPolicy safety net)")
_USAGE = {"static": "static:E,K", "heuristic": "heuristic:E", "confidence": "confidence:E,K,THRESHOLD",
          "copy-else": "copy-else:M,E,THRESHOLD", "tree": "tree:B", "tree-rule": "tree-rule:B,LAMBDA",
          "agent": "agent:PATH", "agent-unguarded": "agent-unguarded:PATH"}


def policy_from_name(name: str, actions: ActionMap, profile=None, bonus: bool = True, reuse: bool = True,
                     observer: Optional[ObservationBuilder] = None):
    """The policy named ``name`` (see :data:`POLICY_NAMES`), shared by ``lede evaluate`` and
    :class:`lede_env.generate.Lede`. ``agent:PATH`` is the exported agent inside the
    :class:`GuardedPolicy` safety net (on by default); ``agent-unguarded:PATH`` is the bare agent.

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
    if kind == "guarded":
        inner = policy_from_name(arg, actions, profile, bonus, reuse, observer) if arg else None
        if inner is None:
            raise ValueError(f"Bad policy {name!r}: write guarded:NAME with NAME one of {POLICY_NAMES}.")
        return inner if isinstance(inner, GuardedPolicy) else GuardedPolicy(inner)
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
        if kind == "copy-else" and len(args) == 3:
            return CopyElseDraftPolicy(actions, int(args[0]), int(args[1]), float(args[2]))
        if kind == "tree" and len(args) == 1:
            return StaticPolicy(actions.encode_tree(int(args[0])))
        if kind == "tree-rule" and len(args) == 2:
            if profile is None:
                raise ValueError("tree-rule needs the cost profile (its pruning weighs nodes against their cost)")
            B = int(args[0])
            return TreeRulePolicy(actions, B, TreePrune.from_profile(profile, B, float(args[1]), reuse))
        if kind in ("agent", "agent-unguarded") and arg:
            p = ExportedPolicy(arg)
            if observer is not None:
                p.check_compatible(observer, actions)
            return GuardedPolicy(p, fallback=int(p.config.get("fallback_action", 0))) if kind == "agent" else p
    except (TypeError, ValueError) as e:
        raise ValueError(f"Bad policy {name!r} ({e}).") from None
    if kind in _USAGE:
        raise ValueError(f"Bad policy {name!r}: write {_USAGE[kind]}.")
    return None


def copy_lengths(name: str) -> tuple[int, ...]:
    """The copy actions (context lengths, see :class:`~lede_env.mdp.ActionMap`) the policy named
    ``name`` plays, which the env or decoder must have: M of ``copy-else:M,E,THRESHOLD``, K of
    ``static:0,K`` (K > 0), those of NAME in ``guarded:NAME``; ``()`` for every other name (an
    exported agent's come with its settings, :func:`lede_env.task.agent_settings`) and for
    malformed arguments (:func:`policy_from_name` reports those)."""
    kind, _, arg = name.partition(":")
    if kind == "guarded":
        return copy_lengths(arg)
    args = arg.split(",") if arg else []
    try:
        if kind == "copy-else" and len(args) == 3 and int(args[0]) > 0:
            return (int(args[0]),)
        if kind == "static" and len(args) == 2 and int(args[0]) == 0 and int(args[1]) > 0:
            return (int(args[1]),)
    except ValueError:
        pass
    return ()


def tree_budgets_of(name: str) -> tuple[int, ...]:
    """The tree budgets (:attr:`~lede_env.mdp.ActionMap.tree_budgets`) the policy named ``name``
    plays, which the env or decoder must have: B of ``tree:B`` and ``tree-rule:B,LAMBDA``, those
    of NAME in ``guarded:NAME``; ``()`` otherwise (and for malformed arguments, which
    :func:`policy_from_name` reports)."""
    kind, _, arg = name.partition(":")
    if kind == "guarded":
        return tree_budgets_of(arg)
    args = arg.split(",") if arg else []
    try:
        if (kind == "tree" and len(args) == 1) or (kind == "tree-rule" and len(args) == 2):
            return (int(args[0]),) if int(args[0]) > 0 else ()
    except ValueError:
        pass
    return ()


def split_policies(s: str) -> list[str]:
    """Split on commas that start a new policy name: a number continues the previous name's
    arguments (``static:4,2,confidence:4,8,0.5`` -> ``static:4,2`` and ``confidence:4,8,0.5``)."""
    out: list[str] = []
    for part in (p.strip() for p in s.split(",")):
        try:
            float(part)
            numeric = True
        except ValueError:
            numeric = False
        if numeric and out and ":" in out[-1]:
            out[-1] += "," + part
        else:
            out.append(part)
    return [p for p in out if p]
