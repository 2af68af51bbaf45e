"""Normalized scores with confidence intervals: how benchmark results are reported.

The D4RL / Minari convention: a policy's mean undiscounted return ``R`` over a set of episodes
(one per prompt) is scored ``100 * (R - R_ar) / (R_oracle - R_ar)``, 0 for always-AR and 100 for
the hindsight oracle on the same prompts (a dataset's ``ref_min_score`` and ``ref_max_score``;
``minari.get_normalized_score`` gives the same number, divided by 100). A category's score uses
the category's own references; the ``all`` score the means over every prompt.

Uncertainty follows rliable (Agarwal et al., arXiv 2108.13264): a 95 % percentile interval of
the stratified bootstrap, resampling prompts within each category and training seeds (scipy's
``scipy.stats.bootstrap`` resamples each sample on its own: one sample per category, one of seeds);
where several categories are aggregated, the interquartile mean (IQM) of the category scores
beside the pooled score.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

#: confidence level of every interval
LEVEL = 0.95
#: bootstrap resamples
RESAMPLES = 2000


def normalized_score(ret: float, ref_min: float, ref_max: float) -> float:
    """``100 * (ret - ref_min) / (ref_max - ref_min)``; NaN where the references coincide.

    Args:
        ret: a mean episode return (undiscounted, the env's reward units).
        ref_min, ref_max: the always-AR and oracle mean returns on the same episodes.
    """
    return float(_ratio(np.float64(ret), np.float64(ref_min), np.float64(ref_max)))


def group_score(returns: np.ndarray, ar: np.ndarray, oracle: np.ndarray) -> float:
    """The normalized score of per-episode ``returns`` (``(S, P)``: seeds x prompts, or ``(P,)``)
    against per-prompt always-AR and oracle returns (``(P,)``)."""
    return normalized_score(float(np.mean(returns)), float(np.mean(ar)), float(np.mean(oracle)))


def iqm(scores: Sequence[float]) -> float:
    """Interquartile mean (the mean of the middle 50 %, ``scipy.stats.trim_mean(x, 0.25)``) of
    the finite scores; NaN if none."""
    x = np.asarray([s for s in scores if np.isfinite(s)], dtype=float)
    return float(_iqm_rows(x[None])[0]) if len(x) else float("nan")


def scores_with_intervals(returns: np.ndarray, ar: np.ndarray, oracle: np.ndarray, categories: Sequence[str],
                          seed: int = 0, resamples: int = RESAMPLES) -> dict[str, tuple[float, float, float]]:
    """Normalized scores of one policy per category, overall (``"all"``) and as the IQM over
    categories (``"iqm"``, when there are several), each with its stratified-bootstrap interval.

    Args:
        returns: ``(S, P)`` float, the policy's return on prompt p with training seed s (S = 1 for
            a policy that is not trained).
        ar, oracle: ``(P,)`` float, always-AR's and the oracle's returns (deterministic).
        categories: ``(P,)`` the prompts' categories (the strata).
        seed: seeds the bootstrap.

    Returns:
        ``{group: (score, low, high)}``; the interval is ``(nan, nan)`` where it cannot be
        estimated (a single prompt and a single seed).

    Raises:
        ValueError: shapes that do not agree.
    """
    R = np.atleast_2d(np.asarray(returns, dtype=float))
    ar, oracle = np.asarray(ar, dtype=float), np.asarray(oracle, dtype=float)
    cats = np.asarray(list(categories))
    if R.shape[1] != len(ar) or len(ar) != len(oracle) or len(ar) != len(cats):
        raise ValueError(f"returns {R.shape}, ar {ar.shape}, oracle {oracle.shape} and {len(cats)} categories "
                         "must agree: returns (seeds, prompts), the others (prompts,).")
    names = sorted(set(cats.tolist()))
    members = [np.flatnonzero(cats == c) for c in names]

    def scores_of(seed_idx, *strata) -> dict:
        """Every group's score for a batch of resamples: ``seed_idx`` ``(B, S')``, ``strata[c]``
        ``(B, n_c)`` prompt indices; ``{group: (B,)}``."""
        rs = R[np.asarray(seed_idx, dtype=int)].mean(axis=1)  # (B, P): each prompt's mean over the seeds drawn
        sums = []
        for idx in strata:
            idx = np.asarray(idx, dtype=int)
            sums.append([np.take_along_axis(x, idx, axis=1).sum(axis=1) if x.ndim == 2 else x[idx].sum(axis=1)
                         for x in (rs, ar, oracle)] + [idx.shape[1]])
        per = {c: _ratio(*sm[:3]) for c, sm in zip(names, sums)}
        tot = [sum(sm[i] for sm in sums) for i in range(3)]
        per["all"] = _ratio(*tot)
        if len(names) > 1:
            per["iqm"] = _iqm_rows(np.stack([per[c] for c in names], axis=1))
        return per

    point = {k: float(v[0]) for k, v in scores_of(np.arange(len(R))[None], *[m[None] for m in members]).items()}
    out = {}
    for key in point:
        if key in names:  # a category's interval resamples its own prompts and the seeds
            j = names.index(key)
            data = (np.arange(len(R)), *[m if i == j else m[:1] for i, m in enumerate(members)])
            resample = [0, 1 + j]
        else:
            data, resample = (np.arange(len(R)), *members), list(range(1 + len(members)))
        out[key] = (point[key], *_interval(lambda *d, key=key: scores_of(*d)[key], data, resample, seed, resamples))
    return out


def _ratio(ret_sum, ar_sum, oracle_sum):
    """Normalized scores of batched sums or means (equal counts cancel; :func:`normalized_score`'s
    one formula), NaN where the references coincide."""
    span = oracle_sum - ar_sum
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(np.isfinite(span) & (np.abs(span) > 1e-12), 100.0 * (ret_sum - ar_sum) / span, np.nan)


def _iqm_rows(x: np.ndarray) -> np.ndarray:
    """:func:`iqm` of each row of ``x`` ``(B, C)`` (rows with NaN scores: NaN)."""
    from scipy.stats import trim_mean

    return trim_mean(x, 0.25, axis=1)


def _interval(stat, data: tuple, resample: list[int], seed: int, resamples: int) -> tuple[float, float]:
    """The percentile interval of ``stat`` under the bootstrap of the samples ``resample`` of
    ``data`` (the others held fixed; samples of one element cannot vary)."""
    from scipy.stats import bootstrap

    vary = [i for i in resample if len(data[i]) > 1]
    if not vary or resamples <= 0:
        return float("nan"), float("nan")

    def batched(*samples, axis=-1):
        n = samples[0].shape[0] if samples[0].ndim == 2 else 1
        full = [np.broadcast_to(d, (n, len(d))) for d in data]
        for i, smp in zip(vary, samples):
            full[i] = np.atleast_2d(smp)
        return stat(*full)

    res = bootstrap(tuple(data[i] for i in vary), batched, n_resamples=resamples, vectorized=True, paired=False,
                    confidence_level=LEVEL, method="percentile", random_state=np.random.default_rng(seed))
    lo, hi = res.confidence_interval
    return float(lo), float(hi)


def format_score(score: float, interval: Optional[Sequence[float]] = None) -> str:
    """``score [low, high]`` (one decimal; ``-`` for an undefined score, no interval where it is
    undefined)."""
    if score is None or not np.isfinite(score):
        return "-"
    if interval is None or not all(np.isfinite(v) for v in interval):
        return f"{score:.1f}"
    return f"{score:.1f} [{interval[0]:.1f}, {interval[1]:.1f}]"
