"""``lede generate`` treats a model's ``generation_config.json`` as transformers' ``generate``
(and lede's ``custom_generate`` hook) does: its sampling settings are the defaults the options
override, and a setting lede cannot honour exactly is one error line naming it and its origin.
(It decoded greedily with no word about a sampling config, dropped a repetition penalty
silently and had no ``--top-k``.)"""

from __future__ import annotations

import json
import shutil

import pytest

from .tiny_agents import MAX_NEW, PROMPT, greedy_tokens, one_line, run_cli
from .tiny_agents import tiny_root  # noqa: F401 - the module's fixture

FAST = ("--head-kind", "lens", "--calib-prompts", "humaneval[100:102]", "--max-new-tokens", MAX_NEW)


def _with_config(tiny_root, name, **settings):  # noqa: F811
    root, tiny = tiny_root
    folder = root / name
    if not folder.exists():
        shutil.copytree(tiny, folder)
        path = folder / "generation_config.json"
        cfg = json.loads(path.read_text()) if path.exists() else {}
        path.write_text(json.dumps({**cfg, **settings}))
    return folder


def _text(folder, tokens):
    from lede_env.model import get_bundle

    return one_line(get_bundle(str(folder)).tokenizer.decode(tokens, skip_special_tokens=True))


def test_a_penalty_in_the_models_generation_config_is_refused_by_name(tiny_root):  # noqa: F811
    folder = _with_config(tiny_root, "penalty", do_sample=True, temperature=0.6, top_p=0.9, repetition_penalty=1.1)
    for extra in ((), ("--temperature", "0.6", "--top-p", "0.9"), ("--temperature", "0")):
        r = run_cli("generate", PROMPT, "--model", folder, *FAST, *extra)
        text = one_line(r.output)
        assert r.exit_code == 2, r.output
        assert "error: lede cannot honour" in text and "Traceback" not in r.output
        assert "repetition_penalty=1.1 (from the model's generation_config.json" in text, text


def test_the_models_sampling_settings_are_the_defaults(tiny_root):  # noqa: F811
    folder = _with_config(tiny_root, "sampling", do_sample=True, temperature=1.5, top_p=0.95)
    greedy = _text(folder, greedy_tokens(folder, PROMPT, MAX_NEW))
    r0 = run_cli("generate", PROMPT, "--model", folder, *FAST, "--temperature", "0")
    assert r0.exit_code == 0 and greedy in one_line(r0.output), r0.output
    runs = [run_cli("generate", PROMPT, "--model", folder, *FAST, "--seed", s) for s in "012"]
    assert all(r.exit_code == 0 for r in runs)
    assert any(greedy not in one_line(r.output) for r in runs)  # (the model's config samples: not greedy)
    rk = run_cli("generate", PROMPT, "--model", folder, *FAST, "--seed", "0", "--top-k", "1")
    assert rk.exit_code == 0 and greedy in one_line(rk.output), rk.output  # (top-1 sampling is greedy)
