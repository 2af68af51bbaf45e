"""Stopping a draft inside the round: the action's speculation length K is a cap, and drafting
ends at the first draft token after which one more would not pay.

The draft head's probability of each draft token is computed anyway while drafting, and it
predicts acceptance far better than anything known before the round (SpecDec++, arXiv
2405.19715; DISCO, arXiv 2405.04304; AdaEDL, arXiv 2410.18351; LEDE's own Figure 1: the agent
picks the exit layer, the length adapts token by token). Two rules, shared by the live decoder,
the live env and trace replay (:func:`lede_env.replay.replay_round`):

- :class:`ThresholdStop` - stop after the first draft token whose draft-head probability is
  below a fixed threshold (Draft & Verify, arXiv 2309.08168; Kangaroo, arXiv 2404.18911).
- :class:`CalibratedStop` - looks at each draft token before keeping it: the draft head's
  probability p of the candidate goes through a per-exit calibration of acceptance
  (:class:`AcceptanceCalibration`, fitted on calibration continuations the heads were not fitted
  on), and the candidate is kept only while the probability that it and every draft token
  before it are accepted, P_j = prod a_E(p_i), exceeds lambda x the marginal cost of keeping it
  (its pass through layers 1..E for the bonus position and one more verified position, in
  AR-step units from the cost profile; lambda the throughput aimed at). The candidate's draft
  pass is needed anyway (it is the previous token's pass, or the pending token's own layers
  1..E, which verification reuses), so looking costs one draft-head call; a round whose first
  candidate is dropped verifies just the pending token: an AR step that cost one head more.

A rule never changes the output (the emitted tokens are still the verifier's), only how many
tokens a round drafts, hence its cost.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from .mdp import verified_positions

#: Default bin edges of :class:`AcceptanceCalibration` over the draft token's probability: finer
#: near 1, where confident drafts concentrate.
DEFAULT_EDGES = (0.0, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98, 1.0)


class StopRule:
    """Never stops: every round drafts its whole K (the base of the rules below).

    A rule answers two questions while a round drafts: :meth:`keep` (is the draft token just
    computed kept, or dropped and the draft ended before it?) and :meth:`stop_after` (after this
    kept token, end the draft?).

    Attributes:
        active: whether the rule reads draft probabilities at all (the decoder skips computing
            them when not).
    """

    active = False

    def keep(self, exit_index: int, probs: Sequence[float]) -> bool:
        """True to keep the newest draft token (the last of ``probs``).

        Args:
            exit_index: index of the round's exit layer in the candidate exits.
            probs: draft-head probabilities of the kept draft tokens of this round and, last, of
                the candidate, oldest first.
        """
        return True

    def stop_after(self, exit_index: int, probs: Sequence[float]) -> bool:
        """True to end the draft after the last of ``probs`` (the kept draft tokens' draft-head
        probabilities, oldest first; at least one)."""
        return False

    def draft(self, exit_index: int, probs: Sequence[float], K: int) -> tuple[int, int]:
        """What a round with cap ``K`` drafts, given its candidates' draft probabilities (fewer
        than K past the end of a trace: drafting goes on there).

        Returns:
            ``(K', passes)``: draft tokens kept (0..K) and draft passes run (K', or K' + 1 when a
            candidate was looked at and dropped).
        """
        for j in range(K):
            if j >= len(probs):
                return K, K
            if not self.keep(exit_index, probs[: j + 1]):
                return j, j + 1
            if self.stop_after(exit_index, probs[: j + 1]):
                return j + 1, j + 1
        return K, K

    def draft_len(self, exit_index: int, probs: Sequence[float], K: int) -> int:
        """Draft tokens kept (the first element of :meth:`draft`)."""
        return self.draft(exit_index, probs, K)[0]

    def describe(self) -> dict:
        """JSON description (for env specs and exported policies)."""
        return {"kind": "none"}


#: the rule that never stops (a static (E, K) drafts its whole K)
NO_STOP = StopRule()


@dataclass(frozen=True)
class ThresholdStop(StopRule):
    """Stop after the first draft token whose draft-head probability is below ``threshold``
    (that token is kept: it was drafted and is verified).

    Raises:
        ValueError: a threshold outside (0, 1).
    """

    threshold: float
    active = True

    def __post_init__(self) -> None:
        if not 0.0 < float(self.threshold) < 1.0:
            raise ValueError(f"stop threshold {self.threshold!r} must be a probability in (0, 1).")

    def stop_after(self, exit_index: int, probs: Sequence[float]) -> bool:
        return float(probs[-1]) < self.threshold

    def describe(self) -> dict:
        return {"kind": "threshold", "threshold": float(self.threshold)}


@dataclass(frozen=True)
class DropStop(StopRule):
    """Drop a draft token whose draft-head probability is below ``threshold`` and end the draft
    before it (the pass that produced it verifies nothing more; a dropped first token leaves a
    plain AR step). Unlike :class:`ThresholdStop`, which keeps that token, this never verifies
    a token it doubts: the rule for one-token drafts, where keeping it is drafting anyway.

    Raises:
        ValueError: a threshold outside (0, 1).
    """

    threshold: float
    active = True

    def __post_init__(self) -> None:
        if not 0.0 < float(self.threshold) < 1.0:
            raise ValueError(f"drop threshold {self.threshold!r} must be a probability in (0, 1).")

    def keep(self, exit_index: int, probs: Sequence[float]) -> bool:
        return float(probs[-1]) >= self.threshold

    def describe(self) -> dict:
        return {"kind": "drop", "threshold": float(self.threshold)}


@dataclass
class AcceptanceCalibration:
    """Per-exit probability that a draft token is accepted, given the draft head's probability
    of it (and an accepted prefix): a monotone histogram calibration (binning + pool-adjacent-
    violators, i.e. isotonic regression on bins).

    Attributes:
        edges: [B + 1] float32 bin edges over [0, 1].
        rate: [n_exits, B] float32 acceptance per bin, non-decreasing along bins.
        mean: [n_exits] float32 acceptance of all draft tokens of that exit.
        count: [n_exits, B] float32 calibration positions per bin.
    """

    edges: np.ndarray
    rate: np.ndarray
    mean: np.ndarray
    count: np.ndarray

    @classmethod
    def fit(cls, probs: np.ndarray, accepted: np.ndarray, edges: Sequence[float] = DEFAULT_EDGES,
            prior: float = 2.0) -> "AcceptanceCalibration":
        """Fit on calibration positions.

        Args:
            probs: [N, n_exits] float draft-head probability of each exit's draft token.
            accepted: [N, n_exits] bool, the draft token equals the full model's.
            prior: pseudo-counts pulling sparse bins towards the exit's mean acceptance.

        Raises:
            ValueError: shapes that differ, or no positions.
        """
        probs = np.asarray(probs, np.float64)
        acc = np.asarray(accepted, np.float64)
        if probs.shape != acc.shape or probs.ndim != 2 or probs.shape[0] == 0:
            raise ValueError(f"probs {probs.shape} and accepted {acc.shape} must be the same [N, n_exits], N > 0.")
        e = np.asarray(edges, np.float64)
        B = len(e) - 1
        b = np.clip(np.searchsorted(e, probs, side="right") - 1, 0, B - 1)  # [N, n_exits]
        n_exits = probs.shape[1]
        mean = acc.mean(0)
        rate = np.zeros((n_exits, B))
        count = np.zeros((n_exits, B))
        for i in range(n_exits):
            cnt = np.bincount(b[:, i], minlength=B).astype(np.float64)
            hit = np.bincount(b[:, i], weights=acc[:, i], minlength=B)
            r = (hit + prior * mean[i]) / (cnt + prior)
            rate[i] = _pav(r, cnt + prior)
            count[i] = cnt
        return cls(e.astype(np.float32), rate.astype(np.float32), mean.astype(np.float32), count.astype(np.float32))

    def __call__(self, exit_index: int, prob: float) -> float:
        """Calibrated acceptance probability of a draft token with draft-head probability ``prob``."""
        B = self.rate.shape[1]
        b = min(max(int(np.searchsorted(self.edges, prob, side="right")) - 1, 0), B - 1)
        return float(self.rate[exit_index, b])

    def state(self) -> dict[str, torch.Tensor]:
        """Tensors to save beside the exit heads (``accept_*`` keys)."""
        return {"accept_edges": torch.from_numpy(self.edges), "accept_rate": torch.from_numpy(self.rate),
                "accept_mean": torch.from_numpy(self.mean), "accept_count": torch.from_numpy(self.count)}

    @classmethod
    def from_state(cls, t: dict[str, torch.Tensor]) -> Optional["AcceptanceCalibration"]:
        """Inverse of :meth:`state`; ``None`` when ``t`` holds no calibration."""
        if "accept_rate" not in t:
            return None
        return cls(t["accept_edges"].numpy().astype(np.float32), t["accept_rate"].numpy().astype(np.float32),
                   t["accept_mean"].numpy().astype(np.float32), t["accept_count"].numpy().astype(np.float32))


def _pav(y: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Weighted pool-adjacent-violators: the non-decreasing fit of ``y`` closest in weighted L2."""
    blocks: list[list[float]] = []  # [value, weight, length]
    for v, wt in zip(y.tolist(), w.tolist()):
        blocks.append([v, wt, 1])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            v2, w2, n2 = blocks.pop()
            v1, w1, n1 = blocks.pop()
            ws = w1 + w2
            blocks.append([(v1 * w1 + v2 * w2) / ws if ws > 0 else (v1 + v2) / 2, ws, n1 + n2])
    return np.concatenate([np.full(n, v) for v, _, n in blocks])


@dataclass
class CalibratedStop(StopRule):
    """Keep a draft token only while the calibrated probability that it and every kept draft
    token before it are accepted pays for keeping it (see the module docstring).

    Attributes:
        calibration: the per-exit acceptance calibration.
        thresholds: [n_exits, k_max] float: ``thresholds[i, j]`` is the least probability P_{j+1}
            (all of the first j+1 draft tokens accepted) at which keeping the (j+1)-th draft token
            at exit i pays: lambda x (cost of the round keeping j+1 tokens - keeping j, with the
            candidate's draft pass run in both).
        lam: the throughput lambda the thresholds were derived for (tokens per AR-step unit).
    """

    calibration: AcceptanceCalibration
    thresholds: np.ndarray
    lam: float = 1.0
    active = True

    @classmethod
    def from_profile(cls, calibration: AcceptanceCalibration, profile, exit_layers: Sequence[int], k_max: int,
                     lam: float = 1.0, bonus: bool = True, reuse: bool = True) -> "CalibratedStop":
        """Thresholds from a cost profile: keeping draft token j+1 adds, in expectation,
        P_{j+1} tokens and costs round_cost(E, j+1) - round_cost(E, j) with j+1 draft passes in
        both (the candidate's pass and head are spent either way); keep it iff
        P_{j+1} > lam x that difference.

        Raises:
            ValueError: lam <= 0, or a calibration for another number of exits.
        """
        if not lam > 0:
            raise ValueError(f"lambda must be > 0 (a throughput in tokens per AR-step unit), got {lam}.")
        if calibration.rate.shape[0] != len(exit_layers):
            raise ValueError(f"The acceptance calibration covers {calibration.rate.shape[0]} exits, the decoder has "
                             f"{len(exit_layers)}: refit the exit heads for these exits.")

        th = np.zeros((len(exit_layers), k_max))
        for i, E in enumerate(exit_layers):
            for j in range(k_max):
                dc = (profile.round_cost(E, j + 1, verified_positions(j + 1, bonus), reuse, passes=j + 1)
                      - profile.round_cost(E, j, verified_positions(j, bonus), reuse, passes=j + 1))
                th[i, j] = lam * dc
        return cls(calibration, th, float(lam))

    def keep(self, exit_index: int, probs: Sequence[float]) -> bool:
        j = len(probs) - 1  # draft tokens already kept
        if j >= self.thresholds.shape[1]:
            return False
        P = 1.0
        for p in probs:
            P *= self.calibration(exit_index, float(p))
        return P > self.thresholds[exit_index, j]

    def describe(self) -> dict:
        return {"kind": "calibrated", "lambda": self.lam}


def as_stop_rule(rule) -> StopRule:
    """A :class:`StopRule` from ``None`` (never stop), a float (a :class:`ThresholdStop`) or a rule."""
    if rule is None:
        return StopRule()
    if isinstance(rule, StopRule):
        return rule
    if isinstance(rule, (int, float)) and not isinstance(rule, bool):
        return ThresholdStop(float(rule))
    raise TypeError(f"A stop rule is None, a probability threshold or a StopRule, got {rule!r}.")
