"""Exit heads on the tiny model: the ridge fit and the KL fine-tune do what they promise."""

from __future__ import annotations

import pytest
import torch

from lede_env.exits import ExitHeads, finetune_kl, fit_affine, teacher_forced

from ..conftest import make_tiny, tiny_continuations


def _seqs(b, n=6):
    return [(torch.tensor(c.prompt_ids + c.generated), len(c.prompt_ids)) for c in tiny_continuations(b, n=n)]


def _mse(heads, seqs, i):
    """Mean squared error of exit i's translator against the final normed hidden state."""
    err, n = 0.0, 0
    for ids, P in seqs:
        eh, final, _ = teacher_forced(heads.stack, ids, heads.exit_layers)
        sl = slice(P - 1, ids.shape[0] - 1)
        err += ((heads.translate(eh[sl, i], i) - final[sl]) ** 2).sum().item()
        n += final[sl].numel()
    return err / n


def _objective(heads, seqs, i):
    """finetune_kl's loss on every position of ``seqs`` (KL to the final layer + CE to its argmax)."""
    tot, n = 0.0, 0
    for ids, _ in seqs:
        eh, final, _ = teacher_forced(heads.stack, ids, heads.exit_layers)
        t = torch.log_softmax(final[:-1] @ heads.draft_w.T, -1)
        lp = torch.log_softmax(heads.translate(eh[:-1, i], i) @ heads.draft_w.T, -1)
        tot += ((t.exp() * (t - lp)).sum(-1) + torch.nn.functional.nll_loss(lp, t.argmax(-1), reduction="none")).sum()
        n += t.shape[0]
    return float(tot) / n


def test_ridge_fit_beats_the_identity_and_a_huge_ridge_gives_the_lens():
    b = make_tiny()
    seqs = _seqs(b)
    lens = ExitHeads(b.stack, (1, 2, 3), "affine")  # identity translators == logit lens
    fitted = ExitHeads(b.stack, (1, 2, 3), "affine")
    fit_affine(fitted, seqs, ridge=0.01)
    for i in range(3):
        # least squares with a penalty towards the identity never fits worse than the identity
        assert _mse(fitted, seqs, i) <= _mse(lens, seqs, i) + 1e-9
    stiff = ExitHeads(b.stack, (1, 2, 3), "affine")
    fit_affine(stiff, seqs, ridge=1e9)
    assert torch.allclose(stiff.weight, lens.weight, atol=1e-4)


def test_kl_finetune_lowers_its_objective():
    b = make_tiny()
    seqs = _seqs(b)
    heads = ExitHeads(b.stack, (1, 3), "affine-kl")
    fit_affine(heads, seqs)
    before = [_objective(heads, seqs, i) for i in range(2)]
    out = finetune_kl(heads, seqs, steps=60, batch=512, lr=1e-3)
    after = [_objective(heads, seqs, i) for i in range(2)]
    assert all(a < b_ for a, b_ in zip(after, before)), (before, after)
    assert set(out["loss"]) == {1, 3}
    with pytest.raises(ValueError, match="translators"):
        finetune_kl(ExitHeads(b.stack, (1,), "lens"), seqs)
    with pytest.raises(ValueError, match="steps"):
        finetune_kl(heads, seqs, steps=0)


def test_get_heads_affine_kl_differs_from_ridge():
    from lede_env.calibration import HeadSpec, get_heads

    b = make_tiny()
    cal = tiny_continuations(b, n=4)
    ridge = get_heads(b, HeadSpec((1, 2), "affine", None), use_cache=False, calibration=cal)
    kl = get_heads(b, HeadSpec((1, 2), "affine-kl", None, kl_steps=20), use_cache=False, calibration=cal)
    assert kl.kind == "affine-kl" and kl.translated
    assert not torch.allclose(kl.weight, ridge.weight)
    assert kl.fingerprint() != ridge.fingerprint()
    with pytest.raises(ValueError, match="kind"):
        ExitHeads(b.stack, (1,), "kangaroo")


def test_head_spec_is_the_one_way_an_exit_list_becomes_heads():
    """A list, a tuple and the CLI's comma string give the same spec (and cache key); empty
    means the default exits; bad exits name the fix."""
    from lede_env.calibration import HeadSpec

    assert HeadSpec([2, 4, 6]) == HeadSpec((2, 4, 6)) == HeadSpec("2,4,6") == HeadSpec(" 2, 4,6 ")
    assert HeadSpec([2, 4, 6]).exit_layers == (2, 4, 6)
    assert HeadSpec(None).exit_layers is None and HeadSpec("").exit_layers is None and HeadSpec([]).exit_layers is None
    for bad in ("2,x", [0, 2], [4, 2], [2, 2]):
        with pytest.raises(ValueError, match="exit_layers"):
            HeadSpec(bad)


def test_exact_prefix_cuts_a_trace_at_its_first_non_greedy_token():
    """Text whose token m is not the model's argmax (as batched decoding can give on a near-tie)
    becomes, with ``exact_prefix``, the trace of its first m tokens: the same drafts and features
    as the greedy continuation's trace there; without, the whole text is kept and the mismatch
    counted."""
    import numpy as np

    from lede_env.continuations import Continuation
    from lede_env.traces import trace_one

    b = make_tiny()
    heads = ExitHeads(b.stack, (1, 2, 3), "lens")
    c = tiny_continuations(b, n=1, max_new=20)[0]
    assert len(c.generated) >= 12
    m = 7
    bad = list(c.generated)
    V = b.stack.head_weight.shape[0]
    bad[m] = 3 + (bad[m] - 2) % (V - 3)  # another ordinary token
    assert bad[m] != c.generated[m]
    whole, mism = trace_one(b.stack, heads, Continuation("x", "c", c.prompt_ids, bad, False))
    assert whole.n == len(bad) and mism >= 1
    cut, _ = trace_one(b.stack, heads, Continuation("x", "c", c.prompt_ids, bad, False), exact_prefix=True)
    ref, ref_mism = trace_one(b.stack, heads, c)
    assert ref_mism == 0 and cut.n == m and not cut.eos
    assert np.array_equal(cut.generated, ref.generated[:m])
    for a in ("draft", "draft_prob", "top1", "entropy", "lens_arg", "hidden"):
        np.testing.assert_allclose(getattr(cut, a), getattr(ref, a)[:m], rtol=1e-5, atol=1e-6)


def _first_mse(heads, seqs, i):
    """Mean squared error of exit i's first-token translator ([norm(h_E(t)), final(t-1)]) against
    final(t), over the positions fit_first uses."""
    err, n = 0.0, 0
    for ids, P in seqs:
        eh, final, _ = teacher_forced(heads.stack, ids, heads.exit_layers)
        sl = slice(max(P - 1, 1), ids.shape[0] - 1)
        x = torch.cat([heads.stack.norm(eh[sl, i]), final[sl.start - 1:sl.stop - 1]], -1)
        err += ((x @ heads.first_weight[i] + heads.first_bias[i] - final[sl]) ** 2).sum().item()
        n += final[sl].numel()
    return err / n


def _prev_heads(b, seqs, ridge=0.01):
    from lede_env.exits import fit_first

    heads = ExitHeads(b.stack, (1, 2, 3), "affine-kl-prev")
    fit_affine(heads, seqs)
    fit_first(heads, seqs, ridge=ridge)
    return heads


def test_first_token_fit_never_fits_worse_than_the_translator_it_starts_from():
    """fit_first's ridge towards the exit's own translator (stacked on zeros for final(t-1)) fits
    the first-token positions at least as well as that translator, a huge ridge gives it back,
    and it refuses heads of another kind."""
    from lede_env.exits import fit_first

    b = make_tiny()
    seqs = _seqs(b)
    heads = _prev_heads(b, seqs)
    own = ExitHeads(b.stack, (1, 2, 3), "affine-kl-prev")
    own.weight, own.bias = heads.weight, heads.bias
    d = b.stack.hidden_size
    for i in range(3):
        own.first_weight[i] = torch.cat([heads.weight[i], torch.zeros(d, d)])
        own.first_bias[i] = heads.bias[i]
        assert _first_mse(heads, seqs, i) <= _first_mse(own, seqs, i) + 1e-9
    stiff = _prev_heads(b, seqs, ridge=1e9)
    assert torch.allclose(stiff.first_weight, own.first_weight, atol=1e-4)
    with pytest.raises(ValueError, match="affine-kl-prev"):
        fit_first(ExitHeads(b.stack, (1, 2), "affine-kl"), seqs)


def test_first_token_heads_save_load_and_fingerprint():
    b = make_tiny()
    heads = _prev_heads(b, _seqs(b))
    again = ExitHeads(b.stack, (1, 2, 3), "affine-kl-prev")
    assert again.fingerprint() != heads.fingerprint()
    again.load_state(heads.state())
    assert torch.equal(again.first_weight, heads.first_weight) and again.fingerprint() == heads.fingerprint()
    plain = ExitHeads(b.stack, (1, 2, 3), "affine-kl")
    with pytest.raises(ValueError, match="first_weight"):
        again.load_state(plain.state())
    # another kind's heads draft their first token with their own head
    h, prev = torch.randn(4, b.stack.hidden_size), torch.randn(4, b.stack.hidden_size)
    assert torch.equal(plain.first_logits(h, prev, 1), plain.draft_logits(h, 1))
    assert not torch.equal(heads.first_logits(h, prev, 1), heads.draft_logits(h, 1))
