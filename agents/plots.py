"""Plots of evaluation results (matplotlib, PNG): where the time goes and what the agent does.

- :func:`plot_speedup_by_category` - wall-clock speedup over AR per policy per prompt category
  (from :func:`agents.evaluate.live_eval` rows) or trace-env throughput (from ``trace_eval`` rows);
- :func:`plot_choices` - one policy's exit layers and speculation lengths: histograms, and the
  choices over the course of each generation, coloured by whether the round was fully accepted
  (from the ``records`` that ``live_eval`` fills);
- :func:`plot_token_exits` / :func:`token_exits_html` - the generated text, each token coloured by
  the exit layer that drafted it;
- :func:`plot_acceptance` - acceptance over the course of a generation, per policy and category.

Every function writes the figure atomically (temporary name, then rename) and returns its path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from lede_env.storage import atomic_file  # noqa: E402


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


def token_exits(record: dict) -> list[int]:
    """The exit layer that produced each generated token of one ``live_eval`` record (0 = the
    verifier: the prefill token, plain AR steps, and each round's correction/bonus token).

    Returns:
        one int per token of ``record["tokens"]``.
    """
    exits = [0]  # the prefill's token
    for r in record["rounds"]:
        exits += [r["exit_layer"]] * r["accepted"] + [0] * (r["emitted"] - r["accepted"])
    return exits[:len(record["tokens"])]


def _exit_colours(exit_layers: Sequence[int]):
    cmap = plt.get_cmap("viridis")
    n = max(len(exit_layers) - 1, 1)
    return {e: cmap(i / n) for i, e in enumerate(exit_layers)}


def plot_token_exits(record: dict, pieces: Sequence[str], path: Path, exit_layers: Sequence[int],
                     title: str = "", width_chars: int = 100) -> Path:
    """The generated text with every token's background coloured by the exit layer that drafted
    it (white = the verifier's own token: prefill, AR step, or a round's correction/bonus).

    Args:
        record: one ``live_eval`` record (``tokens``, ``rounds``).
        pieces: the text of each token (same length as ``record["tokens"]``).
        path: PNG file to write.
        exit_layers: candidate exits (the colour scale).
        width_chars: characters per line before wrapping.

    Raises:
        ValueError: ``pieces`` and the record's tokens differ in length.
    """
    if len(pieces) != len(record["tokens"]):
        raise ValueError(f"{len(pieces)} token texts for {len(record['tokens'])} tokens.")
    exits = token_exits(record)
    colours = _exit_colours(exit_layers)
    lines, line, col = [], [], 0  # wrap into lines of (x, text, exit)
    for piece, e in zip(pieces, exits):
        for j, part in enumerate(piece.split("\n")):
            if j:
                lines.append(line)
                line, col = [], 0
            part = part.replace("\t", "    ")
            if col + len(part) > width_chars and line:
                lines.append(line)
                line, col = [], 0
            if part:
                line.append((col, part, e))
                col += len(part)
    lines.append(line)
    fs = 9
    cw, lh = 0.6 * fs / 72, 1.5 * fs / 72  # monospace character width and line height, inches
    fig = plt.figure(figsize=(width_chars * cw + 0.4, len(lines) * lh + 0.9))
    W, H = fig.get_size_inches()
    for i, ln in enumerate(lines):
        y = 1 - (0.5 + (i + 1) * lh) / H
        for x, text, e in ln:
            fig.text((0.2 + x * cw) / W, y, text, family="monospace", fontsize=fs, va="bottom",
                     bbox=dict(boxstyle="square,pad=0.05", linewidth=0,
                               facecolor=colours.get(e, "white") if e else "white", alpha=0.55 if e else 1.0))
    handles = [plt.Rectangle((0, 0), 1, 1, color=c, alpha=0.55) for c in colours.values()]
    fig.legend(handles, [f"E={e}" for e in colours], loc="lower center", ncol=min(len(colours), 14), fontsize=7,
               frameon=False)
    fig.suptitle(title or "tokens coloured by the exit layer that drafted them (white: verifier)", fontsize=10)
    return _save(fig, path)


def token_exits_html(record: dict, pieces: Sequence[str], exit_layers: Sequence[int]) -> str:
    """The same picture as :func:`plot_token_exits` as an HTML ``<pre>`` block (for notebooks
    and the report page); hovering a token shows its exit layer."""
    import html

    colours = _exit_colours(exit_layers)
    spans = []
    for piece, e in zip(pieces, token_exits(record)):
        if e:
            r, g, b, _ = colours.get(e, (1, 1, 1, 1))
            style = f"background: rgba({int(255 * r)},{int(255 * g)},{int(255 * b)},0.45)"
            spans.append(f'<span style="{style}" title="E={e}">{html.escape(piece)}</span>')
        else:
            spans.append(f'<span title="verifier">{html.escape(piece)}</span>')
    legend = " ".join(f'<span style="background: rgba({int(255 * c[0])},{int(255 * c[1])},{int(255 * c[2])},0.45)">'
                      f"E={e}</span>" for e, c in colours.items())
    return f'<pre style="white-space: pre-wrap">{"".join(spans)}</pre><p>{legend} (uncoloured: the verifier)</p>'


def plot_acceptance(records_by_policy: dict, path: Path, bins: int = 24) -> Path:
    """Acceptance rate over the course of a generation: per policy and prompt category, the mean
    of accepted / drafted tokens over the drafting rounds that start in each of ``bins`` equal
    spans of generated positions; AR steps are skipped.

    Args:
        records_by_policy: ``{policy label: live_eval records}``.
        path: PNG file to write.

    Raises:
        ValueError: no drafting round in any record.
    """
    from lede_env.metrics import acceptance

    series = {}
    for lab, recs in records_by_policy.items():
        for rec in recs:
            pos, pts = 1, []
            for r in rec["rounds"]:
                if r["draft_len"]:
                    pts.append((pos, acceptance(r["accepted"], r["draft_len"])))
                pos += r["emitted"]
            series.setdefault((lab, rec.get("category", "all")), []).extend(pts)
    series = {k: v for k, v in series.items() if v}
    if not series:
        raise ValueError("No drafting round to plot (only AR steps).")
    fig, ax = plt.subplots(figsize=(9, 4))
    for (lab, cat), pts in sorted(series.items()):
        pts.sort()
        # mean acceptance of the drafting rounds starting in each bin of generated positions
        xs = np.array([p for p, _ in pts], float)
        ys = np.array([a for _, a in pts], float)
        edges = np.linspace(xs.min(), xs.max() + 1, min(bins, len(xs)) + 1)
        idx = np.digitize(xs, edges) - 1
        mx = [xs[idx == b].mean() for b in range(len(edges) - 1) if (idx == b).any()]
        my = [ys[idx == b].mean() for b in range(len(edges) - 1) if (idx == b).any()]
        ax.plot(mx, my, marker=".", label=f"{lab} ({cat})")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("generated tokens")
    ax.set_ylabel("acceptance (accepted / drafted)")
    ax.set_title("acceptance over a generation")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _save(fig, path)
