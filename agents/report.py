"""``lede report RESULTS``: the plots of an evaluation as PNG files and one Markdown + HTML page.

``RESULTS`` is a folder written by ``lede evaluate`` or ``lede demo``: ``trace_eval.json``
(trace-env rows), optionally ``live_eval.json`` (real decoder rows) and ``records.json`` (every
round of every live generation with the text of each token, written by :func:`save_records`).
The report holds: speedup (or trace-env throughput) per policy and prompt category, each
dynamic policy's exit layers and speculation lengths, acceptance over a generation, and the
text of a few generations with each token coloured by the exit layer that drafted it.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Optional

from lede_env.storage import write_json_atomic, write_text_atomic

from .tables import format_cell, to_markdown

RECORDS_FORMAT = 1


def save_records(out_dir: Path, records: dict, tokenizer, exit_layers, k_max: int, prompts: str) -> Path:
    """Write ``records.json``: ``live_eval`` records plus the text of each token (``pieces``).

    Args:
        records: ``{policy label: [record, ...]}`` filled by :func:`agents.evaluate.live_eval`.
        tokenizer: the model's tokenizer (decodes each token id on its own).
        exit_layers, k_max: the action set (the plots' scales); prompts: the prompt spec.
    """
    for recs in records.values():
        for rec in recs:
            rec["pieces"] = [tokenizer.decode([t]) for t in rec["tokens"]]
    path = Path(out_dir) / "records.json"
    write_json_atomic(path, {"format": RECORDS_FORMAT, "exit_layers": list(exit_layers), "k_max": int(k_max),
                             "prompts": prompts, "records": records})
    return path


def _load(path: Path):
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}): re-run `lede evaluate` to rewrite it.") from None


def _slug(s: str) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in s)[:60]


def write_report(results: str | Path, out: Optional[str | Path] = None, max_texts: int = 3) -> Path:
    """Write the report of the results folder ``results``.

    Args:
        out: folder for ``report.md``, ``report.html`` and the PNGs (default ``RESULTS/report``).
        max_texts: generations shown token by token, per dynamic policy (one per prompt category
            first).

    Returns:
        the path of ``report.md``.

    Raises:
        FileNotFoundError: ``results`` holds neither ``trace_eval.json`` nor ``live_eval.json``.
        ValueError: a results file is not valid JSON.
    """
    from .plots import plot_acceptance, plot_choices, plot_speedup_by_category, plot_token_exits, token_exits_html

    res = Path(results)
    trace_p, live_p, rec_p = res / "trace_eval.json", res / "live_eval.json", res / "records.json"
    if not trace_p.exists() and not live_p.exists():
        raise FileNotFoundError(f"No trace_eval.json or live_eval.json in {res}: point `lede report` at a folder "
                                "written by `lede evaluate --out DIR` or `lede demo`.")
    out = Path(out) if out is not None else res / "report"
    out.mkdir(parents=True, exist_ok=True)
    trace_rows = _load(trace_p) if trace_p.exists() else []
    live_rows = _load(live_p) if live_p.exists() else []
    md = [f"# lede report: `{res}`", ""]
    body = []  # (title, table rows, image file or None, html extra)
    if live_rows:
        f = plot_speedup_by_category(live_rows, out / "speedup_by_category.png", "speedup_vs_ar")
        body.append(("Wall-clock speedup over AR (real decoder, same process)",
                     [{k: v for k, v in r.items() if k != "exit_histogram"} for r in live_rows], f.name, ""))
    if trace_rows:
        f = plot_speedup_by_category(trace_rows, out / "throughput_by_category.png", "throughput")
        body.append(("Trace-env throughput (tokens per AR-step cost) and share of the oracle",
                     trace_rows, f.name, ""))
    if rec_p.exists():
        rec = _load(rec_p)
        exits, k_max = rec["exit_layers"], rec["k_max"]
        dynamic = {lab: recs for lab, recs in rec["records"].items()
                   if lab != "ar" and not lab.startswith("static") and any(r["rounds"] for r in recs)}
        if dynamic:
            f = plot_acceptance(dynamic, out / "acceptance.png")
            body.append(("Acceptance over a generation", [], f.name, ""))
        for lab, recs in dynamic.items():
            f = plot_choices(recs, out / f"choices_{_slug(lab)}.png", exits, k_max, title=f"{lab} on {rec['prompts']}")
            body.append((f"Exit layers and speculation lengths: {lab}", [], f.name, ""))
            for r in _spread(recs, max_texts):
                if "pieces" not in r:
                    continue
                name = f"tokens_{_slug(lab)}_{_slug(str(r['prompt_id']))}.png"
                plot_token_exits(r, r["pieces"], out / name, exits, title=f"{lab}: {r['prompt_id']} ({r['category']})")
                body.append((f"{lab} on {r['prompt_id']} ({r['category']}): tokens by exit layer", [], name,
                             token_exits_html(r, r["pieces"], exits)))
    page = ["<!doctype html><meta charset='utf-8'><title>lede report</title>",
            "<style>body{font-family:sans-serif;max-width:1100px;margin:auto} img{max-width:100%}"
            " table{border-collapse:collapse;font-size:12px} td,th{border:1px solid #ccc;padding:2px 6px}</style>",
            f"<h1>lede report: {html.escape(str(res))}</h1>"]
    for title, rows, img, extra in body:
        md += [f"## {title}", ""] + ([to_markdown(rows), ""] if rows else []) + ([f"![{title}]({img})", ""] if img else [])
        page.append(f"<h2>{html.escape(title)}</h2>")
        if rows:
            page.append(_html_table(rows))
        if img:
            page.append(f"<img src='{img}' alt='{html.escape(title)}'>")
        page.append(extra)
    md_path = out / "report.md"
    write_text_atomic(md_path, "\n".join(md))
    write_text_atomic(out / "report.html", "\n".join(page))
    return md_path


def _spread(records: list[dict], n: int) -> list[dict]:
    """Up to ``n`` records, one per prompt category first (code, prose, ...), then in order."""
    firsts = list({r.get("category"): r for r in reversed(records)}.values())[::-1]
    rest = [r for r in records if all(r is not f for f in firsts)]
    return (firsts + rest)[:n]


def _html_table(rows: list[dict]) -> str:
    """An HTML table of ``rows`` (dicts with the same keys), numbers formatted as in the Markdown."""
    head = "".join(f"<th>{html.escape(str(k))}</th>" for k in rows[0])
    cells = "".join("<tr>" + "".join(f"<td>{html.escape(format_cell(r[k]))}</td>" for k in rows[0]) + "</tr>"
                    for r in rows)
    return f"<table><tr>{head}</tr>{cells}</table>"
