"""Cost profiles fitted to rounds timed in the real decoding loop.

An isolated timing of one layer or of the LM head on k positions (:func:`~lede_env.costs.measure_profile`)
misses what the decoding loop does around it: the draft's layers and the previous round evict the
weights the next product reads, and the decoder's bookkeeping (acceptance, cache crop, context
match) costs time every round. On CPUs exit-draft rounds cost more in the loop than the isolated
profile says (measured in ``docs/experiments.md``, "The cost profile"), so every consumer of the
profile (trace env rewards, λ, DEL's estimates, the oracle, trained agents) overrated exit drafts.

:func:`measure_loop_profile` runs the real :class:`~lede_env.decoding.SelfSpeculativeDecoder`
on calibration prompts with random actions (AR steps, context drafts of 1..K_max tokens, every
exit with every K), times each round, and fits the isolated profile's times to them
(:func:`~lede_env.costs.fit_profile`). The result predicts the loop's round times; it is what
``cost_profile="measured"`` gives (``"isolated"`` keeps the isolated timings).
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from .continuations import encode_prompts
from .costs import (CostProfile, _probe_net, analytic_profile, fit_profile, measure_profile, overhead_probe, profile_path,
                    reference_profile)
from .decoding import SelfSpeculativeDecoder
from .exits import ExitHeads
from .mdp import ObservationConfig
from .layers import LayerStack
from .model import ModelBundle
from .policies import DesignPolicy, GreedyMLP, numpy_mlp_twin
from .prompts import DEFAULT_CALIB, first_per_category, load_prompts

#: Rounds timed by default: about 30 s on 2 CPU cores with the embedded model.
DEFAULT_LOOP_ROUNDS = 400


def time_rounds(stack: LayerStack, heads: ExitHeads, k_max: int, prompts: Sequence[Sequence[int]],
                eos_ids: Sequence[int] = (), rounds: int = DEFAULT_LOOP_ROUNDS, max_new_tokens: int = 64,
                seed: int = 0, reuse: bool = True, obs_config: Optional[ObservationConfig] = None,
                probe=None, policy_seconds: Optional[list] = None) -> list[tuple[int, int, int, int, float]]:
    """Time at least ``rounds`` real rounds of random actions (greedy decoding, context drafts of
    up to ``k_max`` tokens as action 0), cycling through ``prompts``.

    Args:
        prompts: token ids of each prompt (non-empty).
        max_new_tokens: tokens generated per prompt.
        obs_config, probe: observations of this layout are computed every round and given to
            ``probe(decoder, obs)`` (see :class:`~lede_env.policies.DesignPolicy`); ``policy_seconds`` receives each
            round's observation + probe time.

    Returns:
        ``(exit_layer, draft_len, n_verify, passes, seconds)`` per round, ``seconds`` without
        the policy's time (the profile charges it as ``overhead``).

    Raises:
        ValueError: no prompts, or ``rounds < 1``.
    """
    if not prompts or rounds < 1:
        raise ValueError("time_rounds needs at least one prompt and rounds >= 1.")
    decoder = SelfSpeculativeDecoder(stack, heads, k_max, eos_ids, bonus=True, reuse=reuse, context_draft=k_max,
                                     obs_config=obs_config)
    policy = DesignPolicy(decoder.actions.n, seed=seed,
                          probe=None if probe is None else (lambda obs: probe(decoder, obs)))
    decoder.generate(torch.tensor(prompts[0]), policy, max_new_tokens=8)  # warm-up (kernel build, caches)
    out: list[tuple[int, int, int, int, float]] = []
    i = 0
    while len(out) < rounds:
        res = decoder.generate(torch.tensor(prompts[i % len(prompts)]), policy, max_new_tokens=max_new_tokens)
        out += [(r.exit_layer, r.draft_len, r.n_verify, r.passes, r.seconds - r.policy_seconds) for r in res.rounds]
        if policy_seconds is not None:
            policy_seconds += [r.policy_seconds for r in res.rounds]
        i += 1
    return out


def measure_loop_profile(stack: LayerStack, heads: ExitHeads, k_max: int, prompts: Sequence[Sequence[int]],
                         prior: CostProfile, eos_ids: Sequence[int] = (), rounds: int = DEFAULT_LOOP_ROUNDS,
                         max_new_tokens: int = 64, seed: int = 0, reuse: bool = True,
                         timed: Optional[list] = None, obs_config: Optional[ObservationConfig] = None,
                         probe=None) -> CostProfile:
    """A profile whose times predict rounds of the real decoding loop: :func:`time_rounds`, then
    :func:`~lede_env.costs.fit_profile` starting from ``prior`` (the isolated profile).

    Args:
        timed: a list that receives the timed rounds (for reports and tests).
        obs_config, probe: with both, the per-round overhead is the median time of computing
            this observation and running ``probe(decoder, obs)`` (a policy's forward pass) inside
            the loop, instead of the prior's isolated timing (the loop's own layers evict what
            the observation reads, so inside the loop it costs a multiple of its isolated time).

    Returns:
        A :class:`~lede_env.costs.CostProfile` with ``source="in-loop"``, in seconds; ``meta``
        records the rounds fitted, the median relative error of the fit and of the prior, and
        where the overhead comes from.
    """
    pol: list = []
    r = time_rounds(stack, heads, k_max, prompts, eos_ids, rounds, max_new_tokens, seed, reuse,
                    obs_config if probe is not None else None, probe, pol)
    if timed is not None:
        timed.extend(r)
    prof = fit_profile(r, prior, reuse=reuse)
    if probe is not None and pol:
        prof.overhead = float(np.median(pol))
        prof.meta.update(overhead="in-loop", prior_overhead=prior.overhead)
    return prof


def get_profile(kind: str, bundle: ModelBundle, heads: ExitHeads, k_max: int, obs: ObservationConfig) -> CostProfile:
    """A cost profile, measured once on this machine and cached where measured:

    - ``"measured"``: fitted to rounds timed in the real decoding loop
      (:func:`~lede_env.loop_profile.measure_loop_profile`, about 40 s more on 2 CPU cores the
      first time), starting from the isolated profile; what wall clock follows;
    - ``"isolated"``: each layer, the LM head and the draft head timed alone
      (:func:`~lede_env.costs.measure_profile`; overrates exit drafts on CPUs, see
      :mod:`lede_env.loop_profile`);
    - ``"analytic"``: from parameter counts, nothing timed;
    - ``"reference"``: the profile the package ships, measured in the loop on the reference
      machine (:func:`~lede_env.costs.reference_profile`; the registered tasks' costs, the same on
      every machine);
    - a path to a JSON profile written by ``lede profile``, or the profile itself as a dict
      (:meth:`CostProfile.to_json`; datasets store it so a recovered env charges the same costs).

    Raises:
        ValueError: a JSON file that is not a profile; ``"reference"`` where none ships for these
            settings.
    """
    if isinstance(kind, dict):
        return CostProfile(**kind)
    if kind == "reference":
        return reference_profile(bundle, heads, k_max, obs)
    if kind == "analytic":
        return analytic_profile(bundle.stack, k_max, heads.draft_vocab, heads.translated)
    if kind in ("measured", "isolated"):
        path = profile_path(bundle, heads, k_max, obs, kind)
        if path.exists():
            try:
                return CostProfile.load(path)
            except ValueError:
                pass
        if kind == "isolated":
            prof = measure_profile(bundle.stack, heads, k_max, overhead_fn=overhead_probe(bundle, heads, k_max, obs))
        else:
            prof = loop_profile(bundle, heads, k_max, get_profile("isolated", bundle, heads, k_max, obs), obs=obs)
        prof.save(path)
        return prof
    return CostProfile.load(kind)


def loop_profile(bundle: ModelBundle, heads: ExitHeads, k_max: int, prior: CostProfile,
                 prompts: str = DEFAULT_CALIB, per_category: int = 2,
                 obs: Optional[ObservationConfig] = None) -> CostProfile:
    """The in-loop profile (:func:`~lede_env.loop_profile.measure_loop_profile`) timed on the
    first ``per_category`` prompts of each category of ``prompts`` (the exit heads' calibration
    split by default: disjoint from training and evaluation prompts); with ``obs``, its overhead
    is observation ``obs`` plus a typical Q-network's forward pass timed inside the loop."""
    ps = first_per_category(load_prompts(prompts), per_category)
    return measure_loop_profile(bundle.stack, heads, k_max, encode_prompts(bundle, ps, 64), prior, bundle.eos_ids,
                                obs_config=obs, probe=None if obs is None else loop_probe())


def loop_probe():
    """``probe(decoder, obs)`` for :func:`~lede_env.loop_profile.measure_loop_profile`: flatten the
    decoder's observation and run a typical Q-network's greedy action on it (built at the first
    call for the decoder's observation layout) the way an exported ``trace_q`` agent runs, through
    its numpy twin (:func:`~lede_env.policies.numpy_mlp_twin`; a TorchScript call costs more
    inside the loop, ``docs/experiments.md``)."""
    nets: dict = {}

    def probe(decoder, obs):
        key = id(decoder)
        if key not in nets:
            d, n_act = decoder.observer.flat_dim, decoder.actions.n
            nets[key] = numpy_mlp_twin(GreedyMLP(_probe_net(decoder.observer, n_act), torch.zeros(d), torch.ones(d),
                                                 torch.ones(n_act, dtype=torch.bool)))
        nets[key](decoder.observer.flatten(obs))

    return probe
