"""``lede dataset``: list, show, validate, merge and publish local Minari datasets (thin wrappers
around :mod:`agents.datasets_tool`). Bad input (an unknown id, a malformed id or remote) exits
with code 2 and a red message naming the fix; an invalid dataset exits with code 1."""

from __future__ import annotations

import json
from typing import Optional

import typer
from rich.console import Console

dataset_app = typer.Typer(no_args_is_help=True, help="List, show, validate, merge and publish Minari datasets.")
console = Console()


def fail(e: Exception, code: int = 2):
    """Print ``e`` as a one-line error and exit with ``code`` (2: bad input), for every lede command."""
    console.print(f"[red]error:[/] {e}")
    raise typer.Exit(code) from None


@dataset_app.command("list")
def list_cmd():
    """Whole local datasets (under MINARI_DATASETS_PATH) with episodes, steps and reference scores."""
    from agents.datasets_tool import list_datasets

    rows = list_datasets()
    if not rows:
        console.print("no local datasets")
        return
    for ds_id, r in rows.items():
        ref = ("" if None in (r["ref_min_score"], r["ref_max_score"]) else
               f"  ref {r['ref_min_score']:.3g}..{r['ref_max_score']:.3g}")
        console.print(f"{ds_id}  {r['episodes']} episodes, {r['steps']} steps, {r['size_mb']} MB{ref}",
                      highlight=False)


@dataset_app.command("show")
def show_cmd(dataset_id: str = typer.Argument(..., help="Local dataset id.")):
    """Metadata of a local dataset as JSON."""
    from agents.datasets_tool import show

    try:
        info = show(dataset_id)
    except (FileNotFoundError, ValueError) as e:
        fail(e)
    print(json.dumps(info, indent=2, default=str))


@dataset_app.command("validate")
def validate_cmd(dataset_id: str = typer.Argument(..., help="Local dataset id."),
                 replay: bool = typer.Option(True, help="Re-compute rewards by replay in the env recovered from "
                                                        "the dataset's spec (loads the model).")):
    """Check T+1 observations per episode, actions in range, episode ends, spaces, metadata and
    (with --replay) rewards against a replay in the env; prints what could not be checked and why
    (e.g. the measured rewards of a wall-clock dataset). Exit code 1 when a problem is found."""
    from agents.datasets_tool import validate

    notes: list[str] = []
    try:
        problems = validate(dataset_id, replay=replay, notes=notes)
    except (FileNotFoundError, ValueError) as e:
        fail(e)
    for n in notes:
        console.print(f"[yellow]skipped:[/] {n}", highlight=False)
    if problems:
        for p in problems:
            console.print(f"[red]-[/] {p}", highlight=False)
        console.print(f"[red]{dataset_id}: {len(problems)} problem(s)[/]")
        raise typer.Exit(1)
    console.print(f"{dataset_id}: valid")


@dataset_app.command("merge")
def merge_cmd(new_id: str = typer.Argument(..., help="Id of the merged dataset (lede/<model>/<prompts>-<mix>-vN)."),
              ids: Optional[list[str]] = typer.Argument(None, help="Source dataset ids, in order."),
              shards: Optional[int] = typer.Option(None, help="Merge the N shards NEW_ID's collection wrote "
                                                              "(`lede collect --shard k/N`) instead of listing ids."),
              replay: bool = typer.Option(True, help="Validate the result by replay (loads the model).")):
    """Combine datasets (minari.combine_datasets), typically the shards of one collection, into one
    dataset with fixed metadata (episode options, description, counts, reference scores); prints
    what validation could not check and why."""
    from agents.datasets_tool import merge
    from agents.store import shard_dataset_id

    sources = list(ids or [])
    if shards is not None:
        if shards < 1:
            fail(typer.BadParameter("--shards must be >= 1"))
        sources += [shard_dataset_id(new_id, k, shards) for k in range(1, shards + 1)]
    if not sources:
        fail(ValueError("nothing to merge: list the source ids after NEW_ID, or pass --shards N."))
    notes: list[str] = []
    try:
        ds = merge(sources, new_id, validate_replay=replay, notes=notes)
    except (FileNotFoundError, ValueError) as e:
        fail(e)
    for n in notes:
        console.print(f"[yellow]note:[/] {n}", highlight=False)
    console.print(f"{new_id}: {ds.total_episodes} episodes, {ds.total_steps} steps from {len(sources)} datasets")


@dataset_app.command("publish")
def publish_cmd(dataset_id: str = typer.Argument(..., help="Local dataset id."),
                remote: Optional[str] = typer.Option(None, help="hf://<user-or-org> or gcp://<bucket> "
                                                                "(default: $MINARI_REMOTE)."),
                dry_run: bool = typer.Option(False, "--dry-run", help="Validate and print what would be "
                                                                      "uploaded; upload nothing."),
                token: Optional[str] = typer.Option(None, help="Hugging Face token or GCP key file (default: "
                                                               "HF_TOKEN / huggingface-cli login / "
                                                               "GOOGLE_APPLICATION_CREDENTIALS)."),
                replay: bool = typer.Option(True, help="Validate by replay first (loads the model).")):
    """Validate a dataset and upload it to a Minari remote (minari.upload_dataset)."""
    from agents.datasets_tool import PublishError, publish

    try:
        plan = publish(dataset_id, remote=remote, dry_run=dry_run, token=token, replay=replay)
    except (FileNotFoundError, PublishError) as e:
        fail(e)
    except ValueError as e:  # DatasetInvalid
        fail(e, 1)
    verb = "would upload" if dry_run else "uploaded"
    for f in plan["files"]:
        console.print(f"  {f['remote_path']}  ({f['bytes']} bytes)", highlight=False)
    console.print(f"{verb} {len(plan['files'])} files, {plan['bytes']} bytes of {dataset_id} to {plan['remote']} "
                  f"(credentials: {plan['credentials']})", highlight=False)
