"""Dataset recipes: one YAML file per offline dataset (``datasets/NAME.yaml``), built with
``lede collect --recipe datasets/NAME.yaml``, and dataset cards generated from a dataset's
metadata.

A recipe names everything that determines the dataset::

    id: lede/smollm2-135m-instruct/humaneval-mixed-v0   # lede/<model>/<prompt-set>-<policy-mix>-v<N>
    description: one paragraph for the card
    episodes: 300
    seed: 0
    task: LEDE-Llama3-v1      # optional: start from a registered task's settings (default v0's)
    env:                      # LEDEEnv kwargs changing them (stored as the dataset's env spec)
      model: null             # null = the embedded SmolLM2-135M-Instruct
      prompts: humaneval[0:24]
      max_new_tokens: 96
      k_max: 8
      ...
    backend: trace            # or live: the real decoder (env: may add temperature, top_p, top_k, cost;
                              # the mixture may not hold oracle)
    behaviour:                # one behaviour policy per episode, drawn with these weights
      mixture: {random: 0.2, static: 0.3, heuristic: 0.1, oracle: 0.4}
      oracle_epsilon: 0.1

Every key is checked: an unknown or mistyped key is an error that names the allowed ones.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from .collect import DEFAULT_MIX

BACKENDS = ("trace", "live")
_TOP = {"id": str, "description": str, "episodes": int, "seed": int, "author": str, "code_permalink": str,
        "env": dict, "behaviour": dict, "backend": str, "task": str}
#: registered tasks a recipe may name (``task:``): their settings, which ``env:`` keys change
TASKS = ("LEDE-Llama3-v0", "LEDE-Llama3-v1")
_BEHAVIOUR = {"mixture": dict, "oracle_epsilon": (int, float)}


class RecipeError(ValueError):
    """A malformed recipe file; the message names the file, the key and the fix."""


@dataclass
class Recipe:
    """A parsed dataset recipe (see the module docstring).

    Attributes:
        path: the YAML file (``None`` for one built in code).
        dataset_id: the Minari id it builds.
        env: ``LEDE-Llama3-v0`` keyword arguments.
        mixture: behaviour policy -> weight; oracle_epsilon: random-action rate of the oracle.
        episodes, seed, author, code_permalink, description, backend: as in the YAML.
    """

    dataset_id: str
    env: dict
    mixture: dict
    oracle_epsilon: float = 0.1
    episodes: int = 200
    seed: int = 0
    author: str = "lede"
    code_permalink: str = "https://github.com/lede-project/lede"
    description: str = ""
    backend: str = "trace"
    path: Optional[Path] = field(default=None, compare=False)

    def collect_config(self):
        """The :class:`agents.collect.CollectConfig` of this recipe."""
        from .collect import CollectConfig

        return CollectConfig(dataset_id=self.dataset_id, episodes=self.episodes, mixture=dict(self.mixture),
                             oracle_epsilon=self.oracle_epsilon, seed=self.seed, author=self.author,
                             code_permalink=self.code_permalink, description=self.description)

    @property
    def card_path(self) -> Optional[Path]:
        """Where the dataset card goes: beside the recipe, ``NAME.md``."""
        return None if self.path is None else self.path.with_suffix(".md")


def _check(d: dict, schema: dict, where: str, src: str) -> None:
    unknown = sorted(set(d) - set(schema))
    if unknown:
        raise RecipeError(f"{src}: unknown key(s) {unknown} in {where}; allowed: {sorted(schema)}.")
    for k, v in d.items():
        wrong_type = v is not None and not isinstance(v, schema[k])
        if wrong_type or isinstance(v, bool):  # YAML's true/false is never a number, text or mapping here
            want = schema[k].__name__ if isinstance(schema[k], type) else " or ".join(t.__name__ for t in schema[k])
            raise RecipeError(f"{src}: {where}{k} must be {want}, got {v!r} ({type(v).__name__}).")


def env_keys() -> list[str]:
    """The ``env:`` keys a recipe may set: ``LEDEEnv``'s JSON-serialisable keyword arguments."""
    from lede_env.env import LEDEEnv

    skip = {"config", "render_mode", "progress"}
    return [p for p in inspect.signature(LEDEEnv).parameters if p not in skip]


def parse_recipe(data: Any, src: str = "<recipe>", path: Optional[Path] = None) -> Recipe:
    """Check and parse a recipe already read from YAML.

    Raises:
        RecipeError: a missing or unknown key, a wrong type, an unknown behaviour policy or
            backend, a malformed dataset id.
    """
    if not isinstance(data, dict):
        raise RecipeError(f"{src}: a recipe is a YAML mapping (id, episodes, env, behaviour, ...), "
                          f"got {type(data).__name__}.")
    _check(data, _TOP, "", src)
    for k in ("id", "env", "behaviour"):
        if k not in data:
            raise RecipeError(f"{src}: missing key {k!r} (see datasets/README.md for a complete recipe).")
    did = data["id"]
    try:
        from .store import check_dataset_id

        check_dataset_id(did)
    except ValueError as e:
        raise RecipeError(f"{src}: {e}") from None
    allowed = env_keys()
    bad = sorted(set(data["env"]) - set(allowed))
    if bad:
        raise RecipeError(f"{src}: unknown env key(s) {bad}; LEDE-Llama3-v0 takes {allowed}.")
    beh = data["behaviour"]
    _check(beh, _BEHAVIOUR, "behaviour.", src)
    mix = beh.get("mixture") or {}
    unknown = sorted(set(mix) - set(DEFAULT_MIX))
    if unknown or not mix:
        raise RecipeError(f"{src}: behaviour.mixture needs weights for {sorted(DEFAULT_MIX)} (unknown: {unknown}).")
    if any(not isinstance(w, (int, float)) or isinstance(w, bool) or w < 0 for w in mix.values()) \
            or sum(mix.values()) <= 0:
        raise RecipeError(f"{src}: behaviour.mixture weights must be non-negative numbers, not all zero: {mix}.")
    backend = data.get("backend", data["env"].get("backend", "trace"))
    if backend not in BACKENDS:
        raise RecipeError(f"{src}: backend {backend!r} is not available; use one of {BACKENDS}.")
    if data["env"].get("backend", backend) != backend:
        raise RecipeError(f"{src}: backend {backend!r} and env.backend {data['env']['backend']!r} differ; "
                          "give the backend once (top-level backend:).")
    if backend == "live" and mix.get("oracle", 0) > 0:
        raise RecipeError(f"{src}: the live backend has no oracle (it needs greedy traces): drop oracle from "
                          "behaviour.mixture.")
    task = data.get("task", "LEDE-Llama3-v0")
    if task not in TASKS:
        raise RecipeError(f"{src}: task {task!r} is not registered; use one of {TASKS}.")
    env = dict(data["env"])
    if task == "LEDE-Llama3-v1":
        from lede_env.config import STUDIED_SETTINGS

        env = {**STUDIED_SETTINGS, **env}
    if backend != "trace":
        env["backend"] = backend  # stored in the dataset's env spec
    episodes = data.get("episodes", 200)
    if episodes < 1:
        raise RecipeError(f"{src}: episodes must be >= 1, got {episodes}.")
    eps = float(beh.get("oracle_epsilon", 0.1))
    if not 0.0 <= eps <= 1.0:
        raise RecipeError(f"{src}: behaviour.oracle_epsilon must be in [0, 1], got {eps}.")
    return Recipe(dataset_id=did, env=env, mixture={k: float(v) for k, v in mix.items()},
                  oracle_epsilon=eps, episodes=int(episodes), seed=int(data.get("seed", 0)),
                  author=data.get("author", "lede"),
                  code_permalink=data.get("code_permalink", "https://github.com/lede-project/lede"),
                  description=data.get("description", ""), backend=backend, path=path)


def load_recipe(path: str | Path) -> Recipe:
    """Read and check a recipe YAML file.

    Raises:
        FileNotFoundError: no such file.
        RecipeError: invalid YAML or an invalid recipe (the message names the key and the fix).
    """
    p = Path(path)
    return parse_recipe(read_yaml(p, "recipe", "recipes live in datasets/*.yaml", RecipeError), str(p), p)


def read_yaml(path: Path, what: str, where: str, error: type[ValueError]):
    """The parsed content of the YAML file ``path`` (a recipe, a sweep file, ...).

    Raises:
        FileNotFoundError: no such file (the message names ``what`` and ``where`` such files are).
        error: the file is not valid YAML.
    """
    import yaml

    if not path.is_file():
        raise FileNotFoundError(f"No {what} file {path} ({where}).")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise error(f"{path}: not valid YAML ({e}).") from None


def build(recipe: Recipe, progress: bool = True, env=None, write_card: bool = True):
    """Collect the dataset of ``recipe`` and write its card beside the recipe.

    Args:
        env: a prebuilt env (tests); default ``LEDEEnv(**recipe.env)``.

    Returns:
        the ``minari.MinariDataset``.

    Raises:
        ValueError: the dataset exists already (see :func:`agents.collect.collect`).
    """
    from lede_env.env import LEDEEnv

    from .collect import collect

    if env is None:
        env = LEDEEnv(**recipe.env, progress=progress)
    ds = collect(env, recipe.collect_config(), progress=progress, env_spec=recipe.env)
    if write_card and recipe.card_path is not None:
        from lede_env.storage import atomic_file

        with atomic_file(recipe.card_path, suffix=".md") as tmp:
            Path(tmp).write_text(dataset_card(ds, recipe))
    return ds


def dataset_card(dataset, recipe: Optional[Recipe] = None) -> str:
    """A Markdown dataset card generated from a Minari dataset's metadata (and its recipe)."""
    m = dataset.storage.metadata
    spec = dataset.spec.env_spec

    def text(v):  # Minari keeps author and e-mail as sets
        return ", ".join(sorted(map(str, v))) if isinstance(v, (set, list, tuple)) else str(v)

    def num(v):
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    kwargs = dict(spec.kwargs) if spec is not None and spec.kwargs else {}
    lines = [f"# `{m['dataset_id']}`", "", m.get("description", ""), "",
             "| field | value |", "|---|---|",
             f"| episodes | {m.get('total_episodes')} |", f"| steps (rounds) | {m.get('total_steps')} |",
             f"| behaviour | {m.get('algorithm_name')} |",
             f"| ref_min_score (always AR) | {num(m.get('ref_min_score'))} |",
             f"| ref_max_score (oracle) | {num(m.get('ref_max_score'))} |",
             f"| action space | {dataset.action_space} |",
             f"| author | {text(m.get('author'))} |", f"| code | {m.get('code_permalink')} |",
             f"| requirements | {', '.join(m.get('requirements') or [])} |", ""]
    if kwargs:
        lines += ["Environment (`LEDE-Llama3-v0` kwargs, rebuilt by `recover_environment()`):", "",
                  "| kwarg | value |", "|---|---|"]
        for k, v in kwargs.items():
            if k == "cost_profile" and isinstance(v, dict):  # a measured profile, stored whole in the spec
                from lede_env.costs import CostProfile

                v = f"{v.get('source')} profile stored in the spec (AR step {1000 * CostProfile(**v).ar_step:.1f} ms)"
            lines.append(f"| {k} | `{v}` |")
        lines.append("")
    obs = dataset.observation_space
    if hasattr(obs, "spaces"):
        lines += ["Observation (Dict; Minari stores T+1 observations and T actions per episode):", ""]
        lines += [f"- `{k}`: {s.shape} {s.dtype}" for k, s in obs.spaces.items()]
        lines.append("")
    import numpy as np

    from .store import STEP_INFO_KEYS

    lines += ["Per-step infos (Minari `infos`, T+1 entries per episode, the same keys at every step; entry 0 is "
              "the reset: -1 in the round fields, cost 0): what each round did:", ""]
    lines += [f"- `{k}`: {np.dtype(dt).name}" for k, dt in STEP_INFO_KEYS.items()]
    lines.append("")
    lines += ["Load it:", "", "```python", "import minari", f"ds = minari.load_dataset({m['dataset_id']!r})",
              "env = ds.recover_environment()   # loads the model and its cached traces", "```", ""]
    if recipe is not None and recipe.path is not None:
        lines += [f"Rebuild it: `lede collect --recipe {recipe.path.as_posix()}`", ""]
    return "\n".join(lines)
