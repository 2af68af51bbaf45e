"""Sweeps over RL algorithms: W&B sweep YAML files run by W&B (online) or locally by W&B's own
sweep engine, the ``sweeps`` package (offline).

A sweep file is a W&B sweep configuration (``method``, ``metric``, ``parameters``, ...;
e.g. ``agents/sweeps/algorithms.yaml``). Its parameters are :class:`agents.train.TrainConfig`
fields, plus

- ``recipe``: a dataset recipe (``datasets/NAME.yaml``); the dataset is collected first if it is
  not in Minari's folder yet, and its id becomes ``dataset_id``;
- ``online_steps``: env steps for the online algorithms (``ppo``, ``online_dqn``), whose
  ``steps`` count env steps rather than gradient steps.

Each trial trains, evaluates on the held-out prompts (``eval_prompts``, required) and reports
``heldout_throughput``, ``heldout_oracle_share`` and ``train_seconds``; the summary table
lists every trial.
"""

from __future__ import annotations

import json
import time
from dataclasses import fields
from pathlib import Path
from typing import Optional

from .sb3 import ONLINE_ALGOS
from .train import ALGOS, TrainConfig

EXTRA_PARAMS = ("recipe", "online_steps")
METRICS = ("heldout_throughput", "heldout_oracle_share", "heldout_tokens_per_round", "train_seconds")


class SweepError(ValueError):
    """A malformed sweep file; the message names the problem and the fix."""


def param_names() -> list[str]:
    """Parameters a lede sweep may set."""
    skip = {"out_dir", "wandb", "wandb_project"}
    return [f.name for f in fields(TrainConfig) if f.name not in skip] + list(EXTRA_PARAMS)


def check_sweep(cfg, src: str = "<sweep>") -> dict:
    """Check a sweep configuration against W&B's schema (``sweeps``) and lede's parameters.

    Raises:
        SweepError: not a mapping, a schema violation, an unknown parameter or algorithm, or no
            held-out prompts.
    """
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydantic deprecation chatter from sweeps
        import sweeps

    if not isinstance(cfg, dict):
        raise SweepError(f"{src}: a sweep file is a YAML mapping (method, metric, parameters), "
                         f"got {type(cfg).__name__}.")
    errs = sweeps.schema_violations_from_proposed_config(cfg)
    if errs:
        raise SweepError(f"{src}: not a valid W&B sweep configuration: {'; '.join(errs)}.")
    params = cfg.get("parameters") or {}
    unknown = sorted(set(params) - set(param_names()))
    if unknown:
        raise SweepError(f"{src}: unknown parameter(s) {unknown}; a lede sweep sets {param_names()}.")
    algos = params.get("algo", {}).get("values", [params.get("algo", {}).get("value", "discrete_cql")])
    bad = sorted(set(map(str, algos)) - set(ALGOS))
    if bad:
        raise SweepError(f"{src}: unknown algorithm(s) {bad}; choose from {ALGOS}.")
    if "eval_prompts" not in params:
        raise SweepError(f"{src}: set parameters.eval_prompts (held-out prompts, e.g. value: 'humaneval[24:40]'): "
                         "every trial is evaluated on prompts it was not trained on.")
    if "recipe" not in params and "dataset_id" not in params:
        raise SweepError(f"{src}: set parameters.recipe (datasets/NAME.yaml) or parameters.dataset_id.")
    return cfg


def load_sweep(path: str | Path) -> dict:
    """Read and check a sweep YAML file (see :func:`check_sweep`).

    Raises:
        FileNotFoundError: no such file. SweepError: invalid YAML or sweep.
    """
    from .recipes import read_yaml

    p = Path(path)
    return check_sweep(read_yaml(p, "sweep", "e.g. agents/sweeps/algorithms.yaml", SweepError), str(p))


def trial_config(params: dict, out_dir: Path, wandb_mode: str, progress: bool = True) -> TrainConfig:
    """The :class:`TrainConfig` of one trial (its dataset collected from its recipe if missing)."""
    p = dict(params)
    recipe = p.pop("recipe", None)
    online_steps = p.pop("online_steps", None)
    if recipe is not None:
        p["dataset_id"] = ensure_dataset(recipe, progress)
    if online_steps is not None and p.get("algo") in ONLINE_ALGOS:
        p["steps"] = int(online_steps)
    if "hidden" in p:
        p["hidden"] = tuple(p["hidden"])
    return TrainConfig(**p, out_dir=str(out_dir), wandb=wandb_mode)


def ensure_dataset(recipe_path: str, progress: bool = True) -> str:
    """The dataset id of a recipe, collecting the dataset first when it is not stored locally."""
    import minari

    from .recipes import build, load_recipe

    r = load_recipe(recipe_path)
    if r.dataset_id not in minari.list_local_datasets():
        build(r, progress=progress)
    return r.dataset_id


def run_trial(params: dict, out_dir: Path, wandb_mode: str = "offline", wandb_run=None,
              progress: bool = True, train_kwargs: Optional[dict] = None) -> dict:
    """Train and evaluate one trial; returns its parameters and metrics (also ``trial.json``).

    Args:
        train_kwargs: extra keyword arguments of :func:`agents.train.train` (``dataset``,
            ``env``, ``eval_env``: prebuilt objects, e.g. in tests).
    """
    from .train import train

    cfg = trial_config(params, out_dir, wandb_mode, progress)
    train(cfg, progress=progress, wandb_run=wandb_run, **(train_kwargs or {}))
    summary = json.loads((out_dir / "eval.json").read_text())
    row = {"trial": out_dir.name, **{k: v for k, v in params.items()}, **{k: summary.get(k) for k in METRICS}}
    from lede_env.storage import write_text_atomic

    write_text_atomic(out_dir / "trial.json", json.dumps(row, indent=2))  # the run folder is already published
    return row


def _trial_name(i: int, params: dict) -> str:
    data = Path(str(params.get("recipe", params.get("dataset_id", "data")))).stem.split("/")[-1]
    return f"{i:03d}-{params.get('algo', 'algo')}-{data}-lr{params.get('learning_rate', 'd')}"


def run_local(cfg: dict, out_root: str | Path, count: Optional[int] = None, wandb_mode: str = "offline",
              progress: bool = True, train_kwargs: Optional[dict] = None) -> list[dict]:
    """Run a sweep here with W&B's sweep engine (``sweeps.next_run``), each trial logged to W&B in
    ``wandb_mode`` (offline by default: ``wandb sync`` uploads later).

    Args:
        count: at most this many trials (required for ``random`` and ``bayes`` without ``run_cap``).
        train_kwargs: passed to every :func:`run_trial`.

    Returns:
        one row per trial (parameters and :data:`METRICS`); ``out_root`` gets ``sweep.md``,
        ``sweep.json`` and ``sweep.csv`` (trials, then :func:`reference_rows` on the first
        trial's dataset).

    Raises:
        SweepError: an endless method (random/bayes) with neither ``count`` nor ``run_cap``.
    """
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import sweeps

    if cfg.get("method") != "grid" and count is None and "run_cap" not in cfg:
        raise SweepError(f"method {cfg.get('method')!r} never ends by itself: pass --count N or set run_cap.")
    limit = count if count is not None else cfg.get("run_cap")
    out_root = Path(out_root)
    out_root.mkdir(parents=True, exist_ok=True)
    metric = cfg.get("metric", {}).get("name", "heldout_throughput")
    runs, rows = [], []
    while limit is None or len(runs) < limit:
        nxt = sweeps.next_run(cfg, runs)
        if nxt is None:
            break
        params = {k: v["value"] for k, v in nxt.config.items()}
        name = _trial_name(len(runs), params)
        row = run_trial(params, out_root / name, wandb_mode, progress=progress, train_kwargs=train_kwargs)
        rows.append(row)
        nxt.name = name
        nxt.state = sweeps.RunState.finished
        nxt.summary_metrics = {metric: row.get(metric)}
        nxt.history = [{metric: row.get(metric)}]
        runs.append(nxt)
        write_summary(rows, out_root)
    if rows:
        tk = train_kwargs or {}
        refs = reference_rows(rows[0].get("dataset_id") or load_recipe_id(rows[0]["recipe"]),
                              rows[0]["eval_prompts"], tk.get("env"), tk.get("eval_env"))
        write_summary(rows, out_root, refs)
    return rows


def load_recipe_id(recipe_path: str) -> str:
    """The dataset id a recipe builds."""
    from .recipes import load_recipe

    return load_recipe(recipe_path).dataset_id


def run_online(cfg: dict, project: str, entity: Optional[str] = None, count: Optional[int] = None,
               out_root: str | Path = "runs/sweep", progress: bool = True) -> str:
    """Create the sweep on W&B and run an agent in this process.

    Returns:
        the sweep id; other machines join with ``wandb agent ENTITY/PROJECT/SWEEP_ID`` (the
        sweep's ``command`` runs ``lede sweep-run`` there).

    Raises:
        RuntimeError: W&B cannot be reached or this machine is not logged in (``wandb login``);
            nothing was created.
    """
    import wandb

    try:
        sweep_id = wandb.sweep(cfg, project=project, entity=entity)
    except Exception as e:  # wandb raises several types for auth and network failures
        raise RuntimeError(f"Could not create the sweep on W&B ({e}); log in with `wandb login` or run it "
                           "offline: `lede sweep FILE` without --online.") from None
    out_root = Path(out_root)

    def trial():
        with wandb.init() as run:
            params = dict(run.config)
            run_trial(params, out_root / f"{run.id}-{params.get('algo')}", "online", wandb_run=run,
                      progress=progress)

    wandb.agent(sweep_id, function=trial, project=project, entity=entity, count=count)
    return sweep_id


def reference_rows(dataset_id: str, eval_prompts: str, env=None, eval_env=None) -> list[dict]:
    """Baselines on the sweep's held-out prompts, in the trials' metrics: always-AR, the best
    static (E, K) chosen on the dataset's training traces, and the oracle.

    Args:
        env, eval_env: prebuilt training / held-out envs (default: rebuilt from the dataset).
    """
    from .datasets_tool import load
    from .evaluate import trace_eval
    from .policies import best_static_action
    from .train import heldout_env

    ds = load(dataset_id)
    eval_env = eval_env if eval_env is not None else heldout_env(ds, eval_prompts)
    env = env if env is not None else ds.recover_environment()
    best, _ = best_static_action(env)
    rows = trace_eval(eval_env, ["ar", "static:best", "oracle"], best, by_category=False)
    return [{"trial": f"reference: {r['policy']}", "heldout_throughput": r["throughput"],
             "heldout_oracle_share": r["oracle_share"], "heldout_tokens_per_round": r["tokens_per_round"]}
            for r in rows]


def write_summary(rows: list[dict], out_root: Path, references: Optional[list[dict]] = None) -> str:
    """Write ``sweep.{md,json,csv}`` (one row per trial, best first, then the reference rows) and
    return the Markdown; parameters equal in every trial are left out of the table."""
    from .evaluate import to_markdown, write_results

    ordered = sorted(rows, key=lambda r: -(r.get("heldout_throughput") or float("-inf")))
    varying = [k for k in (ordered[0] if ordered else {}) if k not in METRICS and k != "trial"
               and len({json.dumps(r.get(k), sort_keys=True) for r in ordered}) > 1]
    table = [{"trial": r["trial"], **{k: r.get(k) for k in varying}, **{k: r.get(k) for k in METRICS}}
             for r in ordered]
    table += [{"trial": r["trial"], **{k: "" for k in varying}, **{k: r.get(k, "") for k in METRICS}}
              for r in references or []]
    write_results(out_root, "sweep", table)
    return to_markdown(table)


def trial_from_args_file(path: str | Path, out_root: str | Path = "runs/sweep") -> dict:
    """Run the trial a ``wandb agent`` hands over as ``${args_json_file}`` (``lede sweep-run``)."""
    args = json.loads(Path(path).read_text())
    params = {k: (v["value"] if isinstance(v, dict) and "value" in v else v) for k, v in args.items()}
    import wandb

    with wandb.init() as run:
        return run_trial(params, Path(out_root) / f"{run.id}-{params.get('algo')}-{int(time.time())}", "online",
                         wandb_run=run)
