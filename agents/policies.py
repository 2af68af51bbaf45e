"""Policies that need the traces' hindsight (the trace env's oracle, the best static (E, K)
chosen on training traces). Every other policy lives in :mod:`lede_env.policies`.
"""

from __future__ import annotations

from typing import Optional

from lede_env.policies import BasePolicy

__all__ = ["OraclePolicy", "best_static_action"]


class OraclePolicy(BasePolicy):
    """Asks a trace env for its oracle action (best action sequence by dynamic programming).

    Only valid inside :class:`lede_env.trace_env.TraceEnv`; to replay the oracle in the real decoder,
    use the plan from :func:`lede_env.replay.oracle_plan` with a ``SequencePolicy``.
    """

    def __init__(self, env) -> None:
        self.env = env.unwrapped

    def act(self, obs: Optional[dict]) -> int:
        return self.env.oracle_action()


def best_static_action(env, max_episodes: Optional[int] = None) -> tuple[int, float]:
    """The static action with the best throughput on ``env``'s traces (LayerSkip's setting,
    chosen on training traces: the whole K drafted every round, whatever the env's stop rule);
    :meth:`lede_env.trace_env.TraceEnv.best_static`, computed once per env, or on the first
    ``max_episodes`` traces only.

    Returns:
        ``(action, throughput)``; throughput = total tokens / total cost (AR = about 1.0).
    """
    u = env.unwrapped
    if max_episodes is None:
        return u.best_static()
    from lede_env.replay import best_static

    traces, rules = u.static_setting()
    return best_static(traces[:max_episodes], rules, u.max_new_tokens)
