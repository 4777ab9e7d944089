"""moeprune command line: flags -> `Recipe` -> `api.run`; it parses, prints and nothing else.

Every bad input is a `MoepruneError` (or a usage error): one line on stderr, exit code 2, nothing written.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from .errors import MoepruneError

app = typer.Typer(
    name="moeprune",
    help="Prune experts of Mixture-of-Experts language models and write smaller checkpoints.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)  # progress, notes and errors; results go to stdout


def opt(flag: str, help: str, **kw):
    return typer.Option(flag, help=help, **kw)


Model = Annotated[str, typer.Argument(help="Hugging Face hub id or local checkpoint directory.")]
Out = Annotated[Path, opt("--out", "Output directory (checkpoint, moeprune.json, run files).")]
Overwrite = Annotated[bool, opt("--overwrite", "Replace --out if it exists.")]
Criterion = Annotated[
    str | None, opt("--criterion", "Within-layer criterion (frequency, reap, naee, mop, ...).")
]
Sparsity = Annotated[float | None, opt("--sparsity", "Share of the routed experts removed.")]
Data = Annotated[
    str | None, opt("--data", "Calibration data: .jsonl/.json/.parquet/.txt file or hub dataset.")
]
SearchData = Annotated[
    str, opt("--search-data", "Search data (file or hub dataset) the fitness is measured on.")
]
Stats = Annotated[
    str | None, opt("--stats", "Expert statistics from `moeprune observe` (skips calibration).")
]
TextField = Annotated[str, opt("--text-field", "Field of a data row that holds its text.")]
Samples = Annotated[int, opt("--num-samples", "Calibration samples (seeded draw).")]
SeqLen = Annotated[int, opt("--seq-len", "Tokens per calibration sample (rows are packed).")]
SearchSamples = Annotated[int, opt("--search-samples", "Search samples (seeded draw).")]
SearchSeqLen = Annotated[int, opt("--search-seq-len", "Tokens per search sample.")]
Seed = Annotated[int, opt("--seed", "Seed of sampling, random criterion, K-means and the searches.")]
Fitness = Annotated[str, opt("--fitness", "esap, kl_teacher_draft, kl_draft_teacher, nll.")]
Cache = Annotated[str, opt("--cache", "Teacher cache: sparse (top-K + tail) or dense.")]
TopK = Annotated[int, opt("--top-k", "Teacher probabilities kept per token (sparse cache).")]
Device = Annotated[str, opt("--device", "Where the model runs: cpu, cuda, cuda:1, mps.")]
Stack = Annotated[
    int, opt("--candidate-batch", "Candidates stacked into one forward (pays on a GPU; 1 = one at a time).")
]
Resume = Annotated[bool, opt("--resume", "Continue the search saved for --out.")]

# recipe keys -> the flags that set them, so that an error names what the user typed
FLAGS = {
    "sparsity": "--sparsity", "criterion": "--criterion", "seed": "--seed", "device": "--device",
    "dtype": "--dtype", "calibration.samples": "--num-samples", "calibration.seq_len": "--seq-len",
    "search.data.samples": "--search-samples", "search.data.seq_len": "--search-seq-len",
    "search.fitness": "--fitness", "search.cache": "--cache", "search.top_k": "--top-k",
    "search.population": "--population", "search.generations": "--generations",
    "search.candidate_batch": "--candidate-batch", "eep.population": "--population",
    "eep.iterations": "--iterations", "eep.merge_population": "--merge-population",
    "eep.merge_iterations": "--merge-iterations", "eep.active_experts": "--active-experts",
}  # fmt: skip


def _build(allocation: str, model: str, out: Path, **fields):
    """The recipe the flags describe (errors name the flags)."""
    from . import api
    from .recipe import Recipe

    return Recipe.build(api.recipe_fields(allocation, model, out, **fields), names=FLAGS)


def _execute(recipe, *, overwrite: bool, resume: bool = False) -> None:
    """Run the recipe, print its summary (and evaluation table) on stdout."""
    from . import api
    from .report import evaluation_cells, table

    # progress bars on a terminal only (in a log or a pipe they are noise)
    done = api.run(recipe, overwrite=overwrite, resume=resume, progress=console.is_terminal)
    if done.evaluation:
        columns = {name: evaluation_cells(r) for name, r in done.evaluation.items()}
        Console().print(table(columns, f"{recipe.allocation} at {recipe.sparsity or 0:.0%}"))
    Console().print(f"{done.choice.summary} -> {done.out} ({done.seconds:.0f}s)", highlight=False)


def _data(path, text_field: str, samples: int, seq_len: int):
    return (
        None
        if path is None
        else {"data": path, "text_field": text_field, "samples": samples, "seq_len": seq_len}
    )


@app.command()
def observe(
    model: Model, data: Annotated[str, opt("--data", "Calibration data: local file or hub dataset name.")],
    out: Annotated[Path, opt("--out", "Directory for the expert statistics.")],
    text_field: TextField = "text", num_samples: Samples = 128, seq_len: SeqLen = 512,
    criteria: Annotated[str, opt("--criteria", "Comma-separated criteria to support ('all' includes mop).")] = "all",
    dense_tokens: Annotated[int, opt("--dense-tokens", "Tokens on which every expert runs (only for mop).", min=1)] = 2048,
    batch_size: Annotated[int, opt("--batch-size", "Samples per forward pass.", min=1)] = 8,
    seed: Seed = 0, overwrite: Overwrite = False,
) -> None:  # fmt: skip
    """Run calibration data through MODEL once and save per-expert statistics for `prune --stats`."""
    from . import api
    from .criteria import get_criterion
    from .recipe import DataSpec
    from .surgery.checkpoint import check_output_dir, output_lock

    flags = {"samples": "--num-samples", "seq_len": "--seq-len", "seed": "--seed", "data": "--data"}
    d = DataSpec.build(
        {"data": data, "text_field": text_field, "samples": num_samples, "seq_len": seq_len, "seed": seed},
        names=flags,
    )
    check_output_dir(out, overwrite, inputs=(data,), model=model)
    names = None if criteria.strip() == "all" else [c.strip() for c in criteria.split(",") if c.strip()]
    for name in names or []:
        get_criterion(name)
    api.check_model(model)
    with output_lock(out):
        tokens = api.load_calibration(
            d.data, api.load_tokenizer(model), text_field=d.text_field, seq_len=d.seq_len,
            num_samples=d.samples, seed=d.seed,
        )  # fmt: skip
        stats = api.observe(
            api.load(model), tokens, criteria=names, dense_tokens=dense_tokens, batch_size=batch_size,
            seed=d.seed, out_dir=out, overwrite=overwrite,
        )  # fmt: skip
    Console().print(
        f"observed {stats.meta['num_tokens']} tokens in {len(stats.layers)} MoE layers -> {out} "
        f"(criteria: {', '.join(stats.meta['criteria_supported'])})"
    )


@app.command()
def prune(
    model: Model, out: Out,
    plan: Annotated[Path | None, opt("--plan", 'JSON file {"removed": {"<layer index>": [expert ids]}}.')] = None,
    overwrite: Overwrite = False, criterion: Criterion = None, sparsity: Sparsity = None, data: Data = None,
    text_field: TextField = "text", stats: Stats = None, num_samples: Samples = 128, seq_len: SeqLen = 512,
    seed: Seed = 0, device: Device = "cpu",
) -> None:  # fmt: skip
    """Remove experts from MODEL and write a smaller checkpoint to --out."""
    if plan is None and criterion is None:
        raise MoepruneError(
            "say which experts to remove: --plan PLAN.json, or --criterion NAME --sparsity S --data FILE"
        )
    if plan is not None and criterion is not None:
        raise MoepruneError("give either --plan or --criterion, not both")
    if criterion is not None and sparsity is None:
        raise MoepruneError(
            "--criterion needs --sparsity (share of routed experts removed in every MoE layer)"
        )
    if criterion is not None and stats is None and data is None:
        raise MoepruneError(
            "--criterion needs calibration data (--data FILE_OR_HUB_ID) or statistics (--stats DIR)"
        )
    fields = (
        {"plan": str(plan)}
        if plan is not None
        else {"criterion": criterion, "sparsity": sparsity, "stats": stats}
    )
    r = _build(
        "plan" if plan is not None else "uniform", model, out, seed=seed, device=device,
        data=_data(data, text_field, num_samples, seq_len), **fields,
    )  # fmt: skip
    _execute(r, overwrite=overwrite)


@app.command()
def search(
    model: Model, criterion: Annotated[str, opt("--criterion", "Within-layer criterion (frequency, reap, ...).")],
    sparsity: Annotated[float, opt("--sparsity", "Share of all routed experts removed.")],
    search_data: SearchData, out: Out, data: Data = None, stats: Stats = None, fitness: Fitness = "esap",
    population: Annotated[int, opt("--population", "Plans per generation.")] = 32,
    generations: Annotated[int, opt("--generations", "Generations of the evolutionary search.")] = 50,
    seed: Seed = 0, resume: Resume = False, overwrite: Overwrite = False, cache: Cache = "sparse",
    top_k: TopK = 64, text_field: TextField = "text", num_samples: Samples = 128, seq_len: SeqLen = 512,
    search_samples: SearchSamples = 16, search_seq_len: SearchSeqLen = 256, device: Device = "cpu",
    candidate_batch: Stack = 1,
) -> None:  # fmt: skip
    """EvoESAP: search how many experts each layer loses (global --sparsity), prune, save to --out."""
    r = _build(
        "evoesap", model, out, criterion=criterion, sparsity=sparsity,
        data=_data(data, text_field, num_samples, seq_len), stats=stats,
        search_data=_data(search_data, text_field, search_samples, search_seq_len), fitness=fitness,
        population=population, generations=generations, seed=seed, cache=cache, top_k=top_k, device=device,
        candidate_batch=candidate_batch,
    )  # fmt: skip
    _execute(r, overwrite=overwrite, resume=resume)


@app.command("eep-prune")
def eep_prune(
    model: Model, sparsity: Annotated[float, opt("--sparsity", "Share of each layer's experts removed.")],
    search_data: SearchData, out: Out,
    criterion: Annotated[str | None, opt("--criterion", "Seed the population with this criterion's plan.")] = None,
    data: Data = None, stats: Stats = None, fitness: Fitness = "esap",
    population: Annotated[int, opt("--population", "Selections per iteration.")] = 16,
    iterations: Annotated[int, opt("--iterations", "Iterations of the search.")] = 100,
    merge_iterations: Annotated[int, opt("--merge-iterations", "Then merge the others into the kept experts.")] = 0,
    merge_population: Annotated[int, opt("--merge-population", "Merge candidates per iteration.")] = 8,
    active: Annotated[int | None, opt("--active-experts", "Route every token to this many experts.")] = None,
    seed: Seed = 0, overwrite: Overwrite = False, text_field: TextField = "text", num_samples: Samples = 128,
    seq_len: SeqLen = 512, search_samples: SearchSamples = 16, search_seq_len: SearchSeqLen = 256,
    cache: Cache = "sparse", top_k: TopK = 64, device: Device = "cpu", candidate_batch: Stack = 1,
) -> None:  # fmt: skip
    """EEP: search which experts each layer keeps (uniform --sparsity), optionally merge the others into
    them (--merge-iterations), and save the smaller checkpoint to --out."""
    r = _build(
        "eep", model, out, sparsity=sparsity, criterion=criterion,
        data=_data(data, text_field, num_samples, seq_len), stats=stats,
        search_data=_data(search_data, text_field, search_samples, search_seq_len), fitness=fitness,
        population=population, iterations=iterations, merge_iterations=merge_iterations,
        merge_population=merge_population, active_experts=active, seed=seed, cache=cache, top_k=top_k,
        device=device, candidate_batch=candidate_batch,
    )  # fmt: skip
    _execute(r, overwrite=overwrite)


@app.command()
def evaluate(
    models: Annotated[list[str], typer.Argument(help="Checkpoints (hub ids or directories), one column each.")],
    suite: Annotated[str, opt("--suite", "Suite directory, 'testbed' (bundled) or 'none'.")] = "testbed",
    lm_eval: Annotated[str | None, opt("--lm-eval", "lm-eval tasks, comma-separated (moeprune_mc, ...).")] = None,
    lm_eval_include: Annotated[Path | None, opt("--lm-eval-include", "A folder of extra lm-eval task YAMLs.")] = None,
    limit: Annotated[int | None, opt("--limit", "lm-eval documents per task.")] = None,
    max_items: Annotated[int | None, opt("--max-items", "Suite generation / multiple-choice items.")] = None,
    out: Annotated[Path | None, opt("--out", "Write every result as JSON here.")] = None,
    device: Device = "cpu",
    dtype: Annotated[str | None, opt("--dtype", "float32, bfloat16, float16 or auto (default: float32 on a CPU).")] = None,
) -> None:  # fmt: skip
    """Evaluate checkpoints side by side: the testbed-style suite and/or lm-eval tasks, in process."""
    from . import api
    from .recipe import placement
    from .report import evaluation_cells, table, write_json

    tasks = [t.strip() for t in (lm_eval or "").split(",") if t.strip()]
    suite_dir = None if suite == "none" else suite
    if suite_dir is None and not tasks:
        raise MoepruneError("nothing to evaluate: give a --suite or --lm-eval TASKS")
    if suite_dir not in (None, "testbed") and not Path(suite_dir).is_dir():
        raise MoepruneError(
            f"--suite {suite_dir}: no such directory (a folder with test.jsonl, generation.jsonl, ...)"
        )
    if lm_eval_include is not None and not lm_eval_include.is_dir():
        raise MoepruneError(f"--lm-eval-include {lm_eval_include}: no such directory")
    where = placement(device, dtype or ("float32" if device == "cpu" else "auto"))
    for name in models:
        api.check_model(name)  # every model readable before the first one loads
    results = {}
    for name in models:
        results[name] = api.evaluate(
            api.load(name, **where), api.load_tokenizer(name), suite=suite_dir, lm_eval=tasks, limit=limit,
            max_items=max_items, lm_eval_include=lm_eval_include,
        )  # fmt: skip
    Console().print(table({n: evaluation_cells(r) for n, r in results.items()}, "moeprune evaluate"))
    if out is not None:
        console.print(f"results -> {write_json(results, out)}", highlight=False)


@app.command()
def run(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML (model, out, allocation, sparsity, ...).")],
    overwrite: Overwrite = False, resume: Resume = False,
) -> None:  # fmt: skip
    """Carry out a pruning recipe: prune, save the checkpoint with recipe.yaml, evaluate it if asked."""
    from .recipe import Recipe

    _execute(Recipe.from_yaml(recipe), overwrite=overwrite, resume=resume)


@app.command()
def demo(
    out: Annotated[Path, opt("--out", "Run directory of the demo.")] = Path("moeprune-demo"),
    criterion: Annotated[str, opt("--criterion", "Within-layer criterion.")] = "frequency",
    sparsity: Annotated[float, opt("--sparsity", "Share of all routed experts removed.")] = 0.5,
    population: Annotated[int, opt("--population", "Plans per generation.")] = 12,
    generations: Annotated[int, opt("--generations", "Generations of the search.")] = 6,
    seed: Seed = 0, overwrite: Annotated[bool, opt("--overwrite", "Replace --out if it exists.")] = True,
    model_dir: Annotated[Path | None, opt("--model-dir", "Another testbed-like model (default: bundled).")] = None,
    data_dir: Annotated[Path | None, opt("--data-dir", "Its data (calibration/search/test splits, suite).")] = None,
) -> None:  # fmt: skip
    """On the bundled testbed: observe -> EvoESAP search -> prune -> evaluate against uniform."""
    from .demo import demo_recipe

    r = demo_recipe(
        out, model_dir=model_dir, data_dir=data_dir, criterion=criterion, sparsity=sparsity,
        population=population, generations=generations, seed=seed,
    )  # fmt: skip
    console.print(
        f"demo: {r.criterion} ranking, EvoESAP search (population {population}, {generations} generations)"
    )
    _execute(r, overwrite=overwrite)
    Console().print(
        f"load with moeprune.load('{out}'); plots: {out}/allocation.png, {out}/fitness.png; "
        f"results: {out}/evaluation.json",
        highlight=False,
    )


@app.command("criteria")
def list_criteria() -> None:
    """List the within-layer criteria (for --criterion)."""
    from .criteria import CRITERIA
    from .report import table

    rows = {n: CRITERIA.get(n) for n in CRITERIA.names()}
    cols = {
        "ranks experts by": {n: c.summary for n, c in rows.items()},
        "needs": {n: "dense token subsample" if c.needs_dense else "" for n, c in rows.items()},
    }
    Console().print(table(cols))


@app.command()
def families() -> None:
    """List the supported MoE families and how each routes tokens."""
    from .arch import FAMILIES
    from .report import table

    fams = dict(sorted(FAMILIES.items()))
    cols = {
        "MoE block": {n: f"{f.block_attr}: {f.block_classes[0]}" for n, f in fams.items()},
        "routing": {n: f.routing for n, f in fams.items()},
    }
    Console().print(table(cols))


def _exception_types() -> tuple[tuple, tuple, tuple]:
    """(usage errors, aborts, exits) of click and of the click that typer vendors (typer >= 0.22 raises
    its own copies, which click's classes do not catch)."""
    import importlib

    usage: list[type] = []
    aborts: list[type] = [typer.Abort]
    exits: list[type] = [typer.Exit]
    for name in ("click.exceptions", "typer._click.exceptions", "typer.exceptions"):
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        for attr, into in (
            ("ClickException", usage),
            ("TyperException", usage),
            ("Abort", aborts),
            ("Exit", exits),
        ):
            if isinstance(getattr(module, attr, None), type):
                into.append(getattr(module, attr))
    return tuple(usage), tuple(aborts), tuple(exits)


def _interrupt(error: BaseException | None):
    """The `Interrupted` behind `error` (typer turns a KeyboardInterrupt into ``Exit(130)``)."""
    from .errors import Interrupted

    while error is not None:
        if isinstance(error, Interrupted):
            return error
        error = error.__cause__ or error.__context__
    return None


def _fail(message: str) -> None:
    console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True, markup=True)


def main() -> None:
    """Entry point. Usage, input, model-loading and I/O errors are one line on stderr and exit code 2;
    Ctrl-C or SIGTERM removes partial output, says so and exits 130/143; a bug keeps its traceback."""
    import signal

    from .errors import Interrupted
    from .interrupts import raise_on_signals
    from .quiet import quiet_third_party

    usage, aborts, exits = _exception_types()
    quiet_third_party(console)
    try:
        with raise_on_signals():
            code = app(standalone_mode=False, prog_name="moeprune")
    except MoepruneError as e:
        _fail(escape(str(e)))
        sys.exit(2)
    except usage as e:
        if type(e).__name__ == "NoArgsIsHelpError":
            ctx = getattr(e, "ctx", None)  # bare `moeprune`: the help on stdout (typer's rich help prints it)
            text = (
                ctx.get_help() if ctx is not None else "usage: moeprune COMMAND [OPTIONS] (moeprune --help)"
            )
            if text:
                print(text)
        else:
            ctx = getattr(e, "ctx", None)
            command = f" {ctx.info_name}" if ctx is not None and ctx.parent is not None else ""
            message = e.format_message() if hasattr(e, "format_message") else str(e)
            _fail(escape(f"{' '.join(message.split())} (see moeprune{command} --help)"))
        sys.exit(2)
    except (*aborts, *exits, KeyboardInterrupt, Interrupted) as e:
        stop = _interrupt(e)
        if stop is None and isinstance(e, exits):
            sys.exit(e.exit_code)
        signum = stop.signum if stop is not None else signal.SIGINT
        name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        note = getattr(stop or e, "moeprune_note", "nothing was written")
        console.print(f"interrupted ({name}); {note}", highlight=False, soft_wrap=True)
        sys.exit(128 + signum)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
