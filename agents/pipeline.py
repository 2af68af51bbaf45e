"""The main job end to end: traces -> env -> Minari dataset -> offline RL -> export -> evaluate.

:func:`run_demo` is what ``lede demo`` runs: every stage at a small scale on the embedded
model and HumanEval, ending with the evaluation table on held-out prompts.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from rich.console import Console

from lede_env.config import TaskConfig, studied_task
from lede_env.storage import write_text_atomic
from lede_env.prompts import DEFAULT_EVAL

console = Console()


@dataclass
class DemoConfig:
    """Settings of ``lede demo``: the task it trains in, and the pipeline's own.

    Attributes:
        task: the training task (its ``prompts`` are the training prompts: the traces, the dataset
            and the agent's; default :func:`lede_env.config.studied_task`, the task lede studies:
            context copies of 1-8 tokens with the model's datastore, the compact observation, the
            calibrated in-round stop rule, the relative reward, costs measured on this machine).
            The held-out env is the same task on ``eval_prompts``.
        eval_prompts: held-out prompts for evaluation (never used for fitting or training).
        gamma: the agent's discount.
        episodes: dataset episodes.
        algos: offline algorithms to train; the best on training traces is exported.
        steps: gradient steps per algorithm.
        out_dir: results folder (the Minari dataset lives under ``out_dir/minari``).
        seed: seeds collection and training.
        wandb: W&B mode for training runs.
        live: also decode the held-out prompts for real (wall clock).
        live_per_category: decode only the first N held-out prompts of each category for real
            (``None``: all); the trace env always evaluates all of them.
    """

    task: TaskConfig = field(default_factory=studied_task)
    eval_prompts: str = DEFAULT_EVAL
    gamma: float = 0.5
    episodes: int = 300
    algos: tuple[str, ...] = ("trace_q", "discrete_cql")
    steps: int = 6000
    out_dir: str = "runs/demo"
    seed: int = 0
    wandb: str = "offline"
    live: bool = True
    live_per_category: Optional[int] = 2
    timings: dict = field(default_factory=dict)

    @property
    def train_prompts(self) -> str:
        """The training prompts (the task's)."""
        return self.task.prompts

    def task_for(self, prompts: str, **changes) -> TaskConfig:
        """The demo's task on ``prompts`` (with some flat settings changed), at this process's
        weight dtype where the task names none (``lede --dtype``; bf16 on CUDA)."""
        from lede_env.device import spec_dtype

        dtype = {} if self.task.model.dtype else spec_dtype()
        return self.task.replace(prompts=prompts, **dtype, **changes)


class _Stage:
    def __init__(self, cfg: DemoConfig, name: str) -> None:
        self.cfg, self.name = cfg, name

    def __enter__(self):
        console.rule(f"[bold]{self.name}")
        self.t = time.perf_counter()

    def __exit__(self, *exc):
        dt = time.perf_counter() - self.t
        self.cfg.timings[self.name] = round(dt, 1)
        console.print(f"[dim]{self.name}: {dt:.1f} s[/dim]")


def run_demo(cfg: DemoConfig, progress: bool = True) -> dict:
    """Run the whole pipeline; write ``out_dir/{results.md,results.json,config.json}``.

    Returns:
        ``{"trace": rows, "live": rows, "timings": {...}, "static_best": (E, K), "agent": algo}``.
    """
    from lede_env.calibration import get_heads
    from lede_env.env import LEDEEnv, head_spec
    from lede_env.model import get_bundle

    from . import collect, plots, train  # noqa: F401 - the stages' modules first: a missing extra fails at once
    from .evaluate import evaluate_held_out, held_out_envs
    from .export import export_policy
    from .policies import best_static_action

    out = _out_dir(cfg.out_dir)
    t_all = time.perf_counter()

    with _Stage(cfg, "model + exit heads"):
        bundle = get_bundle(cfg.task.model.name)
        heads = get_heads(bundle, head_spec(cfg.task), progress=progress)
    # lambda (reward and stop rule) from the training traces, never from held-out ones
    train_env, eval_env = held_out_envs(cfg.task_for(cfg.train_prompts), cfg.train_prompts, cfg.eval_prompts,
                                        progress=progress, stage=lambda name: _Stage(cfg, name))
    static_best, static_tp = best_static_action(train_env)
    E, K = train_env.actions.decode(static_best)
    console.print(f"best static action on training traces: E={E}, K={K} (throughput {static_tp:.3f})")

    with _Stage(cfg, "collect (Minari)"):
        ds_id, dataset = _collect(cfg, train_env, progress)
    with _Stage(cfg, "train (d3rlpy)"):
        best = _train_best(cfg, ds_id, dataset, train_env, static_tp, out, progress)
    with _Stage(cfg, "export"):
        policy_dir = export_policy(best[2], train_env, out / "policy", algo_name=best[1], gamma=cfg.gamma)
        console.print(f"exported {best[1]} to {policy_dir}")

    # static:0,4 = a context draft of up to 4 copied tokens every round: `lede generate`'s default
    copy4 = ["static:0,4"] if 4 in cfg.task.rules.context_lengths and (E, K) != (0, 4) else []  # unless it is static:best
    names = ["ar", "static:best", *copy4, "del", f"agent:{policy_dir}", "oracle"]

    def live_subset():
        """The held-out env of the prompts decoded for real: the first ``live_per_category`` of
        each category (all of them: ``eval_env``)."""
        if cfg.live_per_category is None:
            return eval_env
        from lede_env.prompts import first_per_category, load_prompts, write_prompt_file

        subset = first_per_category(load_prompts(cfg.eval_prompts), cfg.live_per_category)
        return LEDEEnv(cfg.task_for(write_prompt_file(subset, out / "live_prompts.jsonl"),
                                    reward_lambda=eval_env.reward_lambda), progress=progress)

    res = evaluate_held_out(train_env, eval_env, names, out, cfg.eval_prompts, static_best=static_best,
                            live=cfg.live, live_names=["ar", "hf", "hf-lookup:10"] + names[1:], live_env=live_subset,
                            bundle=bundle, heads=heads, relabel=lambda rows: _rename_agent(rows, best[1]),
                            progress=progress, stage=lambda name: _Stage(cfg, name), show=console.print)
    trace_rows, live_rows = res.trace, res.live
    if cfg.live:
        _show_live(cfg, res, eval_env, best[1], out)
    cfg.timings["total"] = round(time.perf_counter() - t_all, 1)
    summary = {"config": asdict(cfg), "static_best": [E, K], "agent": best[1], "trace": trace_rows,
               "live": live_rows, "timings": cfg.timings}
    _write_results(cfg, out, summary)
    return summary


def _out_dir(out_dir: str) -> Path:
    """The demo's output folder, made, with an empty ``minari/`` folder in it where Minari's
    datasets go (``MINARI_DATASETS_PATH``)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    minari_dir = (out / "minari").resolve()
    if minari_dir.exists():
        shutil.rmtree(minari_dir)
    os.environ["MINARI_DATASETS_PATH"] = str(minari_dir)
    return out


def _collect(cfg: DemoConfig, train_env, progress: bool):
    """The demo's Minari dataset, collected in the training env: ``(dataset id, dataset)``."""
    from .collect import CollectConfig, collect
    from .store import dataset_model_name

    ds_id = f"lede/{dataset_model_name(train_env.trace_set.manifest['model']['name'])}/multidomain-mixed-v0"
    dataset = collect(train_env, CollectConfig(dataset_id=ds_id, episodes=cfg.episodes, seed=cfg.seed),
                      progress=progress, env_spec=cfg.task_for(cfg.train_prompts))
    console.print(f"dataset {ds_id}: {dataset.total_episodes} episodes, {dataset.total_steps} steps")
    return ds_id, dataset


def _train_best(cfg: DemoConfig, ds_id: str, dataset, train_env, static_tp: float, out: Path, progress: bool):
    """Train each of ``cfg.algos`` on the dataset: ``(training-trace throughput, algo name,
    algo)`` of the one of highest throughput (the first of the best)."""
    from .evaluate import policy_throughput
    from .train import TrainConfig, greedy_q_policy, train

    best = None
    for algo_name in cfg.algos:
        tcfg = TrainConfig(dataset_id=ds_id, algo=algo_name, steps=cfg.steps, gamma=cfg.gamma, seed=cfg.seed,
                           out_dir=str(out / "train" / algo_name), wandb=cfg.wandb)
        algo, layout = train(tcfg, progress=progress, dataset=dataset)
        tp = policy_throughput(train_env, greedy_q_policy(algo, layout))
        console.print(f"{algo_name}: training-trace throughput {tp:.3f} (best static {static_tp:.3f})")
        if best is None or tp > best[0]:
            best = (tp, algo_name, algo)
    return best


def _show_live(cfg: DemoConfig, res, eval_env, algo_name: str, out: Path) -> None:
    """After the live evaluation: plot the agent's choices (``agent_choices.png``) and say whether
    every method's output is greedy AR's."""
    from .plots import plot_choices

    agent_records = next((v for k, v in res.records.items() if k.startswith("agent:")), [])
    if agent_records:
        plot_choices(agent_records, out / "agent_choices.png", eval_env.actions.exit_layers, cfg.task.rules.k_max,
                     title=f"LEDE agent ({algo_name}) on {cfg.eval_prompts}")
    same = all(r["identical_to_ar"] for r in res.live)
    console.print("[bold green]every method's output is identical to greedy AR[/]" if same else
                  "[bold red]OUTPUT MISMATCH: some method differs from greedy AR[/]")


def _write_results(cfg: DemoConfig, out: Path, summary: dict) -> None:
    """``results.json`` (the summary), ``results.md`` (its tables) and the report of ``out``."""
    from .evaluate import to_markdown
    from .report import write_report

    write_text_atomic(out / "results.json", json.dumps(summary, indent=2, default=str))
    write_text_atomic(out / "results.md",
        f"# lede demo\n\nTrace env (held-out `{cfg.eval_prompts}`, throughput in tokens per AR-step cost):\n\n"
        f"{to_markdown(summary['trace'])}\n\nReal decoder (wall clock, same process):\n\n"
        f"{to_markdown(summary['live'])}\n\nStage times (s): {json.dumps(cfg.timings)}\n")
    report = write_report(out)
    console.print(f"stage times (s): {cfg.timings}")
    console.print(f"results in {out}/results.md; plots and report in {report.parent}/ (report.md, report.html)")


def _rename_agent(rows: list[dict], algo: str) -> None:
    for r in rows:
        if r["policy"].startswith("agent:"):
            r["policy"] = f"LEDE agent ({algo})"
