"""Matrix-product kernels for a few positions on the CPU, chosen by measuring them.

Verifying k draft positions costs c(k) AR steps; speculative decoding pays only where c(k) stays
near 1, as it does on GPUs. On the CPU, BLAS's matrix-matrix path packs the weights once an
input has 3+ rows, so on the 2-core machines measured verifying 3-5 positions cost well over one
AR step and only K = 1 drafts paid. Decoding is memory-bound (one fp32 layer of the embedded
model streams ~14 MB of weights per call), so a kernel that reads each weight once for all k rows
(``csrc/skinny_linear.cpp``) keeps c(k) near 1 for several positions (the kernel tables measured:
``docs/performance.md`` and ``docs/experiments.md``).

The fastest kernel for each row count differs between CPUs, even of one machine kind, so it
is never chosen by vendor rules: :func:`kernel_table` times every available kernel on the
model's own weight matrices, for 1 .. :data:`TABLE_ROWS` rows, once per machine, and caches the
per-row-count choice (``~/.cache/lede/kernels``). Kernels:

- ``"blas"``: ``W @ x.T`` through MKL's matrix-matrix path (reads each weight once; one row is
  padded to two, because BLAS's matrix-vector path is slower); up to :data:`BLAS_MAX_ROWS` rows.
- ``"skinny"``: lede's kernel above, compiled at first use for the machine at hand (needs a C++
  compiler and ``ninja``; without them it is skipped with a one-line notice); up to
  :data:`SKINNY_MAX_ROWS` rows.
- ``"packed"``: the same kernel on a copy of each weight matrix in blocks of
  :data:`PACK_ROWS` output rows, the order it reads them (built with ``"skinny"``): 4 output rows
  times up to 6 positions per pass, one prefetched memory stream. It costs a second copy of the
  weights it runs on (about 540 MB for the embedded model), made at first use and dropped again
  when the measured table does not pick it. Matrices whose shape does not block (output rows not
  a multiple of :data:`PACK_ROWS`, input not of 16) use ``"skinny"``.
- ``"onednn"``: oneDNN's linear (any number of rows).
- ``"default"``: ``torch.nn.functional.linear`` (GPUs, non-fp32 weights).

All agree with ``torch.nn.functional.linear`` to fp32 rounding (about 1e-6 relative); greedy
tokens can differ between kernels only on exact near-ties, and every part of lede uses the same
stack, hence the same kernels.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from .storage import cache_dir, write_json_atomic

#: named kernels (``LayerStack(kernels=...)`` also takes ``"auto"``: the measured table)
KERNELS = ("blas", "onednn", "skinny", "packed", "default")
#: most rows the ``"blas"`` kernel computes as ``W @ x.T`` (more go to oneDNN)
BLAS_MAX_ROWS = 5
#: most rows of the ``"skinny"`` kernel (more go to oneDNN)
SKINNY_MAX_ROWS = 8
#: output rows per block of the ``"packed"`` kernel's weight copy
PACK_ROWS = 4
#: most rows of the ``"packed"`` kernel (more go to oneDNN)
PACKED_MAX_ROWS = 16
#: most rows each kernel handles itself (more go to oneDNN)
MAX_ROWS = {"blas": BLAS_MAX_ROWS, "skinny": SKINNY_MAX_ROWS, "packed": PACKED_MAX_ROWS}
#: row counts the measured table covers (1 .. TABLE_ROWS; more rows use oneDNN): a draft of up
#: to 8 tokens (exit or context) is verified on 9 positions
TABLE_ROWS = 16
#: bumped when a kernel's implementation changes (kernel tables and cost profiles are keyed by it)
KERNELS_VERSION = 6

_SOURCE = Path(__file__).with_name("csrc") / "skinny_linear.cpp"
#: one build of the ``skinny`` extension at a time (threads whose first use coincides wait for it)
_BUILD_LOCK = threading.Lock()


def onednn_ok(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether oneDNN's linear kernel is usable (CPU, fp32, op present and working)."""
    if device.type != "cpu" or dtype != torch.float32 or not torch.backends.mkldnn.is_available():
        return False
    try:
        x = torch.ones(1, 2)
        return bool(torch.ops.mkldnn._linear_pointwise(x, torch.ones(3, 2), None, "none", [], "").sum() == 6)
    except (AttributeError, RuntimeError):
        return False


@functools.lru_cache(maxsize=1)
def _cpu_fingerprint() -> str:
    """CPU model and instruction-set flags (an extension built with -march=native runs only there)."""
    info = ""
    try:
        text = Path("/proc/cpuinfo").read_text()
        keep = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags"))]
        info = "\n".join(sorted(set(keep)))
    except OSError:
        pass
    return info or f"{platform.machine()} {platform.processor()}"


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), or the platform's description."""
    for ln in _cpu_fingerprint().splitlines():
        if ln.startswith("model name"):
            return ln.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


@functools.lru_cache(maxsize=1)
def skinny_op() -> Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]:
    """The compiled ``skinny`` kernel ``(x [..., in] fp32, w [out, in] fp32) -> [..., out]``, or
    ``None`` where it cannot be built (a one-line notice says why; the other kernels remain).

    Built once per machine and torch version with ``torch.utils.cpp_extension`` into
    ``~/.cache/lede/kernels/build-<tag>`` (about 10 s on 2 cores); later processes load it.
    Threads calling it at once build it once.
    """
    with _BUILD_LOCK:
        return _build_skinny()


def _build_skinny():
    """Build (or load the built) ``skinny`` extension: :func:`skinny_op`'s body."""
    tag = hashlib.sha256(repr((_cpu_fingerprint(), torch.__version__, KERNELS_VERSION,
                               _SOURCE.read_bytes())).encode()).hexdigest()[:10]
    build = cache_dir() / "kernels" / f"build-{tag}"
    try:
        import torch.utils.cpp_extension as cpp

        try:  # the `ninja` wheel's binary, where the venv's bin folder is not on PATH
            import ninja

            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
        except ImportError:
            pass
        build.mkdir(parents=True, exist_ok=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cpp.load(name=f"lede_skinny_{tag}", sources=[str(_SOURCE)], build_directory=str(build),
                     extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"],
                     is_python_module=False, verbose=False)
        op = torch.ops.lede_kernels.skinny_linear
        x, w = torch.randn(3, 40), torch.randn(5, 40)
        torch.testing.assert_close(op(x, w), x @ w.T, rtol=1e-5, atol=1e-5)
        return op
    except Exception as e:  # noqa: BLE001 - any build failure means: use the other kernels
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        print(f"lede: the 'skinny' CPU kernel could not be built ({first}); using BLAS/oneDNN only "
              "(install a C++ compiler and `pip install ninja` to enable it).", file=sys.stderr)
        return None


def packable(weight: torch.Tensor) -> bool:
    """Whether the ``"packed"`` kernel can block ``weight`` [out, in] (out a multiple of
    :data:`PACK_ROWS`, in of 16; fp32 on the CPU)."""
    return (weight.dim() == 2 and weight.device.type == "cpu" and weight.dtype == torch.float32
            and weight.shape[0] % PACK_ROWS == 0 and weight.shape[1] % 16 == 0)


def packed_weight(weight: torch.Tensor) -> torch.Tensor:
    """The ``"packed"`` kernel's copy of ``weight`` [out, in] fp32, as
    [out / PACK_ROWS, in / 16, PACK_ROWS, 16]: made at first use and kept on the tensor (made
    again if the weight is changed in place or moved)."""
    key = (weight._version, weight.data_ptr())
    cached = getattr(weight, "_lede_packed", None)
    if cached is None or cached[0] != key:
        with torch.no_grad():
            cached = (key, torch.ops.lede_kernels.pack_weight(weight.detach()))
        weight._lede_packed = cached
    return cached[1]


def drop_packed(weights: Sequence[torch.Tensor]) -> None:
    """Free the ``"packed"`` kernel's copies of ``weights`` (made again at the next use)."""
    for w in weights:
        if getattr(w, "_lede_packed", None) is not None:
            del w._lede_packed


def linear(kernel: str, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x @ weight.T + bias`` with one named kernel. [..., in] x [out, in] -> [..., out].

    A kernel asked for more rows than it handles (``"blas"`` > :data:`BLAS_MAX_ROWS`,
    ``"skinny"`` > :data:`SKINNY_MAX_ROWS`, ``"packed"`` > :data:`PACKED_MAX_ROWS`) uses oneDNN for that call; ``"packed"``
    on a matrix it cannot block (:func:`packable`) uses ``"skinny"``.

    Raises:
        ValueError: an unknown kernel name.
    """
    rows = x.numel() // x.shape[-1]
    if kernel == "packed" and rows <= PACKED_MAX_ROWS:
        if packable(weight):
            y = torch.ops.lede_kernels.packed_linear(x, packed_weight(weight))
            return y + bias if bias is not None else y
        kernel = "skinny"
    if kernel == "skinny" and rows <= SKINNY_MAX_ROWS:
        y = skinny_op()(x, weight)
        return y + bias if bias is not None else y
    if kernel == "blas" and rows <= BLAS_MAX_ROWS:
        x2 = x.reshape(rows, x.shape[-1])
        # one row takes BLAS's slow matrix-vector path; two rows do not
        x2 = (x2.expand(2, -1) if rows == 1 else x2).contiguous()
        # contiguous: a transposed result would push attention onto SDPA's slow math path
        y = torch.mm(weight, x2.T).T[:rows].contiguous()
        if bias is not None:
            y = y + bias
        return y.reshape(*x.shape[:-1], weight.shape[0])
    if kernel in ("blas", "skinny", "packed", "onednn"):
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    if kernel == "default":
        return torch.nn.functional.linear(x, weight, bias)
    raise ValueError(f"Unknown kernel {kernel!r}; choose one of {KERNELS}.")


def available(device: torch.device, dtype: torch.dtype) -> tuple[str, ...]:
    """Kernels usable for weights on ``device`` in ``dtype``; ``"default"`` always, last
    (``("default",)`` off the fp32 CPU)."""
    if not onednn_ok(device, dtype):
        return ("default",)
    names = ["onednn"]
    if torch.backends.mkl.is_available():
        names.append("blas")
    if skinny_op() is not None:
        names += ["skinny", "packed"]
    return tuple(names) + ("default",)


def measure_table(weights: Sequence[torch.Tensor], candidates: Sequence[str], rows_max: int = TABLE_ROWS,
                  repeats: int = 5) -> tuple[tuple[str, ...], dict]:
    """Time each candidate kernel on ``weights`` (one call per matrix, as one decoding pass makes)
    for 1..``rows_max`` rows; return the fastest per row count and the times.

    Candidates are interleaved within each repeat (drift hits all alike) and the fastest of
    ``repeats`` passes is kept. A kernel is timed only for the row counts it handles itself
    (:data:`MAX_ROWS`; past them it would only time oneDNN again).

    Returns:
        ``(table, times)``: ``table[r-1]`` the kernel for r rows; ``times[kernel]`` the list of
        seconds per pass for r = 1..rows_max (``inf`` where not timed).
    """
    d_in = {w.shape[1] for w in weights}
    g = torch.Generator().manual_seed(0)
    xs = {(r, d): torch.randn(1, r, d, generator=g, dtype=weights[0].dtype) for r in range(1, rows_max + 1) for d in d_in}
    best = {c: [float("inf")] * rows_max for c in candidates}
    with torch.no_grad():
        for c in candidates:  # warm-up (first calls allocate, the skinny op loads)
            for w in weights[:4]:
                linear(c, xs[(1, w.shape[1])], w)
        for _ in range(repeats):
            for r in range(1, rows_max + 1):
                for c in (c for c in candidates if r <= MAX_ROWS.get(c, rows_max)):  # the others hand over to oneDNN
                    t = time.perf_counter()
                    for w in weights:
                        linear(c, xs[(r, w.shape[1])], w)
                    best[c][r - 1] = min(best[c][r - 1], time.perf_counter() - t)
    table = tuple(min([c for c in candidates if r + 1 <= MAX_ROWS.get(c, rows_max)] or ["onednn"],
                      key=lambda c: best[c][r] if c in best else 0.0) for r in range(rows_max))
    return table, best


def kernel_table(weights: Sequence[torch.Tensor], device: torch.device, dtype: torch.dtype) -> tuple[str, ...]:
    """The per-row-count kernel table for these weights on this machine: measured once
    (:func:`measure_table`, about 3 s for the embedded model) and cached in
    ``~/.cache/lede/kernels/table-<key>.json``, keyed by CPU, threads, torch version, the weights'
    shapes and :data:`KERNELS_VERSION`. ``("default",)`` off the fp32 CPU."""
    cands = tuple(c for c in available(device, dtype) if c != "default")  # torch's own: slowest measured
    if not cands:
        return ("default",) * TABLE_ROWS
    shapes = sorted({tuple(w.shape) for w in weights})
    key = hashlib.sha256(repr((_cpu_fingerprint(), torch.get_num_threads(), torch.__version__, shapes,
                               len(weights), cands, KERNELS_VERSION)).encode()).hexdigest()[:12]
    path = cache_dir() / "kernels" / f"table-{key}.json"
    try:
        table = tuple(json.loads(path.read_text())["table"])
        if len(table) == TABLE_ROWS and set(table) <= set(cands):
            return table
    except (OSError, ValueError, KeyError, TypeError):
        pass
    table, times = measure_table(weights, cands)
    if "packed" not in table:
        drop_packed(weights)
    write_json_atomic(path, {"table": list(table), "cpu": cpu_name(), "threads": torch.get_num_threads(),
                             "torch": torch.__version__, "unit": "seconds per pass over the weights (null: not timed)",
                             "times": {c: [t if t != float("inf") else None for t in ts] for c, ts in times.items()}})
    return table
