"""Assistant prefill: a chat whose last message is the assistant's is continued, as transformers'
``apply_chat_template(..., continue_final_message=True)`` does; by default a chat gets the
generation prompt (a new assistant turn) unless ``continue_final_message``; both together are
refused by name, as transformers refuses them."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import tiny_llama_with_embedded_tokenizer

CHATS = [
    [{"role": "user", "content": "Write a haiku about the sea."},
     {"role": "assistant", "content": "Waves fold into foam,"}],
    [{"role": "system", "content": "You answer in JSON."},
     {"role": "user", "content": "Give me a name and an age."},
     {"role": "assistant", "content": '{"name": "'}],
    [{"role": "user", "content": "Continue my sentence: the cat sat"}],  # the user's own message continued
]


@pytest.fixture(scope="module")
def chat_lede(tmp_path_factory):
    """(tokenizer, model, lede): a 4-layer random Llama with the embedded SmolLM2 tokenizer (its
    chat template) and a Lede whose caches live in a temporary folder."""
    from lede_env.generate import Lede

    model, tok = tiny_llama_with_embedded_tokenizer()
    mp = pytest.MonkeyPatch()
    mp.setenv("LEDE_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
    lede = Lede(model, tok, policy="static:1,2", exit_layers=[1, 2, 3], k_max=4, head_kind="lens", draft_vocab=None,
                calib_prompts="humaneval[0:2]", context_datastore=False)
    yield tok, model, lede
    mp.undo()


def _template(tok, chat, **kw) -> list[int]:
    return tok.apply_chat_template(chat, return_tensors="pt", return_dict=True, **kw)["input_ids"][0].tolist()


@pytest.mark.parametrize("chat", CHATS)
def test_encode_follows_apply_chat_template(chat_lede, chat):
    tok, _, lede = chat_lede
    cont = _template(tok, chat, continue_final_message=True)
    assert lede.encode(messages=chat, continue_final_message=True).tolist() == cont
    # the prefill is open: the final message's text ends the prompt, no end-of-turn after it
    assert tok.decode(cont).endswith(chat[-1]["content"])
    # default: a new assistant turn (transformers' add_generation_prompt=True), also when asked by name
    new_turn = _template(tok, chat, add_generation_prompt=True)
    assert lede.encode(messages=chat).tolist() == new_turn
    assert lede.encode(messages=chat, add_generation_prompt=True).tolist() == new_turn
    assert lede.encode(messages=chat, add_generation_prompt=False).tolist() == _template(tok, chat)
    assert new_turn != cont


@pytest.mark.parametrize("call", ["encode", "generate"])
def test_both_together_are_refused_by_name(chat_lede, call):
    _, _, lede = chat_lede
    with pytest.raises(ValueError) as e:
        getattr(lede, call)(messages=CHATS[0], continue_final_message=True, add_generation_prompt=True)
    msg = str(e.value)
    assert "continue_final_message" in msg and "add_generation_prompt" in msg and "\n" not in msg


@pytest.mark.parametrize("kw", [dict(continue_final_message=True), dict(add_generation_prompt=False)])
def test_the_options_without_a_chat_are_refused(chat_lede, kw):
    """Raw text (``chat=False``) and token ids have no turns to continue or open: one line naming
    the option."""
    _, _, lede = chat_lede
    name = next(iter(kw))
    with pytest.raises(ValueError, match=name):
        lede.generate("the cat sat", chat=False, **kw)
    with pytest.raises(ValueError, match=name):
        lede.generate(input_ids=torch.tensor([5, 6, 7]), **kw)


@pytest.mark.parametrize("policy", ["ar", "static:2,3", "del"])
@pytest.mark.parametrize("chat", CHATS[:2])
def test_generate_continues_the_final_message_losslessly(chat_lede, chat, policy):
    """Lede.generate and the one-call ``generate`` continue the prefill: tokens equal
    transformers' greedy continuation of the same ids."""
    from lede_env.decoding import greedy_reference
    from lede_env.generate import generate

    tok, model, lede = chat_lede
    ids = torch.tensor(_template(tok, chat, continue_final_message=True))
    ref = greedy_reference(model, ids, 12, lede.decoder.eos_ids)
    out = lede.generate(messages=chat, continue_final_message=True, policy=policy, max_new_tokens=12)
    assert out.tokens == ref
    if policy == "ar":  # the one-call generate, with this Lede in its cache
        import importlib

        G = importlib.import_module("lede_env.generate")  # the package's `generate` is the function

        with pytest.MonkeyPatch.context() as mp:
            mp.setitem(G._CACHE, (id(model), "static:1,2"), lede)
            once = generate(model, tok, messages=chat, continue_final_message=True, policy="static:1,2",
                            max_new_tokens=12)
        assert once.tokens == ref
    # a prompt given as text is one user message: the option continues it the same way
    user = [{"role": "user", "content": "the cat sat"}]
    assert lede.encode("the cat sat", continue_final_message=True).tolist() == \
        _template(tok, user, continue_final_message=True)
