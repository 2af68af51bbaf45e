"""Greedy equivalence under bf16: every emitted token is the full model's teacher-forced argmax,
up to near-ties within rounding noise (lede_env.equivalence); exact equality with greedy in fp32."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lede_env.decoding import SelfSpeculativeDecoder, SequencePolicy, StaticPolicy, greedy_reference
from lede_env.equivalence import (TOLERANCE_ULPS, check_logits, default_tolerance, first_divergence,
                                  teacher_forced_check, teacher_forced_logits)
from lede_env.exits import ExitHeads
from lede_env.mdp import ActionMap

from ..conftest import decode_cases

MODELS = {}


def model(num_layers, seed, dtype):
    """A tiny random Llama (tests/conftest.py's make_tiny) with its weights cast to ``dtype``."""
    from lede_env.model import tiny_llama
    from lede_env.model import bundle_from_model

    key = (num_layers, seed, dtype)
    if key not in MODELS:
        MODELS[key] = bundle_from_model(tiny_llama(num_layers, 64, 128, seed).to(dtype),
                                        name=f"tiny-{num_layers}-{seed}-{dtype}")
    return MODELS[key]


def decode(b, prompt, actions, exits, kind="lens", k_max=4, bonus=True, reuse=True, max_new=24):
    heads = ExitHeads(b.stack, exits, kind)
    dec = SelfSpeculativeDecoder(b.stack, heads, k_max, b.eos_ids, bonus, reuse=reuse)
    return dec.generate(torch.tensor(prompt), SequencePolicy([a % dec.actions.n for a in actions]), max_new).tokens


CASES = decode_cases(max_new=32)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(**CASES)
def test_bf16_output_is_teacher_forced_argmax_for_every_action_sequence(num_layers, seed, prompt, actions, k_max,
                                                                        bonus, reuse, max_new, data):
    b = model(num_layers, seed, torch.bfloat16)
    L = b.stack.num_layers
    exits = data.draw(st.lists(st.integers(1, L - 1), min_size=1, max_size=L - 1, unique=True).map(sorted))
    out = decode(b, prompt, actions, exits, data.draw(st.sampled_from(["lens", "affine"])), k_max, bonus, reuse,
                 max_new)
    rep = teacher_forced_check(b.stack, prompt, out)
    assert rep.ok, rep.violations
    assert rep.positions == len(out) and rep.exact + len(rep.near_ties) == len(out)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(**CASES)
def test_fp32_output_equals_greedy_and_passes_the_check(num_layers, seed, prompt, actions, k_max, bonus, reuse,
                                                        max_new, data):
    b = model(num_layers, seed, torch.float32)
    L = b.stack.num_layers
    exits = data.draw(st.lists(st.integers(1, L - 1), min_size=1, max_size=L - 1, unique=True).map(sorted))
    out = decode(b, prompt, actions, exits, "lens", k_max, bonus, reuse, max_new)
    assert out == greedy_reference(b.model, torch.tensor(prompt), max_new, b.eos_ids)
    rep = teacher_forced_check(b.stack, prompt, out)
    assert rep.ok, rep.violations
    assert rep.tolerance_rule.startswith(f"{TOLERANCE_ULPS[torch.float32]:g} ulp")


def test_bf16_decoder_may_leave_bf16_ar_yet_every_token_is_the_argmax():
    """Why the bf16 guarantee is per position: on some prompts the dynamic decoder's bf16 output
    differs from bf16 AR's (a near-tie rounded the other way in a batched verification), yet
    both pass the teacher-forced check."""
    b = model(4, 0, torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    diverged = 0
    for _ in range(8):
        prompt = torch.randint(3, 128, (int(torch.randint(2, 11, (1,), generator=g)),), generator=g).tolist()
        ar = decode(b, prompt, [0], (1, 2, 3), k_max=8, max_new=64)
        sd = decode(b, prompt, [ActionMap((1, 2, 3), 8).encode(1, 4)] * 64, (1, 2, 3), k_max=8, max_new=64)
        for out in (ar, sd):
            assert teacher_forced_check(b.stack, prompt, out).ok
        diverged += first_divergence(ar, sd) is not None
    if not diverged:  # depends on the CPU's bf16 kernels; the checks above are the test
        pytest.skip("no bf16 divergence from AR on this machine's kernels")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_wrong_token_is_a_violation(dtype):
    """The check is not vacuous: a token far from the argmax is reported where it was put."""
    b = model(4, 1, dtype)
    prompt = [5, 9, 17, 33]
    out = decode(b, prompt, [7, 3, 0, 11] * 10, (1, 2, 3), max_new=20)
    assert teacher_forced_check(b.stack, prompt, out).ok
    j = 6
    z = teacher_forced_logits(b.stack, prompt, out).float()
    bad = list(out)
    bad[j] = int(z[j].argmin())  # the least likely token: a margin of several logits
    rep = teacher_forced_check(b.stack, prompt, bad)
    assert not rep.ok
    v = rep.violations[0]
    assert (v.index, v.token, v.argmax) == (j, bad[j], out[j])
    assert v.margin == pytest.approx(float(z[j].max() - z[j].min()), rel=1e-6) and v.margin > 10 * v.tolerance
    assert all(p.index >= j for p in rep.violations)  # positions before it are untouched
    d = rep.as_dict()
    assert json.loads(json.dumps(d))["ok"] is False and d["violations"][0]["index"] == j
    # a near-tie is not a violation: the same margin under a larger absolute tolerance
    # (the shorter pass rounds differently in the last bits: hence the 1% headroom)
    assert teacher_forced_check(b.stack, prompt, bad[: j + 1], tolerance=1.01 * v.margin).ok
    assert not teacher_forced_check(b.stack, prompt, bad[: j + 1], tolerance=0.0).ok


def test_teacher_forced_logits_are_the_models():
    b = model(3, 0, torch.float32)
    prompt, gen = [4, 8, 15, 16], [23, 42, 7]
    z = teacher_forced_logits(b.stack, torch.tensor(prompt), gen)
    ref = b.model(torch.tensor([prompt + gen[:-1]])).logits[0, len(prompt) - 1:]
    assert z.shape == (3, 128) and torch.allclose(z, ref, atol=1e-5)


def test_default_tolerance_and_errors():
    tol = default_tolerance(torch.bfloat16, torch.tensor([10.0, 20.0]))
    assert torch.allclose(tol, TOLERANCE_ULPS[torch.bfloat16] * 2 ** -7 * torch.tensor([10.0, 20.0]))
    with pytest.raises(ValueError, match="dtype"):
        default_tolerance(torch.int64, torch.tensor([1.0]))
    s = model(2, 0, torch.float32).stack
    with pytest.raises(ValueError, match="generated is empty"):
        teacher_forced_check(s, [1, 2], [])
    with pytest.raises(ValueError, match="prompt_ids is empty"):
        teacher_forced_check(s, [], [3])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        teacher_forced_check(s, [1, 2], [128])
    with pytest.raises(ValueError, match="1-D"):
        teacher_forced_check(s, torch.ones(2, 3, dtype=torch.long), [3])
    with pytest.raises(ValueError, match="context"):
        teacher_forced_check(s, [3] * 500, [3] * 20)
    with pytest.raises(ValueError, match="tolerance"):
        teacher_forced_check(s, [1, 2], [3], tolerance=-1.0)
    assert teacher_forced_check(s, torch.tensor([[1, 2]]), [3], tolerance=1e9).ok  # [1, P] prompts
    with pytest.raises(ValueError, match=r"\[G, V\]"):
        check_logits(torch.zeros(2, 128), [3])
    rep = check_logits(torch.tensor([[0.0, 1.0, 1.0]], dtype=torch.bfloat16), [2])  # a tie: either is exact
    assert rep.ok and rep.exact == 1 and rep.tolerance_rule.endswith("ulp of max|logit| (torch.bfloat16)")
    assert first_divergence([1, 2, 3], [1, 2, 3]) is None
    assert first_divergence([1, 2, 3], [1, 5, 3]) == 1
    assert first_divergence([1, 2], [1, 2, 3]) == 2


@pytest.mark.embedded
def test_bf16_on_embedded_model():
    """SmolLM2-135M in bf16 on the CPU, 2 prompts, 32 new tokens: AR and two static (E, K) pass
    the teacher-forced check."""
    from lede_env.model import load_model
    from lede_env.prompts import load_prompts
    from lede_env.continuations import encode_prompts
    from lede_env.model import bundle_from_model

    m, tok = load_model(None, dtype=torch.bfloat16)
    b = bundle_from_model(m, tok, name="smollm2-135m-instruct-bf16")
    heads = ExitHeads(b.stack, (4, 8), "lens", draft_vocab=4096)
    dec = SelfSpeculativeDecoder(b.stack, heads, 6, b.eos_ids)
    for ids in encode_prompts(b, load_prompts("humaneval[0:2]"), 32):
        for action in (0, dec.actions.encode(4, 4), dec.actions.encode(8, 6)):
            out = dec.generate(torch.tensor(ids), StaticPolicy(action), 32).tokens
            rep = teacher_forced_check(b.stack, ids, out)
            assert rep.ok and rep.positions == len(out) > 0, rep.as_dict()
