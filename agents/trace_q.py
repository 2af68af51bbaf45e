"""``trace_q``: a learner that uses what the traces know about every action.

In the trace env the outcome of *every* action at every visited state is known exactly: greedy
decoding's output does not depend on the actions, so a trace replays any (E, K) round at any
position (:func:`lede_env.replay.replay_round`). Offline RL on logged transitions (d3rlpy,
stable-baselines3) sees one action per state and must guess the others; here each visited state
gets a regression target for every action:

    target(s, a) = tokens - lambda * cost of the round a, then of the best static action's rounds
                   until ``horizon`` tokens past s

the env's ``relative`` reward (lambda = its ``reward_lambda``, the best static throughput on the
training traces; Dinkelbach's method for ratio objectives, the relative reward of average-reward
semi-Markov decision processes) summed over the same stretch of text for every action: the value
of a under the static policy, whose argmax is one step of policy improvement over it (Bertsekas'
rollout), exact here because the traces replay every round. A round's own reward alone
(``horizon=0``) ignores what the round leaves the next one and favoured long copies that lost to
the static in the trace env (``docs/experiments.md``). Every stretch ends exactly ``horizon``
tokens past s (the round that crosses it counts pro rata), and a small MLP regresses each
action's advantage, target(s, a) - target(s, static), from the flat observation; the policy is
its argmax over the actions that
can pay at all (:func:`lede_env.replay.useful_actions`). The visited states come from DAgger-style
rounds (Ross et al. 2011, arXiv 1011.0686): first a behaviour mixture (the best static action and
random useful actions), then the learner's own policy with epsilon exploration, aggregated, so the
observation's history and running acceptance look as they will when the learner decodes. It never
imitates the hindsight oracle, which acts on rejections no causal policy can see.

The training loop is lede's own (a few lines of PyTorch); the artefact is the same TorchScript
greedy policy as the other agents' (``lede export``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from torch import nn

from lede_env.policies import GreedyMLP
from lede_env.replay import replay_round, useful_actions
from lede_env.trace_env import TraceEnv


class TraceQAgent:
    """A trained ``trace_q`` agent: ``predict(flat [N, D]) -> actions [N]`` and ``save_policy``,
    like the d3rlpy and stable-baselines3 agents.

    Attributes:
        policy: the :class:`~lede_env.policies.GreedyMLP` module (standardisation, MLP, masked argmax).
        allowed: the action indices it may choose.
        info: training summary (states, iterations, lambda, loss).
    """

    def __init__(self, policy: GreedyMLP, allowed: list[int], info: dict) -> None:
        self.policy, self.allowed, self.info = policy.eval(), list(allowed), dict(info)

    @torch.no_grad()
    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.policy(torch.as_tensor(np.asarray(x, np.float32))).numpy()

    def save_policy(self, path: str) -> None:
        """TorchScript greedy policy (what ``lede export`` ships)."""
        torch.jit.script(self.policy).save(path)

    def save(self, out: Path) -> None:
        """``model.pt`` (TorchScript) and ``trace_q.json`` in the run folder ``out``."""
        out = Path(out)
        self.save_policy(str(out / "model.pt"))
        (out / "trace_q.json").write_text(json.dumps({"allowed": self.allowed, "info": self.info}, indent=2))

    @classmethod
    def load(cls, out: Path) -> "TraceQAgent":
        """Inverse of :meth:`save`. Raises ``FileNotFoundError`` when the run folder has none."""
        out = Path(out)
        if not (out / "model.pt").exists():
            raise FileNotFoundError(f"No trace_q model in {out}: run `lede train --algo trace_q` first.")
        meta = json.loads((out / "trace_q.json").read_text())
        return cls(torch.jit.load(str(out / "model.pt")), meta["allowed"], meta["info"])


def _targets(u, lam: float, actions: list[int], horizon: int = 0, follow: int = 0, exact: bool = True) -> np.ndarray:
    """[len(actions)] tokens - lambda * cost of each action at the env's current state; with
    ``horizon`` > 0, of the action followed by the action ``follow`` until ``horizon`` tokens past
    the state (or the end), so that every action is judged over the same stretch of text.

    With ``exact`` (default), the round that crosses the horizon counts only its tokens up to it
    and the same share of its cost, so every action's stretch ends at the same token and the
    targets rank actions by the cost of reaching it. Without, each stretch ends after the round
    that crosses the horizon: an action whose stretch overshoots further earns the overshoot's
    tokens at ``lam`` per cost unit, a bias towards short copies on text where copies run long
    (a copy of 4 followed by copies of 8 overshoots 16 tokens by 7 where a copy of 8 overshoots
    by 2; on held-out summaries in the trace env this made the agent slower than the static,
    ``docs/experiments.md``)."""
    t, g, limit, rules = u.trace, u._g, u._limit, u.rules
    out = np.empty(len(actions), np.float32)
    tail: dict[int, tuple[float, float]] = {}  # position -> (tokens, cost) of ``follow`` from there to the horizon
    end = g + horizon

    def clip(p: int, n: int, c: float) -> tuple[float, float]:
        """tokens and cost of a round at ``p`` that emitted ``n`` tokens at cost ``c``, up to the horizon."""
        if exact and p + n > end:
            return end - p, c * (end - p) / n
        return n, c

    def rest(pos: int) -> tuple[float, float]:
        if pos not in tail:
            tok, cost, p, done = 0.0, 0.0, pos, False
            while not done and p < end:
                oc, _, c = replay_round(t, p, follow, rules, limit)
                n, c = clip(p, len(oc.emitted), c)
                tok, cost, p, done = tok + n, cost + c, p + len(oc.emitted), oc.done
            tail[pos] = (tok, cost)
        return tail[pos]

    for j, a in enumerate(actions):
        oc, _, cost = replay_round(t, g, a, rules, limit)
        tok = len(oc.emitted)
        if horizon > 0:
            tok, cost = clip(g, tok, cost)
            if not oc.done:
                more, extra = rest(g + len(oc.emitted))
                tok, cost = tok + more, cost + extra
        out[j] = tok - lam * cost
    return out


def train_trace_q(env, steps: int = 3000, hidden: tuple[int, ...] = (64, 64), learning_rate: float = 1e-3,
                  batch_size: int = 256, iterations: int = 4, epsilon: float = 0.1, seed: int = 0,
                  progress: bool = False, log=None, margin: Optional[float] = None,
                  baseline_margin: float = 0.02, horizon: int = 16, exits: bool = True,
                  advantage: bool = True, exact_horizon: bool = True, more_envs: Sequence = ()) -> TraceQAgent:
    """Train a ``trace_q`` agent on a trace env (its own traces and rules).

    Args:
        env: a trace-backend ``LEDE-Llama3-v0`` (e.g. recovered from a Minari dataset).
        steps: Adam steps in all (split over the DAgger iterations).
        hidden: MLP widths (small: the forward pass is paid every round).
        iterations: data-collection rounds (the first with the behaviour mixture, then the
            learner's own policy with ``epsilon``-random useful actions).
        log: ``callable(dict)`` given per-iteration metrics (e.g. W&B).
        margin: after the first iteration, keep only the actions whose mean target over the
            visited states is within ``margin`` (tokens per round) of the best action's: the
            learner then chooses, state by state, among actions that pay on average, instead of
            spreading noisy value estimates over ones that never do (``None``: keep all useful
            actions).
        baseline_margin: the policy leaves the best static action (chosen on the same traces)
            only where another action's predicted target beats it by more than this (tokens per
            round): conservative improvement over a baseline, in the spirit of SPIBB (Laroche
            et al. 2019, arXiv 1712.06924), since the regression's errors are of that size.
        horizon: 0: regress each action's own round (tokens - lambda * cost). > 0 (default 16
            tokens; the horizons measured are in ``docs/experiments.md``): regress the
            round followed by the best static action up to ``horizon`` tokens past the state: the
            value of the action under the static policy (a rollout of Bertsekas' policy
            improvement, exact here because traces replay every round). A round's own reward
            favours long copies and drafts, since it ignores that a shorter action leaves the
            next round a good state too (the relative value of the next state).
        advantage: regress each action's target minus the best static action's at the same state
            (its advantage over the static; ``False``: the targets themselves). The argmax is the
            same, but most of a target's spread is the state's own (how predictable the next
            ``horizon`` tokens are, shared by every action): the advantage drops it, so the
            regression spends its capacity on the differences between actions (the idea of
            advantage learning and dueling networks, arXiv 1511.06581). Needs the static action
            among the allowed ones (else the targets are used).
        exact_horizon: every action's target ends exactly ``horizon`` tokens past the state (the
            round that crosses it counts pro rata, see :func:`_targets`); ``False``: after the
            round that crosses it.
        exits: let the agent choose exit drafts; ``False``: plain steps and context drafts only.
            Where the cost profile rates exit-draft rounds cheaper than the wall clock does
            (``lede evaluate``'s cost-per-round columns), an agent that mixes in E=2 drafts where
            the context has no match wins in the trace env and loses on the clock; the measured
            errors per round kind are in ``docs/experiments.md``.

        more_envs: more trace envs whose traces are visited too, each replayed under its own rules
            (e.g. traces of more prompts, each with a datastore that leaves out its own text,
            :func:`agents.more_traces.fold_envs`). They must have ``env``'s actions and observation
            layout; lambda, the useful actions and the static baseline stay ``env``'s.

    Raises:
        ValueError: a live-backend env (no traces to replay every action on), or a ``more_envs``
            env whose actions or observation layout differ from ``env``'s.
    """
    u = env.unwrapped
    envs = _trace_envs(u, more_envs)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    lam = float(u.reward_lambda) if u.reward_mode == "relative" else 1.0
    allowed = useful_actions(u.rules)
    if not exits:
        allowed = [a for a in allowed if a < u.actions.first_exit_action]
    static = u.best_static()[0]
    col = {a: j for j, a in enumerate(allowed)}
    X: list[np.ndarray] = []
    Y: list[np.ndarray] = []
    net = None
    mean = std = None
    relative = advantage and static in col
    info = {"lambda": lam, "useful": len(allowed), "static": int(static), "horizon": int(horizon),
            "advantage": bool(relative), "exact_horizon": bool(exact_horizon), "iterations": []}

    def targets(v) -> np.ndarray:
        """The targets at ``v``'s state, one per action now allowed (less the static's: ``relative``)."""
        y = _targets(v, lam, allowed, horizon, static, exact_horizon)
        return y - y[col[static]] if relative else y

    def choose(flat: np.ndarray) -> int:
        """The action taken in iteration ``it`` (with the net of the iteration before)."""
        return _choose(rng, it, flat, allowed, static, epsilon, net, mean, std)

    for it in range(iterations):
        _visit(envs, seed + it, targets, choose, X, Y)
        if it == 0 and margin is not None:
            allowed, Y = _keep_candidates(Y, allowed, static, margin)
            col = {a: j for j, a in enumerate(allowed)}
            info["candidates"] = [list(u.actions.decode(a)) for a in allowed]
        net, mean, std, m = _fit(X, Y, hidden, learning_rate, batch_size, max(steps // iterations, 1), seed + it)
        m = {"iteration": it} | m
        info["iterations"].append(m)
        if log is not None:
            log(m)
        if progress:
            print(f"trace_q iteration {it}: {m}")
    policy = _greedy_policy(net, col, u.actions.n, mean, std, static, baseline_margin)
    info["baseline"] = list(u.actions.decode(static))
    return TraceQAgent(policy, allowed, info)


def _trace_envs(u, more_envs: Sequence) -> list[TraceEnv]:
    """``u`` and the unwrapped ``more_envs``, checked to be trace envs with ``u``'s actions and
    observation layout (``ValueError`` otherwise, see :func:`train_trace_q`)."""
    envs = [u] + [e.unwrapped for e in more_envs]
    for v in envs:
        if not isinstance(v, TraceEnv):
            raise ValueError("trace_q needs the trace backend: every action's outcome comes from the traces.")
        if v.actions != u.actions or v.observer.layout() != u.observer.layout():
            raise ValueError("trace_q's more_envs must share the env's action map and observation layout; build "
                             "them with the same env arguments.")
    return envs


def _visit(envs: list[TraceEnv], seed: int, targets, choose, X: list[np.ndarray], Y: list[np.ndarray]) -> None:
    """One data-collection round: an episode per playable trace of each env (reset with ``seed``),
    acting with ``choose(flat observation) -> action``; appends every visited state's flat
    observation to ``X`` and its targets ``targets(env)`` (one per allowed action) to ``Y``."""
    for v, idx in ((v, idx) for v in envs for idx in v.playable):
        obs, _ = v.reset(seed=seed, options={"prompt_index": idx})
        done = False
        while not done:
            flat = v.flatten_observation(obs)
            X.append(flat)
            Y.append(targets(v))
            obs, _, te, tr, _ = v.step(choose(flat))
            done = te or tr


def _choose(rng: np.random.Generator, it: int, flat: np.ndarray, allowed: list[int], static: int, epsilon: float,
            net, mean, std) -> int:
    """The action taken at a visited state in iteration ``it``: the behaviour mixture first (the
    static action or a random useful one, even odds), then the learner's argmax with
    ``epsilon``-random useful actions."""
    if it == 0:
        return static if rng.random() < 0.5 else int(rng.choice(allowed))
    if rng.random() < epsilon:
        return int(rng.choice(allowed))
    with torch.no_grad():
        q = net(torch.from_numpy((flat - mean) / std)[None])[0]
    return allowed[int(q.argmax())]


def _keep_candidates(Y: list[np.ndarray], allowed: list[int], static: int,
                     margin: float) -> tuple[list[int], list[np.ndarray]]:
    """The allowed actions whose mean target is within ``margin`` of the best one's (the static
    action always stays), and the targets ``Y`` of those actions only."""
    means = np.stack(Y).mean(0)
    keep = [j for j in range(len(allowed))
            if means[j] >= means.max() - margin or allowed[j] == static]  # the baseline stays
    return [allowed[j] for j in keep], [y[keep] for y in Y]


def _fit(X: list[np.ndarray], Y: list[np.ndarray], hidden: tuple[int, ...], learning_rate: float, batch_size: int,
         n_steps: int, seed: int) -> tuple[nn.Sequential, np.ndarray, np.ndarray, dict]:
    """An MLP fitted from scratch (``n_steps`` Adam steps) to regress the targets ``Y`` from the
    standardised observations ``X``: ``(net, mean, std, metrics)``, metrics the number of states,
    the last batch's loss and how often the net's argmax is the targets'."""
    x = torch.from_numpy(np.stack(X))
    y = torch.from_numpy(np.stack(Y))
    mean = x.mean(0).numpy()
    std = (x.std(0) + 1e-3).numpy()
    xs = (x - torch.from_numpy(mean)) / torch.from_numpy(std)
    layers: list[nn.Module] = []
    width = x.shape[1]
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, y.shape[1]))
    net = nn.Sequential(*layers)  # refit from scratch on the aggregated states
    opt = torch.optim.Adam(net.parameters(), lr=learning_rate)
    g = torch.Generator().manual_seed(seed)
    for _ in range(n_steps):
        b = torch.randint(0, xs.shape[0], (min(batch_size, xs.shape[0]),), generator=g)
        loss = nn.functional.mse_loss(net(xs[b]), y[b])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        agree = float((net(xs).argmax(-1) == y.argmax(-1)).float().mean())
    return net, mean, std, {"states": int(xs.shape[0]), "loss": float(loss.detach()), "best_action_agreement": agree}


def _greedy_policy(net: nn.Sequential, col: dict[int, int], n_act: int, mean: np.ndarray, std: np.ndarray,
                   static: int, baseline_margin: float) -> GreedyMLP:
    """The :class:`~lede_env.policies.GreedyMLP` of a fitted net whose outputs are the actions of
    ``col`` (``{action: output index}``): a full-width head (the other actions masked out), and the
    actions other than ``static`` penalised by ``baseline_margin``."""
    allowed = list(col)
    # the full-width head: -inf (a large penalty) on actions that cannot pay
    last = net[-1]
    full = nn.Linear(last.in_features, n_act)
    with torch.no_grad():
        full.weight.zero_()
        full.bias.zero_()
        for a, j in col.items():
            full.weight[a] = last.weight[j]
            full.bias[a] = last.bias[j]
    mlp = nn.Sequential(*list(net)[:-1], full)
    mask = torch.zeros(n_act, dtype=torch.bool)
    mask[allowed] = True
    policy = GreedyMLP(mlp, torch.from_numpy(mean), torch.from_numpy(std), mask)
    if static in allowed and baseline_margin > 0:
        with torch.no_grad():
            policy.penalty[[a for a in allowed if a != static]] -= baseline_margin
    return policy

