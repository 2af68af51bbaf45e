"""Generation with lede in one call, and a reusable decoder object.

>>> from lede_env import generate
>>> out = generate(prompt="Write a Python function that reverses a string.",
...                policy="static:2,1", max_new_tokens=64)      # doctest: +SKIP
>>> print(out.text, out.result.tokens_per_round)              # doctest: +SKIP

:class:`Lede` holds the model, tokenizer, exit heads and decoder, so that repeated calls pay the
set-up (loading, fitting or loading the exit heads) once. Policies are named like in
``lede evaluate``: ``ar``, ``static:E,K``, ``heuristic:E``, ``confidence:E,K,THRESHOLD``,
``del``, or the folder of an exported agent (``agent:PATH`` or just ``PATH``); a
:class:`~lede_env.decoding.Policy` object also works. By default (``ar`` with
``context_draft=4``) every plain step also verifies up to 4 tokens copied from the context where
it repeats (prompt lookup, :mod:`lede_env.lookup`), and where it does not, up to 4 tokens the
model's datastore of its own text proposes (:mod:`lede_env.datastore`): the fastest default
measured on the CPU reference machine (``benchmarks/datastore_drafts.py --live 3``; the figures
are in ``docs/performance.md``, "The datastore and context drafts").
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import torch

from .decoding import GenerationResult, Policy, Sampling, SelfSpeculativeDecoder, end_once
from .lookup import DEFAULT_NGRAM
from .prompts import encode_prompt
from .calibration import HeadSpec, get_heads
from .continuations import get_datastore
from .costs import profile_positions
from .datastore import spec_for
from .loop_profile import get_profile
from .metrics import format_metric, tokens_per_second
from .model import bundle_from_model, get_bundle
from .policies import POLICY_NAMES, policy_from_name
from .stopping import CalibratedStop
from .task import AGENT_PREFIXES, agent_folders, agent_path, observation_config, settings_for  # noqa: F401 - re-exported

#: context-draft tokens (prompt lookup) verified on plain steps by default
DEFAULT_CONTEXT_DRAFT = 4
#: context drafts fall back to the model's datastore where the context has no match (see :mod:`lede_env.datastore`)
DEFAULT_CONTEXT_DATASTORE = True
#: :class:`Lede`'s own defaults of the task settings it differs from ``LEDEEnv`` in (the rest are the
#: env's, :func:`lede_env.task.task_defaults`; an exported agent brings its own)
LEDE_DEFAULTS = {"context_draft": DEFAULT_CONTEXT_DRAFT, "context_datastore": DEFAULT_CONTEXT_DATASTORE,
                 "stop_rule": "calibrated", "reward_lambda": 1.0}

__all__ = ["Lede", "LedeOutput", "generate"]


@dataclass
class LedeOutput:
    """What :meth:`Lede.generate` returns.

    Attributes:
        text: the generated text (special tokens skipped).
        tokens: generated token ids (prompt excluded).
        result: the decoder's :class:`~lede_env.decoding.GenerationResult` (rounds, times).
        stopped_by: ``"eos"``, ``"stop_string"`` or ``"max_new_tokens"``.
    """

    text: str
    tokens: list[int]
    result: GenerationResult
    stopped_by: str

    def summary(self) -> str:
        """One line: tokens, tokens/s, tokens per round, acceptance, exits used, policy time (the
        metrics of :mod:`lede_env.metrics`; an undefined one, e.g. AR's acceptance, shows as ``-``)."""
        r = self.result
        exits: dict[int, int] = {}
        for x in r.rounds:
            exits[x.exit_layer] = exits.get(x.exit_layer, 0) + 1
        ex = " ".join(f"{'AR' if e == 0 else f'E{e}'}:{c}" for e, c in sorted(exits.items()))
        pol_ms = 1000 * sum(x.policy_seconds for x in r.rounds) / max(len(r.rounds), 1)
        return (f"{len(self.tokens)} tokens in {r.seconds:.2f} s "
                f"({format_metric(tokens_per_second(len(self.tokens), r.seconds), '.1f')} "
                f"tokens/s), {format_metric(r.tokens_per_round, '.2f')} tokens per round, acceptance "
                f"{format_metric(r.acceptance_rate, '.2f')}, exits {ex or '-'}, policy {pol_ms:.2f} ms/round, "
                f"stopped by {self.stopped_by}")


class Lede:
    """A reusable lede decoder for one model.

    Args:
        model: ``None`` (the embedded SmolLM2-135M-Instruct), a model id or local path, or an
            already loaded Llama-family ``PreTrainedModel`` (then give ``tokenizer`` too).
        tokenizer: the tokenizer of a loaded ``model`` (loaded with it otherwise).
        policy: default policy (see the module docstring). ``"ar"`` (default) with context drafts
            is prompt lookup decoding (with the datastore where the context has no match;
            speedups over the AR loop measured by ``benchmarks/datastore_drafts.py --live 3``,
            see ``docs/performance.md``); ``"del"``, ``"static:E,K"`` and agents add early-exit
            drafts.
        exit_layers: candidate exits (``None``: every second layer).
        k_max: largest speculation length (default 8).
        head_kind, draft_vocab, calib_prompts: exit heads (see :class:`~lede_env.calibration.HeadSpec`;
            default ``"affine-kl"``, 8192, ``DEFAULT_CALIB``; ``draft_vocab=None`` is the full
            vocabulary, its default ``"default"`` means the agent's, else 8192).
        cost_profile: ``"analytic"`` (default) or ``"measured"`` (for DEL's cost estimates, the
            calibrated stop rule and round costs).
        device, dtype: where and in which weight dtype a model given by name runs (``None``:
            ``$LEDE_DEVICE`` or cpu; bf16 on CUDA, fp32 on CPU); a loaded model stays where it is.
        context_draft: most tokens copied from the context (prompt lookup) that a plain step
            verifies when the context has a match (default 4; 0: none; see :mod:`lede_env.lookup`).
        context_datastore: where the context has no match, context drafts come from the model's
            datastore of its own text (default on; :mod:`lede_env.datastore`; the store that goes
            with ``calib_prompts``, :func:`~lede_env.datastore.spec_for`; the embedded model's
            default ships with the package).

    An exported agent (``policy`` an agent folder, also inside ``guarded:``) brings every setting
    of the env it was trained in (exits, K_max, exit heads, observation, copy actions, context
    drafter and datastore, bonus token, layer reuse, in-round stop rule, cost profile;
    :func:`lede_env.task.settings_for`): the arguments above left out (``None``) take the agent's,
    one given that contradicts it is an error. A policy that plays copy actions
    (``copy-else:M,E,T``, ``static:0,K``) switches them on.

    Raises:
        ValueError: a model that is not Llama-family, bad exits, an unknown policy name, an
            exported agent whose exits or observation layout do not match this model, or an
            argument that contradicts the agent's setting (both values named).
    """

    def __init__(self, model=None, tokenizer=None, policy: Union[str, Policy] = "ar",
                 exit_layers: Optional[Sequence[int]] = None, k_max: Optional[int] = None,
                 head_kind: Optional[str] = None, draft_vocab: Union[int, None, str] = "default",
                 calib_prompts: Optional[str] = None, cost_profile: Optional[str] = None,
                 device: Optional[str] = None, dtype: Optional[str] = None, context_draft: Optional[int] = None,
                 context_datastore: Optional[bool] = None) -> None:
        # the task first (an agent's settings, the arguments given, the policy's copy actions): a
        # contradiction is reported before anything loads
        given = {k: v for k, v in dict(exit_layers=exit_layers, k_max=k_max, head_kind=head_kind,
                                        calib_prompts=calib_prompts, cost_profile=cost_profile,
                                        context_draft=context_draft, context_datastore=context_datastore).items()
                 if v is not None}
        if draft_vocab != "default":  # (None is a choice: the full vocabulary)
            given["draft_vocab"] = draft_vocab
        names = [policy] if isinstance(policy, str) else []
        s = self.settings = settings_for(names, given, LEDE_DEFAULTS)
        agents = agent_folders(names)
        agent_cfg = None
        if agents:
            import json

            agent_cfg = json.loads((agents[0] / "policy.json").read_text())
        if model is None or isinstance(model, (str, Path)):
            self.bundle = get_bundle(None if model is None else str(model), device, dtype)
        else:
            if tokenizer is None:
                raise ValueError("A loaded model needs its tokenizer: Lede(model, tokenizer).")
            name = getattr(model.config, "_name_or_path", "") or "custom"
            self.bundle = bundle_from_model(model, tokenizer, name=name)
        self.tokenizer = self.bundle.tokenizer
        self.heads = get_heads(self.bundle, HeadSpec(s["exit_layers"], s["head_kind"], s["draft_vocab"],
                                                     s["feature_vocab"], calib_prompts=s["calib_prompts"]))
        obs = observation_config(s)
        k_max, context_draft, lengths = s["k_max"], s["context_draft"], tuple(s["context_lengths"])
        ngram = tuple((agent_cfg or {}).get("context_ngram", DEFAULT_NGRAM))  # (the agent's drafter, as trained)
        store = None
        if s["context_datastore"]:
            store = get_datastore(self.bundle, spec_for(s["calib_prompts"]))
            want = (agent_cfg or {}).get("context_datastore")
            if want and want != store.fingerprint():
                warnings.warn(f"The agent was trained with datastore {want}; this model's is {store.fingerprint()}. "
                              "Its context features may differ from training (the output is greedy all the same).")
        self.profile = get_profile(s["cost_profile"], self.bundle, self.heads,
                                   profile_positions(k_max, lengths, context_draft), obs)
        self.decoder = SelfSpeculativeDecoder(self.bundle.stack, self.heads, k_max, self.bundle.eos_ids,
                                              s["bonus"], self.profile, obs, reuse=s["reuse"],
                                              stop_rule=self._stop_rule(s),
                                              context_draft=context_draft, context_ngram=ngram,
                                              context_lengths=lengths, context_datastore=store,
                                              tree_budgets=tuple(s["tree_budgets"]), tree_depth=s["tree_depth"])
        self.policy = self.make_policy(policy)

    def _stop_rule(self, settings: dict):
        """The in-round stop rule of policies that name none, from the task ``settings``: a
        threshold (``stop_threshold``), or the calibrated rule (``stop_rule="calibrated"``) at
        lambda = ``reward_lambda`` (an exported agent's own, as it was trained; by default 1: draft
        one more token only while it is expected to pay against AR) when the exit heads carry an
        acceptance calibration, else none."""
        if settings["stop_threshold"] is not None:
            return float(settings["stop_threshold"])
        if settings["stop_rule"] != "calibrated" or self.heads.acceptance is None:
            return None
        lam = settings["reward_lambda"]
        return CalibratedStop.from_profile(self.heads.acceptance, self.profile, self.heads.exit_layers,
                                           settings["k_max"], 1.0 if lam == "auto" else float(lam),
                                           settings["bonus"], settings["reuse"])

    def make_policy(self, policy: Union[str, Policy]) -> Policy:
        """A :class:`~lede_env.decoding.Policy` from a name or an exported agent folder (objects
        pass through); names as in :func:`~lede_env.policies.policy_from_name`."""
        if not isinstance(policy, str):
            return policy
        name = _policy_name(policy)
        pol = policy_from_name(name, self.decoder.actions, self.profile, self.decoder.bonus, self.decoder.reuse,
                               self.decoder.observer)
        if pol is None:
            raise ValueError(f"Unknown policy {policy!r}; use {POLICY_NAMES} (or just the agent's folder).")
        return pol

    def encode(self, prompt: Optional[str] = None, messages: Optional[list[dict]] = None,
               chat: bool = True, *, add_generation_prompt: Optional[bool] = None,
               continue_final_message: Union[bool, str] = False) -> torch.Tensor:
        """Prompt ids [n] int64: ``messages`` through the chat template, or ``prompt`` (as one
        user message when the tokenizer has a chat template and ``chat``, else raw text).

        The chat options mean what they mean in transformers' ``apply_chat_template``:
        ``continue_final_message`` leaves the chat's last message open, so the model continues
        it (an assistant prefill: ``[..., {"role": "assistant", "content": '{"name": "'}]``; a
        string names the field to continue, e.g. ``"reasoning_content"``);
        ``add_generation_prompt`` opens a new assistant turn. By default a chat gets the
        generation prompt unless ``continue_final_message`` is set.

        Raises:
            ValueError: neither or both of ``prompt`` and ``messages``, an empty prompt, both
                ``continue_final_message`` and ``add_generation_prompt``, or either option for
                raw text (no chat template, or ``chat=False``).
        """
        if (prompt is None) == (messages is None):
            raise ValueError("Give exactly one of prompt (a string) or messages (a chat, list of role/content dicts).")
        _check_chat_options(add_generation_prompt, continue_final_message)
        templated = bool(getattr(self.tokenizer, "chat_template", None))
        if messages is not None and not templated:
            raise ValueError("This tokenizer has no chat template: pass prompt=... instead of messages=.")
        if messages is None and not (chat and templated):
            if add_generation_prompt is not None or continue_final_message:
                opt = "continue_final_message" if continue_final_message else "add_generation_prompt"
                raise ValueError(f"{opt} applies to chat templates; this prompt is raw text (chat=False or no chat "
                                 f"template): drop {opt}, or pass the chat as messages=.")
            return encode_prompt(self.tokenizer, prompt, chat=False)
        if messages is None:
            if add_generation_prompt is None and not continue_final_message:
                return encode_prompt(self.tokenizer, prompt, chat=True)
            if not prompt or not prompt.strip():
                raise ValueError("The prompt is empty: give some text to continue.")
            messages = [{"role": "user", "content": prompt}]
        gen = not continue_final_message if add_generation_prompt is None else bool(add_generation_prompt)
        enc = self.tokenizer.apply_chat_template(messages, add_generation_prompt=gen,
                                                 continue_final_message=continue_final_message,
                                                 return_tensors="pt", return_dict=True)
        return enc["input_ids"][0].to(torch.long)

    def generate(self, prompt: Optional[str] = None, *, messages: Optional[list[dict]] = None,
                 input_ids: Optional[torch.Tensor] = None, policy: Union[None, str, Policy] = None,
                 max_new_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0,
                 seed: Optional[int] = None, stop_strings: Sequence[str] = (), streamer=None,
                 chat: bool = True, stop=None, eos_ids: Optional[Sequence[int]] = None,
                 top_k: Optional[int] = None, add_generation_prompt: Optional[bool] = None,
                 continue_final_message: Union[bool, str] = False) -> LedeOutput:
        """Generate a continuation with dynamic self-speculative decoding.

        Thread-safe: calls from several threads on one Lede run one after another (its decoder
        serialises them: the observation history and the policy's state are per generation);
        Ledes sharing one model generate at the same time. Each call gives what it gives alone.

        Args:
            prompt / messages / input_ids: exactly one: text, a chat, or [n] / [1, n] int64 ids.
            policy: overrides the default policy for this call.
            max_new_tokens: most tokens to generate (never exceeded).
            temperature: 0 for greedy (output identical to greedy decoding); > 0 samples with
                speculative sampling (output distributed as plain sampling, arXiv 2211.17192).
            top_p: nucleus sampling mass (with temperature > 0).
            seed: seed of the sampling generator (reproducible on the same machine; ``None``:
                drawn from torch's global generator).
            top_k: keep only the ``top_k`` most likely tokens (with temperature > 0; ``None`` or
                0: off); applied before ``top_p``, as transformers does.
            stop_strings: generation ends right after the first token that completes one of them.
            streamer: a transformers streamer (``TextStreamer``, ``TextIteratorStreamer``).
            chat: wrap a text prompt in the chat template when the tokenizer has one.
            add_generation_prompt, continue_final_message: as in transformers'
                ``apply_chat_template`` (see :meth:`encode`): ``continue_final_message=True``
                continues the chat's last message (an assistant prefill) instead of opening a
                new assistant turn, the default.
            stop: a callable ``tokens -> None | keep`` checked after every round (see
                :meth:`SelfSpeculativeDecoder.generate`), besides ``stop_strings``.
            eos_ids: end tokens of this call (default: the model's).

        Raises:
            ValueError: bad prompt arguments (both chat options, a chat option with raw text or
                ids), batch size > 1, a prompt that does not fit the context, a bad temperature /
                top_p / top_k, an unknown policy.
        """
        streamer = end_once(streamer)  # (ended on every exit path, an error included)
        try:
            if input_ids is not None:
                if prompt is not None or messages is not None:
                    raise ValueError("Give exactly one of prompt, messages or input_ids.")
                _check_chat_options(add_generation_prompt, continue_final_message)
                if add_generation_prompt is not None or continue_final_message:
                    opt = "continue_final_message" if continue_final_message else "add_generation_prompt"
                    raise ValueError(f"{opt} applies to a chat; input_ids are used as they are: drop {opt}, or pass "
                                     "the chat as messages=.")
                ids = torch.as_tensor(input_ids, dtype=torch.long)
            else:
                ids = self.encode(prompt, messages, chat, add_generation_prompt=add_generation_prompt,
                                  continue_final_message=continue_final_message)
            if temperature < 0:
                raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}.")
            sampling = Sampling(temperature, top_p, seed, top_k) if temperature > 0 else None
            pol = self.policy if policy is None else self.make_policy(policy)
            stops = [f for f in (_stop_on_strings(self.tokenizer, stop_strings) if stop_strings else None, stop) if f]
            stop = None if not stops else (stops[0] if len(stops) == 1 else _first_stop(stops))
            fired = []  # what the stop callback cut at, recorded when it happens (never asked again afterwards)
            res = self.decoder.generate(ids, pol, max_new_tokens, sampling=sampling, streamer=streamer,
                                         stop=None if stop is None else _recording(stop, fired), eos_ids=eos_ids)
            toks = list(res.tokens)
            if res.eos:
                why = "eos"
            elif fired:
                why = "stop_string"
            else:
                why = "max_new_tokens"
            return LedeOutput(self.tokenizer.decode(toks, skip_special_tokens=True), toks, res, why)
        except BaseException:
            if streamer is not None:
                streamer.end()
            raise


def generate(model=None, tokenizer=None, prompt: Optional[str] = None, *, messages: Optional[list[dict]] = None,
             policy: Union[str, Policy] = "ar", max_new_tokens: int = 128, **kwargs) -> LedeOutput:
    """One-call generation: ``Lede(model, tokenizer, policy).generate(prompt, ...)``.

    The :class:`Lede` object is cached per (model, policy) in this process, so repeated calls
    do not reload or refit anything. Keyword arguments go to :meth:`Lede.generate`.
    """
    key = (id(model) if model is not None and not isinstance(model, (str, Path)) else model,
           policy if isinstance(policy, str) else id(policy))
    if key not in _CACHE:
        _CACHE[key] = Lede(model, tokenizer, policy=policy)
    return _CACHE[key].generate(prompt, messages=messages, max_new_tokens=max_new_tokens, **kwargs)


_CACHE: dict = {}


def _policy_name(policy: str) -> str:
    """The name :func:`~lede_env.policies.policy_from_name` gets: a bare agent folder becomes
    ``agent:PATH`` (guarded); a name with its own prefix (``agent-unguarded:PATH`` too) stays."""
    path = agent_path(policy)
    return f"agent:{path}" if path is not None and not policy.startswith(AGENT_PREFIXES) else policy


def _check_chat_options(add_generation_prompt: Optional[bool], continue_final_message) -> None:
    """Refuse what transformers' ``apply_chat_template`` refuses: both chat options at once."""
    if continue_final_message and add_generation_prompt:
        raise ValueError("continue_final_message and add_generation_prompt are not compatible: use "
                         "continue_final_message to continue the chat's last message (an assistant prefill), "
                         "add_generation_prompt to open a new assistant turn, not both.")


def _first_stop(stops):
    def stop(tokens: list[int]) -> Optional[int]:
        keeps = [k for k in (f(tokens) for f in stops) if k is not None]
        return min(keeps) if keeps else None

    return stop


def _recording(stop, fired: list):
    """``stop``, appending to ``fired`` every keep it returns (how the generation ended)."""

    def recorded(tokens: list[int]) -> Optional[int]:
        keep = stop(tokens)
        if keep is not None:
            fired.append(keep)
        return keep

    return recorded


def _stop_on_strings(tokenizer, stop_strings: Sequence[str]):
    """A ``stop`` callback for the decoder: keep the tokens up to the first one whose decoded
    text completes a stop string."""
    stops = [s for s in stop_strings if s]

    def stop(tokens: list[int]) -> Optional[int]:
        text = tokenizer.decode(tokens, skip_special_tokens=False)
        if not any(s in text for s in stops):
            return None
        for k in range(1, len(tokens) + 1):  # the shortest prefix that contains a stop string
            t = tokenizer.decode(tokens[:k], skip_special_tokens=False)
            if any(s in t for s in stops):
                return k
        return None

    return stop
