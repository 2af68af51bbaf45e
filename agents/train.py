"""RL on lede's Minari datasets: one :func:`train` for every algorithm (``lede train --algo``).

Offline, d3rlpy (the training loop lives in d3rlpy): ``discrete_cql`` (Kumar et al. 2020,
arXiv 2006.04779), ``dqn`` and ``double_dqn`` (arXiv 1312.5602, 1509.06461), ``discrete_bcq``
(arXiv 1910.01708), ``discrete_bc``. They take the flat float32 observation
(``ObservationBuilder.flatten``; d3rlpy has no Dict spaces) and the ``Discrete`` action.

stable-baselines3 (:mod:`agents.sb3`): ``sb3_offline_dqn`` (DQN on a replay buffer filled from
the dataset), and online on the trace env recovered from the dataset: ``ppo``, ``online_dqn``
(Dict observations through ``MultiInputPolicy``).

lede's own (:mod:`agents.trace_q`): ``trace_q``, value regression on every action at every
visited state of the trace env recovered from the dataset (the traces know every action's
outcome), DAgger-style; its policy never picks an action that cannot pay.

Every trained agent has ``predict(flat [N, D]) -> actions [N]`` and ``save_policy`` (for
``lede export``); with ``eval_prompts`` it is evaluated on held-out prompts (never its training
prompts) after training and the metrics go to ``eval.json`` and W&B.

The ``MDPDataset`` is built from Minari episodes here: Minari keeps T+1 observations per
episode, so the last one is dropped and the step flags mark the episode end
(``d3rlpy.datasets.get_minari`` misaligns observations after the first episode). Truncation
at ``max_new_tokens`` is a true end of this MDP (nothing is left to generate, so the value
after it is 0): it is stored as terminal.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from lede_env.policies import PredictorPolicy
from lede_env.storage import atomic_folder

D3RLPY_ALGOS = ("discrete_cql", "dqn", "double_dqn", "discrete_bcq", "discrete_bc")
ALGOS = D3RLPY_ALGOS + ("sb3_offline_dqn", "ppo", "online_dqn", "trace_q")


@dataclass
class TrainConfig:
    """Offline training settings.

    Attributes:
        dataset_id: Minari dataset to train on.
        algo: one of :data:`ALGOS`.
        steps: gradient steps (offline algorithms) or env steps (``ppo``, ``online_dqn``).
        steps_per_epoch: steps between log lines / W&B points / evaluations.
        batch_size: transitions per step.
        learning_rate: Adam learning rate.
        gamma: discount (``net`` reward: near 1 - it then counts AR steps saved).
        cql_alpha: conservatism weight of DiscreteCQL.
        hidden: widths of the Q-network's (or actor's and critic's) hidden layers.
        target_update_interval: gradient steps between target-network copies (DQN family).
        ppo_n_steps: env steps per PPO rollout.
        eval_prompts: held-out prompt spec evaluated after training in the dataset's env (must
            not share a prompt with the dataset's); ``None`` skips it.
        seed: seeds numpy, torch, python, d3rlpy and sb3.
        out_dir: where the model, logs and ``train_config.json`` go.
        wandb: ``"offline"`` (default), ``"online"`` or ``"disabled"``.
        wandb_project: W&B project.
    """

    dataset_id: str = "lede/smollm2-135m-instruct/humaneval-mixed-v0"
    algo: str = "discrete_cql"
    steps: int = 20000
    steps_per_epoch: int = 2000
    batch_size: int = 256
    learning_rate: float = 3e-4
    gamma: float = 0.5
    cql_alpha: float = 0.5
    hidden: tuple[int, ...] = (256, 256)
    target_update_interval: int = 1000
    ppo_n_steps: int = 256
    eval_prompts: Optional[str] = None
    seed: int = 0
    out_dir: str = "runs/train"
    wandb: str = "offline"
    wandb_project: str = "lede"

    def __post_init__(self) -> None:
        if self.algo not in ALGOS:
            raise ValueError(f"Unknown algorithm {self.algo!r}; choose one of {ALGOS}.")
        if not 0.0 <= self.gamma <= 1.0:
            raise ValueError(f"gamma must be in [0, 1], got {self.gamma}.")
        if self.steps < 1 or self.steps_per_epoch < 1 or self.target_update_interval < 1 or self.ppo_n_steps < 2:
            raise ValueError("steps, steps_per_epoch and target_update_interval must be >= 1, ppo_n_steps >= 2.")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}.")
        if self.wandb not in ("offline", "online", "disabled"):
            raise ValueError(f"wandb must be 'offline', 'online' or 'disabled', got {self.wandb!r}.")
        self.hidden = tuple(int(h) for h in self.hidden)


def seed_everything(seed: int) -> None:
    """Seed python, numpy, torch and d3rlpy."""
    import d3rlpy

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    d3rlpy.seed(seed)


FLAT_KEYS = ("hidden", "exit_stats", "history", "progress")
#: the flat keys of the compact observation (``obs_kind="compact"``)
COMPACT_KEYS = ("exit_stats", "experience", "history", "progress")


def flat_layout(dataset) -> list[tuple[str, list[int]]]:
    """The flat observation layout of a lede dataset (same order as ``ObservationBuilder.layout``:
    :data:`FLAT_KEYS` for the full observation, :data:`COMPACT_KEYS` for the compact one, then
    ``context`` where the env has context drafts; a compact observation without head statistics
    has no ``exit_stats``).

    Raises:
        ValueError: observations without the keys of either layout.
    """
    space = dataset.observation_space
    compact = "experience" in space.spaces
    keys = COMPACT_KEYS if compact else FLAT_KEYS
    # optional: the compact observation's head statistics (obs_stat_exits=0 has none) and the
    # context drafter's features (envs with context drafts or context actions)
    optional = ("exit_stats", "context") if compact else ("context",)
    missing = [k for k in keys if k not in space.spaces and k not in optional]
    if missing:
        raise ValueError(f"Dataset observations lack {missing}: not a LEDE-Llama3-v0 dataset.")
    return [(k, list(space[k].shape)) for k in keys + ("context",) if k in space.spaces]


def to_mdp_dataset(dataset):
    """Build a d3rlpy ``MDPDataset`` from a Minari dataset of ``LEDE-Llama3-v0`` episodes.

    Returns:
        ``(mdp_dataset, layout)``: the dataset, and the flat observation layout used.
    """
    from d3rlpy.constants import ActionSpace
    from d3rlpy.dataset import MDPDataset

    layout = flat_layout(dataset)
    obs, acts, rews, terms = [], [], [], []
    for ep in dataset.iterate_episodes():
        T = len(ep.actions)
        o = np.concatenate([np.asarray(ep.observations[k][:T], np.float32).reshape(T, -1) for k, _ in layout], 1)
        obs.append(o)
        acts.append(np.asarray(ep.actions, np.int64).reshape(T, 1))
        rews.append(np.asarray(ep.rewards, np.float32).reshape(T, 1))
        t = np.zeros(T, np.float32)
        t[-1] = 1.0  # EOS or max_new_tokens: generation is over either way
        terms.append(t)
    ds = MDPDataset(np.concatenate(obs), np.concatenate(acts), np.concatenate(rews), np.concatenate(terms),
                    action_space=ActionSpace.DISCRETE, action_size=int(dataset.action_space.n))
    return ds, layout


def make_algo(cfg: TrainConfig, device: str = "cpu:0"):
    """The d3rlpy algorithm object for ``cfg`` (standardised observations, MLP Q-network)."""
    import d3rlpy
    from d3rlpy.models import VectorEncoderFactory
    from d3rlpy.preprocessing import StandardObservationScaler

    enc = VectorEncoderFactory(hidden_units=list(cfg.hidden))
    common = dict(learning_rate=cfg.learning_rate, batch_size=cfg.batch_size, encoder_factory=enc,
                  observation_scaler=StandardObservationScaler())
    if cfg.algo == "discrete_bc":
        return d3rlpy.algos.DiscreteBCConfig(learning_rate=cfg.learning_rate, batch_size=cfg.batch_size,
                                             encoder_factory=enc,
                                             observation_scaler=StandardObservationScaler()).create(device=device)
    common |= dict(gamma=cfg.gamma)
    if cfg.algo == "discrete_cql":
        return d3rlpy.algos.DiscreteCQLConfig(alpha=cfg.cql_alpha, target_update_interval=cfg.target_update_interval,
                                              **common).create(device=device)
    if cfg.algo == "dqn":
        return d3rlpy.algos.DQNConfig(target_update_interval=cfg.target_update_interval, **common).create(device=device)
    if cfg.algo == "double_dqn":
        return d3rlpy.algos.DoubleDQNConfig(target_update_interval=cfg.target_update_interval, **common).create(device=device)
    return d3rlpy.algos.DiscreteBCQConfig(target_update_interval=cfg.target_update_interval,
                                          **common).create(device=device)


class WandbAdapter:
    """d3rlpy logger adapter writing to a W&B run (``mode`` given explicitly, never blocking)."""

    def __init__(self, run) -> None:
        self.run = run
        self._buf: dict = {}

    def write_params(self, params: dict) -> None:
        self.run.config.update({"d3rlpy": params}, allow_val_change=True)

    def before_write_metric(self, epoch: int, step: int) -> None:
        self._buf = {}

    def write_metric(self, epoch: int, step: int, name: str, value: float) -> None:
        self._buf[f"train/{name}"] = value

    def after_write_metric(self, epoch: int, step: int) -> None:
        self.run.log(self._buf | {"train/epoch": epoch}, step=step)

    def save_model(self, epoch: int, algo) -> None:
        pass

    def close(self) -> None:
        pass

    def watch_model(self, epoch: int, step: int) -> None:
        pass


class WandbAdapterFactory:
    def __init__(self, run) -> None:
        self.run = run

    def create(self, algo, experiment_name: str, n_steps_per_epoch: int) -> WandbAdapter:
        return WandbAdapter(self.run)


def start_wandb(mode: str, project: str, name: str, config: dict, out_dir: Path):
    """``wandb.init`` with an explicit mode (offline by default: synced later with ``wandb sync``)."""
    import os

    import wandb

    os.environ.setdefault("WANDB_SILENT", "true")
    return wandb.init(project=project, name=name, config=config, mode=mode, dir=str(out_dir), reinit="finish_previous")


def train(cfg: TrainConfig, progress: bool = True, dataset=None, on_epoch=None, env=None, eval_env=None,
          wandb_run=None):
    """Train ``cfg.algo`` on the Minari dataset ``cfg.dataset_id``.

    Args:
        dataset: an already loaded ``MinariDataset`` (else :func:`agents.datasets_tool.load`).
        on_epoch: ``callable(agent, epoch, step) -> dict`` of evaluation metrics logged to W&B.
        env: the env online algorithms train in (default: ``dataset.recover_environment()``).
        eval_env: the held-out env (default: the dataset's env on ``cfg.eval_prompts``).
        wandb_run: a W&B run to log to (e.g. a sweep agent's; left open), instead of starting one
            in mode ``cfg.wandb``.

    Returns:
        ``(agent, layout)``: the trained agent (a d3rlpy algorithm or an
        :class:`agents.sb3.SB3Agent`) and the flat observation layout. ``cfg.out_dir`` gets the
        model (``model.d3`` or ``model.zip`` + ``obs_stats.json``), ``train_config.json``, the
        library's logs, and ``eval.json`` (training seconds; held-out metrics when evaluated),
        published whole when training ends (an existing folder there is replaced).

    Raises:
        ValueError: a dataset that is not lede's, or held-out prompts shared with the dataset's.
    """
    import logging

    import structlog

    # d3rlpy prints every parameter and metric through structlog at INFO; they are in the log
    # files and W&B already.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    seed_everything(cfg.seed)
    # the run folder is written under a temporary name and published whole at the end (a killed
    # run never leaves a half-written model.d3 / model.pt where `lede export` would read it)
    with atomic_folder(Path(cfg.out_dir)) as out:
        return _train_into(cfg, out, progress, dataset, on_epoch, env, eval_env, wandb_run)


def _train_into(cfg: TrainConfig, out: Path, progress: bool, dataset, on_epoch, env, eval_env, wandb_run):
    from .datasets_tool import load
    from .sb3 import train_sb3

    if dataset is None:
        dataset = load(cfg.dataset_id)
    mdp, layout = to_mdp_dataset(dataset)
    if cfg.eval_prompts and eval_env is None:
        eval_env = heldout_env(dataset, cfg.eval_prompts)
    (out / "train_config.json").write_text(json.dumps(asdict(cfg) | {"layout": layout}, indent=2))
    run = wandb_run
    if run is None and cfg.wandb != "disabled":
        run = start_wandb(cfg.wandb, cfg.wandb_project, f"{cfg.algo}-s{cfg.seed}", asdict(cfg), out)
    t0 = time.perf_counter()
    try:
        if cfg.algo in D3RLPY_ALGOS:
            agent = _train_d3rlpy(cfg, mdp, out, run, progress, on_epoch)
        elif cfg.algo == "trace_q":
            from .trace_q import train_trace_q

            agent = train_trace_q(env or dataset.recover_environment(), steps=cfg.steps, hidden=cfg.hidden,
                                  learning_rate=cfg.learning_rate, batch_size=cfg.batch_size, seed=cfg.seed,
                                  progress=progress,
                                  log=None if run is None else (lambda m: run.log({f"train/{k}": v for k, v in m.items()})))
            agent.save(out)
        else:
            flat = np.concatenate([e.observations for e in mdp.episodes])
            agent = train_sb3(cfg, dataset, layout, flat, env, out, run, progress, on_epoch)
            agent.save(out)
        seconds = time.perf_counter() - t0
        summary = {"algo": cfg.algo, "seed": cfg.seed, "train_seconds": seconds}
        if eval_env is not None:
            summary |= {f"heldout_{k}": v for k, v in evaluate_agent(agent, layout, eval_env).items()}
            summary["heldout_prompts"] = cfg.eval_prompts
        (out / "eval.json").write_text(json.dumps(summary, indent=2))
        if run is not None:
            run.summary.update(summary)
    finally:
        if run is not None and wandb_run is None:
            run.finish()
    return agent, layout


def _train_d3rlpy(cfg: TrainConfig, mdp, out: Path, run, progress: bool, on_epoch):
    from d3rlpy.logging import CombineAdapterFactory, FileAdapterFactory

    algo = make_algo(cfg)
    adapters = [FileAdapterFactory(root_dir=str(out / "d3rlpy_logs"))]
    if run is not None:
        adapters.append(WandbAdapterFactory(run))

    def epoch_cb(algo_, epoch, step):
        if on_epoch is not None:
            metrics = on_epoch(algo_, epoch, step)
            if run is not None and metrics:
                run.log({f"eval/{k}": v for k, v in metrics.items()}, step=step)

    algo.fit(mdp, n_steps=cfg.steps, n_steps_per_epoch=min(cfg.steps_per_epoch, cfg.steps),
             experiment_name=f"{cfg.algo}", with_timestamp=False, show_progress=progress, save_interval=10**9,
             logger_adapter=CombineAdapterFactory(adapters), epoch_callback=epoch_cb)
    algo.save(str(out / "model.d3"))
    return algo


def heldout_env(dataset, eval_prompts: str):
    """The dataset's env (from its stored env spec) on the held-out prompts ``eval_prompts``; a
    live-backend dataset is evaluated in the trace backend (greedy, profile costs).

    Raises:
        ValueError: the dataset has no env spec, or a held-out prompt is one of its training
            prompts (an agent is never evaluated on the prompts it was trained on).
    """
    from lede_env.env import LEDEEnv
    from lede_env.prompts import DEFAULT_TRAIN, load_prompts

    spec = dataset.spec.env_spec
    if spec is None or not spec.kwargs:
        raise ValueError(f"Dataset {dataset.spec.dataset_id!r} stores no env spec: build the held-out env "
                         "yourself and pass eval_env=.")
    kwargs = dict(spec.kwargs)
    train_texts = {p.text for p in load_prompts(kwargs.get("prompts") or DEFAULT_TRAIN)}
    shared = [p.id for p in load_prompts(eval_prompts) if p.text in train_texts]
    if shared:
        raise ValueError(f"Held-out prompts {eval_prompts!r} share {len(shared)} prompt(s) with the dataset's "
                         f"training prompts {kwargs.get('prompts')!r} (e.g. {shared[:3]}): choose disjoint ones.")
    # held-out metrics are trace-env metrics (share of the oracle needs greedy traces), also for
    # agents trained on live-backend data
    kwargs |= {"backend": "trace", "temperature": 0.0, "cost": "profile"} if kwargs.get("backend") == "live" else {}
    return LEDEEnv(**(kwargs | {"prompts": eval_prompts, "progress": False}))


def evaluate_agent(agent, layout, eval_env) -> dict:
    """Trace-env metrics of ``agent``'s greedy policy on every playable trace of ``eval_env``.

    Returns:
        ``score`` (normalized: 0 = always-AR, 100 = the oracle: :mod:`agents.scores`),
        ``throughput`` (tokens per AR-step cost unit), ``oracle_share`` (of the oracle's
        throughput on the same traces), ``mean_return``, ``tokens_per_round``, ``acceptance``.
    """
    from .evaluate import trace_eval

    row = trace_eval(eval_env, [], by_category=False, policies={"agent": greedy_q_policy(agent, layout)},
                     intervals=False)[0]
    return {k: float(row[k]) for k in ("score", "throughput", "oracle_share", "mean_return", "tokens_per_round",
                                       "acceptance")}


def greedy_q_policy(algo, layout) -> PredictorPolicy:
    """A trained agent (d3rlpy algorithm or :class:`agents.sb3.SB3Agent`) as a lede policy acting
    on Dict observations (for evaluation before export): its greedy action each round."""
    return PredictorPolicy(algo.predict, layout)


def load_algo(path: str | Path, device: str = "cpu:0"):
    """Load an agent saved by :func:`train`: a run folder (its ``train_config.json`` names the
    algorithm) or a d3rlpy ``model.d3`` file.

    Raises:
        FileNotFoundError: the folder holds no trained agent.
    """
    import d3rlpy

    from .sb3 import SB3_ALGOS, SB3Agent

    p = Path(path)
    if p.is_dir():
        cfg_file = p / "train_config.json"
        if not cfg_file.exists():
            raise FileNotFoundError(f"No train_config.json in {p}: not a run folder of `lede train`.")
        algo = json.loads(cfg_file.read_text())["algo"]
        if algo in SB3_ALGOS:
            return SB3Agent.load(p, algo)
        if algo == "trace_q":
            from .trace_q import TraceQAgent

            return TraceQAgent.load(p)
        p = p / "model.d3"
    if not p.exists():
        raise FileNotFoundError(f"No trained agent at {p}: run `lede train` first.")
    return d3rlpy.load_learnable(str(p), device=device)
