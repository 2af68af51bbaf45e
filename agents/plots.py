"""Plots of evaluation results (matplotlib, PNG): where the time goes and what the agent does.

- :func:`plot_speedup_by_category` - wall-clock speedup over AR per policy per prompt category
  (from :func:`agents.evaluate.live_eval` rows) or trace-env throughput (from ``trace_eval`` rows);
- :func:`plot_choices` - one policy's exit layers and speculation lengths: histograms, and the
  choices over the course of each generation, coloured by whether the round was fully accepted
  (from the ``records`` that ``live_eval`` fills).

Every function writes the figure atomically (temporary name, then rename) and returns its path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from lede_env.model import atomic_file  # noqa: E402


def _save(fig, path: Path) -> Path:
    path = Path(path)
    try:
        with atomic_file(path, suffix=".png") as tmp:  # matplotlib infers the format from the suffix
            fig.savefig(tmp, dpi=120, bbox_inches="tight")
    finally:
        plt.close(fig)
    return path


def plot_speedup_by_category(rows: Sequence[dict], path: Path, metric: str = "speedup_vs_ar") -> Path:
    """Grouped bars: ``metric`` per policy (bars) per prompt category (groups), ``all`` first.

    Args:
        rows: result rows with ``policy``, ``category`` (optional; ``all`` when absent) and ``metric``.
        path: PNG file to write.
        metric: ``"speedup_vs_ar"`` (live rows) or ``"throughput"`` (trace rows, tokens per AR-step unit).

    Raises:
        ValueError: no row has ``metric``.
    """
    rows = [r for r in rows if metric in r]
    if not rows:
        raise ValueError(f"No result row has {metric!r}: pass live_eval rows (speedup_vs_ar) or trace_eval rows "
                         "(throughput).")
    cats = list(dict.fromkeys(r.get("category", "all") for r in rows))
    pols = list(dict.fromkeys(r["policy"] for r in rows))
    val = {(r["policy"], r.get("category", "all")): r[metric] for r in rows}
    width = 0.8 / len(pols)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(cats) * max(1, len(pols)) * 0.5), 4))
    x = np.arange(len(cats))
    for j, p in enumerate(pols):
        ax.bar(x + (j - (len(pols) - 1) / 2) * width, [val.get((p, c), np.nan) for c in cats], width, label=p)
    ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
    ax.set_xticks(x, cats, rotation=30, ha="right")
    ax.set_ylabel("speedup over AR (wall clock)" if metric == "speedup_vs_ar" else "tokens per AR-step cost")
    ax.legend(fontsize=8, ncol=2)
    ax.set_title("speedup per policy and prompt category" if metric == "speedup_vs_ar"
                 else "trace-env throughput per policy and prompt category")
    return _save(fig, path)


def plot_choices(records: Sequence[dict], path: Path, exit_layers: Sequence[int], k_max: int,
                 title: str = "") -> Path:
    """A policy's actions: histograms of exit layer and speculation length, and exit layer over
    the generated tokens of every generation (marker size = K; green = fully accepted round,
    red = a draft token was rejected, grey = AR step).

    Args:
        records: ``[{"prompt_id", "category", "tokens", "rounds": [RoundRecord dicts]}]``
            (see :func:`agents.evaluate.live_eval`).
        path: PNG file to write.
        exit_layers: candidate exits (for the histogram's bins); k_max: largest K.

    Raises:
        ValueError: no rounds in ``records``.
    """
    rounds = [r for rec in records for r in rec["rounds"]]
    if not rounds:
        raise ValueError("No rounds to plot: run the policy with live_eval(..., records=...) first.")
    fig, axes = plt.subplots(1, 3, figsize=(15, 4), gridspec_kw={"width_ratios": [1, 1, 2.2]})
    exits = [0] + list(exit_layers)
    counts = [sum(r["exit_layer"] == e for r in rounds) for e in exits]
    axes[0].bar([str(e) if e else "AR" for e in exits], counts, color="tab:blue")
    axes[0].set_xlabel("exit layer E")
    axes[0].set_ylabel("rounds")
    axes[0].tick_params(axis="x", labelsize=7, rotation=90)
    ks = list(range(0, k_max + 1))
    full = [sum(r["draft_len"] == k and r["accepted"] >= k > 0 for r in rounds) for k in ks]
    part = [sum(r["draft_len"] == k and not (r["accepted"] >= k > 0) for r in rounds) for k in ks]
    axes[1].bar(ks, full, color="tab:green", label="fully accepted")
    axes[1].bar(ks, part, bottom=full, color="tab:red", label="rejection / AR")
    axes[1].set_xlabel("speculation length K (0 = AR)")
    axes[1].legend(fontsize=8)
    ax = axes[2]
    for rec in records:
        pos = 1
        for r in rec["rounds"]:
            c = "grey" if r["draft_len"] == 0 else ("tab:green" if r["accepted"] >= r["draft_len"] else "tab:red")
            ax.scatter(pos, r["exit_layer"], s=8 + 10 * r["draft_len"], color=c, alpha=0.5, linewidths=0)
            pos += r["emitted"]
    ax.set_xlabel("generated tokens")
    ax.set_ylabel("exit layer E (0 = AR)")
    ax.set_title("choices over each generation (size = K)")
    fig.suptitle(title or "exit layers and speculation lengths")
    return _save(fig, path)
