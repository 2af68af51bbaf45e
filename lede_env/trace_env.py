"""``LEDE-Llama3-v0``: the LEDE MDP replayed exactly from traces (:class:`TraceEnv`).

Greedy decoding only; a round costs what the cost profile says. Arguments, spaces, reward and
rendering are :class:`lede_env.env.LEDEEnv`'s.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import asdict, replace
from typing import Optional

import numpy as np

from .calibration import get_heads
from .costs import CostProfile, profile_positions
from .loop_profile import get_profile
from .env import LEDEEnv, head_spec
from .mdp import ActionMap, ObservationBuilder, context_observation
from .model import get_bundle
from .replay import best_static, budget, oracle_plan, replay_round, useful_actions
from .rules import RoundRules
from .stopping import NO_STOP
from .storage import cache_dir, write_json_atomic
from .traces import PACKAGED_TRACES, TraceSpec, get_traces
from .trees import TREE_RECIPE_VERSION


class TraceEnv(LEDEEnv):
    """The trace backend of :class:`~lede_env.env.LEDEEnv` (``LEDE-Llama3-v0``): each step replays
    one round from the episode's trace (greedy continuation + one teacher-forced pass), at
    microseconds a step; every output is greedy decoding's.
    ``TraceEnv.with_objects(trace_set=..., profile=..., eos_ids=...)`` plays prebuilt traces
    instead of building them for ``model``/``prompts``; ``heads=`` then gives the exit heads (for
    ``stop_rule="calibrated"`` and :meth:`make_decoder`).

    Raises:
        ValueError: as :class:`~lede_env.env.LEDEEnv`; sampling (``temperature > 0``) or
            wall-clock cost (they need :class:`~lede_env.live_env.LiveEnv`); ``bundle=``; a
            prebuilt ``trace_set`` without ``profile`` or ``eos_ids``; no trace with room for a
            round.
    """

    backend = "trace"

    def _load(self, objects, progress: bool) -> None:
        c = self.task_config
        heads, trace_set, profile, eos_ids = objects.heads, objects.trace_set, objects.profile, objects.eos_ids
        self.bundle, self.heads = None, heads
        if objects.bundle is not None or (heads is not None and trace_set is None):
            raise ValueError("bundle/heads are for the live backend; the trace backend takes trace_set=... instead "
                             "(with heads=... only for stop_rule='calibrated').")
        k_max, lengths = c.rules.k_max, c.rules.context_lengths
        if trace_set is None:
            m = c.model
            spec = TraceSpec(m.name, c.prompts, self.max_new_tokens, head_spec(c), m.device, m.dtype)
            bundle = get_bundle(m.name, m.device, m.dtype)
            heads = get_heads(bundle, spec.heads, progress=progress)
            trace_set = get_traces(spec, progress=progress, bundle=bundle, heads=heads,
                                   need_hidden=self.obs_config.kind == "full")
            self.bundle, self.heads = bundle, heads
            if profile is None:
                profile = get_profile(c.reward.cost_profile, bundle, heads,
                                      profile_positions(k_max, lengths, c.rules.context_draft), self.obs_config)
            eos_ids = bundle.eos_ids if eos_ids is None else eos_ids
        if profile is None and isinstance(c.reward.cost_profile, dict):  # the profile a config or env spec holds
            profile = CostProfile(**c.reward.cost_profile)
        if profile is None:
            raise ValueError("A prebuilt trace_set needs a cost profile: pass profile=CostProfile(...) or a config "
                             "whose cost_profile is the profile as a dict.")
        if eos_ids is None:
            raise ValueError("A prebuilt trace_set needs eos_ids.")
        man = trace_set.manifest
        if self.obs_config.kind == "full" and trace_set.traces and trace_set.traces[0].hidden.shape[1] == 0:
            raise ValueError("These traces hold no hidden states (a shipped trace file), which the 'full' observation "
                             "reads: use obs_kind='compact', or build traces with `lede traces build`.")
        cut = [t.n for t in trace_set.traces if not t.eos and t.n < self.max_new_tokens]  # stopped by their length limit
        if cut:
            warnings.warn(f"Traces hold at most {max(cut)} new tokens for {len(cut)} prompts that had not ended; "
                          "episodes are truncated there.")
        self.trace_set = trace_set
        self.profile = profile
        self.actions = ActionMap(trace_set.exit_layers, k_max, lengths, c.rules.tree_budgets)
        self.rules = RoundRules(self.actions, profile, c.rules.bonus, tuple(int(e) for e in eos_ids), c.rules.reuse,
                                 c.rules.stop_threshold, tree_depth=c.rules.tree_depth)
        d = int(man["model"]["hidden_size"])  # (shipped traces hold no hidden states: the compact observation reads none)
        self.observer = ObservationBuilder(self.obs_config, d, len(self.actions.exit_layers),
                                           trace_set.num_layers, k_max, int(man["model"]["vocab_size"]),
                                           tuple(self.actions.exit_layers))
        self.playable = [i for i, t in enumerate(trace_set.traces) if budget(t, self.max_new_tokens) >= 2
                         and not (t.eos and t.n <= 1)]
        if not self.playable:
            raise ValueError("No trace has room for a round (every continuation is 1 token): "
                             "use other prompts or a larger max_new_tokens.")
        self._trace_index: Optional[int] = None

    def _default_lambda(self) -> float:
        # a per-round reward of tokens - lambda * cost then favours exactly the rounds that beat
        # the best static (E, K) on the env's own traces
        return max(1.0, self.best_static()[1])

    def static_setting(self) -> tuple[list, RoundRules]:
        """``(traces, rules)`` a static action is judged on: the playable traces, and the env's
        rules as a static (E, K) plays them (no feature/policy overhead, the whole K drafted)."""
        return ([self.trace_set.traces[i] for i in self.playable],
                replace(self.rules.without_overhead(), stop_rule=NO_STOP))

    def best_static(self) -> tuple[int, float]:
        """The static action with the best throughput over this env's playable traces, as a static
        (E, K) is defined (whole K drafted, no feature/policy overhead; LayerSkip's setting): the
        baseline of the relative reward's lambda, of ``trace_q`` and of ``static:best``. Computed
        once (only actions that can beat AR are tried, which changes nothing: the others never
        do).

        The search (seconds for the registered task's 64 training prompts) is looked up where it
        ran before: shipped with the package for the registered tasks' traces, else cached
        (:func:`static_search_key`).

        Returns:
            ``(action, throughput)``; throughput = total tokens / total cost (AR = about 1.0).
        """
        if self._best_static is None:
            traces, rules = self.static_setting()
            key = static_search_key(traces, rules, self.max_new_tokens)
            found = known_static(key)
            if found is None:
                found = best_static(traces, rules, self.max_new_tokens, useful_actions(rules))
                remember_static(key, found)
            self._best_static = found
        return self._best_static

    # ---- the episode -----------------------------------------------------------------------
    @property
    def trace(self):
        """The current episode's trace (``None`` before the first reset)."""
        return None if self._trace_index is None else self.trace_set.traces[self._trace_index]

    @property
    def manifest(self) -> dict:
        """What the env plays: the trace set's manifest."""
        return self.trace_set.manifest

    @property
    def prompt_id(self) -> Optional[str]:
        return None if self.trace is None else self.trace.id

    @property
    def generated(self) -> list[int]:
        return [] if self.trace is None else self.trace.generated[: self._g].tolist()

    def _obs(self) -> dict:
        t, g = self.trace, self._g
        j = g - 1  # last verified local position: its output is the pending token generated[g-1]
        seq_tail = np.concatenate([t.prompt[-self.obs_config.recent_tokens:], t.generated[:g]])
        agree = (t.lens_arg[j] == t.generated[j]).astype(np.float32)
        ctx = (0.0, 0.0)
        if self.obs_config.context:
            cd, ngram = self.rules.copy_max, self.rules.context_ngram
            seq = np.concatenate([t.prompt, t.generated[:g]])
            ctx = context_observation(seq, cd, ngram, self.obs_config, datastore=self.rules.datastore)[1]
        return self.observer.build(t.hidden[j], t.top1[j], t.entropy[j], agree, seq_tail.tolist(),
                                   g / self.max_new_tokens, ctx, self._history)

    def oracle_action(self) -> int:
        """The oracle's action in the current state (best action sequence for this trace by
        dynamic programming; an upper bound no causal policy can pass)."""
        if self._done:
            raise RuntimeError("oracle_action() needs a running episode: call reset() first.")
        i = self._trace_index
        if i not in self._oracle_cache:
            self._oracle_cache[i] = oracle_plan(self.trace, self.rules, self.max_new_tokens)[0]
        return int(self._oracle_cache[i][self._g])

    def _reset(self, options: dict):
        if "prompt_index" in options:
            idx = int(options["prompt_index"])
            if idx not in self.playable:
                raise ValueError(f"prompt_index {idx} is not a playable trace (0..{len(self.trace_set) - 1}, "
                                 "with room for at least one round).")
        else:
            idx = int(self.playable[self.np_random.integers(len(self.playable))])
        self._trace_index = idx
        self._limit = budget(self.trace, self.max_new_tokens)
        self._g = 1
        self._done = False
        self._last_round = None
        self._history = self.observer.new_history()
        return self._obs(), {"prompt_id": self.trace.id, "prompt_index": idx, "category": self.trace.category}

    def _step(self, action):
        oc, E, cost = replay_round(self.trace, self._g, action, self.rules, self._limit)
        n = len(oc.emitted)
        self._g += n
        reward = self._reward(n, cost)
        terminated = oc.eos
        truncated = oc.done and not oc.eos
        self._done = oc.done
        self._history.record(oc.accepted, oc.draft_len, E)
        rnd = self._round_info(action, E, oc.draft_len, oc.accepted, n, oc.n_verify, cost)
        obs = self._obs()  # g <= trace length always, so the last verified position exists
        info = {"round": rnd, "tokens_generated": self._g, "prompt_id": self.trace.id}
        return obs, float(reward), terminated, truncated, info

    def config(self) -> dict:
        out = super().config()
        out["trace_manifest"] = {k: v for k, v in self.trace_set.manifest.items() if k not in ("categories",)}
        return out


#: bump when the best-static search changes what it returns
STATIC_SEARCH_VERSION = 1
#: best-static searches shipped with the package, ``{key: [action, throughput]}`` (written by
#: ``scripts/ship_task_data.py`` for the registered tasks' traces)
PACKAGED_STATIC = PACKAGED_TRACES / "best_static.json"


def static_search_key(traces, rules: RoundRules, max_new_tokens: int) -> str:
    """A key naming a best-static search by everything its result depends on: the traces'
    tokens, drafts (first-token drafts too) and draft probabilities, the round rules (actions, cost profile without its
    ``meta``, bonus, reuse, threshold, context drafter and datastore fingerprint, EOS ids; with
    tree actions also the tree depth and the static tree rule) and the token budget. Without tree
    actions the key is the one it was before they existed (the registered tasks' shipped
    searches are found by it)."""
    h = hashlib.sha256()
    for t in traces:
        for a in (t.prompt, t.generated, t.draft, t.draft_prob, t.draft_first, t.draft_first_prob):
            h.update(b"-" if a is None else np.ascontiguousarray(a).tobytes())
        h.update(bytes([t.eos]))
    prof = None if rules.profile is None else {k: v for k, v in asdict(rules.profile).items() if k != "meta"}
    acts = rules.actions
    # (written as before tree actions existed when there are none, so earlier searches' keys hold)
    actions = (repr(acts) if acts.tree_budgets else
               f"ActionMap(exit_layers={acts.exit_layers!r}, k_max={acts.k_max!r}, context_lengths={acts.context_lengths!r})")
    desc = [STATIC_SEARCH_VERSION, actions, prof, rules.bonus, list(rules.eos_ids), rules.reuse,
            rules.stop_threshold, rules.context_draft, list(rules.context_ngram),
            None if rules.datastore is None else rules.datastore.fingerprint(), int(max_new_tokens)]
    if acts.tree_budgets:
        desc.append({"tree_depth": rules.tree_depth, "tree_recipe": TREE_RECIPE_VERSION,
                     "tree_prune": None if rules.tree_prune is None else [rules.tree_prune.lam, rules.tree_prune.costs]})
    h.update(json.dumps(desc, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def known_static(key: str) -> Optional[tuple[int, float]]:
    """A best-static search already run for ``key``: shipped, else cached; ``None`` if neither."""
    for path in (PACKAGED_STATIC, cache_dir() / "best_static" / f"{key}.json"):
        try:
            d = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        found = d.get(key) if path == PACKAGED_STATIC else d
        if isinstance(found, list) and len(found) == 2:
            return int(found[0]), float(found[1])
    return None


def remember_static(key: str, found: tuple[int, float]) -> None:
    """Cache a best-static search's result under ``key`` (atomically)."""
    write_json_atomic(cache_dir() / "best_static" / f"{key}.json", [int(found[0]), float(found[1])])
