"""The last stage of ``benchmarks/gpu_check.sh``: one JSON of what the check measured.

Reads ``OUT/eval/{live_eval,trace_eval}.json``, ``OUT/eval/records.json`` and
``OUT/timings.jsonl``; re-checks every lede method's output on every held-out prompt with one
teacher-forced pass (:func:`lede_env.equivalence.teacher_forced_check`: in bf16 every emitted
token must be the full model's argmax up to rounding near-ties); writes ``OUT/gpu_check.json``
and prints the wall-clock table as Markdown.

    python benchmarks/gpu_check_summary.py --out runs/gpu_check --model facebook/layerskip-llama3.2-1B
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch


def equivalence(out: Path, model: str, eval_prompts: str, max_new_tokens: int) -> dict:
    """Teacher-forced check of every recorded generation: ``{policy: totals}``."""
    from lede_env.equivalence import teacher_forced_check
    from lede_env.prompts import load_prompts
    from lede_env.continuations import encode_prompts
    from lede_env.model import get_bundle

    recs = json.loads((out / "eval" / "records.json").read_text())["records"]
    b = get_bundle(model)
    prompts = load_prompts(eval_prompts)
    ids = dict(zip((p.id for p in prompts), encode_prompts(b, prompts, max_new_tokens)))
    res = {}
    for policy, items in recs.items():
        tot = {"generations": 0, "positions": 0, "exact": 0, "near_ties": 0, "violations": 0, "max_margin": 0.0}
        for r in items:
            if not r["tokens"]:
                continue
            rep = teacher_forced_check(b.stack, ids[r["prompt_id"]], r["tokens"])
            tot["generations"] += 1
            tot["positions"] += rep.positions
            tot["exact"] += rep.exact
            tot["near_ties"] += len(rep.near_ties)
            tot["violations"] += len(rep.violations)
            tot["max_margin"] = max(tot["max_margin"], rep.max_margin)
            tot["tolerance_rule"] = rep.tolerance_rule
        tot["ok"] = tot["violations"] == 0
        res[policy] = tot
    return res


def device_facts(model: str) -> dict:
    """Device, dtype and library versions of this run."""
    import transformers

    from lede_env.device import resolve_device, resolve_dtype

    dev = resolve_device(None)
    facts = {"device": str(dev), "dtype": str(resolve_dtype(None, dev)).replace("torch.", ""), "model": model,
             "torch": torch.__version__, "transformers": transformers.__version__, "host": platform.node(),
             "cpu_threads": torch.get_num_threads()}
    if dev.type == "cuda":
        facts["device_name"] = torch.cuda.get_device_name(dev)
        facts["cuda"] = torch.version.cuda
    return facts


def main(argv=None) -> dict:
    from lede_env.metrics import format_metric

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="The folder gpu_check.sh wrote (OUT).")
    ap.add_argument("--model", required=True)
    ap.add_argument("--seconds", type=float, default=None, help="Wall-clock seconds of all stages.")
    args = ap.parse_args(argv)
    out = args.out
    live = json.loads((out / "eval" / "live_eval.json").read_text())
    trace = json.loads((out / "eval" / "trace_eval.json").read_text())
    timings = [json.loads(line) for line in (out / "timings.jsonl").read_text().splitlines() if line.strip()]
    evaluate_cmd = next(t["command"] for t in timings if t["stage"] == "evaluate")
    opt = {evaluate_cmd[i]: evaluate_cmd[i + 1] for i in range(len(evaluate_cmd) - 1) if evaluate_cmd[i].startswith("--")}
    eq = equivalence(out, args.model, opt["--prompts"], int(opt["--max-new-tokens"]))
    algo = json.loads((out / "train" / "train_config.json").read_text())["algo"]
    for r in live + trace:  # the agent's folder is in the JSON's commands; name it by its algorithm
        if r["policy"].startswith("agent:"):
            r["policy"] = f"LEDE agent ({algo})"
    eq = {(f"LEDE agent ({algo})" if k.startswith("agent:") else k): v for k, v in eq.items()}
    rows = [r for r in live if r["category"] == "all"]
    summary = {
        "facts": device_facts(args.model),
        "prompts": {"eval": opt["--prompts"], "train": opt["--train-prompts"], "max_new_tokens": int(opt["--max-new-tokens"])},
        "wall_clock": [{k: r.get(k) for k in ("policy", "speedup_vs_ar", "tokens_per_s", "tokens_per_round", "acceptance",
                                             "cost_per_round_predicted", "cost_per_round_measured", "identical_to_ar",
                                             "policy_ms_per_round")} for r in rows],
        "trace_env": [{k: r[k] for k in ("policy", "throughput", "oracle_share", "tokens_per_round")}
                      for r in trace if r["category"] == "all"],
        "greedy_equivalence": eq,
        "stages": {t["stage"]: t["seconds"] for t in timings},
        "total_seconds": args.seconds,
    }
    tmp = out / ".gpu_check.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2, default=str))
    tmp.replace(out / "gpu_check.json")
    print(f"\n{summary['facts']}\n")
    # metrics as lede_env.metrics defines them; an undefined one (AR's acceptance) prints "-"
    print("| method | speedup vs AR | tokens/s | tokens/round | acceptance | round cost predicted | round cost measured "
          "| identical to AR |")
    print("|---|---|---|---|---|---|---|---|")
    for r in summary["wall_clock"]:
        print(f"| {r['policy']} | {format_metric(r['speedup_vs_ar'])} | {format_metric(r['tokens_per_s'], '.1f')} | "
              f"{format_metric(r['tokens_per_round'], '.2f')} | {format_metric(r['acceptance'], '.2f')} | "
              f"{format_metric(r['cost_per_round_predicted'], '.2f')} | "
              f"{format_metric(r['cost_per_round_measured'], '.2f')} | {r['identical_to_ar']} |")
    bad = {p: e for p, e in eq.items() if not e["ok"]}
    print(f"\nteacher-forced greedy check: {'every emitted token is the greedy choice' if not bad else bad}")
    print(f"stage seconds: {summary['stages']}; total {args.seconds} s -> {out / 'gpu_check.json'}")
    return summary


if __name__ == "__main__":
    main()
