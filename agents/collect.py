"""Collecting offline datasets in Minari format from behaviour policies run in the trace env.

A behaviour *mixture* assigns each episode one policy: ``random``, ``static`` (a random static
(E, K) per episode, i.e. the static grid), ``heuristic`` (the +2/-1 schedule at a random exit)
and ``oracle`` (the dynamic-programming oracle with epsilon-random actions). Episodes store
their seed and ``options={"prompt_index": i}``, so any episode can be replayed in the
recovered env. As in Minari, an episode holds T+1 observations and T actions.

Datasets are written through ``minari.create_dataset_from_buffers`` (no jax needed) under a
temporary id and renamed into place when whole, so an interrupted collection never leaves a
dataset ``minari.load_dataset`` would read as complete.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
from tqdm.auto import tqdm

from .policies import EpsilonPolicy, HeuristicPolicy, OraclePolicy, RandomPolicy, StaticPolicy

DEFAULT_MIX = {"random": 0.2, "static": 0.3, "heuristic": 0.1, "oracle": 0.4}


@dataclass
class CollectConfig:
    """Dataset collection settings.

    Attributes:
        dataset_id: Minari id, ``lede/<model>/<prompt-set>-<policy-mix>-v<N>``.
        episodes: number of episodes.
        mixture: behaviour policy -> probability (normalised).
        oracle_epsilon: random-action probability of the oracle behaviour.
        seed: seeds episode draws and behaviour policies.
        author, code_permalink, description: dataset metadata.
    """

    dataset_id: str = "lede/smollm2-135m-instruct/humaneval-mixed-v0"
    episodes: int = 200
    mixture: dict = field(default_factory=lambda: dict(DEFAULT_MIX))
    oracle_epsilon: float = 0.1
    seed: int = 0
    author: str = "lede"
    code_permalink: str = "https://github.com/lede-project/lede"
    description: str = ""

    def __post_init__(self) -> None:
        unknown = set(self.mixture) - set(DEFAULT_MIX)
        if unknown:
            raise ValueError(f"Unknown behaviour policies {sorted(unknown)}; choose from {sorted(DEFAULT_MIX)}.")
        if self.episodes < 1:
            raise ValueError(f"episodes must be >= 1, got {self.episodes}.")
        if sum(self.mixture.values()) <= 0:
            raise ValueError("The behaviour mixture has no positive weight.")


def make_behaviour(kind: str, env, rng: np.random.Generator, eps: float):
    """One behaviour policy of kind ``kind`` for ``env`` (its random choices drawn from ``rng``)."""
    u = env.unwrapped
    A = u.actions
    seed = int(rng.integers(2**31))
    if kind == "random":
        return RandomPolicy(A.n, seed)
    if kind == "static":
        return StaticPolicy(int(rng.integers(A.n)))
    if kind == "heuristic":
        return HeuristicPolicy(A, int(rng.choice(A.exit_layers)), k_start=int(rng.integers(1, A.k_max + 1)))
    if kind == "oracle":
        return EpsilonPolicy(OraclePolicy(env), A.n, eps, seed)
    raise ValueError(kind)


def run_episode(env, policy, seed: int, options: Optional[dict] = None):
    """Play one episode; return observations (list of T+1 dicts), actions, rewards, terminations,
    truncations and the reset info."""
    from lede_env.decoding import RoundRecord

    obs, info = env.reset(seed=seed, options=options)
    policy.reset()
    observations, actions, rewards, terms, truncs = [obs], [], [], [], []
    done = False
    while not done:
        a = policy.act(obs if getattr(policy, "needs_observation", False) else None)
        obs, r, te, tr, step_info = env.step(a)
        policy.update(RoundRecord(**{k: step_info["round"][k] for k in
                                     ("action", "exit_layer", "draft_len", "accepted", "emitted", "cost")}))
        observations.append(obs)
        actions.append(a)
        rewards.append(r)
        terms.append(te)
        truncs.append(tr)
        done = te or tr
    return observations, actions, rewards, terms, truncs, info


def _stack(observations: list[dict]) -> dict[str, np.ndarray]:
    return {k: np.stack([o[k] for o in observations]) for k in observations[0]}


def minari_root() -> Path:
    """Minari's local datasets folder (``$MINARI_DATASETS_PATH`` or ``~/.minari/datasets``)."""
    from minari.storage.datasets_root_dir import get_dataset_path

    return Path(get_dataset_path())


def collect(env, config: CollectConfig, progress: bool = True, env_spec: Optional[dict] = None):
    """Run the behaviour mixture in ``env`` and write a Minari dataset.

    Args:
        env: a ``LEDE-Llama3-v0`` env (trace backend).
        config: collection settings.
        env_spec: JSON-serialisable kwargs that rebuild ``env`` (stored in the metadata).

    Returns:
        The ``minari.MinariDataset``.

    Raises:
        ValueError: the dataset id exists already (delete it with ``minari delete ID`` first).
    """
    import minari
    from minari.data_collector import EpisodeBuffer

    root = minari_root()
    if (root / config.dataset_id).exists():
        raise ValueError(f"Dataset {config.dataset_id!r} already exists under {root}: choose a new version "
                         f"(-vN) or delete it (`minari delete {config.dataset_id}`).")
    u = env.unwrapped
    rng = np.random.default_rng(config.seed)
    kinds = sorted(config.mixture)
    probs = np.array([config.mixture[k] for k in kinds], float)
    probs /= probs.sum()
    buffers, counts = [], {k: 0 for k in kinds}
    for ep in tqdm(range(config.episodes), desc=f"collect {config.dataset_id}", disable=not progress):
        kind = kinds[int(rng.choice(len(kinds), p=probs))]
        counts[kind] += 1
        policy = make_behaviour(kind, env, rng, config.oracle_epsilon)
        seed = int(rng.integers(2**31))
        idx = int(u.playable[int(rng.integers(len(u.playable)))])
        obs, acts, rews, terms, truncs, _ = run_episode(env, policy, seed, {"prompt_index": idx})
        buffers.append(EpisodeBuffer(id=ep, seed=seed, options={"prompt_index": idx}, observations=_stack(obs),
                                     actions=np.asarray(acts, np.int64), rewards=rews, terminations=terms,
                                     truncations=truncs))
    ref_min, ref_max = reference_scores(env)
    tmp_id = _tmp_id(config.dataset_id)
    tmp_path = root / tmp_id
    final_path = root / config.dataset_id
    try:
        minari.create_dataset_from_buffers(
            dataset_id=tmp_id,
            buffer=buffers,
            env=env_spec_for(env, env_spec),
            algorithm_name="behaviour mixture: " + ", ".join(f"{k}={counts[k]}" for k in kinds),
            author=config.author,
            code_permalink=config.code_permalink,
            action_space=u.action_space,
            observation_space=u.observation_space,
            # Reference scores are written below: given here, Minari would re-make the env to
            # check them (loading the model again).
            description=config.description or _describe(u, config, counts),
            requirements=_requirements(),
        )
        _rename_dataset(tmp_path, final_path, config.dataset_id,
                        {"ref_min_score": ref_min, "ref_max_score": ref_max, "num_episodes_average_score": len(u.playable)})
    finally:
        if tmp_path.exists():
            shutil.rmtree(tmp_path, ignore_errors=True)
    return minari.load_dataset(config.dataset_id)


def _tmp_id(dataset_id: str) -> str:
    ns, _, name = dataset_id.rpartition("/")
    base, _, ver = name.rpartition("-v")
    return f"{ns}/partial-{os.getpid()}-{base}-v{ver}" if ns else f"partial-{os.getpid()}-{base}-v{ver}"


def _rename_dataset(tmp_path: Path, final_path: Path, dataset_id: str, extra: dict) -> None:
    """Move a finished dataset folder into place, fixing the id and adding ``extra`` to its metadata."""
    import json

    meta = tmp_path / "data" / "metadata.json"
    m = json.loads(meta.read_text())
    m["dataset_id"] = dataset_id
    m.update(extra)
    meta.write_text(json.dumps(m))
    final_path.parent.mkdir(parents=True, exist_ok=True)
    os.rename(tmp_path, final_path)


def env_spec_for(env, kwargs: Optional[dict]):
    """A gymnasium ``EnvSpec`` that rebuilds the env (``minari``'s ``recover_environment``)."""
    from gymnasium.envs.registration import EnvSpec

    if kwargs is None:
        return None
    return EnvSpec(id="LEDE-Llama3-v0", entry_point="lede_env.env:LEDEEnv", kwargs=dict(kwargs))


def reference_scores(env) -> tuple[float, float]:
    """Mean undiscounted return of always-AR (``ref_min_score``) and of the oracle
    (``ref_max_score``) over the env's traces, in its reward mode."""
    u = env.unwrapped
    mins, maxs = [], []
    for i in u.playable:
        for which, out in (("ar", mins), ("oracle", maxs)):
            u.reset(seed=0, options={"prompt_index": i})
            ret, done = 0.0, False
            while not done:
                a = 0 if which == "ar" else u.oracle_action()
                _, r, te, tr, _ = u.step(a)
                ret += r
                done = te or tr
            out.append(ret)
    return float(np.mean(mins)), float(np.mean(maxs))


def _requirements() -> list[str]:
    from importlib.metadata import version

    return [f"{p}=={version(p)}" for p in ("lede", "torch", "transformers", "gymnasium", "minari")]


def _describe(u, config: CollectConfig, counts: dict) -> str:
    return (f"Offline experience of dynamic self-speculative decoding (LEDE-Llama3-v0, trace backend). "
            f"Model {u.trace_set.manifest['model'].get('name')}, prompts {u.trace_set.manifest.get('prompts')}, "
            f"exits {list(u.actions.exit_layers)}, k_max {u.actions.k_max}, reward {u.reward_mode}, "
            f"bonus={u.rules.bonus}, cost profile {u.profile.source}. Behaviour episodes: {counts}; "
            f"oracle epsilon {config.oracle_epsilon}; seed {config.seed}. Collection config: {asdict(config)}")
