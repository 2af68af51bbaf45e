"""stable-baselines3 agents on lede's MDP: offline DQN from a Minari dataset, online PPO and DQN
on the trace env.

Every sb3 agent sees Dict observations (``MultiInputPolicy``) holding the same keys as the
d3rlpy agents' flat vector (:data:`agents.train.FLAT_KEYS`), each standardised with the mean
and standard deviation of the training dataset's observations (so every algorithm on a dataset
sees the same inputs). The greedy policy - standardisation, split into the Dict, the network,
argmax - is one ``torch.nn.Module`` on the flat vector, so evaluation before export and the
exported TorchScript run the same code.

- ``sb3_offline_dqn``: sb3's ``DQN`` (Mnih et al., arXiv 1312.5602) whose replay buffer is filled
  once with every transition of the dataset and never with new ones; gradient steps via
  ``DQN.train`` and a hard target-network copy every ``target_update_interval`` steps.
- ``ppo`` (arXiv 1707.06347) and ``online_dqn``: sb3's ``learn`` on the trace env recovered
  from the dataset's env spec (the dataset gives the env and the observation statistics; its
  transitions are not used).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces

from lede_env.mdp import flatten_by_layout

SB3_ALGOS = ("sb3_offline_dqn", "ppo", "online_dqn")
ONLINE_ALGOS = ("ppo", "online_dqn")


def observation_stats(flat: np.ndarray, floor: float = 1e-3) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean and standard deviation (floored at ``floor``) of flat observations.

    Args:
        flat: [N, D] float32 observations.

    Returns:
        ``(mean, std)``, each [D] float32.
    """
    flat = np.asarray(flat, np.float64)
    return flat.mean(0).astype(np.float32), np.maximum(flat.std(0), floor).astype(np.float32)


def dict_space(layout) -> spaces.Dict:
    """The standardised Dict observation space for a flat ``layout`` ``[(key, shape), ...]``."""
    return spaces.Dict({k: spaces.Box(-np.inf, np.inf, tuple(s), np.float32) for k, s in layout})


def split_flat(z: np.ndarray, layout) -> dict[str, np.ndarray]:
    """Split standardised flat observations [N, D] into the Dict ``{key: [N, *shape]}``."""
    out, off = {}, 0
    for k, s in layout:
        n = int(np.prod(s))
        out[k] = z[:, off:off + n].reshape(len(z), *s)
        off += n
    return out


class StandardisedDictObservation(gym.ObservationWrapper):
    """Wrap a ``LEDE-Llama3-v0`` env so that it emits the sb3 agents' standardised Dict."""

    def __init__(self, env: gym.Env, layout, mean: np.ndarray, std: np.ndarray) -> None:
        super().__init__(env)
        self.layout, self.mean, self.std = layout, mean, std
        self.observation_space = dict_space(layout)

    def observation(self, obs: dict) -> dict:
        z = (flatten_by_layout(obs, self.layout) - self.mean) / self.std
        return {k: v[0] for k, v in split_flat(z[None].astype(np.float32), self.layout).items()}


class _SpacesOnly(gym.Env):
    """An env that only carries spaces: sb3 needs one to build an offline DQN."""

    def __init__(self, observation_space, action_space) -> None:
        self.observation_space, self.action_space = observation_space, action_space

    def reset(self, *, seed=None, options=None):  # pragma: no cover - never stepped
        raise RuntimeError("offline training never steps the env")

    def step(self, action):  # pragma: no cover
        raise RuntimeError("offline training never steps the env")


class GreedyModule(torch.nn.Module):
    """flat observation [B, D] float32 -> greedy action [B] int64 of an sb3 policy.

    Standardises with the dataset statistics, splits into the Dict of ``layout`` and runs the
    Q-network (DQN: argmax Q) or the actor (PPO: the most likely action).
    """

    def __init__(self, policy, layout, mean: np.ndarray, std: np.ndarray, kind: str) -> None:
        super().__init__()
        self.policy = policy
        self.layout = [(k, tuple(int(x) for x in s)) for k, s in layout]
        self.kind = kind
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32))
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = (x - self.mean) / self.std
        obs, off = {}, 0
        for k, s in self.layout:
            n = int(np.prod(s))
            obs[k] = z[:, off:off + n].reshape(-1, *s)
            off += n
        if self.kind == "q":
            scores = self.policy.q_net(obs)
        else:
            features = self.policy.extract_features(obs, self.policy.pi_features_extractor)
            scores = self.policy.action_net(self.policy.mlp_extractor.forward_actor(features))
        return scores.argmax(-1)


class SB3Agent:
    """A trained sb3 model with the observation statistics and layout it was trained with.

    Duck-types the parts of a d3rlpy algorithm that lede uses: ``predict`` (flat observations
    [N, D] float32 -> actions [N] int64) and ``save_policy`` (TorchScript, read by
    :class:`agents.policies.ExportedPolicy`).
    """

    def __init__(self, model, algo: str, layout, mean: np.ndarray, std: np.ndarray) -> None:
        self.model, self.algo, self.layout, self.mean, self.std = model, algo, layout, mean, std
        self.module = GreedyModule(model.policy, layout, mean, std, "pi" if algo == "ppo" else "q").eval()

    @torch.no_grad()
    def predict(self, flat: np.ndarray) -> np.ndarray:
        return self.module(torch.as_tensor(np.asarray(flat, np.float32))).numpy()

    def save_policy(self, path: str | Path) -> None:
        """Write the greedy policy as TorchScript (input [B, D] float32, output [B] int64)."""
        example = torch.zeros(2, self.mean.shape[0])
        with torch.no_grad():
            traced = torch.jit.trace(self.module, example, check_trace=False)
        traced.save(str(path))

    def save(self, folder: str | Path) -> None:
        """Write ``model.zip`` (sb3) and ``obs_stats.json`` into ``folder``."""
        folder = Path(folder)
        self.model.save(str(folder / "model.zip"))
        (folder / "obs_stats.json").write_text(json.dumps({"mean": self.mean.tolist(), "std": self.std.tolist(),
                                                           "layout": self.layout}))

    @classmethod
    def load(cls, folder: str | Path, algo: str) -> "SB3Agent":
        """Load an agent written by :meth:`save`.

        Raises:
            FileNotFoundError: ``model.zip`` or ``obs_stats.json`` is missing.
        """
        from stable_baselines3 import DQN, PPO

        folder = Path(folder)
        for f in ("model.zip", "obs_stats.json"):
            if not (folder / f).exists():
                raise FileNotFoundError(f"No {f} in {folder}: not an sb3 run folder written by `lede train`.")
        st = json.loads((folder / "obs_stats.json").read_text())
        model = (PPO if algo == "ppo" else DQN).load(str(folder / "model.zip"), device="cpu")
        layout = [(k, list(s)) for k, s in st["layout"]]
        return cls(model, algo, layout, np.asarray(st["mean"], np.float32), np.asarray(st["std"], np.float32))


class WandbOutput:
    """An sb3 logger output format (``KVWriter``) forwarding every dump to a W&B run."""

    def __init__(self, run) -> None:
        self.run = run

    def write(self, key_values: dict, key_excluded: dict, step: int = 0) -> None:
        vals = {k: v for k, v in key_values.items() if isinstance(v, (int, float, np.floating, np.integer))}
        if vals:
            self.run.log(vals, step=int(step))

    def close(self) -> None:
        pass


def make_logger(folder: Path, run=None):
    """An sb3 logger writing CSV into ``folder`` and, with ``run``, to W&B."""
    from stable_baselines3.common.logger import CSVOutputFormat, Logger

    folder.mkdir(parents=True, exist_ok=True)
    formats = [CSVOutputFormat(str(folder / "progress.csv"))]
    if run is not None:
        formats.append(WandbOutput(run))
    return Logger(str(folder), formats)


def train_sb3(cfg, dataset, layout, flat_obs: np.ndarray, env: Optional[gym.Env], out: Path, run=None,
              progress: bool = True, on_epoch=None) -> SB3Agent:
    """Train the sb3 algorithm ``cfg.algo`` (see the module docstring).

    Args:
        cfg: an :class:`agents.train.TrainConfig` (``steps`` = gradient steps for the offline DQN,
            env steps for the online algorithms).
        dataset: the Minari dataset (transitions for the offline DQN, spaces for all).
        layout: the flat observation layout; flat_obs: [N, D] float32 dataset observations (for
            the standardisation statistics).
        env: the trace env for online algorithms (``None``: recovered from the dataset's spec).
        out: run folder (``progress.csv``).
        run: a W&B run or ``None``.
        on_epoch: ``callable(agent, epoch, step) -> dict`` of evaluation metrics, called every
            ``cfg.steps_per_epoch`` steps.

    Raises:
        ValueError: an online algorithm without an env and a dataset without an env spec.
    """
    from stable_baselines3 import DQN, PPO

    mean, std = observation_stats(flat_obs)
    space = dict_space(layout)
    net = dict(net_arch=list(cfg.hidden))
    logger = make_logger(out / "sb3_logs", run)
    if cfg.algo == "sb3_offline_dqn":
        n = int(sum(len(ep.actions) for ep in dataset.iterate_episodes()))
        model = DQN("MultiInputPolicy", _SpacesOnly(space, dataset.action_space), learning_rate=cfg.learning_rate,
                    buffer_size=n, learning_starts=0, batch_size=cfg.batch_size, gamma=cfg.gamma,
                    policy_kwargs=net, seed=cfg.seed, device="cpu")
        model.set_logger(logger)
        fill_replay_buffer(model.replay_buffer, dataset, layout, mean, std)
        agent = SB3Agent(model, cfg.algo, layout, mean, std)
        _train_offline(cfg, model, agent, logger, progress, on_epoch)
        return agent

    if env is None:
        env = dataset.recover_environment()
    wrapped = StandardisedDictObservation(env, layout, mean, std)
    if cfg.algo == "ppo":
        model = PPO("MultiInputPolicy", wrapped, learning_rate=cfg.learning_rate, n_steps=cfg.ppo_n_steps,
                    batch_size=min(cfg.batch_size, cfg.ppo_n_steps), gamma=cfg.gamma, policy_kwargs=net,
                    seed=cfg.seed, device="cpu")
    else:
        model = DQN("MultiInputPolicy", wrapped, learning_rate=cfg.learning_rate, batch_size=cfg.batch_size,
                    gamma=cfg.gamma, learning_starts=min(1000, cfg.steps // 10), buffer_size=max(cfg.steps, 1000),
                    exploration_fraction=0.3, target_update_interval=cfg.target_update_interval,
                    policy_kwargs=net, seed=cfg.seed, device="cpu")
    model.set_logger(logger)
    agent = SB3Agent(model, cfg.algo, layout, mean, std)
    model.learn(total_timesteps=cfg.steps, progress_bar=progress, callback=_eval_callback(cfg, model, agent, on_epoch))
    logger.dump(model.num_timesteps)
    model.policy.set_training_mode(False)
    return agent


def _train_offline(cfg, model, agent: SB3Agent, logger, progress: bool, on_epoch) -> None:
    """The offline DQN's loop: ``cfg.steps`` gradient steps on its filled replay buffer, the target
    network synced every ``cfg.target_update_interval`` steps, ``on_epoch`` evaluated and logged
    every ``cfg.steps_per_epoch`` steps (and after the last)."""
    from tqdm.auto import tqdm

    done, epoch = 0, 0
    chunk = min(cfg.target_update_interval, cfg.steps_per_epoch)
    with tqdm(total=cfg.steps, desc=f"train {cfg.algo}", disable=not progress) as bar:
        while done < cfg.steps:
            k = min(chunk, cfg.steps - done)
            model.policy.set_training_mode(True)
            model.train(gradient_steps=k, batch_size=cfg.batch_size)
            done += k
            bar.update(k)
            if done % cfg.target_update_interval < k or done == cfg.steps:
                model.q_net_target.load_state_dict(model.q_net.state_dict())
            if done % cfg.steps_per_epoch < k or done == cfg.steps:
                epoch += 1
                model.policy.set_training_mode(False)
                for key, v in (on_epoch(agent, epoch, done) if on_epoch else {}).items():
                    logger.record(f"eval/{key}", v)
                logger.record("train/epoch", epoch)
                logger.dump(done)


def _eval_callback(cfg, model, agent: SB3Agent, on_epoch):
    """The callback of an online algorithm's ``learn``: ``on_epoch`` evaluated (policy in eval
    mode) and logged every ``cfg.steps_per_epoch`` env steps."""
    from stable_baselines3.common.callbacks import BaseCallback

    class _Eval(BaseCallback):
        def _on_step(self) -> bool:
            if on_epoch is not None and self.num_timesteps % cfg.steps_per_epoch == 0:
                model.policy.set_training_mode(False)
                for key, v in on_epoch(agent, self.num_timesteps // cfg.steps_per_epoch, self.num_timesteps).items():
                    self.logger.record(f"eval/{key}", v)
            return True

    return _Eval()


def fill_replay_buffer(buffer, dataset, layout, mean: np.ndarray, std: np.ndarray) -> int:
    """Add every transition of a Minari dataset to an sb3 ``DictReplayBuffer`` (standardised).

    The last transition of each episode is stored as done (EOS or ``max_new_tokens``: nothing is
    left to generate, as in :func:`agents.train.to_mdp_dataset`).

    Returns:
        the number of transitions added.
    """
    count = 0
    for ep in dataset.iterate_episodes():
        T = len(ep.actions)
        flat = np.concatenate([np.asarray(ep.observations[k], np.float32).reshape(T + 1, -1) for k, _ in layout], 1)
        z = split_flat(((flat - mean) / std).astype(np.float32), layout)
        for t in range(T):
            buffer.add({k: v[t:t + 1] for k, v in z.items()}, {k: v[t + 1:t + 2] for k, v in z.items()},
                       np.array([[int(ep.actions[t])]]), np.array([float(ep.rewards[t])], np.float32),
                       np.array([t == T - 1]), [{}])
            count += 1
    return count
