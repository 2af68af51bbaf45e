"""Tables of result rows as text: each cell (:func:`format_cell`) and whole Markdown tables
(:func:`to_markdown`).

Shared by the evaluation harness (:mod:`agents.evaluate`, which writes the tables and still
exports both names) and ``lede report`` (:mod:`agents.report`), so that neither imports the other
for them.
"""

from __future__ import annotations

from lede_env.metrics import format_metric

from .scores import format_score


def format_cell(v, floatfmt: str = ".3f") -> str:
    """One table cell: floats with ``floatfmt`` (small ones such as learning rates in ``.3g``;
    an undefined metric, NaN, as ``-``: :func:`lede_env.metrics.format_metric`), dicts as
    ``key:value`` pairs."""
    if isinstance(v, float):
        return format_metric(v, ".3g" if v and abs(v) < 0.01 else floatfmt)
    if isinstance(v, dict):
        return " ".join(f"{k}:{c}" for k, c in v.items())
    return str(v)


#: the header of a normalized score printed with its interval (``score`` and ``score_ci`` cells)
SCORE_HEADER = "score [95% CI]"


def to_markdown(rows: list[dict], floatfmt: str = ".3f") -> str:
    """A Markdown table of ``rows`` (dicts with the same keys). A ``score`` with its
    ``score_ci`` prints as one cell, ``score [low, high]`` (:func:`agents.scores.format_score`)."""
    if not rows:
        return ""
    keys = list(rows[0])
    merged = "score" in keys and "score_ci" in keys
    keys = [k for k in keys if not (merged and k == "score_ci")]

    def cell(r, k):
        if merged and k == "score":
            return format_score(r["score"], r["score_ci"])
        return format_cell(r[k], floatfmt)

    head = [SCORE_HEADER if merged and k == "score" else k for k in keys]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(cell(r, k) for k in keys) + " |" for r in rows]
    return "\n".join(lines)
