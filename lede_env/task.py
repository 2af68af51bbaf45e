"""Every setting of the task an agent plays, in one place.

An env's *task settings* are the :class:`~lede_env.env.LEDEEnv` keyword arguments that fix what a
policy sees (observation), what it may do (actions), the rules its rounds follow (bonus token,
layer reuse, in-round stop rule, context drafter) and what they cost (cost profile, reward):
:data:`TASK_KEYS`. They are JSON values, and ``LEDEEnv(**settings, model=..., prompts=...)``
rebuilds that task on any prompts.

``lede export`` writes an env's settings (:func:`env_settings`) into ``policy.json`` under
``"env"``, and every command that plays an exported agent (``lede evaluate``, ``lede generate``,
:class:`~lede_env.generate.Lede`, transformers' ``generate(custom_generate=lede_generate)``, the
notebooks) builds its env or decoder from them alone, through :func:`settings_for`: a setting
given beside the agent that contradicts it is a one-line ``ValueError`` naming both values, a
policy that needs copy actions (``copy-else:M,E,T``, ``static:0,K``) switches them on itself.
Agents exported before ``"env"`` existed are read from their older keys (:func:`agent_settings`;
what they never recorded, ``calib_prompts`` and ``cost_profile``, comes from the command).

The model (``model``, ``device``, ``dtype``), the prompts, ``max_new_tokens`` and the sampling
settings are not task settings: they are chosen where a policy is played.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

from .config import TaskConfig
from .mdp import ObservationConfig
from .policies import copy_lengths, tree_budgets_of

#: the LEDEEnv keyword arguments that fix the task (observation, actions, rules, costs)
TASK_KEYS = ("exit_layers", "k_max", "head_kind", "draft_vocab", "feature_vocab", "calib_prompts",
             "bonus", "reuse", "stop_rule", "stop_threshold", "reward_mode", "reward_lambda", "cost_profile",
             "obs_kind", "obs_hidden_dim", "obs_history", "obs_recent_tokens", "obs_stat_exits",
             "obs_context_agreement", "obs_context_span", "context_draft", "context_lengths", "context_datastore",
             "tree_budgets", "tree_depth")
#: task settings that ``policy.json`` files written before ``"env"`` existed do not record
UNRECORDED_BEFORE = ("calib_prompts", "cost_profile")

__all__ = ["TASK_KEYS", "task_defaults", "normalise", "observation_config", "env_settings", "agent_settings",
           "read_agent_settings", "agent_folders", "settings_for", "task_for"]


def task_defaults() -> dict:
    """``LEDEEnv``'s own default of every task setting (the default :class:`~lede_env.config.TaskConfig`'s),
    normalised."""
    defaults = TaskConfig().to_kwargs()
    return normalise({k: defaults[k] for k in TASK_KEYS})


def normalise(settings: dict) -> dict:
    """Task settings in one canonical JSON form, so that equal settings compare equal: lists for
    ``exit_layers`` (``None`` or empty: ``None``, the default exits), ``context_lengths`` and ``tree_budgets``,
    ``None`` for ``stop_rule="none"``, ints, floats and bools where the env takes them.

    Args:
        settings: any subset of :data:`TASK_KEYS` (other keys pass through unchanged).

    Raises:
        ValueError: a value of the wrong type (e.g. ``k_max="four"``), naming the setting.
    """
    out = dict(settings)
    try:
        for k, v in settings.items():
            if k == "exit_layers":
                ex = [x for x in v.replace(" ", "").split(",") if x] if isinstance(v, str) else v
                out[k] = [int(x) for x in ex] if ex else None
            elif k in ("context_lengths", "tree_budgets"):
                out[k] = [int(x) for x in (v or ())]
            elif k == "stop_rule":
                out[k] = None if v in (None, "none") else str(v)
            elif k in ("k_max", "context_draft", "tree_depth", "obs_hidden_dim", "obs_history", "obs_recent_tokens",
                       "obs_stat_exits", "feature_vocab") and not isinstance(v, bool):
                out[k] = int(v)
            elif k == "draft_vocab":
                out[k] = None if v is None else int(v)
            elif k == "stop_threshold":
                out[k] = None if v is None else float(v)
            elif k == "reward_lambda":
                out[k] = v if v == "auto" else float(v)
            elif k in ("bonus", "reuse", "obs_context_agreement", "obs_context_span", "context_datastore"):
                out[k] = bool(v)
    except (TypeError, ValueError):
        raise ValueError(f"Bad task setting {k}={v!r}.") from None
    return out


def observation_config(settings: dict) -> ObservationConfig:
    """The observation of the task ``settings`` (complete :data:`TASK_KEYS`): the ``obs_*``
    settings, with the context drafter's features on exactly where the task has context drafts
    (``context_draft > 0`` or ``context_lengths``). The one rule the env and the decoder of
    :class:`~lede_env.generate.Lede` follow.

    Raises:
        ValueError: a bad observation setting (see :class:`~lede_env.mdp.ObservationConfig`).
    """
    context = int(settings["context_draft"]) > 0 or bool(settings["context_lengths"])
    return ObservationConfig(settings["obs_hidden_dim"], settings["obs_history"], settings["obs_recent_tokens"],
                             kind=settings["obs_kind"], stat_exits=settings["obs_stat_exits"], context=context,
                             context_agreement=bool(settings["obs_context_agreement"]) and context,
                             context_span=bool(settings["obs_context_span"]) and context)


def env_settings(env) -> dict:
    """Every task setting of a built env, resolved (the exits it chose, the lambda it computed,
    what its observation switched on), normalised: what ``lede export`` writes.

    Args:
        env: a ``LEDE-Llama3-v0`` or ``LEDE-Llama3-Live-v0`` env (wrapped or not).

    Returns:
        ``{key: value for key in TASK_KEYS}``. ``cost_profile`` is what the env was given
        (``"analytic"``, ``"measured"``, a path or a dict), or the injected profile itself as a dict;
        ``context_datastore`` is whether context drafts fall back to a datastore (``policy.json``
        also keeps its fingerprint).
    """
    u = env.unwrapped
    heads = u.manifest.get("heads", {})
    o = u.obs_config
    return normalise({
        "exit_layers": list(u.actions.exit_layers), "k_max": u.actions.k_max,
        "head_kind": heads.get("kind"), "draft_vocab": heads.get("draft_vocab"),
        "feature_vocab": heads.get("feature_vocab", 1024), "calib_prompts": u.task_config.heads.calib_prompts,
        "bonus": u.rules.bonus, "reuse": u.rules.reuse, "stop_rule": u.task_config.rules.stop_rule,
        "stop_threshold": u.rules.stop_threshold, "reward_mode": u.reward_mode, "reward_lambda": u.reward_lambda,
        "cost_profile": u.cost_profile_spec, "obs_kind": o.kind, "obs_hidden_dim": o.hidden_dim,
        "obs_history": o.history, "obs_recent_tokens": o.recent_tokens, "obs_stat_exits": o.stat_exits,
        "obs_context_agreement": o.context_agreement, "obs_context_span": o.context_span,
        "context_draft": u.rules.context_draft, "context_lengths": list(u.actions.context_lengths),
        "context_datastore": u.rules.datastore is not None, "tree_budgets": list(u.actions.tree_budgets),
        "tree_depth": u.rules.tree_depth})


def agent_settings(cfg: dict) -> dict:
    """The task settings of an exported agent, from its ``policy.json`` contents.

    ``"task_config"`` (the resolved :class:`~lede_env.config.TaskConfig`, written by ``lede export``
    since it exists) gives them; else ``"env"`` (written by ``lede export`` since it exists) holds them all; a key a later version
    adds is missing from it and takes ``LEDEEnv``'s default. A ``policy.json`` of the previous
    format is read from its older keys (``exit_layers``, ``k_max``, ``bonus``, ``heads``,
    ``observation``, ``stop_rule``, ``reward_*``, ``context_*``), missing ones as the defaults
    of that version (no layer-reuse switch: reuse on); it never recorded ``calib_prompts`` or
    ``cost_profile`` (:data:`UNRECORDED_BEFORE`), which are then absent: the command's options
    or defaults give them.

    Raises:
        ValueError: a config that is not an exported agent's.
    """
    if "task_config" in cfg:  # (written by ``lede export`` since the task config exists: the whole task)
        flat = TaskConfig.from_dict(cfg["task_config"]).to_kwargs()
        return normalise({k: flat[k] for k in TASK_KEYS})
    if "env" in cfg:
        d = task_defaults()
        return normalise({**{k: d[k] for k in TASK_KEYS if k not in cfg["env"]}, **cfg["env"]})
    if "exit_layers" not in cfg or "k_max" not in cfg:
        raise ValueError("Not an exported agent's policy.json (no exit_layers / k_max): run `lede export`.")
    d = task_defaults()
    obs, heads = cfg.get("observation", {}), cfg.get("heads", {})
    stop = cfg.get("stop_rule") or {"kind": "none"}
    lam = cfg.get("reward_lambda", stop.get("lambda", "auto"))
    return normalise({
        "exit_layers": cfg["exit_layers"], "k_max": cfg["k_max"],
        "head_kind": heads.get("kind", d["head_kind"]),
        "draft_vocab": heads["draft_vocab"] if "draft_vocab" in heads else d["draft_vocab"],
        "feature_vocab": heads.get("feature_vocab", d["feature_vocab"]),
        "bonus": cfg.get("bonus", d["bonus"]), "reuse": d["reuse"],
        "stop_rule": "calibrated" if stop.get("kind") == "calibrated" else None,
        "stop_threshold": stop["threshold"] if stop.get("kind") == "threshold" else None,
        "reward_mode": cfg.get("reward_mode", d["reward_mode"]), "reward_lambda": lam,
        "obs_kind": obs.get("kind", d["obs_kind"]), "obs_hidden_dim": obs.get("hidden_dim", d["obs_hidden_dim"]),
        "obs_history": obs.get("history", d["obs_history"]),
        "obs_recent_tokens": obs.get("recent_tokens", d["obs_recent_tokens"]),
        "obs_stat_exits": obs.get("stat_exits", d["obs_stat_exits"]),
        "obs_context_agreement": obs.get("context_agreement", False),
        "obs_context_span": obs.get("context_span", False),
        "context_draft": cfg.get("context_draft", 0), "context_lengths": cfg.get("context_lengths", []),
        "context_datastore": bool(cfg.get("context_datastore")), "tree_budgets": [], "tree_depth": d["tree_depth"]})


def read_agent_settings(folder: "str | Path") -> dict:
    """:func:`agent_settings` of the exported agent in ``folder`` (its ``policy.json``).

    Raises:
        FileNotFoundError: no ``policy.json`` there.
        ValueError: not an exported agent's config.
    """
    path = Path(folder) / "policy.json"
    if not path.exists():
        raise FileNotFoundError(f"No exported agent in {folder} (policy.json missing): run `lede export` first.")
    return agent_settings(json.loads(path.read_text()))


#: policy-name prefixes of an exported agent's folder
AGENT_PREFIXES = ("agent:", "agent-unguarded:")


def agent_path(policy: str) -> Optional[Path]:
    """The exported-agent folder named by ``policy`` (``agent:PATH``, ``agent-unguarded:PATH`` or
    a folder with ``policy.json``), else ``None``.

    Raises:
        ValueError: a name with an agent prefix whose folder holds no ``policy.json``.
    """
    prefix = next((x for x in AGENT_PREFIXES if policy.startswith(x)), "")
    p = Path(policy[len(prefix):])
    if (p / "policy.json").exists():
        return p
    if prefix:
        raise ValueError(f"No exported agent in {p} (policy.json missing): run `lede export` first.")
    return None


def agent_folders(policies: Sequence[str]) -> list[Path]:
    """The exported-agent folders the policy names play (``agent:PATH``, ``agent-unguarded:PATH``,
    a bare folder, also inside ``guarded:``), each once, in order.

    Raises:
        ValueError: a name with an agent prefix whose folder holds no ``policy.json``.
    """
    out: list[Path] = []
    for name in policies:
        while name.startswith("guarded:"):
            name = name[len("guarded:"):]
        p = agent_path(name)
        if p is not None and p not in out:
            out.append(p)
    return out


#: how a cost profile's ``source`` (:class:`~lede_env.costs.CostProfile`) was made, by the name that makes it
PROFILE_SOURCES = {"analytic": ("analytic",), "measured": ("in-loop",), "isolated": ("measured",),
                   "reference": ("reference",)}


def _agree(key: str, given, agent) -> bool:
    """Whether a ``given`` task setting says the same as the agent's. Equal values agree, and a
    cost profile named by how it is made (``"analytic"``, ``"measured"``, ``"isolated"``) agrees
    with an agent's profile dict made that way: an agent trained on a dataset records the profile
    itself (datasets store it so that a recovered env charges the same costs), and the command
    that names it then uses its own (for ``"analytic"`` the same values on the same model; for
    ``"measured"`` the costs measured on the machine at hand)."""
    if given == agent:
        return True
    if key == "cost_profile" and isinstance(given, str) and isinstance(agent, dict):
        return agent.get("source", "analytic") in PROFILE_SOURCES.get(given, ())
    return False


def settings_for(policies: Sequence[str], given: Optional[dict] = None, defaults: Optional[dict] = None) -> dict:
    """The task settings of the env or decoder that plays ``policies``: the one way ``lede
    evaluate``, ``lede generate`` and :class:`~lede_env.generate.Lede` decide them.

    1. The exported agents among the names (:func:`agent_folders`) give theirs; several agents
       must have the same ones (one env plays them all).
    2. ``given`` settings (the caller's options; only those given) must equal the agent's; with no
       agent, or for a setting the agent did not record, they are used. A cost profile named by how
       it is made agrees with an agent's profile dict made that way (an agent trained on a dataset
       records the dict) and is then used (``"measured"``: the costs of the machine at hand).
    3. Copy actions the named policies play (:func:`~lede_env.policies.copy_lengths`) are switched
       on (beside the ``defaults``' own) where neither an agent nor ``given`` fixed
       ``context_lengths``; else they must be in it. Tree actions (``tree:B``, ``tree-rule:B,L``:
       :func:`~lede_env.policies.tree_budgets_of`) likewise, in ``tree_budgets``.
    4. ``defaults`` (the command's own), then ``LEDEEnv``'s, give the rest. A datastore is only
       kept where there are context drafts.

    Args:
        policies: policy names (non-string policies are left out by the caller).
        given: ``{key: value}`` of :data:`TASK_KEYS` the caller was given explicitly.
        defaults: the caller's defaults for settings neither an agent nor ``given`` fixes.

    Returns:
        ``{key: value for key in TASK_KEYS}``, normalised (LEDEEnv keyword arguments).

    Raises:
        ValueError: one line: a given setting that contradicts an agent's (both values named),
            agents trained in different envs, a copy policy whose copy length the fixed
            ``context_lengths`` lack, or a badly typed setting.
        FileNotFoundError: ``agent:PATH`` without an exported agent there.
    """
    given = normalise(dict(given or {}))
    unknown = sorted(set(given) - set(TASK_KEYS))
    if unknown:
        raise ValueError(f"Not task settings: {unknown}; they are {list(TASK_KEYS)}.")
    fixed: dict = {}
    where: dict = {}  # setting -> who fixed it (for the messages)
    for folder in agent_folders(policies):
        s = read_agent_settings(folder)
        for k, v in s.items():
            if k in fixed and fixed[k] != v:
                raise ValueError(f"The agents {where[k]} and {folder} were trained in different envs ({k}={fixed[k]!r} "
                                 f"against {k}={v!r}): evaluate them in separate runs.")
            fixed[k], where[k] = v, str(folder)
    for k, v in given.items():
        if k in fixed and not _agree(k, v, fixed[k]):
            raise ValueError(f"{k}={v!r} (given) contradicts the agent's {k}={fixed[k]!r} ({where[k]}): leave the "
                             "option out (the agent's own is used) or play an agent trained with it.")
        if k not in fixed or k == "cost_profile":  # (an agreeing profile name: the command's own)
            fixed[k], where[k] = v, "given"
    _switch_on(fixed, where, policies, defaults, "context_lengths", copy_lengths, "copies up to {} tokens",
               "copy action", "context lengths")
    _switch_on(fixed, where, policies, defaults, "tree_budgets", tree_budgets_of, "verifies trees of {} nodes",
               "tree action", "tree budgets")
    out = {**task_defaults(), **normalise(dict(defaults or {})), **fixed}
    if not (out["context_draft"] or out["context_lengths"] or out["tree_budgets"]):
        out["context_datastore"] = False  # (a datastore only backs context drafts and trees)
    return out


def _switch_on(fixed: dict, where: dict, policies, defaults, key: str, needs, does: str, action: str,
               plural: str) -> None:
    """Step 3 of :func:`settings_for` for the setting ``key`` (``context_lengths`` or
    ``tree_budgets``): the values the named policies need (``needs(name)``) are added to the
    defaults' where nothing fixed ``key``, else they must be in it (``ValueError`` naming the
    policy, the value and the fix)."""
    need = sorted({m for name in policies for m in needs(name)})
    if need and key in fixed:
        have = fixed[key]
        for name in policies:
            missing = [m for m in needs(name) if m not in have]
            if missing:
                whose = "given" if where[key] == "given" else f"the agent's, {where[key]}"
                raise ValueError(f"{name} {does.format(missing[0])}, but {key}={have!r} ({whose}) has no such "
                                 f"{action}: add {missing[0]} to the {plural} or play it in a separate run.")
    elif need:  # (the command's own values kept: a policy adds its own, never removes any)
        base = normalise(dict(defaults or {})).get(key) or []
        fixed[key] = sorted(set(base) | set(need))


def task_for(policies: Sequence[str], given: Optional[dict] = None, defaults: Optional[dict] = None,
             **played) -> TaskConfig:
    """The task config of the env that plays ``policies``: :func:`settings_for`'s task settings
    (an exported agent's own, its stored ``task_config``), with the settings chosen where the
    policies are played (``model``, ``device``, ``dtype``, ``prompts``, ``max_new_tokens``,
    sampling, ``backend``). What ``lede evaluate`` builds its envs from.

    Args:
        policies, given, defaults: as :func:`settings_for`.
        played: flat env keywords that are not task settings (:data:`TASK_KEYS`).

    Raises:
        ValueError: as :func:`settings_for`; a task setting among ``played`` (give it in
            ``given``, where it is checked against the agents').
        TypeError: a keyword that is no env setting.
    """
    clash = sorted(set(played) & set(TASK_KEYS))
    if clash:
        raise ValueError(f"{clash} are task settings: pass them in given= (checked against the agents' own).")
    return TaskConfig.from_kwargs(**settings_for(policies, given, defaults), **played)
