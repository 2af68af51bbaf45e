"""Collecting offline datasets in Minari format from behaviour policies run in the trace env.

A behaviour *mixture* assigns each episode one policy: ``random``, ``static`` (a random static
(E, K) per episode, i.e. the static grid), ``heuristic`` (the +2/-1 schedule at a random exit)
and ``oracle`` (the dynamic-programming oracle with epsilon-random actions). Episodes store
their seed and ``options={"prompt_index": i}``, so any episode can be replayed in the
recovered env. As in Minari, an episode holds T+1 observations and T actions.

Each episode's randomness (behaviour policy, reset seed, prompt) comes from
``numpy.random.default_rng([seed, episode_index])``, so an episode does not depend on which
other episodes were collected: ``shard="k/n"`` collects the episodes ``i % n == k - 1`` of the
same collection, and the n shards merged (:func:`agents.datasets_tool.merge`) hold exactly the
episodes of the unsharded collection.

The live backend (``LEDE-Llama3-Live-v0``, ``backend="live"``) collects from the real decoder,
e.g. under sampling: every behaviour but ``oracle`` (which needs greedy traces; refused with an
error). Its reference scores are always-AR (``ref_min_score``) and, for want of an oracle, the
mean over prompts of the best return seen on that prompt, always-AR or a collected episode
(``ref_max_score``). Its episodes replay exactly from their stored seed (sampling included) on
the same machine, so validation replays them as for traces, except with ``cost="wallclock"``,
whose rewards are measured times: those datasets are validated without replay.

Datasets are written through ``minari.create_dataset_from_buffers`` (no jax needed) under a
temporary id (``partial-<host>-<pid>-...``, :func:`agents.store.partial_id`), validated
(:func:`agents.datasets_tool.validate`, rewards re-computed by replay) and renamed into place when
whole (:func:`agents.store.move_into_place`), so an interrupted collection never leaves a dataset
``minari.load_dataset`` would read as complete; a ``partial-*`` folder left by a killed process
is removed by the next collection on the same host (:func:`agents.store.clean_stale_partials`).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
from tqdm.auto import tqdm

from lede_env.config import TaskConfig
from lede_env.episodes import play_episode
from lede_env.live_env import LiveEnv
from lede_env.policies import EpsilonPolicy, HeuristicPolicy, RandomPolicy, StaticPolicy

from .policies import OraclePolicy
from .store import (STEP_INFO_KEYS, check_dataset_id, check_new, clean_stale_partials, describe_collection,
                    minari_root, move_into_place, reference_scores, shard_dataset_id, writing_partial)

DEFAULT_MIX = {"random": 0.2, "static": 0.3, "heuristic": 0.1, "oracle": 0.4}


@dataclass
class CollectConfig:
    """Dataset collection settings.

    Attributes:
        dataset_id: Minari id, ``lede/<model>/<prompt-set>-<policy-mix>-v<N>``.
        episodes: number of episodes.
        mixture: behaviour policy -> probability (normalised).
        oracle_epsilon: random-action probability of the oracle behaviour.
        seed: seeds episode draws and behaviour policies (episode i uses ``default_rng([seed, i])``).
        author, code_permalink, description: dataset metadata.
        shard: ``"k/n"`` (or ``(k, n)``): collect only episodes ``i % n == k - 1``, into the dataset
            :func:`agents.store.shard_dataset_id` (``...-shard<k>of<n>-v<N>``); ``None``
            collects all of them into ``dataset_id``. ``"auto"`` is the launcher's shard
            (``RANK+1``/``WORLD_SIZE`` of torchrun or accelerate launch), resolved to ``"k/n"``
            when the config is made.
    """

    dataset_id: str = "lede/smollm2-135m-instruct/humaneval-mixed-v0"
    episodes: int = 200
    mixture: dict = field(default_factory=lambda: dict(DEFAULT_MIX))
    oracle_epsilon: float = 0.1
    seed: int = 0
    author: str = "lede"
    code_permalink: str = "https://github.com/lede-project/lede"
    description: str = ""
    shard: Optional[str] = None

    def __post_init__(self) -> None:
        unknown = set(self.mixture) - set(DEFAULT_MIX)
        if unknown:
            raise ValueError(f"Unknown behaviour policies {sorted(unknown)}; choose from {sorted(DEFAULT_MIX)}.")
        if self.episodes < 1:
            raise ValueError(f"episodes must be >= 1, got {self.episodes}.")
        if sum(self.mixture.values()) <= 0:
            raise ValueError("The behaviour mixture has no positive weight.")
        from lede_env.sharding import parse_shard

        sh = parse_shard(self.shard)
        if isinstance(self.shard, str) and self.shard.strip().lower() == "auto":
            self.shard = f"{sh[0]}/{sh[1]}"  # the launcher's shard, fixed before anything is named
        if sh is not None and sh[0] > self.episodes:
            raise ValueError(f"shard {sh[0]}/{sh[1]} of {self.episodes} episodes is empty: use at most "
                             f"{self.episodes} shards.")


def parse_mixture(text: str) -> dict[str, float]:
    """Parse a behaviour mixture ``"random=0.2,static=0.3,oracle=0.5"``.

    Raises:
        ValueError: a malformed item, a weight that is not a non-negative number, an unknown
            policy, or no positive weight (the message shows the expected form).
    """
    form = f"NAME=WEIGHT,... with NAME in {sorted(DEFAULT_MIX)}, e.g. random=0.2,static=0.3,heuristic=0.1,oracle=0.4"
    mix = {}
    for item in (p.strip() for p in text.split(",") if p.strip()):
        name, eq, w = item.partition("=")
        try:
            weight = float(w)
        except ValueError:
            weight = float("nan")
        if not eq or not weight >= 0:
            raise ValueError(f"Bad behaviour mixture item {item!r}: use {form}.")
        if name.strip() not in DEFAULT_MIX:
            raise ValueError(f"Unknown behaviour policy {name.strip()!r}: use {form}.")
        mix[name.strip()] = weight
    if not mix or sum(mix.values()) <= 0:
        raise ValueError(f"The behaviour mixture {text!r} has no positive weight: use {form}.")
    return mix


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


def step_infos(reset_info: dict, step_infos_: list[dict]) -> dict[str, np.ndarray]:
    """Minari ``infos`` of one episode: each :data:`STEP_INFO_KEYS` entry as a [T+1] array from
    the reset info and the T step infos of ``env.step`` (their ``round`` and ``tokens_generated``)."""
    out = {}
    for k, dt in STEP_INFO_KEYS.items():
        if k == "tokens_generated":
            first = reset_info.get("tokens_generated", 1)
            vals = [first] + [i["tokens_generated"] for i in step_infos_]
        else:
            vals = [0.0 if k == "cost" else -1] + [i["round"][k] for i in step_infos_]
        out[k] = np.asarray(vals, dt)
    return out


def run_episode(env, policy, seed: int, options: Optional[dict] = None):
    """Play one episode (:func:`lede_env.episodes.play_episode`); return observations (list of
    T+1 dicts), actions, rewards, terminations, truncations, the reset info and the T step infos."""
    ep = play_episode(env, policy, seed, options)
    return ep.observations, ep.actions, ep.rewards, ep.terminations, ep.truncations, ep.reset_info, ep.step_infos


def _stack(observations: list[dict]) -> dict[str, np.ndarray]:
    return {k: np.stack([o[k] for o in observations]) for k in observations[0]}


def collect(env, config: CollectConfig, progress: bool = True, env_spec=None):
    """Run the behaviour mixture in ``env`` and write a Minari dataset.

    Args:
        env: a ``LEDE-Llama3-v0`` env, trace or live backend (see the module docstring).
        config: collection settings (``config.shard`` collects one part, see :class:`CollectConfig`).
        env_spec: the kwargs that rebuild ``env`` (JSON-serialisable; completed from ``env``, see
            :func:`env_spec_for`) or a ready ``gymnasium.envs.registration.EnvSpec``; stored in the
            metadata for ``MinariDataset.recover_environment()``. ``None`` stores no spec.

    Returns:
        The ``minari.MinariDataset`` (id ``config.dataset_id``, or the shard's id).

    Raises:
        ValueError: a malformed dataset id, or the dataset exists already (delete it with
            ``minari delete ID`` first, or collect a new version ``-vN``); ``oracle`` in the
            mixture of a live-backend env; the collected data fail validation (nothing is
            written then).
    """
    import minari

    from lede_env.sharding import parse_shard, shard_indices

    from .datasets_tool import check

    check_dataset_id(config.dataset_id)
    shard = parse_shard(config.shard)
    dataset_id = config.dataset_id if shard is None else shard_dataset_id(config.dataset_id, *shard)
    root = minari_root()
    clean_stale_partials()
    check_new(dataset_id, root)
    u = env.unwrapped
    live = isinstance(u, LiveEnv)
    if live and config.mixture.get("oracle", 0) > 0:
        raise ValueError("The oracle behaviour needs greedy traces, which the live backend has none of: drop oracle "
                         "from the mixture (e.g. --mixture random=0.3,static=0.5,heuristic=0.2) or collect with "
                         "the trace backend.")
    kinds = sorted(config.mixture)
    probs = np.array([config.mixture[k] for k in kinds], float)
    probs /= probs.sum()
    episodes = shard_indices(config.episodes, shard)
    buffers, extra_meta, counts, best = _run_mixture(env, config, episodes, kinds, probs, f"collect {dataset_id}",
                                                     progress)
    ref_min, ref_max = reference_scores(env, best if live else None)
    collection = {"seed": config.seed, "episodes": config.episodes, "mixture": dict(config.mixture),
                  "oracle_epsilon": config.oracle_epsilon, "shard": None if shard is None else list(shard),
                  "episode_indices": len(episodes), "behaviour_counts": counts,
                  "env": _describe_env(u)}
    spec = env_spec_for(env, env_spec)
    with writing_partial(dataset_id, root) as tmp_id:
        ds = _create_dataset(tmp_id, buffers, u, config, collection, dataset_id)
        if spec is not None:
            ds.storage.update_metadata({"env_spec": spec.to_json()})
        ds.storage.update_episode_metadata(extra_meta, range(len(extra_meta)))
        ds.storage.update_metadata({"ref_min_score": ref_min, "ref_max_score": ref_max,
                                    "num_episodes_average_score": len(u.playable), "lede_collection": collection})
        # rewards re-computed by replay (re-opened: the dataset object holds the metadata of its creation);
        # raises before anything is renamed into place
        replayable = getattr(u, "cost", "profile") != "wallclock"  # measured times do not replay
        check(minari.MinariDataset(ds.storage.data_path), env if replayable else None, replay=replayable,
              require_env_spec=spec is not None)
        move_into_place(tmp_id, dataset_id, root)
    return minari.load_dataset(dataset_id)


def _run_mixture(env, config: CollectConfig, episodes, kinds: list[str], probs: np.ndarray, desc: str,
                 progress: bool):
    """Play the episodes ``episodes`` (their indices in the collection) with the behaviour mixture:
    ``(buffers, extra_meta, counts, best)``, Minari's episode buffers, each episode's
    ``episode_index`` and behaviour, the episodes per behaviour kind, and the best return per
    prompt index."""
    from minari.data_collector import EpisodeBuffer

    buffers, extra_meta, counts, best = [], [], {k: 0 for k in kinds}, {}
    for n, ep in enumerate(tqdm(episodes, desc=desc, disable=not progress)):
        kind, policy, seed, idx = episode_plan(env, config, ep, kinds, probs)
        counts[kind] += 1
        obs, acts, rews, terms, truncs, info0, infos = run_episode(env, policy, seed, {"prompt_index": idx})
        buffers.append(EpisodeBuffer(id=n, seed=seed, options={"prompt_index": idx}, observations=_stack(obs),
                                     actions=np.asarray(acts, np.int64), rewards=rews, terminations=terms,
                                     truncations=truncs, infos=step_infos(info0, infos)))
        extra_meta.append({"episode_index": ep, "behaviour": kind})
        best[idx] = max(best.get(idx, -np.inf), float(np.sum(rews)))
    return buffers, extra_meta, counts, best


def _create_dataset(tmp_id: str, buffers: list, u, config: CollectConfig, collection: dict, dataset_id: str):
    """``minari.create_dataset_from_buffers`` under the partial id ``tmp_id``, with the spaces of
    the unwrapped env ``u`` and the collection's author, permalink, description and requirements
    (no env, no env spec, no reference scores: the caller writes those)."""
    import minari

    counts = collection["behaviour_counts"]
    with warnings.catch_warnings():  # the spec is stored below; no author e-mail, no eval env
        warnings.filterwarnings("ignore", message=r".*(env_spec is None|`eval_env` is set|`author_email`)")
        return minari.create_dataset_from_buffers(
            dataset_id=tmp_id,
            buffer=buffers,
            env=None,  # given as a spec, Minari would gym.make() a second env (loading the model) for its spaces
            algorithm_name="behaviour mixture: " + ", ".join(f"{k}={counts[k]}" for k in sorted(counts)),
            author=config.author,
            code_permalink=config.code_permalink,
            action_space=u.action_space,
            observation_space=u.observation_space,
            # Reference scores are written below: given here, Minari would re-make the env to
            # check them (loading the model again).
            description=config.description or describe_collection(collection, dataset_id),
            requirements=_requirements(),
        )


def episode_plan(env, config: CollectConfig, episode_index: int, kinds: list[str], probs: np.ndarray):
    """Behaviour kind, policy, reset seed and prompt index of episode ``episode_index``: drawn
    from ``default_rng([config.seed, episode_index])`` alone, so it is the same in any shard."""
    u = env.unwrapped
    rng = np.random.default_rng([config.seed, episode_index])
    kind = kinds[int(rng.choice(len(kinds), p=probs))]
    policy = make_behaviour(kind, env, rng, config.oracle_epsilon)
    seed = int(rng.integers(2**31))
    idx = int(u.playable[int(rng.integers(len(u.playable)))])
    return kind, policy, seed, idx


def env_spec_for(env, kwargs):
    """A gymnasium ``EnvSpec`` that rebuilds the env (``minari``'s ``recover_environment``).

    ``kwargs`` are flat env keywords or a :class:`~lede_env.config.TaskConfig` (stored as the flat
    keywords where it differs from the defaults, and its model and prompts). The kwargs are completed from ``env`` with everything that fixes its MDP, so the recovered env
    is the same one even where the given kwargs relied on defaults: the exit layers, ``k_max``,
    ``max_new_tokens``, reward mode, replay rules, observation settings, and the cost profile
    itself (a dict, so a ``"measured"`` profile is not re-measured on another machine); for the
    live backend also ``backend``, ``temperature``, ``top_p``, ``top_k`` (when on) and ``cost`` (id
    ``LEDE-Llama3-Live-v0``). ``None`` gives ``None``; an ``EnvSpec`` is returned as is. The entry
    point is ``lede_env.env:LEDEEnv`` for both backends: it makes the env the ``backend`` keyword
    names, as for every dataset written before the two envs had classes of their own.
    """
    from gymnasium.envs.registration import EnvSpec

    if kwargs is None or isinstance(kwargs, EnvSpec):
        return kwargs
    if isinstance(kwargs, TaskConfig):
        default = TaskConfig().to_kwargs()
        kwargs = {k: v for k, v in kwargs.to_kwargs().items() if k in ("model", "prompts") or v != default[k]}
    u = env.unwrapped
    kw = dict(kwargs)
    kw.update({"exit_layers": list(u.actions.exit_layers), "k_max": u.actions.k_max,
               "max_new_tokens": u.max_new_tokens, "reward_mode": u.reward_mode, "bonus": u.rules.bonus,
               "reuse": u.rules.reuse, "stop_threshold": u.rules.stop_threshold,
               "obs_hidden_dim": u.obs_config.hidden_dim, "obs_history": u.obs_config.history,
               "obs_recent_tokens": u.obs_config.recent_tokens, "cost_profile": u.profile.to_json(),
               "reward_lambda": u.reward_lambda, "stop_rule": u.task_config.rules.stop_rule, "obs_kind": u.obs_config.kind,
               "obs_stat_exits": u.obs_config.stat_exits, "context_draft": u.rules.context_draft,
               "context_lengths": list(u.actions.context_lengths)})
    if u.obs_config.context_agreement:  # (absent when off: specs written before it recover as before)
        kw["obs_context_agreement"] = True
    if u.obs_config.context_span:  # (absent when off, as above)
        kw["obs_context_span"] = True
    if u.actions.tree_budgets:  # (absent without tree actions, as above)
        kw.update({"tree_budgets": list(u.actions.tree_budgets), "tree_depth": u.rules.tree_depth})
    if isinstance(u, LiveEnv):
        kw.update({"backend": "live", "temperature": u.temperature, "top_p": u.top_p, "cost": u.cost})
        if getattr(u, "top_k", None):  # (absent when off: specs written before top_k recover as before)
            kw["top_k"] = int(u.top_k)
        return EnvSpec(id="LEDE-Llama3-Live-v0", entry_point="lede_env.env:LEDEEnv", kwargs=kw, nondeterministic=True)
    return EnvSpec(id="LEDE-Llama3-v0", entry_point="lede_env.env:LEDEEnv", kwargs=kw)


def _requirements() -> list[str]:
    """The pip requirements a dataset records (``minari``'s ``requirements``): the public versions
    (``torch==2.13.0``, not ``2.13.0+cpu``), which every build of that release meets, where a
    local label would make ``recover_environment()`` warn on the CUDA build of the same torch
    (pytorch/rl PR #3920)."""
    from importlib.metadata import version

    from packaging.version import Version

    return [f"{p}=={Version(version(p)).public}" for p in ("lede", "torch", "transformers", "gymnasium", "minari")]


def _describe_env(u) -> str:
    if isinstance(u, LiveEnv):
        how = (f"LEDE-Llama3-Live-v0, live backend, temperature {u.temperature}, top_p {u.top_p}, "
               + (f"top_k {u.top_k}, " if getattr(u, "top_k", None) else "") +
               f"{'wall-clock' if u.cost == 'wallclock' else 'cost-profile'} costs")
    else:
        how = "LEDE-Llama3-v0, trace backend"
    return (f"Offline experience of dynamic self-speculative decoding ({how}). "
            f"Model {u.manifest['model'].get('name')}, prompts {u.manifest.get('prompts')}, "
            f"exits {list(u.actions.exit_layers)}, k_max {u.actions.k_max}, reward {u.reward_mode}, "
            f"bonus={u.rules.bonus}, cost profile {u.profile.source}.")
