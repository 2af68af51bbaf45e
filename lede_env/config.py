"""The task config: every setting that defines a LEDE MDP, in one typed, frozen, validated object.

A :class:`TaskConfig` is what a registered task, a dataset's env spec, an exported agent and the
CLI share. It is made of parts, one per concern, each a frozen dataclass that checks itself:

========================= ====================================================================
part                      settings (flat env keyword in brackets)
========================= ====================================================================
:class:`ModelConfig`      model id or path [model], device [device], weight dtype [dtype]
``prompts``               prompt spec [prompts], token budget [max_new_tokens]
:class:`HeadConfig`       exits [exit_layers], head kind [head_kind], vocabularies
                          [draft_vocab, feature_vocab], calibration prompts [calib_prompts]
:class:`ObsConfig`        observation layout [obs_kind, obs_hidden_dim, obs_history,
                          obs_recent_tokens, obs_stat_exits, obs_context_agreement,
                          obs_context_span]
:class:`RulesConfig`      the round's rules [k_max, bonus, reuse, stop_threshold, stop_rule,
                          context_draft, context_lengths, context_datastore]
:class:`RewardConfig`     reward and costs [reward_mode, reward_lambda, cost_profile, cost]
:class:`SamplingConfig`   [temperature, top_p, top_k]
``backend``               ``"trace"`` (exact replay) or ``"live"`` (the real decoder) [backend]
========================= ====================================================================

Flat keywords stay the thin way in (``gym.make(id, **kwargs)``, env specs stored in datasets):
:meth:`TaskConfig.from_kwargs` builds a config from them and :meth:`TaskConfig.to_kwargs` gives
them back; :meth:`TaskConfig.to_json` / :meth:`TaskConfig.from_json` round-trip the nested form.
Objects (a loaded model, exit heads, traces, a cost profile, a datastore) are never part of a
config: the env's classmethod constructors inject them.

This module holds data only and imports nothing of lede's but the prompt defaults.
"""

from __future__ import annotations

import json
import math
import numbers
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Optional, Union

from .prompts import DEFAULT_CALIB, DEFAULT_MAX_NEW, DEFAULT_TRAIN

REWARD_MODES = ("relative", "net", "ratio")
#: in-round stop rules the env builds by name (``stop_rule=``)
STOP_RULES = ("calibrated",)
BACKENDS = ("trace", "live")
COST_SOURCES = ("profile", "wallclock")
HEAD_KINDS = ("lens", "affine", "affine-kl", "affine-kl-prev")
#: observation layouts (:class:`ObsConfig`)
OBSERVATION_KINDS = ("full", "compact")
DTYPES = ("fp32", "bf16", "fp16")


def _is_int(x: Any) -> bool:
    """An integer (Python's or NumPy's), not a bool."""
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _set(obj, name: str, value) -> None:
    """Normalise a field of a frozen dataclass in its ``__post_init__``."""
    object.__setattr__(obj, name, value)


@dataclass(frozen=True)
class ModelConfig:
    """Which model, where.

    Attributes:
        name: a transformers model id or local path; ``None``: the embedded SmolLM2-135M-Instruct.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"auto"``; ``None``: ``$LEDE_DEVICE`` or cpu.
        dtype: ``"fp32"``, ``"bf16"``, ``"fp16"``; ``None``: bf16 on CUDA, fp32 on CPU (part of the
            traces' and cost profiles' cache keys: bf16 changes the greedy continuation).
    """

    name: Optional[str] = None
    device: Optional[str] = None
    dtype: Optional[str] = None

    def __post_init__(self) -> None:
        if self.name is not None and not isinstance(self.name, str):
            raise TypeError(f"model={self.name!r}: give a model id or path (a string), or None for the embedded "
                            "model; a loaded model goes to the env's with_objects(...) constructor.")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r}; choose one of {DTYPES} or None (bf16 on CUDA, fp32 on CPU).")


@dataclass(frozen=True)
class HeadConfig:
    """The exit heads that draft and that observation features read.

    Attributes:
        exit_layers: candidate exits, strictly increasing layer numbers (``None``: every 2nd layer
            below L). A comma-separated string (``"2,4,6"``) is accepted and stored as a tuple.
        kind: ``"lens"``, ``"affine"``, ``"affine-kl"`` or ``"affine-kl-prev"`` (see
            :mod:`lede_env.exits`).
        draft_vocab: truncated draft vocabulary (tokens; ``None`` = the full vocabulary).
        feature_vocab: vocabulary of the observation's head statistics (tokens).
        calib_prompts: prompt spec whose greedy continuations fit the heads.
    """

    exit_layers: Optional[tuple[int, ...]] = None
    kind: str = "affine-kl"
    draft_vocab: Optional[int] = 8192
    feature_vocab: int = 1024
    calib_prompts: str = DEFAULT_CALIB

    def __post_init__(self) -> None:
        _set(self, "exit_layers", normalize_exit_layers(self.exit_layers))
        if self.kind not in HEAD_KINDS:
            raise ValueError(f"head_kind={self.kind!r}; choose one of {HEAD_KINDS}.")
        if self.draft_vocab is not None and not (_is_int(self.draft_vocab) and self.draft_vocab > 0):
            raise ValueError(f"draft_vocab={self.draft_vocab!r} must be a positive integer (tokens) or None.")
        if not (_is_int(self.feature_vocab) and self.feature_vocab > 0):
            raise ValueError(f"feature_vocab={self.feature_vocab!r} must be a positive integer (tokens).")
        if not isinstance(self.calib_prompts, str):
            raise TypeError(f"calib_prompts={self.calib_prompts!r} must be a prompt spec (a string).")


def normalize_exit_layers(exit_layers) -> Optional[tuple[int, ...]]:
    """Exit layers as a tuple of ints (``None`` or empty: the default exits).

    Args:
        exit_layers: any sequence of layer numbers or a comma-separated string (``"2,4,6"``).

    Raises:
        ValueError: an exit that is not a positive integer, or exits not strictly increasing.
    """
    ex = exit_layers
    if isinstance(ex, str):
        ex = [x for x in ex.replace(" ", "").split(",") if x]
    if ex is None or len(ex) == 0:
        return None
    try:
        ex = tuple(int(x) for x in ex)
    except (TypeError, ValueError):
        raise ValueError(f"exit_layers={exit_layers!r}: give layer numbers, e.g. (2, 4, 6) or '2,4,6'.") from None
    if ex[0] < 1 or any(b <= a for a, b in zip(ex, ex[1:])):
        raise ValueError(f"exit_layers={ex}: exits must be positive and strictly increasing, e.g. (2, 4, 6).")
    return ex


@dataclass(frozen=True)
class ObsConfig:
    """What the agent observes (see :class:`lede_env.mdp.ObservationBuilder` for the keys).

    Attributes:
        kind: ``"full"`` (hidden-state context and every exit's head statistics) or
            ``"compact"`` (what the rounds already computed, the shallowest ``stat_exits`` exits'
            head statistics and running per-exit acceptance).
        hidden_dim: width of the projected hidden state (``"full"`` only; 0 keeps d).
        history: past rounds summarised.
        recent_tokens: recent token ids (``"full"`` only).
        stat_exits: ``"compact"`` only: how many of the shallowest exits' statistics.
        context_agreement: with context drafts, the ``context`` key also holds the matched
            n-gram's occurrences and how far their continuations agree.
        context_span: with context drafts, the ``context`` key also holds the matched span.
    """

    kind: str = "full"
    hidden_dim: int = 64
    history: int = 4
    recent_tokens: int = 8
    stat_exits: int = 1
    context_agreement: bool = False
    context_span: bool = False

    def __post_init__(self) -> None:
        if self.kind not in OBSERVATION_KINDS:
            raise ValueError(f"obs_kind={self.kind!r}; choose one of {OBSERVATION_KINDS}.")
        for name in ("hidden_dim", "history", "recent_tokens", "stat_exits"):
            v = getattr(self, name)
            if not (_is_int(v) and v >= 0):
                raise ValueError(f"obs_{name}={v!r} must be an integer >= 0.")
        _set(self, "context_agreement", bool(self.context_agreement))
        _set(self, "context_span", bool(self.context_span))


@dataclass(frozen=True)
class RulesConfig:
    """The rules of a round, shared by trace replay and the real decoder.

    Attributes:
        k_max: largest speculation length (tokens).
        bonus: verify K+1 positions (the last draft token also runs layers 1..E; a fully accepted
            round earns the verifier's bonus token) instead of K.
        reuse: verification runs only layers E+1..L on drafted positions (compute reuse).
        stop_threshold: confidence-threshold drafting (Draft & Verify, arXiv 2309.08168): stop
            after the first draft token whose probability is below it (K is a cap); ``None``: off.
        stop_rule: an in-round stop rule by name (``"calibrated"``) or ``None``.
        context_draft: most tokens action 0 copies from the context (0: a plain AR step).
        context_lengths: copy lengths of the context actions (tokens, strictly increasing).
        context_datastore: where the context has no match, draft from the model's datastore.
        tree_budgets: node budgets of the tree actions (token trees from a suffix index,
            :func:`lede_env.trees.round_tree`; strictly increasing, 1..64; () : none).
        tree_depth: longest branch of a tree action's tree (tokens, 1..64).
    """

    k_max: int = 8
    bonus: bool = True
    reuse: bool = True
    stop_threshold: Optional[float] = None
    stop_rule: Optional[str] = None
    context_draft: int = 0
    context_lengths: tuple[int, ...] = ()
    context_datastore: bool = False
    tree_budgets: tuple[int, ...] = ()
    tree_depth: int = 8

    def __post_init__(self) -> None:
        if not (_is_int(self.k_max) and 1 <= self.k_max <= 64):
            raise ValueError(f"k_max={self.k_max!r} must be an integer in 1..64 (tokens; the paper caps K at 12).")
        _set(self, "k_max", int(self.k_max))
        _set(self, "bonus", bool(self.bonus))
        _set(self, "reuse", bool(self.reuse))
        if self.stop_rule is not None and self.stop_rule not in STOP_RULES:
            raise ValueError(f"stop_rule={self.stop_rule!r}; choose one of {STOP_RULES} or None (stop_threshold= for "
                             "a fixed probability threshold).")
        if self.stop_threshold is not None:
            if self.stop_rule is not None:
                raise ValueError("Give stop_rule or stop_threshold, not both.")
            try:
                t = float(self.stop_threshold)
            except (TypeError, ValueError):
                t = math.nan
            if not 0.0 < t < 1.0:
                raise ValueError(f"stop_threshold={self.stop_threshold!r} must be a probability in (0, 1), or None.")
            _set(self, "stop_threshold", t)
        if not (_is_int(self.context_draft) and self.context_draft >= 0):
            raise ValueError(f"context_draft={self.context_draft!r} must be an integer >= 0 (most tokens a context "
                             "draft copies on action 0; 0: action 0 is a plain AR step).")
        _set(self, "context_draft", int(self.context_draft))
        lengths = tuple(() if self.context_lengths is None else self.context_lengths)
        if any(not _is_int(x) or not 1 <= x <= 64 for x in lengths) or any(b <= a for a, b in zip(lengths, lengths[1:])):
            raise ValueError(f"context_lengths={self.context_lengths!r} must be strictly increasing integers in 1..64 "
                             "(most copied tokens each context action verifies), e.g. (1, 2, 3, 4, 6, 8).")
        _set(self, "context_lengths", tuple(int(x) for x in lengths))
        budgets = tuple(() if self.tree_budgets is None else self.tree_budgets)
        if any(not _is_int(x) or not 1 <= x <= 64 for x in budgets) or any(b <= a for a, b in zip(budgets, budgets[1:])):
            raise ValueError(f"tree_budgets={self.tree_budgets!r} must be strictly increasing integers in 1..64 "
                             "(most nodes each tree action verifies), e.g. (4, 8).")
        _set(self, "tree_budgets", tuple(int(x) for x in budgets))
        if not (_is_int(self.tree_depth) and 1 <= self.tree_depth <= 64):
            raise ValueError(f"tree_depth={self.tree_depth!r} must be an integer in 1..64 (longest branch of a tree, "
                             "tokens).")
        _set(self, "tree_depth", int(self.tree_depth))
        if not isinstance(self.context_datastore, bool):
            raise TypeError(f"context_datastore={self.context_datastore!r}: give True or False in a config (a "
                            "NgramDatastore object goes to the env's with_objects(...) constructor).")
        if self.context_datastore and not (self.has_context or self.tree_budgets):
            raise ValueError("context_datastore drafts where the context has no match, so it needs context drafts or "
                             "trees: give context_draft > 0, context_lengths or tree_budgets.")

    @property
    def has_context(self) -> bool:
        """Whether any action copies from the context."""
        return self.context_draft > 0 or bool(self.context_lengths)


@dataclass(frozen=True)
class RewardConfig:
    """What a round earns and what it is charged.

    Attributes:
        mode: ``"relative"`` (tokens - lambda x cost), ``"net"`` (tokens - cost) or ``"ratio"``
            (tokens / cost); see :class:`lede_env.env.LEDEEnv`.
        lambda_: ``"auto"`` (the best static throughput on the env's traces) or a throughput > 0
            (tokens per AR-step unit) [flat keyword ``reward_lambda``].
        cost_profile: ``"reference"`` (shipped, measured on the reference machine: the same costs on
            every machine), ``"measured"`` (timed on this machine), ``"analytic"``, a JSON path, or
            the profile as a dict.
        cost: ``"profile"`` (deterministic) or ``"wallclock"`` (live backend only).
    """

    mode: str = "relative"
    lambda_: Union[float, str] = "auto"
    cost_profile: Union[str, dict] = "analytic"
    cost: str = "profile"

    def __post_init__(self) -> None:
        if self.mode not in REWARD_MODES:
            raise ValueError(f"reward_mode={self.mode!r}; choose one of {REWARD_MODES}.")
        lam = self.lambda_
        if not (lam == "auto" or (isinstance(lam, (int, float)) and not isinstance(lam, bool)
                                  and math.isfinite(lam) and lam > 0)):
            raise ValueError(f"reward_lambda={lam!r}; give 'auto' (the best static throughput on the env's traces) "
                             "or a throughput > 0 in tokens per AR-step unit.")
        if lam != "auto":
            _set(self, "lambda_", float(lam))
        if not isinstance(self.cost_profile, (str, dict)):
            raise TypeError(f"cost_profile={self.cost_profile!r}: give 'analytic', 'measured', a JSON path or the "
                            "profile as a dict (a CostProfile object goes to the env's with_objects(...)).")
        if self.cost not in COST_SOURCES:
            raise ValueError(f"cost={self.cost!r}; choose 'profile' (the cost profile, deterministic) or 'wallclock' "
                             "(measured round time / AR step time, live backend only).")


@dataclass(frozen=True)
class SamplingConfig:
    """Decoding temperature and truncation (greedy when ``temperature == 0``).

    Attributes:
        temperature: >= 0; 0 = greedy (> 0 needs the live backend).
        top_p: nucleus mass in (0, 1] (1 = off).
        top_k: keep the k most likely tokens (``None`` = off; 0 is stored as ``None``).
    """

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: Optional[int] = None

    def __post_init__(self) -> None:
        try:
            t, p = float(self.temperature), float(self.top_p)
        except (TypeError, ValueError):
            raise ValueError(f"temperature and top_p must be numbers, got {self.temperature!r}, {self.top_p!r}.") from None
        if not (math.isfinite(t) and t >= 0):
            raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {t}.")
        if not 0 < p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (1 = no nucleus truncation), got {p}.")
        k = self.top_k
        if k is not None and not (_is_int(k) and k >= 0):
            raise ValueError(f"top_k must be an integer >= 0 (the most likely tokens kept when sampling; 0 or None: "
                             f"off), got {k!r}.")
        _set(self, "temperature", t)
        _set(self, "top_p", p)
        _set(self, "top_k", int(k) if k else None)


#: flat env keyword -> (part, field) of :class:`TaskConfig` (part ``None``: a top-level field)
FLAT_KEYS: dict[str, tuple[Optional[str], str]] = {
    "model": ("model", "name"), "device": ("model", "device"), "dtype": ("model", "dtype"),
    "prompts": (None, "prompts"), "max_new_tokens": (None, "max_new_tokens"),
    "exit_layers": ("heads", "exit_layers"), "head_kind": ("heads", "kind"),
    "draft_vocab": ("heads", "draft_vocab"), "feature_vocab": ("heads", "feature_vocab"),
    "calib_prompts": ("heads", "calib_prompts"),
    "obs_kind": ("observation", "kind"), "obs_hidden_dim": ("observation", "hidden_dim"),
    "obs_history": ("observation", "history"), "obs_recent_tokens": ("observation", "recent_tokens"),
    "obs_stat_exits": ("observation", "stat_exits"), "obs_context_agreement": ("observation", "context_agreement"),
    "obs_context_span": ("observation", "context_span"),
    "k_max": ("rules", "k_max"), "bonus": ("rules", "bonus"), "reuse": ("rules", "reuse"),
    "stop_threshold": ("rules", "stop_threshold"), "stop_rule": ("rules", "stop_rule"),
    "context_draft": ("rules", "context_draft"), "context_lengths": ("rules", "context_lengths"),
    "context_datastore": ("rules", "context_datastore"), "tree_budgets": ("rules", "tree_budgets"),
    "tree_depth": ("rules", "tree_depth"),
    "reward_mode": ("reward", "mode"), "reward_lambda": ("reward", "lambda_"),
    "cost_profile": ("reward", "cost_profile"), "cost": ("reward", "cost"),
    "temperature": ("sampling", "temperature"), "top_p": ("sampling", "top_p"), "top_k": ("sampling", "top_k"),
    "backend": (None, "backend"),
}
_PARTS = {"model": ModelConfig, "heads": HeadConfig, "observation": ObsConfig, "rules": RulesConfig,
          "reward": RewardConfig, "sampling": SamplingConfig}


def _prompts(p):
    """A prompt spec (str), or prompts as token-id lists (live backend) stored as nested tuples."""
    if isinstance(p, str):
        return p
    try:
        out = tuple(tuple(int(t) for t in ids) for ids in p)
    except TypeError:
        raise TypeError(f"prompts={p!r}: give a prompt spec (e.g. 'humaneval[0:8]', a .jsonl path) or, with the "
                        "live backend, prompts as lists of token ids.") from None
    if not out or any(len(ids) == 0 for ids in out):
        raise ValueError("prompts as token ids must be a non-empty list of non-empty token-id lists.")
    return out


@dataclass(frozen=True)
class TaskConfig:
    """Every setting that defines a LEDE MDP (see the module docstring for the parts).

    Build one from parts, from flat env keywords (:meth:`from_kwargs`) or from JSON
    (:meth:`from_json`); all three validate, so a bad setting raises at construction with a
    message naming the setting and the fix.

    Raises:
        ValueError, TypeError: a setting outside its range or of the wrong type (each part's own
            checks), ``max_new_tokens < 2``, sampling or wall-clock cost with the trace backend,
            an unknown ``backend``.
    """

    model: ModelConfig = field(default_factory=ModelConfig)
    prompts: Union[str, tuple] = DEFAULT_TRAIN
    max_new_tokens: int = DEFAULT_MAX_NEW
    heads: HeadConfig = field(default_factory=HeadConfig)
    observation: ObsConfig = field(default_factory=ObsConfig)
    rules: RulesConfig = field(default_factory=RulesConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    backend: str = "trace"

    def __post_init__(self) -> None:
        for name, cls in _PARTS.items():
            part = getattr(self, name)
            if isinstance(part, dict):
                _set(self, name, cls(**part))
            elif not isinstance(part, cls):
                raise TypeError(f"TaskConfig.{name} must be a {cls.__name__}, got {type(part).__name__}.")
        _set(self, "prompts", _prompts(self.prompts))
        if not (_is_int(self.max_new_tokens) and self.max_new_tokens >= 2):
            raise ValueError(f"max_new_tokens must be an integer >= 2, got {self.max_new_tokens!r}.")
        _set(self, "max_new_tokens", int(self.max_new_tokens))
        if self.backend not in BACKENDS:
            raise ValueError(f"backend={self.backend!r}; choose 'trace' (exact greedy replay from traces) or 'live' "
                             "(the real decoder on the loaded model; sampling, wall-clock cost).")
        if self.backend == "trace":
            if self.sampling.temperature > 0:
                raise ValueError(f"temperature={self.sampling.temperature}: traces replay greedy decoding only; use "
                                 "backend='live' (or gym.make('LEDE-Llama3-Live-v0', ...)) to sample.")
            if self.reward.cost != "profile":
                raise ValueError("cost='wallclock' measures real rounds: use backend='live' (LEDE-Llama3-Live-v0).")
            if not isinstance(self.prompts, str):
                raise ValueError("prompts as token ids need the live backend; the trace backend takes a prompt spec.")
        if not self.rules.has_context and (self.observation.context_agreement or self.observation.context_span):
            # the context features exist only with context drafts: stored as off, as the env builds them
            _set(self, "observation", replace(self.observation, context_agreement=False, context_span=False))

    # ---- flat keywords --------------------------------------------------------------------------
    @classmethod
    def from_kwargs(cls, **kwargs) -> "TaskConfig":
        """A config from flat env keywords (``LEDEEnv``'s and ``gym.make``'s; see
        :data:`FLAT_KEYS`); keywords not given take the defaults.

        Raises:
            TypeError: a keyword that is not a task setting (named, with the known ones).
            ValueError: as :class:`TaskConfig`.
        """
        unknown = sorted(set(kwargs) - set(FLAT_KEYS))
        if unknown:
            raise TypeError(f"Not task settings: {', '.join(unknown)}. The settings are: {', '.join(FLAT_KEYS)}.")
        parts: dict[str, dict] = {name: {} for name in _PARTS}
        top: dict[str, Any] = {}
        for key, value in kwargs.items():
            part, name = FLAT_KEYS[key]
            if part is None:
                top[name] = value
            else:
                parts[part][name] = value
        return cls(**{name: _PARTS[name](**kw) for name, kw in parts.items()}, **top)

    def to_kwargs(self) -> dict:
        """The flat env keywords of this config (JSON-serialisable: tuples become lists), so
        ``TaskConfig.from_kwargs(**c.to_kwargs()) == c``."""
        out = {}
        for key, (part, name) in FLAT_KEYS.items():
            value = getattr(self if part is None else getattr(self, part), name)
            out[key] = _jsonable(value)
        return out

    def replace(self, **kwargs) -> "TaskConfig":
        """A copy with some flat settings changed (``c.replace(k_max=4, obs_kind="compact")``),
        validated again.

        Raises:
            TypeError, ValueError: as :meth:`from_kwargs`.
        """
        return TaskConfig.from_kwargs(**(self.to_kwargs() | kwargs))

    def differences(self, other: "TaskConfig") -> dict[str, tuple]:
        """``{flat key: (self's value, other's value)}`` for every setting that differs."""
        a, b = self.to_kwargs(), other.to_kwargs()
        return {k: (a[k], b[k]) for k in a if a[k] != b[k]}

    # ---- JSON ----------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """The nested form (JSON-serialisable)."""
        return _jsonable(asdict(self))

    @classmethod
    def from_dict(cls, d: dict) -> "TaskConfig":
        """Inverse of :meth:`to_dict`; a part or field left out takes its default.

        Raises:
            TypeError: an unknown part or field (named).
            ValueError: as :class:`TaskConfig`.
        """
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise TypeError(f"Not parts of a TaskConfig: {', '.join(unknown)} (known: {', '.join(sorted(known))}).")
        kw = dict(d)
        for name, part in _PARTS.items():
            if name in kw:
                sub = kw[name]
                names = {f.name for f in fields(part)}
                bad = sorted(set(sub) - names)
                if bad:
                    raise TypeError(f"Not fields of TaskConfig.{name}: {', '.join(bad)} (known: {', '.join(sorted(names))}).")
                kw[name] = part(**sub)
        return cls(**kw)

    def to_json(self, indent: Optional[int] = 1) -> str:
        """The config as JSON text (:meth:`from_json` reads it back to an equal config)."""
        return json.dumps(self.to_dict(), indent=indent, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "TaskConfig":
        """A config from :meth:`to_json`'s text.

        Raises:
            ValueError: text that is not a JSON object, or a setting out of range.
            TypeError: as :meth:`from_dict`.
        """
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"Not a task config (invalid JSON: {e}).") from None
        if not isinstance(d, dict):
            raise ValueError("A task config is a JSON object.")
        return cls.from_dict(d)


#: the flat settings of the task lede studies, where they differ from :class:`TaskConfig`'s
#: defaults: multi-domain training prompts, exit drafts plus context copies of 1-8 tokens that fall
#: back to the model's datastore, the compact observation with the matched span, the calibrated
#: in-round stop rule, the relative reward and the shipped reference costs (``LEDE-Llama3-v1``; what
#: ``lede demo`` trains and evaluates)
STUDIED_SETTINGS: dict[str, Any] = {
    "prompts": DEFAULT_TRAIN, "obs_kind": "compact", "obs_stat_exits": 0, "obs_context_span": True,
    "stop_rule": "calibrated", "context_lengths": [1, 2, 3, 4, 6, 8], "context_datastore": True,
    "reward_mode": "relative", "cost_profile": "reference",
}


def studied_task(**overrides) -> TaskConfig:
    """The task lede studies (:data:`STUDIED_SETTINGS`), with some flat settings changed.

    Switching the context actions off (``context_lengths=()`` and no ``context_draft``) also
    switches their datastore off unless ``context_datastore`` is given.

    Raises:
        TypeError, ValueError: as :meth:`TaskConfig.from_kwargs`.
    """
    kw = {**STUDIED_SETTINGS, **overrides}
    if "context_datastore" not in overrides and not kw.get("context_lengths") and not kw.get("context_draft"):
        kw["context_datastore"] = False
    return TaskConfig.from_kwargs(**kw)


def _jsonable(v):
    """Tuples to lists, recursively (JSON has no tuples)."""
    if isinstance(v, (tuple, list)):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    return v


__all__ = ["BACKENDS", "COST_SOURCES", "FLAT_KEYS", "HEAD_KINDS", "HeadConfig", "ModelConfig", "OBSERVATION_KINDS",
           "ObsConfig", "REWARD_MODES", "RewardConfig", "RulesConfig", "STOP_RULES", "STUDIED_SETTINGS", "SamplingConfig",
           "TaskConfig", "normalize_exit_layers", "studied_task"]
