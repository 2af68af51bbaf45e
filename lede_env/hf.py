"""lede inside transformers' ``model.generate``: one extra argument.

transformers 5.x lets ``generate`` hand its decoding loop to a callable (``custom_generate=``,
the documented extension point for custom decoding methods): it prepares the inputs and the
``GenerationConfig`` as usual, then calls the callable instead of its own loop.

>>> from lede_env.hf import lede_generate
>>> out = model.generate(**tok("def fib(n):", return_tensors="pt"), max_new_tokens=64,
...                      custom_generate=lede_generate)                   # doctest: +SKIP

Honoured ``GenerationConfig`` fields: ``max_new_tokens`` / ``max_length``, ``eos_token_id``,
``do_sample`` with ``temperature`` and ``top_p`` (speculative sampling, so the output is
distributed as transformers' own sampling), and every stopping criterion transformers builds
(``stop_strings`` with ``tokenizer=``, max time, ...), checked after each accepted token so
generation ends exactly where transformers' own loop would. Other logits processors
(repetition penalty, top-k, ...) change the target distribution per step, which speculative
decoding cannot honour exactly: they are refused with an error rather than ignored.

The policy is chosen with ``lede_policy=`` (default ``"del"``; ``"static:E,K"``, an exported
agent folder, ...; see :mod:`lede_env.generate`), or pass a configured ``lede=Lede(...)``.
"""

from __future__ import annotations

from typing import Optional

import torch

from .generate import Lede

__all__ = ["lede_generate"]

_LEDES: dict = {}
#: logits processors whose effect lede reproduces itself (temperature, top-p) or that are no-ops
_HANDLED = {"TemperatureLogitsWarper", "TopPLogitsWarper"}


def lede_generate(model, input_ids: torch.LongTensor, logits_processor=None, stopping_criteria=None,
                  generation_config=None, synced_gpus: bool = False, streamer=None,
                  lede_policy: str = "del", lede: Optional[Lede] = None, **model_kwargs) -> torch.LongTensor:
    """Decoding loop for ``model.generate(..., custom_generate=lede_generate)``.

    Args:
        model: the Llama-family model ``generate`` was called on.
        input_ids: [1, n] int64 prompt ids (batch size 1 only).
        logits_processor, stopping_criteria, generation_config, streamer: as prepared by
            ``generate``.
        lede_policy: lede policy name or exported agent folder.
        lede: a ready :class:`~lede_env.generate.Lede` for this model (its own policy, exit heads
            and calibration); built once per model and policy and cached otherwise.

    Returns:
        [1, n + generated] int64: prompt and generated ids, like ``generate``.

    Raises:
        ValueError: batch size > 1, or a logits processor lede cannot honour exactly.
    """
    if input_ids.shape[0] != 1:
        raise ValueError(f"lede decodes one sequence at a time; got batch size {input_ids.shape[0]}. "
                         "Loop over the prompts instead.")
    unsupported = [type(p).__name__ for p in (logits_processor or []) if type(p).__name__ not in _HANDLED]
    if unsupported:
        raise ValueError(f"lede cannot honour the logits processors {unsupported} exactly (speculative decoding "
                         "needs the target distribution before the tokens are known); drop those generation "
                         "options or call generate() without custom_generate.")
    key = (id(model), lede_policy)
    if lede is not None:
        _LEDES[key] = lede
    elif key not in _LEDES:
        tok = model_kwargs.get("tokenizer")
        if tok is None:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(model.config._name_or_path)
        _LEDES[key] = Lede(model, tok, policy=lede_policy)
    lede = _LEDES[key]
    cfg = generation_config
    n = input_ids.shape[1]
    max_new = cfg.max_new_tokens if cfg.max_new_tokens is not None else cfg.max_length - n
    do_sample = bool(getattr(cfg, "do_sample", False))
    stop = _criteria_stop(stopping_criteria, input_ids) if stopping_criteria else None
    eos = cfg.eos_token_id
    eos_ids = tuple([eos] if isinstance(eos, int) else (eos or ())) or lede.decoder.eos_ids
    out = lede.generate(input_ids=input_ids[0], max_new_tokens=int(max_new),
                        temperature=float(cfg.temperature or 1.0) if do_sample else 0.0,
                        top_p=float(cfg.top_p or 1.0) if do_sample else 1.0, streamer=streamer, stop=stop,
                        eos_ids=tuple(int(e) for e in eos_ids))
    toks = out.tokens
    return torch.cat([input_ids, torch.tensor([toks], dtype=input_ids.dtype, device=input_ids.device)], 1)


def _criteria_stop(stopping_criteria, prompt: torch.LongTensor):
    """Smallest number of generated tokens after which transformers' stopping criteria say stop."""

    checked = [0]  # prefixes already checked (the decoder calls this after every round)

    def stop(tokens: list[int]) -> Optional[int]:
        for k in range(max(checked[0], 0) + 1, len(tokens) + 1):
            ids = torch.cat([prompt, torch.tensor([tokens[:k]], dtype=prompt.dtype, device=prompt.device)], 1)
            if bool(stopping_criteria(ids, None).any()):
                return k
        checked[0] = len(tokens)
        return None

    return stop
