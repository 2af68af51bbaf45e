"""``lede export`` of an agent trained on a dataset that stores no env spec (d3rlpy #460: the env
cannot be recovered): one error line naming the fix, exit 2, nothing written; as ``lede train``
refuses ``trace_q`` on it."""

from __future__ import annotations

import pytest

from .tiny_agents import one_line, run_cli

DATASET = "lede/tiny/nospec-mixed-v0"


@pytest.fixture(scope="module")
def run_dir(tiny, tmp_path_factory):
    from agents.collect import CollectConfig, collect
    from agents.train import TrainConfig, train
    from lede_env.env import LEDEEnv

    b, heads, ts, prof = tiny
    env = LEDEEnv.with_objects(trace_set=ts, profile=prof, eos_ids=b.eos_ids, k_max=4, max_new_tokens=32, progress=False)
    ds = collect(env, CollectConfig(dataset_id=DATASET, episodes=4, seed=0), progress=False, env_spec=None)
    assert ds.spec.env_spec is None
    out = tmp_path_factory.mktemp("nospec") / "run"
    train(TrainConfig(dataset_id=DATASET, algo="dqn", steps=10, steps_per_epoch=10, batch_size=8, out_dir=str(out),
                      wandb="disabled", eval_prompts=None), progress=False, dataset=ds)
    return out


def test_export_of_an_agent_whose_dataset_has_no_env_spec_is_one_error_line(run_dir, tmp_path):
    r = run_cli("export", "--run-dir", run_dir, "--out", tmp_path / "policy")
    assert r.exit_code == 2, r.output
    text = one_line(r.output)
    assert "Traceback" not in r.output and text.startswith("error:")
    assert DATASET in text and "env spec" in text and "export_policy" in text, text
    assert not (tmp_path / "policy").exists()


def test_export_of_a_folder_that_is_no_run_is_one_error_line(tmp_path):
    r = run_cli("export", "--run-dir", tmp_path / "nothing", "--out", tmp_path / "policy")
    assert r.exit_code == 2 and "Traceback" not in r.output and "train_config.json" in one_line(r.output)


def test_training_trace_q_on_it_is_refused_too(run_dir, tmp_path):
    r = run_cli("train", "--dataset-id", DATASET, "--algo", "trace_q", "--steps", "5", "--eval-prompts", "",
                "--wandb", "disabled", "--out", tmp_path / "tq")
    assert r.exit_code == 2 and "Traceback" not in r.output and "env" in one_line(r.output)
