"""The one definition of each metric lede reports (trace env, live decoder, ``summary()``,
``lede evaluate``, the demo, the report and the benchmarks all compute them here).

Definitions (``docs/performance.md``'s "Metrics" section says the same):

- **round tokens**: tokens emitted by draft/verify rounds. The prefill's token (the first
  generated token, emitted by the prompt's forward pass) is not a round's: the prefill is not a
  step of the MDP, every method pays it alike, and the trace env never plays it.
- **tokens per round** = round tokens / rounds. 1.0 for plain AR; undefined (NaN) without rounds.
- **acceptance** = accepted draft tokens / drafted tokens, over exit-head drafts and context
  drafts (copied tokens) alike. Undefined (NaN) when nothing was drafted (AR, transformers
  baselines whose rounds lede cannot see); tables print an undefined value as ``-``
  (:func:`format_metric`), JSON keeps ``NaN``.
- **throughput** (trace env) = round tokens / round cost in AR-step units of the cost profile
  (about 1.0 for AR; the prefill, paid alike by every policy, is in neither).
- **tokens/s** (wall clock) = all generated tokens / wall-clock seconds, prefill included: what a
  user waits for, and the only split transformers' ``generate`` allows.
- **speedup** = a method's tokens/s / the reference's (lede's AR loop) over the same prompts;
  with identical outputs (greedy) this is the ratio of total times, and it stays a fair ratio
  when sampled outputs differ in length.
- **cost per round**: predicted = mean round cost from the cost profile (AR-step units);
  measured = mean wall-clock seconds of a round / the measured seconds of a plain AR step (the
  reference's rounds that drafted nothing), so both are in AR-step units and a policy with high
  acceptance but no speed shows where its rounds' time went.

Every function takes totals (sums over rounds and generations: ratios of sums, never means of
per-generation ratios) and returns a float; NaN marks "undefined", never 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Iterable, Optional

#: the value of a metric with no defined value (e.g. AR's acceptance); printed as ``-``
UNDEFINED = float("nan")

__all__ = ["UNDEFINED", "RoundTotals", "acceptance", "cost_per_round", "format_metric", "measured_cost_per_round",
           "speedup", "throughput", "tokens_per_round", "tokens_per_second"]


def _ratio(num: float, den: float) -> float:
    return num / den if den else UNDEFINED


def tokens_per_round(round_tokens: int, rounds: int) -> float:
    """Tokens emitted by rounds / rounds (the prefill's token and the prefill excluded).

    Args:
        round_tokens: tokens emitted by draft/verify rounds (sum of ``RoundRecord.emitted``).
        rounds: rounds played.

    Returns:
        tokens per round (1.0 for AR), NaN without rounds.
    """
    return _ratio(round_tokens, rounds)


def acceptance(accepted: int, drafted: int) -> float:
    """Accepted draft tokens / drafted tokens (exit-head and context drafts); NaN when nothing
    was drafted (AR)."""
    return _ratio(accepted, drafted)


def throughput(round_tokens: float, cost: float) -> float:
    """Round tokens / round cost in AR-step units (trace env; AR = about 1.0); NaN at zero cost."""
    return _ratio(round_tokens, cost)


def tokens_per_second(tokens: int, seconds: float) -> float:
    """All generated tokens / wall-clock seconds, prefill included; NaN without time."""
    return _ratio(tokens, seconds)


def speedup(tokens: int, seconds: float, ref_tokens: int, ref_seconds: float) -> float:
    """A method's tokens/s over the reference's (lede's AR loop) on the same prompts.

    Returns:
        the ratio of :func:`tokens_per_second` values; NaN when either is undefined or the
        reference produced nothing.
    """
    return _ratio(tokens_per_second(tokens, seconds), tokens_per_second(ref_tokens, ref_seconds))


def cost_per_round(cost: float, rounds: int) -> float:
    """Mean round cost predicted by the cost profile, in AR-step units; NaN without rounds."""
    return _ratio(cost, rounds)


def measured_cost_per_round(round_seconds: float, rounds: int, ar_step_seconds: float) -> float:
    """Mean measured seconds of a round in AR-step units: (round seconds / rounds) / the seconds
    of one plain AR step measured alongside; NaN when either is unknown."""
    return _ratio(_ratio(round_seconds, rounds), ar_step_seconds)


def format_metric(value: Any, floatfmt: str = ".3f") -> str:
    """One table cell of a metric: ``-`` for an undefined value (NaN or ``None``), else ``floatfmt``."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, floatfmt)


def _get(rec: Any, key: str, default=0):
    return rec.get(key, default) if isinstance(rec, dict) else getattr(rec, key, default)


@dataclass
class RoundTotals:
    """Sums over rounds (of one or many generations) from which every metric above follows.

    Attributes:
        rounds: rounds played (the prefill is not one).
        tokens: tokens the rounds emitted (the prefill's token excluded).
        drafted: draft tokens proposed (``RoundRecord.draft_len``).
        accepted: draft tokens accepted.
        cost: predicted round cost, AR-step units (0 when the decoder has no cost profile).
        seconds: wall-clock seconds of the rounds (0 for trace-env rounds).
        plain_rounds: rounds that drafted nothing (plain AR steps).
        plain_seconds: their wall-clock seconds.
    """

    rounds: int = 0
    tokens: int = 0
    drafted: int = 0
    accepted: int = 0
    cost: float = 0.0
    seconds: float = 0.0
    plain_rounds: int = 0
    plain_seconds: float = 0.0

    def add(self, record: Any) -> "RoundTotals":
        """Count one round: a :class:`~lede_env.decoding.RoundRecord` or its dict (the trace and
        live envs' ``info["round"]``: ``draft_len``, ``accepted``, ``emitted``, ``cost``,
        optionally ``seconds``). Returns ``self``."""
        drafted, secs = int(_get(record, "draft_len")), float(_get(record, "seconds", 0.0))
        self.rounds += 1
        self.tokens += int(_get(record, "emitted"))
        self.drafted += drafted
        self.accepted += int(_get(record, "accepted"))
        self.cost += float(_get(record, "cost", 0.0))
        self.seconds += secs
        if drafted == 0:
            self.plain_rounds += 1
            self.plain_seconds += secs
        return self

    @classmethod
    def of(cls, records: Iterable[Any]) -> "RoundTotals":
        """The totals of ``records`` (round records or their dicts)."""
        t = cls()
        for r in records:
            t.add(r)
        return t

    def __iadd__(self, other: "RoundTotals") -> "RoundTotals":
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))
        return self

    @property
    def tokens_per_round(self) -> float:
        return tokens_per_round(self.tokens, self.rounds)

    @property
    def acceptance(self) -> float:
        return acceptance(self.accepted, self.drafted)

    @property
    def throughput(self) -> float:
        return throughput(self.tokens, self.cost)

    @property
    def cost_per_round(self) -> float:
        return cost_per_round(self.cost, self.rounds)

    @property
    def ar_step_seconds(self) -> float:
        """Mean wall-clock seconds of the plain AR steps among these rounds (NaN if none)."""
        return _ratio(self.plain_seconds, self.plain_rounds)

    def measured_cost_per_round(self, ar_step_seconds: Optional[float]) -> float:
        """Mean measured round time in units of ``ar_step_seconds`` (NaN when it is unknown)."""
        return measured_cost_per_round(self.seconds, self.rounds,
                                       UNDEFINED if ar_step_seconds is None else ar_step_seconds)
