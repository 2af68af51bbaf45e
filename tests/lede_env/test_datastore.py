"""The datastore drafter (lede_env.datastore): what it proposes, its file, its use by the envs."""

from __future__ import annotations

import numpy as np
import pytest

from lede_env.datastore import NgramDatastore
from lede_env.env import LEDEEnv


def test_proposals_follow_the_longest_ngram_with_a_majority_next_token():
    store = NgramDatastore([[1, 2, 3, 4], [1, 2, 3, 5], [1, 2, 3, 4]], ngram=(2, 3), min_count=2, min_share=0.5)
    # (1, 2) -> 3 three times; (1, 2, 3) -> 4 two times of three; nothing follows (2, 3, 4) or (3, 4)
    assert store.propose([9, 1, 2], 8) == [3, 4]
    assert store.propose([9, 1, 2], 1) == [3]
    assert store.propose([9, 1, 2], 0) == []
    assert store.propose([2, 1], 8) == []  # an n-gram the store never saw
    assert store.propose([5], 8) == []  # shorter than the shortest n-gram
    strict = NgramDatastore([[1, 2, 3, 4], [1, 2, 3, 5], [1, 2, 3, 4]], ngram=(2, 3), min_count=3)
    assert strict.propose([9, 1, 2], 8) == [3]  # (1, 2, 3) -> 4 only twice
    majority = NgramDatastore([[1, 2, 3, 4], [1, 2, 3, 5], [1, 2, 3, 6]], ngram=(2, 3), min_count=1, min_share=0.5)
    assert majority.propose([1, 2], 8) == [3]  # 4, 5 and 6 each a third of what follows (1, 2, 3)


def test_ties_go_to_the_lowest_token_id_and_bad_arguments_raise():
    store = NgramDatastore([[7, 8, 2], [7, 8, 1]], ngram=(2, 2), min_count=1, min_share=0.5)
    assert store.propose([7, 8], 1) == [1]
    with pytest.raises(ValueError, match="max_len"):
        store.propose([7, 8], -1)
    with pytest.raises(ValueError, match="min_count"):
        NgramDatastore([[1, 2, 3]], min_count=0)
    with pytest.raises(ValueError, match="min_share"):
        NgramDatastore([[1, 2, 3]], min_share=0.0)
    with pytest.raises(ValueError, match="ngram"):
        NgramDatastore([[1, 2, 3]], ngram=(3, 2))


def test_save_load_round_trip_and_a_bad_file(tmp_path):
    rng = np.random.default_rng(0)
    seqs = [rng.integers(0, 20, n).tolist() for n in (30, 5, 0, 50)]
    store = NgramDatastore(seqs, ngram=(1, 3), min_count=2, min_share=0.4)
    store.save(tmp_path / "s.npz")
    back = NgramDatastore.load(tmp_path / "s.npz")
    assert back.fingerprint() == store.fingerprint() and back.tokens == 85 and len(back) == len(store)
    for s in seqs:
        for i in range(len(s)):
            assert back.propose(s[:i + 1], 6) == store.propose(s[:i + 1], 6)
    assert NgramDatastore(seqs, ngram=(1, 3), min_count=3).fingerprint() != store.fingerprint()
    assert [p.name for p in tmp_path.iterdir()] == ["s.npz"]  # no temporary left behind
    (tmp_path / "bad.npz").write_bytes(b"not a datastore")
    with pytest.raises(ValueError, match="not a lede datastore"):
        NgramDatastore.load(tmp_path / "bad.npz")


def test_env_arguments(tiny):
    b, heads, ts, prof = tiny
    store = NgramDatastore([t.generated.tolist() for t in ts.traces], min_count=1)
    env = LEDEEnv.with_objects(trace_set=ts, profile=prof, eos_ids=b.eos_ids, k_max=4, context_lengths=(2, 4),
                  datastore=store, progress=False)
    assert env.rules.datastore is store and env.config()["context_datastore"] == store.fingerprint()
    assert env.make_decoder(b, heads).datastore is store
    with pytest.raises(ValueError, match="needs context drafts"):
        LEDEEnv.with_objects(trace_set=ts, profile=prof, eos_ids=b.eos_ids, k_max=4, datastore=store)
    with pytest.raises(ValueError, match="prebuilt trace_set"):
        LEDEEnv.with_objects(trace_set=ts, profile=prof, eos_ids=b.eos_ids, k_max=4, context_lengths=(2,), context_datastore=True)
    with pytest.raises(ValueError, match="context_datastore="):
        LEDEEnv.with_objects(trace_set=ts, profile=prof, eos_ids=b.eos_ids, k_max=4, context_datastore="yes")


def test_a_datastore_draft_is_replayed_where_the_context_has_none(tiny):
    """Action 0 with context drafts verifies the context's copy where the context has a match and
    the datastore's draft where it has none; a store made of the trace's own continuation
    proposes exactly what the full model generates, so those rounds accept every draft token."""
    from dataclasses import replace

    from lede_env.lookup import context_draft
    from lede_env.replay import replay_round

    b, heads, ts, prof = tiny
    env = LEDEEnv.with_objects(trace_set=ts, profile=prof, eos_ids=b.eos_ids, k_max=4, max_new_tokens=32, context_draft=4)
    seen = {"context": 0, "store": 0}
    for t in ts.traces:
        store = NgramDatastore([t.prompt[-1:].tolist() + t.generated.tolist()], ngram=(1, 1), min_count=1)
        rules = replace(env.rules, datastore=store)
        for g in range(1, t.n - 5):
            seq = np.concatenate([t.prompt, t.generated[:g]])
            copy = context_draft(seq, 4)
            oc, E, cost = replay_round(t, g, 0, rules, 32)
            plain, _, _ = replay_round(t, g, 0, env.rules, 32)
            assert E == 0
            if copy:
                seen["context"] += 1
                assert (oc.accepted, oc.n_verify) == (plain.accepted, plain.n_verify)
            else:
                want = store.propose(seq, 4)
                assert plain.n_verify == 1 and oc.n_verify == len(want) + 1
                # the store's next token after each generated token is the one that followed it in
                # the continuation whenever that token never had another successor
                k = 0
                while k < len(want) and want[k] == t.generated[g + k]:
                    k += 1
                assert oc.accepted == k
                seen["store"] += want != []
    assert seen["context"] > 0 and seen["store"] > 0


def test_the_shipped_datastore_is_the_embedded_models_default():
    """The store shipped for the embedded model is found under the key its default spec gives,
    passes its checksum and holds what its manifest says."""
    import json
    from types import SimpleNamespace

    from lede_env.datastore import PACKAGED_DATASTORE, DatastoreSpec, datastore_key, packaged_datastore

    from lede_env.datastore import spec_for
    from lede_env.prompts import DATASTORE_EXTRA, DEFAULT_CALIB

    # the envs and Lede load the store that goes with their calibration prompts
    assert spec_for(DEFAULT_CALIB) == DatastoreSpec() and DatastoreSpec().extra_prompts == DATASTORE_EXTRA
    assert spec_for("humaneval[0:2]") == DatastoreSpec(calib_prompts="humaneval[0:2]", extra_prompts="")
    key = datastore_key(SimpleNamespace(slug="smollm2-135m-instruct"), DatastoreSpec())
    path = packaged_datastore(key)
    assert path is not None
    entry = json.loads((PACKAGED_DATASTORE / "MANIFEST.json").read_text())[key]
    store = NgramDatastore.load(path)
    assert (store.fingerprint(), store.tokens, len(store)) == (entry["fingerprint"], entry["tokens"], entry["ngrams"])


def test_get_datastore_builds_once_then_loads_and_ignores_a_bad_shipped_file(tiny, monkeypatch, tmp_path):
    from lede_env import datastore as ds
    from lede_env.continuations import get_datastore
    from lede_env.datastore import DatastoreSpec, build_datastore, datastore_key

    from ..conftest import assert_damaged_shipped_file_ignored, tiny_continuations

    b = tiny[0]
    monkeypatch.setenv("LEDE_CACHE_DIR", str(tmp_path / "cache"))
    conts = tiny_continuations(b, 4, max_new=8, seed=5)
    calls = []

    def fake_continuations(bundle, prompts, max_new_tokens, **kw):  # the tiny model has no tokenizer
        calls.append(max_new_tokens)
        return conts

    monkeypatch.setattr("lede_env.continuations.get_continuations", fake_continuations)
    spec = DatastoreSpec(calib_prompts="humaneval[0:4]", calib_max_new_tokens=8, extra_prompts="", min_count=1)
    store = get_datastore(b, spec, progress=False)
    assert store.tokens == sum(min(len(c.prompt_ids), 4) + len(c.generated) for c in conts)
    assert store.fingerprint() == build_datastore(conts, spec).fingerprint() and calls == [8]
    assert get_datastore(b, spec, progress=False).fingerprint() == store.fingerprint()
    assert calls == [8]  # loaded from the cache, not decoded again
    assert_damaged_shipped_file_ignored(monkeypatch, ds, "PACKAGED_DATASTORE", ds.packaged_datastore,
                                        datastore_key(b, spec), "s.npz", tmp_path)
    # more prompts' batched text joins the calibration continuations, under another key
    extra = tiny_continuations(b, 3, max_new=6, seed=9)
    monkeypatch.setattr("lede_env.continuations.batched_text",
                        lambda bundle, prompts, max_new_tokens, **kw: calls.append(("extra", max_new_tokens)) or extra)
    wide = DatastoreSpec(calib_prompts="humaneval[0:4]", calib_max_new_tokens=8, extra_prompts="humaneval[4:7]",
                         extra_max_new_tokens=6, min_count=1)
    assert datastore_key(b, wide) != datastore_key(b, spec)
    assert get_datastore(b, wide, progress=False).fingerprint() == build_datastore(conts + extra, wide).fingerprint()
    assert calls[-2:] == [8, ("extra", 6)]


def test_fold_split_leaves_each_part_out_of_its_own_store(tiny):
    """agents.more_traces.fold_split: every extra continuation is in exactly one part; a part's
    store holds the calibration text and every other part's, never its own; a part's
    continuations are cut to the episode length, keeping EOS only where the cut keeps it."""
    from agents.more_traces import fold_split
    from lede_env.continuations import Continuation
    from lede_env.datastore import DatastoreSpec

    from ..conftest import tiny_continuations

    b = tiny[0]
    calib = tiny_continuations(b, n=2, max_new=12, seed=3)
    extra = [Continuation(f"x{i}", c.category, c.prompt_ids, c.generated, c.eos)
             for i, c in enumerate(tiny_continuations(b, n=7, max_new=20, seed=4))]
    spec = DatastoreSpec(prompt_tail=2)

    def seq(c):
        return list(c.prompt_ids[-2:]) + list(c.generated)

    parts = fold_split(calib, extra, spec, folds=3, max_new_tokens=10)
    ids = [c.id for _, conts in parts for c in conts]
    assert sorted(ids) == sorted(c.id for c in extra)
    by_id = {c.id: c for c in extra}
    for store, conts in parts:
        mine = {c.id for c in conts}
        want = [seq(c) for c in calib] + [seq(c) for c in extra if c.id not in mine]
        assert [s.tolist() for s in store.sequences] == want
        for c in conts:
            full = by_id[c.id]
            assert c.generated == full.generated[:10] and c.prompt_ids == full.prompt_ids
            assert c.eos == (full.eos and len(full.generated) <= 10)
    limited = fold_split(calib, extra, spec, folds=2, max_new_tokens=10, limit=4)
    assert sum(len(conts) for _, conts in limited) == 4
    with pytest.raises(ValueError, match="folds"):
        fold_split(calib, extra, spec, folds=1, max_new_tokens=10)


def test_fold_envs_needs_an_env_that_loaded_its_model(tiny_env):
    from agents.more_traces import fold_envs

    with pytest.raises(ValueError, match="loaded its model"):
        fold_envs(tiny_env)
