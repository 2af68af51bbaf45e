"""Every policy name that the README (and docs/), or a command's ``--help`` lists runs in every
command that takes a policy (``lede generate``, ``lede evaluate``), on a tiny model, with output identical to
greedy; a policy that needs copy actions (``copy-else:M,E,T``, ``static:0,K``) switches them on
itself."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from .tiny_agents import HELD_OUT, MAX_NEW, PROMPT, TRAIN, build_agent, greedy_tokens, one_line, run_cli
from .tiny_agents import tiny_root  # noqa: F401 - the module's fixture

ROOT = Path(__file__).resolve().parents[2]
#: a value for every placeholder the lists use (the tiny model's exits are 2 and 4)
VALUES = {"E": "2", "K": "2", "THRESHOLD": "0.3", "M": "4", "N": "3", "m": "2", "B": "4", "LAMBDA": "2"}


def listed_names(text: str) -> list[str]:
    """The policy names of a help text or README sentence: its comma-separated list (inside
    parentheses when the text has a parenthesised list, else the text itself), each name as
    written (``static:E,K``; an internal comma is never followed by a space), "an exported agent
    folder" as ``FOLDER``."""
    inner = re.search(r"\(([^()]*,[^()]*)\)", text)
    body = inner.group(1) if inner else re.sub(r"\s*\([^()]*\)", "", text)
    names = []
    for part in re.split(r",\s+", body.replace("`", "")):
        part = re.sub(r"^or\s+", "", part.strip().rstrip("."))
        if part in ("an exported agent folder", "the folder of an exported agent"):
            part = "FOLDER"
        assert part and " " not in part, f"cannot read the policy name {part!r} in {text!r}"
        names.append(part)
    return names


def option_help(command: str, option: str) -> str:
    import typer

    from agents.cli import app

    cmd = typer.main.get_command(app).commands[command]
    return next(p.help for p in cmd.params if p.name == option)


def help_names(command: str) -> list[str]:
    return listed_names(option_help(command, {"generate": "policy", "evaluate": "policies"}[command]))


def doc_names() -> list[str]:
    """The policy names the README and docs/*.md write with placeholders (``static:E,K``,
    ``static:0,m``, ``copy-else:M,E,THRESHOLD``, ``guarded:NAME``, ``agent:PATH``, ...): every
    backticked ``KIND:ARGS`` whose KIND a command's help lists and whose ARGS are placeholders
    (capitals, a single small letter) or numbers, one placeholder at least."""
    from lede_env.policies import POLICY_NAMES

    kinds = {n.partition(":")[0] for n in help_names("generate") + help_names("evaluate") + listed_names(
        POLICY_NAMES.replace(" (any of these inside the GuardedPolicy safety net)", ""))}
    out = []
    for f in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for name in re.findall(r"`([a-z][a-z-]*:[A-Za-z0-9.]+(?:,[A-Za-z0-9.]+)*)`", f.read_text()):
            kind, _, args = name.partition(":")
            parts = args.split(",")
            if (kind in kinds and all(re.fullmatch(r"[A-Z]+|[a-z]|[0-9.]+", a) for a in parts)
                    and any(re.fullmatch(r"[A-Z]+|[a-z]", a) for a in parts) and name not in out):
                out.append(name)
    return out


#: the names only `lede evaluate` plays (transformers' own decoding, the hindsight ones)
EVALUATE_ONLY = ("hf", "hf-lookup:N", "hf-early-exit:E", "static:best", "oracle")


def concrete(name: str, agent: Path) -> list[str]:
    """The names to run for a listed ``name``: placeholders filled in (``guarded:NAME`` with a
    name that needs copy actions and one that drafts)."""
    if name == "FOLDER":
        return [str(agent)]
    if name == "guarded:NAME":
        return ["guarded:copy-else:4,2,0.3", "guarded:static:2,2", f"guarded:agent-unguarded:{agent}"]
    kind, _, args = name.partition(":")
    if args == "PATH":
        return [f"{kind}:{agent}"]
    return [kind + (":" + ",".join(VALUES.get(a, a) for a in args.split(",")) if args else "")]


def test_the_lists_are_read():
    assert {"copy-else:M,E,THRESHOLD", "static:E,K", "guarded:NAME", "agent:PATH"} <= set(doc_names())
    assert "copy-else:M,E,THRESHOLD" in help_names("generate") and "FOLDER" in help_names("generate")
    assert {"oracle", "static:best", "agent:PATH"} <= set(help_names("evaluate"))
    assert listed_names("ar (with context drafts: prompt lookup), static:E,K, del, or an exported agent folder.") == [
        "ar", "static:E,K", "del", "FOLDER"]


def _generate_names():
    return sorted((set(help_names("generate")) | set(doc_names())) - set(EVALUATE_ONLY))


@pytest.mark.parametrize("listed", _generate_names())
def test_every_listed_policy_runs_in_lede_generate(tiny_root, listed):  # noqa: F811
    from lede_env.model import get_bundle

    root, tiny = tiny_root
    agent = build_agent(root, tiny, "compact")
    want = get_bundle(str(tiny)).tokenizer.decode(greedy_tokens(tiny, PROMPT, MAX_NEW), skip_special_tokens=True)
    for name in concrete(listed, agent):
        r = run_cli("generate", PROMPT, "--model", tiny, "--policy", name, "--max-new-tokens", MAX_NEW,
                    "--calib-prompts", "humaneval[100:104]")
        assert r.exit_code == 0, (name, r.output)
        assert one_line(want) in one_line(r.output), name


def test_every_listed_policy_runs_in_lede_evaluate(tiny_root, tmp_path):  # noqa: F811
    """All listed names (evaluate's help and the docs', bare agent folders aside: evaluate names
    agents agent:PATH) in one evaluation without an agent (the copy actions they need switched on
    by themselves), then the agent's names (its own env)."""
    root, tiny = tiny_root
    agent = build_agent(root, tiny, "compact")
    listed = sorted((set(help_names("evaluate")) | set(doc_names())) - {"FOLDER"})
    names = list(dict.fromkeys(n for x in listed for n in concrete(x, agent)))
    plain = [n for n in names if str(agent) not in n]
    for i, group in enumerate((plain, [n for n in names if str(agent) in n])):
        assert group
        out = tmp_path / f"eval{i}"
        r = run_cli("evaluate", "--model", tiny, "--policies", ",".join(["ar", "hf", *group]), "--prompts", HELD_OUT,
                    "--train-prompts", TRAIN, "--max-new-tokens", MAX_NEW, "--calib-prompts", "humaneval[100:104]",
                    "--cost-profile", "analytic", "--no-plots", "--wandb", "disabled", "--out", out)
        assert r.exit_code == 0, (group, r.output)
        live = json.loads((out / "live_eval.json").read_text())
        assert all(row["identical_to_ar"] for row in live)  # transformers' greedy generate ("hf") included
        assert len({row["policy"] for row in live}) == len(set(["ar", "hf", *group]))


def test_a_copy_policy_the_options_leave_no_room_for_is_one_error_line(tiny_root, tmp_path):  # noqa: F811
    root, tiny = tiny_root
    r = run_cli("evaluate", "--model", tiny, "--policies", "ar,copy-else:4,2,0.3", "--context-lengths", "1,2",
                "--prompts", HELD_OUT, "--train-prompts", TRAIN, "--max-new-tokens", MAX_NEW, "--no-plots",
                "--wandb", "disabled", "--out", tmp_path / "eval")
    assert r.exit_code == 2 and "Traceback" not in r.output
    text = one_line(r.output)
    assert "copy-else:4,2,0.3" in text and "context_lengths=[1, 2]" in text, text
