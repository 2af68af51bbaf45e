"""The ``lede`` command line: one verb per pipeline stage, each a thin wrapper around an
importable function.

``traces build -> exits fit -> profile -> collect -> train -> export -> evaluate``, and ``demo``
for all of them at a small scale on the embedded model.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from lede_env.prompts import DEFAULT_CALIB, DEFAULT_EVAL, DEFAULT_MAX_NEW, DEFAULT_TRAIN


def _silence_gym_notice() -> None:
    """d3rlpy imports the old ``gym`` package (for its spaces), and importing gym prints a
    migration banner to stderr ("Gym has been unmaintained since 2022 ...") that it reads from
    ``gym_notices``. It is harmless here: lede's environments are Gymnasium's. Drop that one
    notice before anything imports gym; no other output or warning is hidden."""
    try:
        from importlib.metadata import version

        import gym_notices.notices as notices

        notices.notices.pop(version("gym"), None)
    except Exception:  # noqa: BLE001 - gym or gym_notices not installed: nothing to silence
        pass


_silence_gym_notice()

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="lede: dynamic self-speculative decoding as offline RL (LEDE, arXiv 2606.03113).")
traces_app = typer.Typer(no_args_is_help=True, help="Build greedy traces.")
exits_app = typer.Typer(no_args_is_help=True, help="Fit and inspect exit heads.")
app.add_typer(traces_app, name="traces")
app.add_typer(exits_app, name="exits")
from agents.cli_dataset import dataset_app, fail  # noqa: E402
from lede_env.policies import split_policies  # noqa: E402

app.add_typer(dataset_app, name="dataset")
console = Console()

@app.callback()
def _main(device: Optional[str] = typer.Option(None, "--device", envvar="LEDE_DEVICE",
                                               help="cpu (default), cuda, cuda:N or auto: where models run. Under "
                                                    "torchrun / accelerate launch, cuda means cuda:LOCAL_RANK."),
          dtype: Optional[str] = typer.Option(None, "--dtype", envvar="LEDE_DTYPE",
                                              help="Weight dtype: fp32, bf16, fp16 or auto (default: bf16 on CUDA, "
                                                   "fp32 on CPU, where greedy equivalence is exact).")):
    """Global options, given before the command: ``lede --device cuda --dtype bf16 evaluate ...``."""
    from lede_env.device import set_default_device

    try:
        set_default_device(device, dtype)
    except ValueError as e:
        fail(e)


ModelOpt = typer.Option(None, help="Model id or local path (default: embedded SmolLM2-135M-Instruct).")
PromptsOpt = typer.Option(DEFAULT_TRAIN, help="Prompt spec: humaneval[a:b] or FILE.jsonl{cats}[a:b].")
CalibOpt = typer.Option(DEFAULT_CALIB, help="Prompts whose greedy continuations fit the exit heads.")
MaxNewOpt = typer.Option(DEFAULT_MAX_NEW, help="Tokens generated per prompt.")


def _shard(s: Optional[str]) -> Optional[str]:
    from lede_env.sharding import parse_shard

    try:
        parse_shard(s)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    return s


ShardOpt = typer.Option(None, callback=_shard, help="K/N: build only part K of N (items i with i % N == K-1), "
                                                    "so N processes or machines share the work.")


def _exits(s: Optional[str]) -> Optional[list[int]]:
    return [int(x) for x in s.split(",")] if s else None


def _task(base=None, **options):
    """The task config a command's options describe: the one place the CLI builds one.

    Args:
        base: the config the options change (default: ``TaskConfig()``, the ``LEDE-Llama3-v0``
            defaults).
        options: flat env keywords (:data:`lede_env.config.FLAT_KEYS`); ``exit_layers`` may be the
            comma-separated option string. The process's weight dtype (``lede --dtype``; bf16 on
            CUDA) is recorded where no ``dtype`` is given.

    Exits with the config's own one-line message on a bad setting.
    """
    from lede_env.config import TaskConfig
    from lede_env.device import spec_dtype

    if isinstance(options.get("exit_layers"), str):
        options["exit_layers"] = _exits(options["exit_layers"])
    try:
        return (base or TaskConfig()).replace(**{**spec_dtype(), **options})
    except (TypeError, ValueError) as e:
        fail(e)


@traces_app.command("build")
def traces_build(model: Optional[str] = ModelOpt, prompts: str = PromptsOpt, max_new_tokens: int = MaxNewOpt,
                 exits: Optional[str] = typer.Option(None, help="Comma-separated exit layers (default every 2nd)."),
                 head_kind: str = "affine-kl", draft_vocab: Optional[int] = 8192, calib_prompts: str = CalibOpt,
                 shard: Optional[str] = ShardOpt):
    """Greedy continuations + one teacher-forced pass per prompt, cached under the lede cache.
    With --shard K/N only part K of the greedy continuations (trace and calibration prompts) is
    built; a final run without --shard reuses all N parts and builds the traces."""
    from lede_env.calibration import HeadSpec
    from lede_env.traces import TraceSpec, build_continuation_shard, get_traces

    spec = TraceSpec(model, prompts, max_new_tokens,
                     HeadSpec(exits, head_kind, draft_vocab,
                              calib_prompts=calib_prompts))
    if shard:
        from lede_env.sharding import parse_shard

        sh = parse_shard(shard)  # "auto" -> this rank's K/N under torchrun / accelerate launch
        done = build_continuation_shard(spec, sh)
        console.print(f"shard {sh[0]}/{sh[1]}: {done['trace_prompts']} trace-prompt and {done['calib_prompts']} calibration "
                      f"continuations of {done['total']}; when all shards are done, run `lede traces build` "
                      "without --shard to build the traces from them.")
        return
    ts = get_traces(spec)
    n = sum(t.n for t in ts.traces)
    console.print(f"{len(ts)} traces, {n} generated tokens, exits {list(ts.exit_layers)}, "
                  f"teacher-forcing mismatches: {ts.manifest['teacher_forcing_mismatches']}")


@exits_app.command("fit")
def exits_fit(model: Optional[str] = ModelOpt, calib_prompts: str = CalibOpt,
              heldout_prompts: str = typer.Option(DEFAULT_EVAL, help="Prompts to report agreement on."),
              max_new_tokens: int = MaxNewOpt, exits: Optional[str] = None, draft_vocab: Optional[int] = 8192,
              kinds: str = typer.Option("lens,affine,affine-kl", help="Exit-head kinds to fit and compare."),
              ridge: float = 0.01, kl_steps: int = 600):
    """Fit exit heads of each kind (logit lens; affine tuned lens, arXiv 2303.08112, by ridge;
    affine + KL fine-tune) and report held-out top-1 agreement with the final layer per prompt
    category, and each draft head's time per token. Calibration and held-out prompts must be
    disjoint."""
    import torch

    from lede_env.costs import min_time
    from lede_env.exits import HEAD_KINDS, ExitHeads
    from lede_env.prompts import load_prompts
    from lede_env.calibration import HeadSpec, agreement_by_category, get_heads
    from lede_env.continuations import get_continuations
    from lede_env.model import get_bundle
    from lede_env.prompts import check_disjoint

    b = get_bundle(model)
    names = [k.strip() for k in kinds.split(",") if k.strip()]
    for k in names:
        if k not in HEAD_KINDS:
            raise typer.BadParameter(f"unknown exit-head kind {k!r}; choose from {HEAD_KINDS}", param_hint="--kinds")
    try:
        check_disjoint(calibration=calib_prompts, held_out=heldout_prompts)
    except ValueError as e:
        fail(e)
    held = get_continuations(b, load_prompts(heldout_prompts), max_new_tokens)
    x = torch.randn(1, b.stack.hidden_size, dtype=b.stack.dtype, device=b.stack.device)
    V = b.stack.head_weight.shape[0]
    tables, times = {}, {}
    for k in names:
        heads = get_heads(b, HeadSpec(exits, k, draft_vocab,
                                      calib_prompts=calib_prompts, ridge=ridge, kl_steps=kl_steps))
        tables[f"{k} (V_d={heads.draft_vocab})"] = agreement_by_category(heads, held)
        times[f"{k} (V_d={heads.draft_vocab})"] = 1000 * min_time(lambda h=heads: h.draft_tokens(x, 0), 30,
                                                                   b.stack.device)
        if heads.draft_vocab != V:  # the same translators over the full vocabulary
            full = ExitHeads(b.stack, heads.exit_layers, k)
            full.load_state(heads.state())
            tables[f"{k} (full vocab)"] = agreement_by_category(full, held)
            times[f"{k} (full vocab)"] = 1000 * min_time(lambda h=full: h.draft_tokens(x, 0), 30, b.stack.device)
    print(f"Top-1 agreement with the final layer on the held-out {heldout_prompts} "
          f"({sum(len(c.generated) for c in held)} positions), per prompt category; heads fitted on "
          f"{calib_prompts}\n")
    for name, table in tables.items():
        cats = list(table)
        print(f"{name}: draft head {times[name]:.2f} ms per token\n")
        print("| exit | " + " | ".join(cats) + " |\n|---|" + "---|" * len(cats))
        for e in table["all"]:
            print(f"| {e} | " + " | ".join(f"{table[c][e]:.3f}" for c in cats) + " |")
        print()


@app.command()
def profile(model: Optional[str] = ModelOpt, out: Path = Path("cost_profile.json"), k_max: int = 8,
            draft_vocab: Optional[int] = 8192, calib_prompts: str = CalibOpt,
            in_loop: bool = typer.Option(True, help="Fit the times to rounds timed in the real decoding loop "
                                                    "(what cost_profile='measured' uses; about 30 s more)"),
            compare_kernels: bool = typer.Option(False, help="Also measure every kernel choice alone (blas, "
                                                             "skinny, onednn, default) beside the measured table"),
            long_context: int = typer.Option(768, help="Also time the whole verify pass alone after this many "
                                                       "cached positions (the profile's own times use 256): "
                                                       "attention over the context raises c(k) with it; 0: skip"),
            tree_nodes: str = typer.Option("2,4,8,16", help="Also time the verify pass of token trees of these node "
                                                            "counts against a causal copy verify of as many positions "
                                                            "(recorded in the profile's meta; '': skip)")):
    """Measure the cost profile (layer, head, draft head, overhead times) on this machine and
    print c(k), the cost of k positions relative to one, for one layer, the LM head and the
    whole verify pass: timed alone, and fitted to rounds of the real decoding loop."""
    import torch
    from rich.table import Table

    from lede_env.costs import measure_profile
    from lede_env.costs import overhead_probe
    from lede_env.loop_profile import loop_profile
    from lede_env.kernels import available, cpu_name
    from lede_env.mdp import ObservationConfig
    from lede_env.calibration import HeadSpec, get_heads
    from lede_env.model import get_bundle

    b = get_bundle(model)
    heads = get_heads(b, HeadSpec(draft_vocab=draft_vocab, calib_prompts=calib_prompts))
    iso = measure_profile(b.stack, heads, k_max, overhead_fn=overhead_probe(b, heads, k_max, ObservationConfig()))
    profs = {"isolated": iso}
    if in_loop:
        profs["in-loop"] = loop_profile(b, heads, k_max, iso, obs=ObservationConfig())
    prof = profs["in-loop" if in_loop else "isolated"]
    if tree_nodes.strip():
        prof.meta["tree_verify"] = _tree_verify_table(b, [int(x) for x in tree_nodes.split(",")])
    prof.save(out)
    console.print(f"{cpu_name()}, {torch.get_num_threads()} threads, kernels {b.stack.kernels_tag}")
    for name, p in profs.items():
        console.print(f"{name}: AR step {1000 * p.ar_step:.2f} ms; layer {1000 * p.layer[0]:.3f} ms; head "
                      f"{1000 * p.head[0]:.2f} ms; draft head {1000 * p.draft_head:.3f} ms; overhead "
                      f"{1000 * p.overhead:.3f} ms")
    if in_loop:
        m = prof.meta
        console.print(f"in-loop fit: {m['rounds']} rounds ({m['outliers']} outliers dropped); median error of the "
                      f"predicted round time {100 * m['median_rel_error']:.1f} % (isolated profile: "
                      f"{100 * m['prior_median_rel_error']:.1f} %) -> {out}")
    cols = [f"{what} {name}" for name in profs for what in ("layer", "head", "verify")]
    t = Table("k (positions)", *cols, title="c(k): cost of k positions / 1 (one layer, the LM head, the whole verify pass)")
    cs = [p.c_table() for p in profs.values()]
    long = None
    if long_context > 0:  # timed alone as the isolated profile is, after more cached positions
        long = measure_profile(b.stack, heads, k_max, context=long_context).c_table()["verify"]
        t.add_column(f"verify isolated, {long_context} cached")
    for k in range(1, prof.max_positions + 1):
        t.add_row(str(k), *(f"{c[what][k - 1]:.2f}" for c in cs for what in ("layer", "head", "verify")),
                  *([f"{long[k - 1]:.2f}"] if long else []))
    console.print(t)
    t = Table("round", *profs, title="Round cost in AR steps (E, K; K + 1 positions verified)")
    for e, k in ((0, 0), (2, 1), (2, 2), (4, 1), (4, 2), (6, 3)):
        t.add_row("AR step" if e == 0 else f"E={e}, K={k}", *(f"{p.round_cost(e, k, k + 1):.3f}" for p in profs.values()))
    console.print(t)
    if compare_kernels:
        t = Table("kernels", "AR ms", "c(2)", "c(4)", "c(8)", "verify(4) ms", "verify(8) ms",
                  title=f"Kernel choices on {cpu_name()} ({torch.get_num_threads()} threads)")
        chosen = b.stack.kernels
        try:
            for k in ("auto",) + available(b.stack.device, b.stack.dtype):
                b.stack.set_kernels(k)
                p = measure_profile(b.stack, heads, max(k_max, 7))
                t.add_row(f"{k} ({b.stack.kernels_tag})" if k == "auto" else k, f"{1000 * p.ar_step:.1f}",
                          *(f"{p.verify_cost(n):.2f}" for n in (2, 4, 8)),
                          *(f"{1000 * p.ar_step * p.verify_cost(n):.1f}" for n in (4, 8)))
        finally:
            b.stack.set_kernels(chosen)
        console.print(t)


def _tree_verify_table(bundle, nodes: list[int]) -> dict:
    """Print the verify time of token trees of ``nodes`` nodes against a copy draft's verify of as
    many positions (:func:`lede_env.costs.measure_tree_verify`); return ``{n: tree / copy}``. The
    profile charges a tree of n nodes as a copy verify of n + 1 positions (``docs/experiments.md``,
    "Tree verification cost": equal within 1-2 %)."""
    from rich.table import Table

    from lede_env.costs import measure_tree_verify

    times = measure_tree_verify(bundle.stack, nodes)
    t = Table("nodes n", "copy verify of n + 1, ms", "tree verify, ms", "tree / copy",
              title="Token-tree verify (tree mask, depth positions, cache compaction) vs a causal copy verify")
    for n, v in times.items():
        t.add_row(str(n), f"{1e3 * v['copy']:.2f}", f"{1e3 * v['tree']:.2f}", f"{v['tree'] / v['copy']:.3f}")
    console.print(t)
    return {str(n): v["tree"] / v["copy"] for n, v in times.items()}


_DEFAULT_MIXTURE = "random=0.2,static=0.3,heuristic=0.1,oracle=0.4"


@app.command()
def collect(dataset_id: str = "lede/smollm2-135m-instruct/humaneval-mixed-v0", episodes: int = 200, seed: int = 0,
            model: Optional[str] = ModelOpt, prompts: str = PromptsOpt, max_new_tokens: int = MaxNewOpt,
            exits: Optional[str] = None, k_max: int = 8, head_kind: str = "affine-kl",
            draft_vocab: Optional[int] = 8192, calib_prompts: str = CalibOpt, reward_mode: str = "net",
            cost_profile: str = "measured",
            mixture: str = typer.Option(_DEFAULT_MIXTURE, help="Behaviour mixture, NAME=WEIGHT,... (the default "
                                                               "drops oracle for --backend live)"),
            recipe: Optional[Path] = typer.Option(None, help="A dataset recipe (datasets/NAME.yaml): builds that "
                                                             "dataset and its card; the other options are ignored."),
            shard: Optional[str] = ShardOpt,
            backend: str = typer.Option("trace", help="trace (greedy trace replay) or live (the real decoder: "
                                                      "sampling, wall-clock cost; no oracle behaviour)."),
            temperature: float = typer.Option(0.0, help="Live backend: sampling temperature (0 = greedy)."),
            top_p: float = typer.Option(1.0, help="Live backend: nucleus sampling mass."),
            top_k: int = typer.Option(0, help="Live backend: keep the k most likely tokens when sampling (0 = off)."),
            cost: str = typer.Option("profile", help="Live backend: profile or wallclock round costs.")):
    """Run behaviour policies in LEDE-Llama3-v0 (or LEDE-Llama3-Live-v0) and write a Minari dataset."""
    from agents.collect import CollectConfig, collect as run_collect

    from lede_env.env import LEDEEnv

    if recipe is not None:
        from agents.recipes import build, load_recipe

        try:
            r = load_recipe(recipe)
            ds = build(r)
        except (ValueError, FileNotFoundError) as e:
            fail(e)
        console.print(f"{r.dataset_id}: {ds.total_episodes} episodes, {ds.total_steps} steps; card {r.card_path}")
        return

    live = {}
    if (backend, temperature, top_p, top_k, cost) != ("trace", 0.0, 1.0, 0, "profile"):  # recorded in the env spec
        live = dict(backend=backend, temperature=temperature, top_p=top_p, cost=cost, top_k=top_k or None)
    task = _task(model=model, prompts=prompts, max_new_tokens=max_new_tokens, exit_layers=exits, k_max=k_max,
                 head_kind=head_kind, draft_vocab=draft_vocab, calib_prompts=calib_prompts, reward_mode=reward_mode,
                 cost_profile=cost_profile, **live)
    try:  # settings are checked before the env (and model) is loaded
        from agents.collect import parse_mixture
        from agents.store import check_dataset_id

        mix = parse_mixture(mixture)
        if backend == "live" and mixture == _DEFAULT_MIXTURE and mix.pop("oracle", None):
            console.print(f"live backend: no oracle behaviour (it needs traces); mixture {mix}")
        cfg = CollectConfig(dataset_id=dataset_id, episodes=episodes, mixture=mix, seed=seed, shard=shard)
        check_dataset_id(dataset_id)
        ds = run_collect(LEDEEnv(task), cfg, env_spec=task)
    except ValueError as e:
        fail(e)
    console.print(f"{ds.spec.dataset_id}: {ds.total_episodes} episodes, {ds.total_steps} steps")


@app.command()
def train(dataset_id: str = "lede/smollm2-135m-instruct/humaneval-mixed-v0",
          algo: str = typer.Option("discrete_cql", help="discrete_cql, dqn, double_dqn, discrete_bcq, discrete_bc "
                                                        "(d3rlpy, offline); sb3_offline_dqn (stable-baselines3, "
                                                        "offline); ppo, online_dqn (stable-baselines3, online on "
                                                        "the dataset's trace env)."),
          steps: int = typer.Option(6000, help="Gradient steps (offline) or env steps (online)."),
          gamma: float = 0.5, learning_rate: float = 3e-4, batch_size: int = 256, seed: int = 0,
          eval_prompts: Optional[str] = typer.Option(DEFAULT_EVAL, help="Held-out prompts evaluated after "
                                                                       "training ('' to skip)."),
          out: Path = Path("runs/train"),
          wandb: str = typer.Option("offline", help="offline | online | disabled")):
    """Train an RL agent on a Minari dataset; evaluate it on held-out prompts (eval.json, W&B)."""
    from agents.train import TrainConfig, train as run_train

    try:
        cfg = TrainConfig(dataset_id=dataset_id, algo=algo, steps=steps, gamma=gamma, learning_rate=learning_rate,
                          batch_size=batch_size, seed=seed, out_dir=str(out), wandb=wandb,
                          eval_prompts=eval_prompts or None)
        run_train(cfg)
    except ValueError as e:
        fail(e)
    summary = json.loads((out / "eval.json").read_text())
    console.print(json.dumps(summary, indent=2))
    console.print(f"agent in {out} (export it with `lede export --run-dir {out}`)")


@app.command()
def sweep(file: Path = typer.Argument(..., help="W&B sweep YAML (e.g. agents/sweeps/algorithms.yaml)."),
          online: bool = typer.Option(False, help="Create the sweep on W&B and run an agent here (needs "
                                                  "`wandb login`); other machines join with `wandb agent`."),
          count: Optional[int] = typer.Option(None, help="At most this many trials (needed for random/bayes)."),
          project: str = "lede", entity: Optional[str] = None, out: Path = Path("runs/sweep"),
          wandb: str = typer.Option("offline", help="Offline sweeps: W&B mode of each trial (offline | disabled).")):
    """Sweep RL algorithms x learning rates x datasets; offline (default) with W&B's `sweeps` engine,
    each trial logged to W&B offline; ends with a table of held-out throughput, share of the oracle
    and training time per trial."""
    from agents.sweep import load_sweep, run_local, run_online

    try:
        cfg = load_sweep(file)
        if online:
            sweep_id = run_online(cfg, project, entity, count, out)
            console.print(f"sweep {sweep_id}; join from other machines with: wandb agent "
                          f"{entity + '/' if entity else ''}{project}/{sweep_id}")
            return
        if wandb not in ("offline", "disabled"):
            raise ValueError(f"--wandb {wandb!r}: offline sweeps log 'offline' or 'disabled' (use --online for W&B).")
        rows = run_local(cfg, out, count, wandb)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        fail(e)
    console.print((out / "sweep.md").read_text())
    console.print(f"{len(rows)} trials; table in {out}/sweep.md; runs under {out}/*/ (sync W&B logs with "
                  f"`wandb sync {out}/*/wandb/offline-run-*`)")


@app.command("sweep-run", hidden=True)
def sweep_run(args_json_file: Path, out: Path = Path("runs/sweep")):
    """One trial of an online sweep (what `wandb agent` runs: the sweep's `command`)."""
    from agents.sweep import trial_from_args_file

    console.print(trial_from_args_file(args_json_file, out))


@app.command()
def export(run_dir: Path = Path("runs/train"), out: Path = Path("runs/policy"),
           dataset_id: Optional[str] = typer.Option(None, help="Dataset the agent was trained on (default: from "
                                                                "the run's train_config.json)."),
           onnx: bool = typer.Option(False, help="Also write policy.onnx (needs the onnx extra).")):
    """Export a trained agent (any `lede train --algo`) as TorchScript + JSON (runs without d3rlpy or
    stable-baselines3), optionally ONNX."""
    from agents.datasets_tool import load
    from agents.export import export_policy
    from agents.train import load_algo

    try:
        if not (run_dir / "train_config.json").exists():
            raise ValueError(f"No train_config.json in {run_dir}: not a run folder of `lede train` (give --run-dir).")
        cfg = json.loads((run_dir / "train_config.json").read_text())
        ds_id = dataset_id or cfg["dataset_id"]
        ds = load(ds_id)
        if ds.spec.env_spec is None:  # (minari: "Environment cannot be recovered when env_spec is None")
            raise ValueError(f"Dataset {ds_id!r} stores no env spec, so the env the agent was trained in cannot be "
                             "rebuilt to export it: export it from Python with agents.export.export_policy(agent, "
                             "env, out) and that env, or train on a dataset collected by `lede collect` (which "
                             "stores one).")
        env = ds.recover_environment()
        algo = load_algo(run_dir)
    except (ValueError, FileNotFoundError) as e:
        fail(e)
    export_policy(algo, env, out, algo_name=cfg["algo"], gamma=cfg["gamma"], onnx=onnx)
    console.print(f"exported to {out}")


@app.command()
def evaluate(policies: str = typer.Option("ar,hf,hf-lookup:10,static:best,oracle",
                                          help="Comma-separated policy names (ar, hf, hf-lookup:N, hf-early-exit:E, "
                                               "static:E,K, static:best, heuristic:E, confidence:E,K,THRESHOLD, copy-else:M,E,THRESHOLD, del, "
                                               "oracle, agent:PATH)."),
             prompts: str = typer.Option(DEFAULT_EVAL, help="Held-out prompts."),
             train_prompts: str = typer.Option(DEFAULT_TRAIN, help="Prompts to choose static:best on."),
             calib_prompts: Optional[str] = typer.Option(None, help="Prompts whose greedy continuations fit the "
                                                         "exit heads (default: the agent's, else DEFAULT_CALIB)."),
             model: Optional[str] = ModelOpt, max_new_tokens: int = MaxNewOpt,
             k_max: Optional[int] = typer.Option(None, help="Largest speculation length (default: the agent's, "
                                                 "else 8)."),
             exits: Optional[str] = typer.Option(None, help="Comma-separated exit layers (default: the agent's, "
                                                 "else every 2nd)."),
             head_kind: Optional[str] = typer.Option(None, help="Exit heads (default: the agent's, else affine-kl)."),
             draft_vocab: Optional[int] = typer.Option(None, help="Draft vocabulary (default: the agent's, else "
                                                       "8192)."),
             cost_profile: Optional[str] = typer.Option(None, help="reference | measured | analytic | FILE.json "
                                                        "(default: the agent's, else reference)."),
             obs_kind: Optional[str] = typer.Option(None, help="Observation of the env: compact | full (default: "
                                                    "the exported agent's, else compact)."),
             stop_rule: Optional[str] = typer.Option(None, help="In-round stop rule of policies that name none: "
                                                     "calibrated | none (default: the agent's, else calibrated)."),
             context_draft: Optional[int] = typer.Option(None, help="Tokens action 0 copies from the context "
                                                         "(prompt lookup; default: the agent's, else 0)."),
             context_lengths: Optional[str] = typer.Option(None, help="Copy lengths of the context actions, e.g. "
                                                           "1,2,3,4,6,8 (default: the agent's, else 1,2,3,4,6,8)."),
             context_datastore: Optional[bool] = typer.Option(None, help="Context drafts fall back to the model's "
                                                              "datastore where the context has no match (default: "
                                                              "the agent's, else on)."),
             live: bool = typer.Option(True, help="Also time the real decoder."),
             plots: bool = typer.Option(True, help="Write PNG plots (speedup per category, policies' choices)."),
             out: Path = Path("runs/eval"),
             wandb: str = typer.Option("offline", help="Log the results to W&B: offline | online | disabled.")):
    """Evaluate policies in the trace env and with the real decoder on held-out prompts, in the
    task LEDE-Llama3-v1 by default; normalized scores (0 = AR, 100 = oracle) with 95 % bootstrap
    intervals. An exported agent among the policies brings every setting of the env it was
    trained in (the options above left out take the agent's; one that contradicts it is an
    error); a policy that plays copy actions (copy-else:M,E,T, static:0,K) needs them in the
    context lengths."""
    from agents.evaluate import evaluate_held_out, held_out_envs
    from lede_env.config import STUDIED_SETTINGS
    from lede_env.device import spec_dtype
    from lede_env.task import task_for

    names = [p for p in split_policies(policies)]
    given = {k: v for k, v in dict(
        k_max=k_max, exit_layers=exits, head_kind=head_kind, draft_vocab=draft_vocab, calib_prompts=calib_prompts,
        cost_profile=cost_profile, obs_kind=obs_kind, stop_rule=stop_rule, context_draft=context_draft,
        context_lengths=None if context_lengths is None else [x for x in context_lengths.split(",") if x.strip()],
        context_datastore=context_datastore).items() if v is not None}
    try:
        from lede_env.prompts import check_disjoint

        # (an agent's own stored task, else LEDE-Llama3-v1's settings)
        task = task_for(names, given, {k: v for k, v in STUDIED_SETTINGS.items() if k != "prompts"}, model=model,
                        max_new_tokens=max_new_tokens, **spec_dtype())
        check_disjoint(training=train_prompts, held_out=prompts)
    except (ValueError, TypeError, FileNotFoundError) as e:
        fail(e)
    k_max = task.rules.k_max
    # lambda and static:best come from training traces
    train_env, eval_env = held_out_envs(task, train_prompts, prompts)
    res = evaluate_held_out(train_env, eval_env, names, out, prompts, live=live, show=console.print)
    trace_rows, records = res.trace, res.records
    rows = res.live if live else trace_rows
    plot_rows = rows
    from agents.evaluate import log_to_wandb

    log_to_wandb(wandb, "lede", f"evaluate-{prompts}", {"policies": names, **task.to_kwargs(), "prompts": prompts},
                 {"trace_eval": trace_rows, "live_eval": rows if live else []}, out)
    if plots:
        from agents.plots import plot_choices, plot_speedup_by_category

        made = [plot_speedup_by_category(plot_rows, out / "speedup_by_category.png",
                                         "speedup_vs_ar" if live else "throughput")]
        for lab, recs in records.items():
            if lab != "ar" and not lab.startswith("static"):
                slug = "".join(ch if ch.isalnum() else "_" for ch in lab)[:60]
                made.append(plot_choices(recs, out / f"choices_{slug}.png", eval_env.actions.exit_layers, k_max,
                                         title=f"{lab} on {prompts}"))
        console.print("plots: " + ", ".join(str(m) for m in made))


@app.command()
def leaderboard(out: Path = Path("runs/leaderboard"),
                algos: str = typer.Option("all", help="Comma-separated learners (agents.train.ALGOS), or all."),
                seeds: int = typer.Option(3, help="Training seeds per learner."),
                steps: int = typer.Option(6000, help="Gradient steps (offline) or env steps (online) per run."),
                episodes: int = typer.Option(300, help="Dataset episodes."),
                train_prompts: str = DEFAULT_TRAIN, eval_prompts: str = DEFAULT_EVAL, model: Optional[str] = ModelOpt,
                max_new_tokens: int = MaxNewOpt,
                cost_profile: str = typer.Option("reference", help="reference (the same on every machine) | measured "
                                                                   "| analytic | FILE.json.")):
    """Train every learner over several seeds on the LEDE-Llama3-v1 task's dataset and rank them
    beside the baselines on held-out prompts: leaderboard.md (normalized score [95 % CI] per
    category, IQM, training time, policy cost per round)."""
    from agents.leaderboard import LeaderboardConfig, run_leaderboard
    from agents.train import ALGOS
    from lede_env.config import studied_task

    names = ALGOS if algos == "all" else tuple(a for a in algos.split(",") if a)
    task = _task(studied_task(), model=model, prompts=train_prompts, max_new_tokens=max_new_tokens,
                 cost_profile=cost_profile)
    try:
        cfg = LeaderboardConfig(task=task, eval_prompts=eval_prompts, algos=names,
                                seeds=tuple(range(seeds)), steps=steps, episodes=episodes, out_dir=str(out))
        res = run_leaderboard(cfg)
    except ValueError as e:
        fail(e)
    console.print(res["markdown"])
    console.print(f"leaderboard in {out / 'leaderboard.md'}")


@app.command()
def report(results: Path = typer.Argument(..., help="A folder written by `lede evaluate --out DIR` or `lede demo`."),
           out: Optional[Path] = typer.Option(None, help="Where report.md, report.html and the PNGs go "
                                                         "(default RESULTS/report)."),
           max_texts: int = typer.Option(3, help="Generations shown token by token per dynamic policy.")):
    """Plots of an evaluation as PNG files plus one Markdown and one HTML page: speedup per
    category, the agent's exit layers and speculation lengths, acceptance over a generation, and
    the generated text with each token coloured by the exit layer that drafted it."""
    from agents.report import write_report

    try:
        path = write_report(results, out, max_texts)
    except (FileNotFoundError, ValueError) as e:
        fail(e)
    console.print(f"report: {path} and {path.with_suffix('.html')}")


@app.command("generate")
def generate_cmd(prompt: str = typer.Argument(..., help="Prompt text (sent as one chat message when the "
                                                        "tokenizer has a chat template)."),
                 policy: str = typer.Option("ar", help="ar (with context drafts: prompt lookup), static:E,K, "
                                                       "heuristic:E, confidence:E,K,THRESHOLD, copy-else:M,E,THRESHOLD, del, guarded:NAME, "
                                                       "or an exported agent folder."),
                 model: Optional[str] = ModelOpt, max_new_tokens: int = 128,
                 temperature: Optional[float] = typer.Option(None, help="0 = greedy; > 0 = speculative sampling "
                                                             "(default: the model's generation_config.json, as "
                                                             "transformers' generate reads it; else greedy)."),
                 top_p: Optional[float] = typer.Option(None, help="Nucleus mass when sampling (default: the "
                                                       "model's generation config, else 1)."),
                 top_k: Optional[int] = typer.Option(None, help="Most likely tokens kept when sampling (default: "
                                                     "the model's generation config, else transformers' 50)."),
                 seed: Optional[int] = None,
                 stop: list[str] = typer.Option([], help="Stop string (repeatable)."),
                 head_kind: Optional[str] = typer.Option(None, help="Exit heads (default: the agent's, else "
                                                         "affine-kl)."),
                 calib_prompts: Optional[str] = typer.Option(None, help="Prompts whose greedy continuations fit "
                                                             "the exit heads (default: the agent's, else "
                                                             "DEFAULT_CALIB)."),
                 context_draft: Optional[int] = typer.Option(None, help="Most tokens copied from the context "
                                                             "(prompt lookup) that a plain step verifies; 0 = off "
                                                             "(default: the agent's, else 4)."),
                 context_datastore: Optional[bool] = typer.Option(None, help="Where the context has no match, draft "
                                                                  "from the model's datastore of its own text "
                                                                  "(default: the agent's, else on).")):
    """Generate with dynamic self-speculative decoding, printing tokens as rounds are accepted,
    then one line: tokens, tokens/s, tokens per round, acceptance, exits used, policy time.

    Runs through transformers' ``generate(custom_generate=lede_generate)``, so the model's own
    ``generation_config.json`` counts as it does there: its sampling settings are the defaults the
    options above override, and a setting lede cannot honour exactly (a repetition penalty, ...)
    is one error line naming it and where it came from."""
    import torch
    from transformers import TextStreamer

    from lede_env.generate import Lede
    from lede_env.hf import lede_generate

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        lede = Lede(model, policy=policy, head_kind=head_kind, calib_prompts=calib_prompts,
                    context_draft=context_draft, context_datastore=context_datastore)
        streamer = TextStreamer(lede.tokenizer, skip_prompt=True, skip_special_tokens=True)
        given = {k: v for k, v in (("temperature", temperature), ("top_p", top_p), ("top_k", top_k)) if v is not None}
        if temperature is not None:
            given["do_sample"] = temperature > 0
            if temperature == 0:
                del given["temperature"]  # (greedy: transformers refuses temperature=0 with sampling off)
        if seed is not None:
            torch.manual_seed(seed)
        ids = lede.encode(prompt).view(1, -1)
        outputs: list = []
        lede.bundle.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                   custom_generate=lede_generate, lede=lede, lede_outputs=outputs,
                                   stop_strings=list(stop) or None, streamer=streamer, **given)
    except ValueError as e:
        fail(e)
    console.print(f"[dim]{outputs[-1].summary()}[/]")


@app.command("tiny-model")
def tiny_model(out: Path = typer.Argument(..., help="Folder to write the model to (replaced if it exists)."),
               layers: int = typer.Option(8, help="Decoder layers."), hidden: int = typer.Option(64, help="Width."),
               seed: int = 0):
    """Write a randomly initialised tiny Llama with the embedded tokenizer, for trying pipelines
    end to end in seconds (``--model OUT`` on any command; e.g. benchmarks/gpu_check.sh on a CPU)."""
    from lede_env.model import save_tiny_model

    save_tiny_model(out, layers, hidden, seed)
    console.print(f"tiny Llama ({layers} layers, width {hidden}) with the embedded tokenizer -> {out}")


@app.command()
def demo(out: Path = Path("runs/demo"), train_prompts: str = DEFAULT_TRAIN, eval_prompts: str = DEFAULT_EVAL,
         calib_prompts: str = DEFAULT_CALIB, max_new_tokens: int = DEFAULT_MAX_NEW, episodes: int = 300,
         steps: int = 6000, reward_mode: str = "relative", gamma: float = 0.5, seed: int = 0,
         wandb: str = "offline", live: bool = True, model: Optional[str] = ModelOpt,
         head_kind: str = typer.Option("affine-kl", help="Exit heads: lens (LayerSkip checkpoints), affine, affine-kl."),
         context_lengths: str = typer.Option("1,2,3,4,6,8", help="Copy lengths of the context actions (prompt "
                                                                  "lookup), comma-separated; '' for none."),
         context_datastore: bool = typer.Option(True, help="Where the context has no match, context drafts come from "
                                                "the model's datastore of its own text.")):
    """The main job: traces -> env -> Minari dataset -> offline RL -> export -> evaluation table,
    on the embedded model (its time and table on the reference machine: docs/performance.md)."""
    from agents.pipeline import DemoConfig, run_demo
    from lede_env.config import studied_task

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    lengths = tuple(int(x) for x in context_lengths.split(",") if x.strip())
    task = _task(studied_task(), model=model, head_kind=head_kind, prompts=train_prompts, calib_prompts=calib_prompts,
                 max_new_tokens=max_new_tokens, reward_mode=reward_mode, context_lengths=lengths,
                 context_datastore=context_datastore and bool(lengths))
    run_demo(DemoConfig(task=task, eval_prompts=eval_prompts, episodes=episodes, steps=steps, gamma=gamma, seed=seed,
                        out_dir=str(out), wandb=wandb, live=live))


#: optional module -> the extra that installs it (``pip install 'lede[EXTRA]'``)
EXTRAS = {"d3rlpy": "rl", "stable_baselines3": "rl", "sb3_contrib": "rl", "minari": "rl", "h5py": "rl",
          "PIL": "rl", "wandb": "rl", "sweeps": "sweep", "sklearn": "sweep", "scipy": "rl",
          "matplotlib": "report", "onnx": "onnx", "onnxruntime": "onnx"}


def missing_extra(e: ModuleNotFoundError) -> Optional[str]:
    """The one-line message for a missing optional dependency (``None`` if ``e`` is not one)."""
    top = (e.name or "").split(".")[0]
    if top not in EXTRAS:
        return None
    extra = EXTRAS[top]
    hint = " and `pip install --no-deps sweeps==0.3.0`" if extra == "sweep" else ""
    return (f"this command needs {top!r}, part of lede's '{extra}' extra: pip install 'lede[{extra}]'{hint} "
            "(scripts/setup.sh installs every extra).")


def main() -> None:
    """The ``lede`` console script: :data:`app`, with a missing extra and a dataset another process
    is writing (:class:`agents.store.DatasetBusyError`) reported in one line (exit 2)."""
    from agents.store import DatasetBusyError, is_lock_error

    try:
        app()
    except ModuleNotFoundError as e:
        msg = missing_extra(e)
        if msg is None:
            raise
        console.print(f"[red]error:[/] {msg}")
        raise SystemExit(2) from None
    except DatasetBusyError as e:
        console.print(f"[red]error:[/] {e}", highlight=False)
        raise SystemExit(2) from None
    except OSError as e:  # (a file HDF5 found locked after the dataset was opened)
        if not is_lock_error(e):
            raise
        console.print("[red]error:[/] an HDF5 file this command reads is being written by another process (HDF5 "
                      "locks it): wait for that process to finish, or stop it.", highlight=False)
        raise SystemExit(2) from None


if __name__ == "__main__":  # pragma: no cover
    main()
