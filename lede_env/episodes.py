"""The episode loop: one policy plays one episode of a trace or live env, round by round.

Evaluation (:func:`agents.evaluate.run_episodes`), collection (:func:`agents.collect.run_episode`)
and the reference scores of datasets (:func:`agents.store.reference_scores`) all play episodes
through :func:`play_episode` and read what they need from the :class:`Episode` it returns.

The trace-only replay of :func:`lede_env.replay.rollout` is a separate loop on purpose: the
oracle and the best-static search call it once per action and trace, and it plays rounds on the
trace directly (:func:`~lede_env.replay.replay_round`) without building the observations, rewards
and infos of a gym step, which would cost more than the round itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from .decoding import RoundRecord
from .metrics import RoundTotals
from .policies import reads_observations


@dataclass
class Episode:
    """What one episode produced (T rounds; Minari's layout: T+1 observations, T of the rest).

    Attributes:
        observations: the reset's observation, then one per step (T+1 dicts of arrays).
        actions: the T action indices played.
        rewards: the T step rewards.
        terminations, truncations: the T step flags (the last one ends the episode).
        reset_info: the info dict of ``env.reset``.
        step_infos: the T info dicts of ``env.step`` (each with ``"round"``: what the round did,
            see :meth:`lede_env.env.LEDEEnv._round_info`, and ``"tokens_generated"``).
    """

    observations: list[dict] = field(default_factory=list)
    actions: list[int] = field(default_factory=list)
    rewards: list[float] = field(default_factory=list)
    terminations: list[bool] = field(default_factory=list)
    truncations: list[bool] = field(default_factory=list)
    reset_info: dict = field(default_factory=dict)
    step_infos: list[dict] = field(default_factory=list)

    @property
    def ret(self) -> float:
        """The undiscounted return (the rewards' sum, added round by round)."""
        total = 0.0
        for r in self.rewards:
            total += r
        return total

    @property
    def totals(self) -> RoundTotals:
        """The rounds' sums (:class:`lede_env.metrics.RoundTotals`; ``tokens`` are the rounds',
        the prefill's token excluded)."""
        return RoundTotals.of(i["round"] for i in self.step_infos)


def play_episode(env, policy: Optional[Any], seed: Optional[int] = None,
                 options: Optional[dict] = None) -> Episode:
    """Play one episode of ``env`` with ``policy``: reset, then act, step and tell the policy
    what the round did, until the episode terminates or is truncated.

    Args:
        env: a trace or live env (``LEDE-Llama3-v0`` / ``LEDE-Llama3-Live-v0``), wrapped or not.
        policy: an object with ``reset()``, ``act(obs or None) -> action`` and
            ``update(RoundRecord)`` (:class:`lede_env.policies.BasePolicy`); it gets the
            observation only if its ``needs_observation`` is true. ``None`` plays the env's own
            oracle (``env.unwrapped.oracle_action()``; trace env only).
        seed, options: passed to ``env.reset`` (e.g. ``options={"prompt_index": i}``).

    The caller decides the rules a policy plays under (e.g. ``with env.unwrapped.playing(policy)``,
    as evaluation does); this loop only plays.

    Returns:
        the :class:`Episode`.

    Raises:
        RuntimeError: ``policy`` is ``None`` in a live env (it has no oracle).
    """
    obs, info = env.reset(seed=seed, options=options)
    if policy is not None:
        policy.reset()
    ep = Episode(observations=[obs], reset_info=info)
    oracle = env.unwrapped.oracle_action if policy is None else None
    wants_obs = reads_observations(policy)
    done = False
    while not done:
        a = oracle() if policy is None else policy.act(obs if wants_obs else None)
        obs, r, te, tr, step_info = env.step(a)
        if policy is not None:
            policy.update(RoundRecord(**step_info["round"]))
        ep.observations.append(obs)
        ep.actions.append(a)
        ep.rewards.append(r)
        ep.terminations.append(te)
        ep.truncations.append(tr)
        ep.step_infos.append(step_info)
        done = te or tr
    return ep
