"""The benchmark harness (``benchmarks/bench.py``): methods run interleaved prompt by prompt and
repeated, sums per category and overall, outputs compared with the reference method's; every
subcommand parses its defaults."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("lede_bench", ROOT / "benchmarks" / "bench.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["lede_bench"] = mod  # dataclasses look their module up
    try:
        spec.loader.exec_module(mod)
        yield mod
    finally:
        sys.modules.pop("lede_bench", None)


def test_paired_interleaves_methods_prompt_by_prompt_and_repeats(bench):
    calls = []

    def method(name, seconds, tokens):
        def run(i, item):
            calls.append((name, i, item))
            return bench.Run(seconds, tokens(item), bench.plain_rounds(tokens(item)))
        return run

    methods = {"ref": method("ref", 1.0, lambda item: [1, 2, item]),
               "same": method("same", 0.5, lambda item: [1, 2, item]),
               "other": method("other", 2.0, lambda item: [1, 2, 3, 4] if item == 9 else [1, 2, item])}
    items = [("code", 7), ("math", 9), ("code", 8)]
    t = bench.paired(items, methods, repeats=2)
    assert calls == [(m, i, it) for _ in range(2) for i, (_, it) in enumerate(items) for m in methods]
    assert bench.categories(t) == ["code", "math", "all"]
    assert bench.labels(t) == ["ref", "same", "other"]
    assert t[("ref", "all")].seconds == 6.0 and t[("ref", "all")].tokens == 18
    assert t[("ref", "code")].tokens == 12 and t[("ref", "math")].tokens == 6
    assert t[("same", "all")].speedup_over(t[("ref", "all")]) == pytest.approx(2.0)
    assert t[("same", "all")].identical and not t[("other", "all")].identical
    assert t[("other", "code")].identical and not t[("other", "math")].identical
    assert t[("ref", "all")].totals.tokens_per_round == pytest.approx(1.0)


def test_paired_compares_with_the_named_reference(bench):
    methods = {"a": lambda i, x: bench.Run(1.0, [x]), "b": lambda i, x: bench.Run(1.0, [0])}
    t = bench.paired([("c", 0), ("c", 1)], methods, reference="b")
    assert not t[("a", "all")].identical and t[("b", "all")].identical
    assert math.isnan(t[("a", "all")].totals.tokens_per_round)  # rounds unseen
    assert math.isnan(t[("a", "all")].policy_ms_per_round)


@pytest.mark.parametrize("name", ["speed", "generate", "context-draft", "kernels", "live-env", "agent-vs-static",
                                  "policies", "trees"])
def test_every_subcommand_parses_its_defaults(bench, name):
    args = bench.parser().parse_args([name])
    assert args.run is bench.SUBCOMMANDS[name][0]
    assert args.run.__doc__


def _doc_text() -> str:
    return "\n".join(p.read_text(encoding="utf-8") for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))])


def test_every_benchmark_is_named_by_a_doc_page_with_its_command(bench):
    """Each subcommand of the harness and each other script is run by a command a doc page shows
    (``gpu_check_summary.py`` is run by ``gpu_check.sh``)."""
    text = _doc_text()
    missing = [f"bench.py {name}" for name in bench.SUBCOMMANDS if f"benchmarks/bench.py {name}" not in text]
    for p in sorted((ROOT / "benchmarks").iterdir()):
        if p.name in ("bench.py", "gpu_check_summary.py") or p.name.startswith((".", "__")):
            continue
        runner = "bash" if p.suffix == ".sh" else "python"
        if f"{runner} benchmarks/{p.name}" not in text and f"`benchmarks/{p.name} " not in text:
            missing.append(p.name)
    assert not missing, f"no doc page gives the command of: {missing}"
