"""A leaderboard you can regenerate: every learner lede has, over several training seeds, beside
the baselines, on the held-out categories of a task (default ``LEDE-Llama3-v1``).

:func:`run_leaderboard` is what ``lede leaderboard`` runs: one Minari dataset collected in the
training env; every algorithm of :data:`agents.train.ALGOS` (d3rlpy's five, stable-baselines3's,
``trace_q``) trained on it with each seed; every agent and baseline (always-AR, the static action
families, DEL, the copy-else rule, the hindsight oracle) played on every held-out trace. Scores are
normalized (0 = always-AR, 100 = the oracle) with 95 % stratified-bootstrap intervals over prompts
and seeds (:mod:`agents.scores`); the table also gives training time and the policy's cost per
round. The trace env charges the task's cost profile (``"reference"`` for the registered task: the
same scores on every machine).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from lede_env.config import TaskConfig, studied_task
from lede_env.policies import own_stop_rule, own_tree_prune, reads_observations
from lede_env.prompts import DEFAULT_EVAL
from lede_env.replay import best_static, useful_actions
from lede_env.storage import write_text_atomic

from .scores import format_score
from .tables import to_markdown
from .train import ALGOS


@dataclass
class LeaderboardConfig:
    """Settings of ``lede leaderboard``.

    Attributes:
        task: the training task (its ``prompts`` train; default the task ``LEDE-Llama3-v1``).
        eval_prompts: held-out prompts (never trained on).
        algos: learners (names of :data:`agents.train.ALGOS`).
        seeds: training seeds of each learner (the dataset is collected once, with seed 0).
        steps: gradient steps (offline learners) or env steps (online ones) per run.
        episodes: dataset episodes.
        out_dir: where ``leaderboard.md``, ``leaderboard.json``, the dataset and the runs go.
        dataset_id: the dataset's Minari id.
    """

    task: TaskConfig = field(default_factory=studied_task)
    eval_prompts: str = DEFAULT_EVAL
    algos: tuple[str, ...] = ALGOS
    seeds: tuple[int, ...] = (0, 1, 2)
    steps: int = 6000
    episodes: int = 300
    out_dir: str = "runs/leaderboard"
    dataset_id: str = "lede/leaderboard/mixed-v0"

    def __post_init__(self) -> None:
        bad = [a for a in self.algos if a not in ALGOS]
        if bad or not self.algos:
            raise ValueError(f"Unknown algorithms {bad}; choose from {ALGOS}.")
        if len(self.seeds) < 1 or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds={self.seeds}: give distinct training seeds (3 or more for intervals).")


class TimedPolicy:
    """A policy whose ``act`` calls are timed (seconds summed in :attr:`seconds`, calls in
    :attr:`calls`): the policy's own cost per round, what the trace env does not charge."""

    def __init__(self, policy) -> None:
        self.policy, self.seconds, self.calls = policy, 0.0, 0
        self.needs_observation = reads_observations(policy)
        self.stop_rule = own_stop_rule(policy)
        self.tree_prune = own_tree_prune(policy)

    def reset(self) -> None:
        self.policy.reset()

    def act(self, obs) -> int:
        t = time.perf_counter()
        a = self.policy.act(obs)
        self.seconds += time.perf_counter() - t
        self.calls += 1
        return a

    def update(self, record) -> None:
        self.policy.update(record)


def baseline_names(train_env) -> tuple[list[str], int]:
    """The baselines of a leaderboard, chosen on the training traces: ``(names, static_best)``:
    always-AR, the best static action, the best static exit draft (E, K) and its heuristic
    schedule, copies of at most 4 and 8 tokens (where the task has them), each fixed token tree and
    the static tree rule at the largest budget aiming at the best static throughput (where the task
    has tree actions), DEL, the copy-else rule at the best exit, the oracle."""
    u = train_env.unwrapped
    static_best = u.best_static()[0]
    traces, rules = u.static_setting()
    exits = [a for a in useful_actions(rules) if u.actions.decode(a)[0] > 0]
    names = ["ar", "static:best"]
    E = None
    if exits:
        E, K = u.actions.decode(best_static(traces, rules, u.max_new_tokens, exits)[0])
        names += [f"static:{E},{K}", f"heuristic:{E}"]
    names += [f"static:0,{m}" for m in (4, 8) if m in u.actions.context_lengths
              and u.actions.encode(0, m) != static_best]  # (static:best already plays it)
    budgets = u.actions.tree_budgets
    names += [f"tree:{b}" for b in budgets if u.actions.encode_tree(b) != static_best]
    if budgets:
        names.append(f"tree-rule:{max(budgets)},{max(1.0, u.best_static()[1]):.3f}")
    names.append("del")
    if E is not None and u.actions.context_lengths:
        names.append(f"copy-else:{max(u.actions.context_lengths)},{E},0.35")
    return names + ["oracle"], static_best


def _train_all(cfg: LeaderboardConfig, dataset, train_env, out: Path, progress: bool) -> tuple[dict, dict]:
    """Every learner with every seed: ``({algo: [policy per seed]}, {algo: mean training seconds})``."""
    from .train import TrainConfig, greedy_q_policy, train

    policies, seconds = {}, {}
    for algo in cfg.algos:
        policies[algo], times = [], []
        for seed in cfg.seeds:
            tcfg = TrainConfig(dataset_id=cfg.dataset_id, algo=algo, steps=cfg.steps, seed=seed, wandb="disabled",
                               out_dir=str(out / "runs" / f"{algo}-s{seed}"), eval_prompts=None)
            t0 = time.perf_counter()
            agent, layout = train(tcfg, progress=progress, dataset=dataset, env=train_env)
            times.append(time.perf_counter() - t0)
            policies[algo].append(TimedPolicy(greedy_q_policy(agent, layout)))
        seconds[algo] = float(np.mean(times))
    return policies, seconds


def run_leaderboard(cfg: LeaderboardConfig, progress: bool = True) -> dict:
    """Collect, train every learner with every seed, evaluate everything on the held-out traces,
    write ``out_dir/leaderboard.{md,json}``.

    Returns:
        ``{"rows": trace_eval rows (+ train_seconds, policy_us_per_round), "baselines": names,
        "markdown": the leaderboard}``.

    Raises:
        ValueError: as :class:`LeaderboardConfig`; held-out prompts shared with the training ones.
    """
    import os

    from lede_env.prompts import check_disjoint

    from .collect import CollectConfig, collect
    from .evaluate import held_out_envs, trace_eval

    check_disjoint(training=cfg.task.prompts, held_out=cfg.eval_prompts)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("MINARI_DATASETS_PATH", str((out / "minari").resolve()))
    train_env, eval_env = held_out_envs(cfg.task, cfg.task.prompts, cfg.eval_prompts, progress=progress)
    names, static_best = baseline_names(train_env)
    dataset = collect(train_env, CollectConfig(dataset_id=cfg.dataset_id, episodes=cfg.episodes, seed=0),
                      progress=progress, env_spec=cfg.task)
    policies, seconds = _train_all(cfg, dataset, train_env, out, progress)
    rows = trace_eval(eval_env, names, static_best=static_best, policies=policies)
    for r in rows:
        pols = policies.get(r["policy"], [])
        calls = sum(p.calls for p in pols)
        r["train_seconds"] = seconds.get(r["policy"], float("nan"))
        r["policy_us_per_round"] = 1e6 * sum(p.seconds for p in pols) / calls if calls else float("nan")
    md = leaderboard_markdown(rows, cfg, eval_env)
    write_text_atomic(out / "leaderboard.md", md)
    write_text_atomic(out / "leaderboard.json", json.dumps({"config": asdict(cfg), "baselines": names, "rows": rows},
                                                           indent=1, default=str))
    return {"rows": rows, "baselines": names, "markdown": md}


def leaderboard_markdown(rows: list[dict], cfg: LeaderboardConfig, eval_env) -> str:
    """The leaderboard: the overall table (sorted by score), then each policy's score per category."""
    overall = sorted((r for r in rows if r["category"] == "all"), key=lambda r: -np.nan_to_num(r["score"], nan=-1e9))
    keep = ("policy", "score", "score_ci", "score_iqm", "throughput", "acceptance", "tokens_per_round",
            "train_seconds", "policy_us_per_round")
    cats = sorted({r["category"] for r in rows} - {"all"})
    by = {(r["policy"], r["category"]): r for r in rows}
    per_cat = [{"policy": r["policy"], **{c: format_score(by[r["policy"], c]["score"], by[r["policy"], c]["score_ci"])
                                          for c in cats}} for r in overall]
    u = eval_env.unwrapped
    return (f"# lede leaderboard\n\nTask: `LEDE-Llama3-v1` settings ({json.dumps(cfg.task.differences(TaskConfig()))}); "
            f"trained on `{cfg.task.prompts}`, held out `{cfg.eval_prompts}` ({len(u.playable)} prompts), cost profile "
            f"{u.profile.source}. Learners: {', '.join(cfg.algos)}, seeds {list(cfg.seeds)}, {cfg.steps} steps, "
            f"dataset of {cfg.episodes} episodes. Score: 0 = always-AR, 100 = the hindsight oracle, with its 95 % "
            "stratified-bootstrap interval over prompts and seeds; IQM over categories.\n\n"
            f"{to_markdown([{k: r[k] for k in keep} for r in overall])}\n\n## Score per category\n\n"
            f"{to_markdown(per_cat)}\n")
