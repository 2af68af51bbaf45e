"""lede inside transformers' ``model.generate``: one extra argument.

transformers 5.x lets ``generate`` hand its decoding loop to a callable (``custom_generate=``,
the documented extension point for custom decoding methods): it prepares the inputs and the
``GenerationConfig`` as usual, then calls the callable instead of its own loop.

>>> from lede_env.hf import lede_generate
>>> out = model.generate(**tok("def fib(n):", return_tensors="pt"), max_new_tokens=64,
...                      custom_generate=lede_generate)                   # doctest: +SKIP

Honoured exactly: ``max_new_tokens`` / ``max_length``, ``eos_token_id``, ``do_sample`` with
``temperature``, ``top_k`` (transformers fills in 50 when it is not set) and ``top_p`` (speculative
sampling with the same warping, so the output is distributed as transformers' own sampling;
``torch.manual_seed`` makes it reproducible), streamers, and every stopping criterion transformers
builds (max time, ...) or lede adds (``stop_strings=``), checked after each accepted token so
generation ends exactly where transformers' own loop would. transformers 5.x hands neither
``tokenizer=`` nor ``streamer=`` on to a callable ``custom_generate``: ``stop_strings=`` are
therefore an argument of :func:`lede_generate` (transformers passes its own arguments on) and the
criterion is built with the tokenizer lede holds (stop strings set in a ``GenerationConfig``
still make transformers itself ask for ``tokenizer=``, before lede is called); the streamer is
taken from the calling ``generate()``.

Everything else that changes the output is refused with a ``ValueError`` naming the setting and
where it came from (the call, the model's ``generation_config.json``, or a ``logits_processor=``
list), never ignored: the other logits processors (repetition penalty, min-p, typical-p, min
length, bad words, ...) change the target distribution per step in ways speculative decoding
cannot reproduce, and beams, several return sequences or ``return_dict_in_generate`` ask for
outputs lede does not produce.

The policy is chosen with ``lede_policy=`` (default ``"ar"``: plain steps with context drafts,
see :mod:`lede_env.generate`; ``"del"``, ``"static:E,K"``, an exported agent folder, ...), or
pass a configured ``lede=Lede(...)``.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from .decoding import end_once
from .generate import Lede

__all__ = ["lede_generate"]

_LEDES: dict = {}
#: the warpers lede reproduces (read from the processors themselves), in transformers' order
_WARPERS = ("TemperatureLogitsWarper", "TopKLogitsWarper", "TopPLogitsWarper")
#: processors that change no sampled or greedy token (log-softmax of the scores)
_NO_OPS = {"LogitNormalization"}
#: the generate setting behind each logits processor transformers builds (for the error message)
_PROCESSOR_SETTINGS = {
    "MinLengthLogitsProcessor": "min_length", "MinNewTokensLengthLogitsProcessor": "min_new_tokens",
    "RepetitionPenaltyLogitsProcessor": "repetition_penalty",
    "EncoderRepetitionPenaltyLogitsProcessor": "encoder_repetition_penalty",
    "TopHLogitsWarper": "top_h", "MinPLogitsWarper": "min_p", "TypicalLogitsWarper": "typical_p",
    "EpsilonLogitsWarper": "epsilon_cutoff", "EtaLogitsWarper": "eta_cutoff",
    "NoRepeatNGramLogitsProcessor": "no_repeat_ngram_size",
    "EncoderNoRepeatNGramLogitsProcessor": "encoder_no_repeat_ngram_size",
    "SequenceBiasLogitsProcessor": "sequence_bias", "NoBadWordsLogitsProcessor": "bad_words_ids",
    "ForcedBOSTokenLogitsProcessor": "forced_bos_token_id", "ForcedEOSTokenLogitsProcessor": "forced_eos_token_id",
    "InfNanRemoveLogitsProcessor": "remove_invalid_values",
    "ExponentialDecayLengthPenalty": "exponential_decay_length_penalty",
    "SuppressTokensLogitsProcessor": "suppress_tokens", "SuppressTokensAtBeginLogitsProcessor": "begin_suppress_tokens",
    "UnbatchedClassifierFreeGuidanceLogitsProcessor": "guidance_scale",
    "ClassifierFreeGuidanceLogitsProcessor": "guidance_scale",
    "WatermarkLogitsProcessor": "watermarking_config", "SynthIDTextWatermarkLogitsProcessor": "watermarking_config",
}
#: settings that no logits processor carries but that ask for another output: (field, is it in use)
_OUTPUT_SETTINGS = (
    ("num_beams", lambda v: v is not None and v > 1),
    ("num_return_sequences", lambda v: v is not None and v > 1),
    ("num_beam_groups", lambda v: v is not None and v > 1),
    ("penalty_alpha", lambda v: v is not None and v > 0),
    ("prompt_lookup_num_tokens", lambda v: v is not None),
    ("return_dict_in_generate", bool),
)


def lede_generate(model, input_ids: torch.LongTensor, logits_processor=None, stopping_criteria=None,
                  generation_config=None, synced_gpus: bool = False, streamer=None,
                  lede_policy: str = "ar", lede: Optional[Lede] = None,
                  stop_strings: Optional[Sequence[str]] = None, tokenizer=None, lede_outputs: Optional[list] = None,
                  **model_kwargs) -> torch.LongTensor:
    """Decoding loop for ``model.generate(..., custom_generate=lede_generate)``.

    Args:
        model: the Llama-family model ``generate`` was called on.
        input_ids: [1, n] int64 prompt ids (batch size 1 only).
        logits_processor, stopping_criteria, generation_config, streamer: as prepared by
            ``generate``.
        lede_policy: lede policy name or exported agent folder.
        lede: a ready :class:`~lede_env.generate.Lede` for this model (its own policy, exit heads
            and calibration); built once per model and policy and cached otherwise.
        stop_strings: end generation on the token that completes one of them, as transformers'
            ``StopStringCriteria`` does (being an argument of this function, transformers hands
            them over instead of building the criterion itself, which needs ``tokenizer=``).
        tokenizer: the tokenizer for ``stop_strings`` and for building a :class:`Lede` (default:
            the :class:`Lede`'s own; transformers 5.x never passes it on).
        lede_outputs: a list the call's :class:`~lede_env.generate.LedeOutput` is appended to
            (rounds, acceptance, timing: what ``lede generate`` prints).

    Returns:
        [1, n + generated] int64: prompt and generated ids, like ``generate``.

    ``attention_mask`` is honoured: the tokens it masks (left padding, or any inside the prompt)
    are left out of the prompt, which is what transformers' masked greedy decoding computes.
    The streamer gets ``end()`` on every exit path, a refusal included.

    Raises:
        ValueError: batch size > 1, a generation setting lede cannot honour exactly (named,
            with where it came from), or a model input it cannot honour (``inputs_embeds``, a
            filled cache, custom ``position_ids``; see :func:`_unmasked_prompt`).
    """
    if streamer is None:
        streamer = _dropped_streamer()
    streamer = end_once(None if streamer is None else _AfterPrompt(streamer))
    try:
        return _generate(model, input_ids, logits_processor, stopping_criteria, generation_config, streamer,
                         lede_policy, lede, stop_strings, tokenizer, model_kwargs, lede_outputs)
    except BaseException:
        if streamer is not None:  # (every exit path ends it: a TextIteratorStreamer's reader waits for it)
            streamer.end()
        raise


def _generate(model, input_ids, logits_processor, stopping_criteria, generation_config, streamer, lede_policy,
              lede, stop_strings, tokenizer, model_kwargs, outputs) -> torch.LongTensor:
    cfg = generation_config
    temperature, top_k, top_p = _warping(model, cfg, logits_processor)
    if input_ids.shape[0] != 1:
        raise ValueError(f"lede decodes one sequence at a time; got batch size {input_ids.shape[0]}. "
                         "Loop over the prompts instead.")
    prompt = _unmasked_prompt(input_ids, model_kwargs)
    key = (id(model), lede_policy)
    if lede is not None:
        _LEDES[key] = lede
    elif key not in _LEDES:
        tok = tokenizer if tokenizer is not None else model_kwargs.get("tokenizer")
        if tok is None:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(model.config._name_or_path)
        _LEDES[key] = Lede(model, tok, policy=lede_policy)
    lede = _LEDES[key]
    if stop_strings:
        from transformers import StoppingCriteriaList, StopStringCriteria

        strings = [stop_strings] if isinstance(stop_strings, str) else list(stop_strings)
        crit = StopStringCriteria(tokenizer if tokenizer is not None else lede.tokenizer, strings)
        stopping_criteria = StoppingCriteriaList([*(stopping_criteria or []), crit])
    n = input_ids.shape[1]
    max_new = cfg.max_new_tokens if cfg.max_new_tokens is not None else cfg.max_length - n
    do_sample = bool(getattr(cfg, "do_sample", False))
    stop = _criteria_stop(stopping_criteria, input_ids) if stopping_criteria else None
    eos = cfg.eos_token_id
    eos_ids = tuple([eos] if isinstance(eos, int) else (eos or ())) or lede.decoder.eos_ids
    out = lede.generate(input_ids=prompt, max_new_tokens=int(max_new),
                        temperature=temperature if do_sample else 0.0, top_p=top_p if do_sample else 1.0,
                        top_k=top_k if do_sample else None,
                        streamer=streamer, stop=stop,
                        eos_ids=tuple(int(e) for e in eos_ids))
    if outputs is not None:
        outputs.append(out)
    toks = out.tokens
    return torch.cat([input_ids, torch.tensor([toks], dtype=input_ids.dtype, device=input_ids.device)], 1)


#: model inputs transformers' ``generate`` hands on that lede reads (``attention_mask``,
#: ``position_ids``) or that carry nothing for it (an empty cache, cache switches, the tokenizer)
_KNOWN_INPUTS = ("attention_mask", "position_ids", "cache", "past_key_values", "use_cache", "logits_to_keep",
                 "cache_position", "tokenizer")


def _unmasked_prompt(input_ids: torch.LongTensor, model_kwargs: dict) -> torch.LongTensor:
    """The prompt tokens lede decodes from: [m] int64, the positions of ``input_ids`` [1, n] that
    ``attention_mask`` keeps (all without a mask).

    transformers' greedy ``generate`` with a mask numbers the kept tokens 0, 1, ... (``position_ids
    = cumsum(mask) - 1``) and lets no position attend to a masked one, which is decoding the kept
    tokens alone: left padding and masked tokens inside the prompt alike (transformers PR
    #46773, mlx-lm #1906: ignoring the mask changes the output).

    Raises:
        ValueError: naming the input and the fix: ``inputs_embeds`` (lede drafts from token ids),
            a cache that already holds positions, ``position_ids`` that are not consecutive over
            the kept tokens (a constant shift is fine: rotary attention is relative), a mask that
            keeps no token or masks the last one (right padding: transformers would continue from
            a pad position), or any other model input lede cannot honour.
    """
    if model_kwargs.get("inputs_embeds") is not None:
        raise ValueError("lede decodes from token ids; inputs_embeds cannot be honoured: pass input_ids (the "
                         "tokenizer's output) instead of inputs_embeds.")
    other = sorted(k for k, v in model_kwargs.items() if k not in _KNOWN_INPUTS and v is not None)
    if other:
        raise ValueError(f"lede cannot honour the model input(s) {', '.join(other)}: it decodes from input_ids and "
                         "attention_mask alone; leave them out, or call generate() without custom_generate.")
    for k in ("cache", "past_key_values"):
        c = model_kwargs.get(k)
        if c is not None and hasattr(c, "get_seq_length") and c.get_seq_length() > 0:
            raise ValueError(f"{k} already holds {c.get_seq_length()} positions; lede prefills the prompt itself: "
                             "pass the whole prompt as input_ids without a cache.")
    mask = model_kwargs.get("attention_mask")
    keep = None if mask is None else mask[0].to(torch.bool)
    if keep is not None and not bool(keep.any()):
        raise ValueError("attention_mask keeps no token of the prompt: give a mask with 1 at the prompt's tokens.")
    if keep is not None and not bool(keep[-1]):
        raise ValueError("attention_mask masks the prompt's last token (right padding): generation continues from "
                         "the last position, so pad on the left (tokenizer.padding_side = 'left').")
    pos = model_kwargs.get("position_ids")
    if pos is not None:
        want = (torch.arange(input_ids.shape[1], device=input_ids.device) if keep is None
                else keep.long().cumsum(0) - 1)
        kept = slice(None) if keep is None else keep
        shift = pos[0][kept].to(want.device) - want[kept]
        if bool((shift != shift[0]).any()):  # (a constant shift changes nothing: rotary attention is relative)
            raise ValueError("position_ids that do not number the prompt's tokens one after another (0, 1, ... over "
                             "the tokens attention_mask keeps) cannot be honoured; leave position_ids out.")
    return input_ids[0] if keep is None or bool(keep.all()) else input_ids[0][keep]


def _warping(model, cfg, processors) -> tuple[float, Optional[int], float]:
    """(temperature, top_k, top_p) of the warpers transformers built (read from the processors,
    so a warper passed in ``logits_processor=`` counts too).

    Raises:
        ValueError: any processor or setting lede cannot honour exactly, each named with its origin.
    """
    temperature, top_k, top_p = 1.0, None, 1.0
    refused, seen = [], []
    for proc in processors or []:
        name = type(proc).__name__
        if name in _NO_OPS:
            continue
        if name not in _WARPERS:
            refused.append(_describe_processor(model, cfg, name))
            continue
        if seen and _WARPERS.index(name) <= _WARPERS.index(seen[-1]):
            refused.append(f"{name} twice or after {seen[-1]} (transformers applies temperature, top-k, top-p "
                           "once each, in that order; check logits_processor=)")
            continue
        seen.append(name)
        if name == "TemperatureLogitsWarper":
            temperature = float(proc.temperature)
        elif name == "TopKLogitsWarper":
            top_k = int(proc.top_k)
        elif int(getattr(proc, "min_tokens_to_keep", 1)) > 1:
            refused.append(f"TopPLogitsWarper with min_tokens_to_keep={proc.min_tokens_to_keep}")
        else:
            top_p = float(proc.top_p)
    for field, in_use in _OUTPUT_SETTINGS:
        value = getattr(cfg, field, None)
        if value is not None and in_use(value):
            refused.append(f"{field}={value!r} ({_origin(model, field, value)})")
    if refused:
        raise ValueError("lede cannot honour these generation settings (logits processors and outputs) exactly: "
                         + "; ".join(refused) + ". Speculative decoding needs each position's target distribution "
                         "before the tokens are known and returns one sequence of token ids: drop those settings "
                         "(from the call, or from model.generation_config for the model's own), or call "
                         "generate() without custom_generate.")
    return temperature, top_k, top_p


def _describe_processor(model, cfg, name: str) -> str:
    """'setting=value (origin)' for a processor transformers built from a setting, else what it is."""
    if name == "PrefixConstrainedLogitsProcessor":
        return "prefix_allowed_tokens_fn (your generate() call)"
    field = _PROCESSOR_SETTINGS.get(name)
    value = None if field is None else getattr(cfg, field, None)
    default = _defaults(model).get(field)
    if field is None:
        return f"{name} (passed in logits_processor=, or built from a generation setting lede does not know)"
    if value is None or (default is not None and _same(value, default)):
        return f"{name} (passed in logits_processor=)"  # the setting itself builds no processor
    return f"{field}={value!r} ({_origin(model, field, value)})"


def _origin(model, field: str, value) -> str:
    """Where a generation setting's value came from, as far as the merged config tells."""
    own = getattr(getattr(model, "generation_config", None), field, None)
    if own is not None and _same(own, value):
        return "from the model's generation_config.json (model.generation_config)"
    default = _defaults(model).get(field)
    if default is not None and _same(default, value):
        return "transformers' default, filled in because it was not set"
    return "set in your generate() call"


def _defaults(model) -> dict:
    gc = getattr(model, "generation_config", None)
    try:
        return dict(gc._get_default_generation_params()) if gc is not None else {}
    except Exception:  # noqa: BLE001 - a transformers without that helper: no defaults known
        return {}


def _same(a, b) -> bool:
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - tensors and other values without a truth value
        return False


def _dropped_streamer():
    """The ``streamer=`` of the transformers ``generate()`` call that called :func:`lede_generate`.

    transformers 5.x puts the prompt into it, then leaves it out of the arguments it hands to a
    callable ``custom_generate``; without this the generated tokens and ``end()`` would never reach
    it (a ``TextIteratorStreamer``'s reader would wait forever). ``None`` when not called from there.
    """
    import sys

    try:
        frame = sys._getframe(2)  # 0: here, 1: lede_generate, 2: GenerationMixin.generate
    except ValueError:
        return None
    if frame.f_code.co_name != "generate" or not frame.f_globals.get("__name__", "").startswith("transformers."):
        return None
    return frame.f_locals.get("streamer")


class _AfterPrompt:
    """A streamer wrapper: transformers' ``generate`` has already streamed the prompt, so lede's
    own put of the prompt is dropped and everything after it passed on."""

    def __init__(self, streamer) -> None:
        self.streamer, self.prompt_sent = streamer, False

    def put(self, value) -> None:
        if not self.prompt_sent:
            self.prompt_sent = True
            return
        self.streamer.put(value)

    def end(self) -> None:
        self.streamer.end()


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
