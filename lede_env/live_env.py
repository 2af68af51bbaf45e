"""``LEDE-Llama3-Live-v0``: the LEDE MDP on the real decoder (:class:`LiveEnv`).

Each step runs one round of :class:`~lede_env.decoding.SelfSpeculativeDecoder` on the loaded
model: greedy or sampled (speculative sampling), charged by the cost profile or by wall clock.
Arguments, spaces, reward and rendering are :class:`lede_env.env.LEDEEnv`'s.
"""

from __future__ import annotations

import statistics
from contextlib import contextmanager
from dataclasses import replace
from typing import Optional

import numpy as np
import torch

from .calibration import get_heads
from .continuations import encode_prompts
from .costs import profile_positions
from .loop_profile import get_profile
from .decoding import GenerationResult, Sampling, SelfSpeculativeDecoder
from .env import LEDEEnv, head_spec
from .model import describe_model, get_bundle
from .prompts import load_prompts
from .mdp import ActionMap
from .rules import RoundRules


class LiveEnv(LEDEEnv):
    """The live backend of :class:`~lede_env.env.LEDEEnv` (``LEDE-Llama3-Live-v0``): each step plays
    one real round of the decoder (draft, verify, accept) on the loaded model.
    ``LiveEnv.with_objects(bundle=..., heads=...)`` injects a loaded model and exit heads;
    ``prompts`` may also be a list of prompts as token-id lists. ``env.unwrapped.ar_seconds`` is the unit of wall-clock costs
    (``cost="wallclock"``), ``env.unwrapped.decoder`` the decoder that plays the rounds.

    Raises:
        ValueError: as :class:`~lede_env.env.LEDEEnv`; ``trace_set=`` (traces are the trace
            env's); prompts that are neither a prompt spec nor token-id lists; ``exit_layers``
            that differ from the given heads'.
    """

    backend = "live"
    trace_set = None  # (no traces: the rounds are decoded)

    def _load(self, objects, progress: bool) -> None:
        """Load the model, heads and prompts and build the decoder."""
        c = self.task_config
        bundle, heads, profile, eos_ids = objects.bundle, objects.heads, objects.profile, objects.eos_ids
        prompts, exit_layers, k_max = c.prompts, c.heads.exit_layers, c.rules.k_max
        if objects.trace_set is not None:
            raise ValueError("trace_set is for the trace backend; the live backend decodes its prompts: "
                             "pass prompts=... (a prompt spec or token-id lists).")
        if bundle is None:
            bundle = get_bundle(c.model.name, c.model.device, c.model.dtype)
        if isinstance(prompts, str):
            listed = load_prompts(prompts)
            ids = encode_prompts(bundle, listed, self.max_new_tokens)
            self.prompts = [(p.id, p.category, list(map(int, x))) for p, x in zip(listed, ids)]
        elif isinstance(prompts, (list, tuple)) and prompts and all(
                isinstance(x, (list, tuple)) and x and all(isinstance(t, (int, np.integer)) for t in x)
                for x in prompts):
            self.prompts = [(str(i), "default", list(map(int, x))) for i, x in enumerate(prompts)]
        else:
            raise ValueError("prompts must be a prompt spec (e.g. 'humaneval[0:24]') or, for the live backend, a "
                             "non-empty list of non-empty token-id lists.")
        if heads is None:
            heads = get_heads(bundle, head_spec(c), progress=progress)
        elif exit_layers and tuple(exit_layers) != tuple(heads.exit_layers):
            raise ValueError(f"exit_layers={list(exit_layers)} differ from the given heads' {list(heads.exit_layers)}.")
        if profile is None:
            profile = get_profile(c.reward.cost_profile, bundle, heads,
                                  profile_positions(k_max, c.rules.context_lengths, c.rules.context_draft),
                                  self.obs_config)
        eos_ids = tuple(int(e) for e in (bundle.eos_ids if eos_ids is None else eos_ids))
        self.bundle, self.heads = bundle, heads
        self.profile = profile
        self.actions = ActionMap(heads.exit_layers, k_max, c.rules.context_lengths, c.rules.tree_budgets)
        self.rules = RoundRules(self.actions, profile, c.rules.bonus, eos_ids, c.rules.reuse, c.rules.stop_threshold,
                                tree_depth=c.rules.tree_depth)
        self.playable = list(range(len(self.prompts)))
        self.manifest = {"backend": "live", "model": {"name": bundle.name} | describe_model(bundle.model),
                         "exit_layers": list(heads.exit_layers),
                         "heads": {"kind": heads.kind, "draft_vocab": heads.draft_vocab,
                                   "feature_vocab": heads.feature_vocab, "fingerprint": heads.fingerprint()},
                         "prompts": prompts if isinstance(prompts, str) else "token ids",
                         "prompt_ids": [p[0] for p in self.prompts], "max_new_tokens": self.max_new_tokens,
                         "eos_ids": list(eos_ids), "temperature": self.temperature, "top_p": self.top_p,
                         "top_k": self.top_k, "cost": self.cost}
        self._prompt_index: Optional[int] = None
        self._result: Optional[GenerationResult] = None
        self._state = None

    def _default_lambda(self) -> float:
        return 1.0  # no traces to measure a static on; AR's throughput

    def _finish_rules(self, heads) -> None:
        super()._finish_rules(heads)
        # the decoder plays the finished rules; profile None: the env charges costs itself (its
        # rules may drop the overhead, see charging_overhead)
        self.decoder = SelfSpeculativeDecoder.from_rules(self.bundle.stack, heads, replace(self.rules, profile=None),
                                                         self.obs_config)
        self.observer = self.decoder.observer
        # the unit of wall-clock costs, timed under the env's finished rules
        self.ar_seconds = self._measure_ar_seconds() if self.cost == "wallclock" else None

    def _sampling(self, seed: int) -> Optional[Sampling]:
        return Sampling(self.temperature, self.top_p, seed, self.top_k) if self.temperature > 0 else None

    @contextmanager
    def _decoding(self):
        with torch.no_grad(), self.decoder.stack.kernels_active():
            yield

    def _measure_ar_seconds(self, steps: int = 32) -> float:
        """Median seconds of one AR step on this machine, timed as :meth:`step` times a round
        (the decoder's round, without the next observation), under the env's sampling settings:
        the unit of wall-clock costs. The first generation warms up and is not counted."""
        times: list[float] = []
        for i in range(len(self.prompts) * 2 + 1):
            with self._decoding():
                state = self.decoder.start(torch.tensor(self.prompts[i % len(self.prompts)][2]),
                                           min(self.max_new_tokens, steps + 1), self._sampling(i), want_obs=True)
                while not state.done:
                    self.decoder.observe(state)
                    t0 = self.decoder.clock()
                    self.decoder.play_round(state, 0)
                    if i > 0:
                        times.append(self.decoder.clock() - t0)
            if len(times) >= steps:
                break
        if not times:
            raise ValueError("Cannot measure an AR step: every prompt ends at its first token; use other prompts.")
        return float(statistics.median(times))

    def best_static(self) -> tuple[int, float]:
        """Unavailable: the best static is measured on traces.

        Raises:
            RuntimeError: always (use :class:`~lede_env.trace_env.TraceEnv`).
        """
        raise RuntimeError("best_static() replays traces: use the trace backend (LEDE-Llama3-v0).")

    def oracle_action(self) -> int:
        """Unavailable: the oracle needs greedy traces.

        Raises:
            RuntimeError: always (use :class:`~lede_env.trace_env.TraceEnv`).
        """
        raise RuntimeError("The oracle needs greedy traces, which the live backend has none of: use "
                           "backend='trace' (LEDE-Llama3-v0) for oracle actions.")

    # ---- the episode -----------------------------------------------------------------------
    @property
    def trace(self):
        """Always ``None``: the live env has no traces."""
        return None

    @property
    def prompt_id(self) -> Optional[str]:
        return None if self._prompt_index is None else self.prompts[self._prompt_index][0]

    @property
    def generated(self) -> list[int]:
        return [] if self._result is None else list(self._result.tokens)

    def _close_episode(self) -> None:
        self._state = None

    def _reset(self, options: dict):
        self._close_episode()
        pinned = "prompt_index" in options
        if pinned:
            idx = int(options["prompt_index"])
            if idx not in self.playable:
                raise ValueError(f"prompt_index {idx} is not a prompt of this env (0..{len(self.prompts) - 1}).")
        for _ in range(1 if pinned else 8):
            if not pinned:
                idx = int(self.playable[self.np_random.integers(len(self.playable))])
            sampling = self._sampling(int(self.np_random.integers(2**63 - 1)))
            self._prompt_index = idx
            self._result = GenerationResult(tokens=[])
            with self._decoding():
                self._state = self.decoder.start(torch.tensor(self.prompts[idx][2]), self.max_new_tokens, sampling,
                                                 want_obs=True, result=self._result)
                obs = self.decoder.observe(self._state)
            if not self._state.done:
                break
            self._close_episode()
        else:
            raise ValueError(f"prompt {self.prompts[idx][0]!r} (index {idx}) ends at its first token (EOS): the "
                             "episode would have no round; choose another prompt_index or other prompts.")
        self._done = False
        self._last_round = None
        pid, cat, _ = self.prompts[idx]
        return obs, {"prompt_id": pid, "prompt_index": idx, "category": cat}

    def _step(self, action):
        self.actions.decode(action)  # a bad action raises here, leaving the episode playable
        with self._decoding():
            t0 = self.decoder.clock()
            rec = self.decoder.play_round(self._state, int(action), self.rules.stop)
            t1 = self.decoder.clock()
            obs = self.decoder.observe(self._state)  # the next round's observation, or the final one
            t2 = self.decoder.clock()
        E, K = rec.exit_layer, rec.draft_len
        if self.cost == "profile":
            cost = self.rules.profile.round_cost(E, K, rec.n_verify, self.rules.reuse, rec.passes, tree=rec.tree)
        else:
            cost = ((t1 - t0) + ((t2 - t1) if self._charge_overhead else 0.0)) / self.ar_seconds
        n = rec.emitted
        reward = self._reward(n, cost)
        self._done = self._state.done
        terminated = self._done and self._result.eos
        truncated = self._done and not self._result.eos
        if self._done:
            self._close_episode()
        rnd = self._round_info(action, E, K, rec.accepted, n, rec.n_verify, cost)
        if self.cost == "wallclock":  # (kept out of the info of deterministic envs)
            rnd["seconds"] = t2 - t0
        info = {"round": rnd, "tokens_generated": len(self._result.tokens),
                "prompt_id": self.prompts[self._prompt_index][0]}
        return obs, float(reward), terminated, truncated, info

    def close(self):
        self._close_episode()
        super().close()

    def config(self) -> dict:
        out = super().config()
        out.update(backend="live", temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, cost=self.cost,
                   ar_seconds=self.ar_seconds, manifest=self.manifest)
        return out
