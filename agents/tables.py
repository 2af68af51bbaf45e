"""Tables of result rows as text: each cell (:func:`format_cell`) and whole Markdown tables
(:func:`to_markdown`).

Shared by the evaluation harness (:mod:`agents.evaluate`, which writes the tables and still
exports both names) and ``lede report`` (:mod:`agents.report`), so that neither imports the other
for them.
"""

from __future__ import annotations

from lede_env.metrics import format_metric


def format_cell(v, floatfmt: str = ".3f") -> str:
    """One table cell: floats with ``floatfmt`` (small ones such as learning rates in ``.3g``;
    an undefined metric, NaN, as ``-``: :func:`lede_env.metrics.format_metric`), dicts as
    ``key:value`` pairs."""
    if isinstance(v, float):
        return format_metric(v, ".3g" if v and abs(v) < 0.01 else floatfmt)
    if isinstance(v, dict):
        return " ".join(f"{k}:{c}" for k, c in v.items())
    return str(v)


def to_markdown(rows: list[dict], floatfmt: str = ".3f") -> str:
    """A Markdown table of ``rows`` (dicts with the same keys)."""
    if not rows:
        return ""
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(format_cell(r[k], floatfmt) for k in keys) + " |" for r in rows]
    return "\n".join(lines)
