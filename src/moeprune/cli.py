"""moeprune command line: a thin typer layer over `moeprune.api`.

Every bad input is a `MoepruneError`: printed as one line on stderr, exit code 2, nothing written.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from .errors import MoepruneError

app = typer.Typer(
    name="moeprune",
    help="Prune experts of Mixture-of-Experts language models and write smaller checkpoints.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)

ModelArg = Annotated[str, typer.Argument(help="Hugging Face hub id or local checkpoint directory.")]
OutOpt = Annotated[Path, typer.Option("--out", help="Output directory of the pruned checkpoint.")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace --out if it exists.")]


def fail(message: str) -> None:
    """One line on stderr, exit code 2."""
    console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


@app.command()
def prune(
    model: ModelArg,
    out: OutOpt,
    plan: Annotated[
        Path | None,
        typer.Option("--plan", help='JSON file {"removed": {"<layer index>": <list of expert ids>}}.'),
    ] = None,
    overwrite: OverwriteOpt = False,
) -> None:
    """Remove experts from MODEL and write a smaller checkpoint to --out."""
    from . import api
    from .surgery import ExpertPlan
    from .surgery.checkpoint import check_output_dir

    check_output_dir(out, overwrite)
    if plan is None:
        fail("say which experts to remove: --plan PLAN.json")
    expert_plan = ExpertPlan.from_json(plan)
    api.check_model(model, expert_plan)
    loaded = api.load(model)
    counts = api.expert_counts(loaded)
    kept = api.prune(loaded, expert_plan)
    path = api.save(
        loaded,
        out,
        source=model,
        kept=kept,
        num_experts=counts,
        tokenizer=api.load_tokenizer(model),
        overwrite=overwrite,
        plan=expert_plan.to_dict(),
    )
    left = sum(len(v) for v in kept.values())
    console.print(f"pruned {sum(counts.values()) - left} of {sum(counts.values())} routed experts -> {path}")


@app.command()
def families() -> None:
    """List the supported MoE families and how each routes tokens."""
    from rich.table import Table

    from .arch import FAMILIES

    table = Table("model_type", "MoE block", "routing")
    for name, fam in sorted(FAMILIES.items()):
        table.add_row(name, f"{fam.block_attr}: {fam.block_classes[0]}", fam.routing)
    Console().print(table)


def main() -> None:
    """Entry point: run the app, turning user errors into one line and exit code 2."""
    try:
        code = app(standalone_mode=False)
    except MoepruneError as e:
        console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        console.print("aborted")
        sys.exit(130)
    except Exception as e:  # click usage errors
        import click

        if isinstance(e, click.exceptions.ClickException):
            e.show()
            sys.exit(2)
        raise
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
