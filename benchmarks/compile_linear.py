"""torch.compile (inductor's CPU backend) against lede's kernels on one decoder layer's linear layers.

Issue 21's first try: before writing kernels, what does a well-kept compiler give for the
projections of one layer (q, k, v, o, gate, up, down: 3.5 M fp32 weights, 14 MB streamed per
call) at 1..9 rows (positions verified at once)? Each choice runs the seven products of layer 1
of the loaded model; the table gives ms per call and c(k) = time(k rows) / time(1 row) of the
same choice, and the speed of 1 row against torch's default linear. Every compiled output is
compared with torch's default linear (max abs difference; fp32 rounding only).

Choices: ``default`` (torch's linear), ``auto`` (lede's measured kernel table,
:mod:`lede_env.kernels`), ``compile`` (``torch.compile``, inductor, weights frozen as
constants), ``compile-max-autotune`` (the same with ``max_autotune``: inductor's C++ GEMM
template with weight prepacking, against ATen's, picked by timing per shape).

    python benchmarks/compile_linear.py --rows 1,2,4,8 --repeats 200
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="1,2,3,4,6,8,9")
    ap.add_argument("--repeats", type=int, default=200)
    ap.add_argument("--choices", default="default,auto,compile,compile-max-autotune")
    args = ap.parse_args()
    import platform

    from agents.evaluate import to_markdown
    from lede_env.model import get_bundle

    rows = [int(r) for r in args.rows.split(",")]
    b = get_bundle()
    layer = b.stack.layers[0]
    lins = [m for m in layer.modules() if isinstance(m, torch.nn.Linear)]
    d = b.stack.hidden_size
    weights = [m.weight.detach() for m in lins]

    def plain(x: torch.Tensor, x_mid: torch.Tensor) -> list[torch.Tensor]:
        return [torch.nn.functional.linear(x_mid if w.shape[1] != d else x, w) for w in weights]

    class Layer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.ParameterList([torch.nn.Parameter(w.clone(), requires_grad=False) for w in weights])

        def forward(self, x: torch.Tensor, x_mid: torch.Tensor) -> list[torch.Tensor]:
            return [torch.nn.functional.linear(x_mid if w.shape[1] != d else x, w) for w in self.w]

    def lede(x: torch.Tensor, x_mid: torch.Tensor) -> list[torch.Tensor]:
        return [b.stack.linear(x_mid if w.shape[1] != d else x, w) for w in weights]

    mid = max(w.shape[1] for w in weights)
    out = []
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    for choice in args.choices.split(","):
        if choice == "default" or choice == "auto":
            fn = plain if choice == "default" else lede
        else:
            import torch._inductor.config as ic

            ic.freezing = True
            ic.max_autotune = choice.endswith("max-autotune")
            ic.max_autotune_gemm_backends = "CPP,ATEN"
            torch._dynamo.reset()
            torch._dynamo.config.cache_size_limit = 64
            fn = torch.compile(Layer().eval(), dynamic=False)
        times = {}
        err = 0.0
        t_compile = time.perf_counter()
        with torch.no_grad(), b.stack.kernels_active() if choice == "auto" else torch.no_grad():
            for r in rows:
                x, xm = torch.randn(1, r, d), torch.randn(1, r, mid)
                got = fn(x, xm)
                ref = plain(x, xm)
                err = max(err, max(float((g - f).abs().max()) for g, f in zip(got, ref)))
                for _ in range(10):
                    fn(x, xm)
                t0 = time.perf_counter()
                for _ in range(args.repeats):
                    fn(x, xm)
                times[r] = (time.perf_counter() - t0) / args.repeats * 1e3
        row = {"choice": choice, "ms 1 row": round(times[rows[0]], 3)}
        row |= {f"c({r})": round(times[r] / times[rows[0]], 2) for r in rows[1:]}
        row["max abs diff vs default"] = f"{err:.1e}"
        row["set-up + timing s"] = round(time.perf_counter() - t_compile, 1)
        out.append(row)
        print(row, flush=True)
    print(f"\n{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}; one decoder layer's 7 linear "
          f"layers ({sum(w.numel() for w in weights) / 1e6:.2f} M fp32 weights)\n")
    base = out[0]["ms 1 row"]
    for row in out:
        row["1 row vs default"] = round(base / row["ms 1 row"], 2)
    print(to_markdown(out))


if __name__ == "__main__":
    main()
