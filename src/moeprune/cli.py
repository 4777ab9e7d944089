"""moeprune command line: flags -> `Recipe` -> `api.run`; it parses, prints and nothing else.

Every bad input is a `MoepruneError` (or a usage error): one line on stderr, exit code 2, nothing written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from .errors import MoepruneError

# help text is plain (rich_markup_mode=None): '[expert ids]' in a help line is text, not markup
app = typer.Typer(name="moeprune", help="Prune experts of Mixture-of-Experts language models and write smaller "
                  "checkpoints.", no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  rich_markup_mode=None)  # fmt: skip
console = Console(stderr=True)  # progress, notes and errors; results go to stdout


def opt(flag: str, help: str, **kw):
    return typer.Option(flag, help=help, **kw)


# fmt: off
Model = Annotated[str, typer.Argument(help="Hugging Face hub id or local checkpoint directory.")]
Out = Annotated[Path, opt("--out", "Output directory (checkpoint, moeprune.json, run files).")]
Overwrite = Annotated[bool, opt("--overwrite", "Replace --out if it exists.")]
Criterion = Annotated[str | None, opt("--criterion", "Within-layer criterion (frequency, reap, naee, mop, ...).")]
Sparsity = Annotated[float | None, opt("--sparsity", "Share of the routed experts removed.")]
Data = Annotated[str | None, opt("--data", "Calibration data: .jsonl/.json/.parquet/.txt file or hub dataset.")]
SearchData = Annotated[str, opt("--search-data", "Search data (file or hub dataset) the fitness is measured on.")]
Stats = Annotated[str | None, opt("--stats", "Expert statistics from `moeprune observe` (skips calibration).")]
TextField = Annotated[str, opt("--text-field", "Field of a data row that holds its text.")]
Samples = Annotated[int, opt("--num-samples", "Calibration samples (seeded draw).")]
SeqLen = Annotated[int, opt("--seq-len", "Tokens per calibration sample (rows are packed).")]
SearchSamples = Annotated[int, opt("--search-samples", "Search samples (seeded draw).")]
SearchSeqLen = Annotated[int, opt("--search-seq-len", "Tokens per search sample.")]
Seed = Annotated[int, opt("--seed", "Seed of sampling, random criterion, K-means and the searches.")]
Fitness = Annotated[str, opt("--fitness", "esap, kl_teacher_draft, kl_draft_teacher, nll.")]
Cache = Annotated[str, opt("--cache", "Teacher cache: hidden (final states, exact, T x H), sparse (top-K + tail) or dense.")]
TopK = Annotated[int, opt("--top-k", "Teacher probabilities kept per token (sparse cache).")]
Device = Annotated[str, opt("--device", "cpu, cuda, cuda:1, mps, auto[:0=70GiB,cpu=200GiB] (accelerate device map + disk offload), or DEVICE:layers / layers (one decoder layer at a time from the checkpoint; automatic when the model does not fit).")]
Stack = Annotated[int, opt("--candidate-batch", "Candidates stacked into one forward (pays on a GPU; 1 = one at a time).")]
Resume = Annotated[bool, opt("--resume", "Continue the search saved for --out.")]
Executor = Annotated[str, opt("--executor", "Where candidates are scored: local (this process) or ray.")]
RayAddress = Annotated[str | None, opt("--ray-address", "Ray cluster HOST:PORT (default: start a local one).")]
Workers = Annotated[int | None, opt("--workers", "Ray workers (default: one per GPU, else per CPU).")]
Racing = Annotated[str, opt("--racing", "on: score candidates slice by slice, drop clear losers early; off: exact.")]
RacingZ = Annotated[float | None, opt("--racing-z", "Drop when mean + z * se of the paired differences to the worst elite < 0 [default: 1 search, 3 eep-prune].")]
GenTokens = Annotated[int, opt("--gen-tokens", "Prompt rows (on-policy data): tokens the model writes per prompt.")]
GenStop = Annotated[str | None, opt("--gen-stop", "Prompt rows: end each answer after this text (e.g. '\\n'), else at eos.")]
# fmt: on

SPECIAL_FLAGS = {"calibration.samples": "--num-samples", "search.data.samples": "--search-samples",
                 "search.data.seq_len": "--search-seq-len", "recipe": "recipe"}  # fmt: skip


def flag(key: str) -> str:
    """The flag that sets recipe `key` (so that an error names what the user typed)."""
    return SPECIAL_FLAGS.get(key, "--" + key.rsplit(".", 1)[-1].replace("_", "-"))


def _unescape(text: str | None) -> str | None:
    """'\\n' typed in a shell is a newline."""
    return None if text is None else text.replace("\\n", "\n").replace("\\t", "\t")


def _build(allocation: str, model: str, out: Path, **fields):
    """The recipe the flags describe (errors name the flags)."""
    from . import api
    from .recipe import Recipe

    return Recipe.build(api.recipe_fields(allocation, model, out, **fields), names=flag)


def _execute(recipe, *, overwrite: bool, resume: bool = False) -> None:
    """Run the recipe, print its evaluation table and summary on stdout."""
    from . import api
    from .report.tables import run_summary

    # progress bars on a terminal only (in a log or a pipe they are noise)
    for shown in run_summary(
        api.run(recipe, overwrite=overwrite, resume=resume, progress=console.is_terminal)
    ):
        Console().print(shown, highlight=False)


def _data(path, text_field: str, samples: int, seq_len: int) -> dict | None:
    return None if path is None else {"data": path, "text_field": text_field, "samples": samples, "seq_len": seq_len}  # fmt: skip


@app.command()
def observe(
    model: Model, data: Annotated[str, opt("--data", "Calibration data: local file or hub dataset name.")],
    out: Annotated[Path, opt("--out", "Directory for the expert statistics.")],
    text_field: TextField = "text", num_samples: Samples = 128, seq_len: SeqLen = 512,
    criteria: Annotated[str, opt("--criteria", "Comma-separated criteria to support ('all' includes mop).")] = "all",
    dense_tokens: Annotated[int, opt("--dense-tokens", "Tokens on which every expert runs (only for mop).", min=1)] = 2048,
    batch_size: Annotated[int, opt("--batch-size", "Samples per forward pass.", min=1)] = 8,
    seed: Seed = 0, overwrite: Overwrite = False, device: Device = "cpu",
) -> None:  # fmt: skip
    """Run calibration data through MODEL once and save per-expert statistics for `prune --stats`."""
    from . import api
    from .recipe import DataSpec

    d = DataSpec.build(
        _data(data, text_field, num_samples, seq_len) | {"seed": seed},
        names=lambda k: flag(f"calibration.{k}"),
    )
    names = None if criteria.strip() == "all" else [c.strip() for c in criteria.split(",") if c.strip()]
    stats = api.observe_checkpoint(
        model, out, data=d.model_dump(), criteria=names, overwrite=overwrite, seed=seed,
        dense_tokens=dense_tokens, batch_size=batch_size, device=device, progress=console.is_terminal,
    )  # fmt: skip
    supported, n = ", ".join(stats.meta["criteria_supported"]), stats.meta["num_tokens"]
    Console().print(f"observed {n} tokens in {len(stats.layers)} MoE layers -> {out} ({supported})")


@app.command()
def prune(
    model: Model, out: Out,
    plan: Annotated[Path | None, opt("--plan", 'JSON file {"removed": {"<layer index>": [expert ids]}}.')] = None,
    overwrite: Overwrite = False, criterion: Criterion = None, sparsity: Sparsity = None, data: Data = None,
    text_field: TextField = "text", stats: Stats = None, num_samples: Samples = 128, seq_len: SeqLen = 512,
    seed: Seed = 0, device: Device = "cpu",
    mode: Annotated[str, opt("--mode", "auto | stream (rewrite the safetensors tensor by tensor) | memory | layers.")] = "auto",
    max_shard_size: Annotated[str | None, opt("--max-shard-size", "Largest weight file, e.g. 5GB.")] = None,
    uniform_from: Annotated[str | None, opt("--uniform-from", "A search's run dir: prune its nearest uniform plan.")] = None,
) -> None:  # fmt: skip
    """Remove experts from MODEL and write a smaller checkpoint to --out (streamed when it can be)."""
    if uniform_from is not None and (plan is not None or criterion is not None or sparsity is not None):
        raise MoepruneError(
            "--uniform-from takes the plan and its size from the search run; drop --plan/--criterion/--sparsity"
        )
    if plan is None and criterion is None and uniform_from is None:
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
    fields = {"plan": str(plan)} if plan is not None else {"criterion": criterion, "sparsity": sparsity, "stats": stats}  # fmt: skip
    fields |= {"uniform_from": uniform_from}
    _execute(_build(
        "plan" if plan is not None or uniform_from is not None else "uniform", model, out, seed=seed, device=device, mode=mode,
        max_shard_size=max_shard_size,
        data=_data(data, text_field, num_samples, seq_len), **fields,
    ), overwrite=overwrite)  # fmt: skip


@app.command()
def search(
    model: Model, criterion: Annotated[str, opt("--criterion", "Within-layer criterion (frequency, reap, ...).")],
    sparsity: Annotated[float, opt("--sparsity", "Share of all routed experts removed.")],
    search_data: SearchData, out: Out, data: Data = None, stats: Stats = None, fitness: Fitness = "esap",
    population: Annotated[int, opt("--population", "Plans per generation.")] = 32,
    generations: Annotated[int, opt("--generations", "Generations of the evolutionary search.")] = 50,
    seed: Seed = 0, resume: Resume = False, overwrite: Overwrite = False, cache: Cache = "hidden",
    top_k: TopK = 64, text_field: TextField = "text", num_samples: Samples = 128, seq_len: SeqLen = 512,
    search_samples: SearchSamples = 16, search_seq_len: SearchSeqLen = 256, device: Device = "cpu",
    candidate_batch: Stack = 1, executor: Executor = "local", ray_address: RayAddress = None, workers: Workers = None,
    racing: Racing = "on", racing_z: RacingZ = None, gen_tokens: GenTokens = 64, gen_stop: GenStop = None,
) -> None:  # fmt: skip
    """EvoESAP: search how many experts each layer loses (global --sparsity), prune, save to --out."""
    _execute(_build(
        "evoesap", model, out, criterion=criterion, sparsity=sparsity,
        data=_data(data, text_field, num_samples, seq_len), stats=stats,
        search_data=_data(search_data, text_field, search_samples, search_seq_len), fitness=fitness,
        population=population, generations=generations, seed=seed, cache=cache, top_k=top_k, device=device,
        candidate_batch=candidate_batch, executor=executor, ray_address=ray_address, workers=workers,
        racing=racing, racing_z=racing_z, gen_tokens=gen_tokens, gen_stop=_unescape(gen_stop),
    ), overwrite=overwrite, resume=resume)  # fmt: skip


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
    cache: Cache = "hidden", top_k: TopK = 64, device: Device = "cpu", candidate_batch: Stack = 1,
    resume: Resume = False, executor: Executor = "local", ray_address: RayAddress = None, workers: Workers = None,
    racing: Racing = "on", racing_z: RacingZ = None, gen_tokens: GenTokens = 64, gen_stop: GenStop = None,
) -> None:  # fmt: skip
    """EEP: search which experts each layer keeps (uniform --sparsity), merge the others in, save --out."""
    _execute(_build(
        "eep", model, out, sparsity=sparsity, criterion=criterion,
        data=_data(data, text_field, num_samples, seq_len), stats=stats,
        search_data=_data(search_data, text_field, search_samples, search_seq_len), fitness=fitness,
        population=population, iterations=iterations, merge_iterations=merge_iterations,
        merge_population=merge_population, active_experts=active, seed=seed, cache=cache, top_k=top_k,
        device=device, candidate_batch=candidate_batch, executor=executor, ray_address=ray_address, workers=workers,
        racing=racing, racing_z=racing_z, gen_tokens=gen_tokens, gen_stop=_unescape(gen_stop),
    ), overwrite=overwrite, resume=resume)  # fmt: skip


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
    dtype: Annotated[str | None, opt("--dtype", "float32, bfloat16, float16 or auto (default: the checkpoint's).")] = None,
) -> None:  # fmt: skip
    """Evaluate checkpoints side by side: the testbed-style suite and/or lm-eval tasks, in process."""
    from . import api
    from .report import evaluation_cells, table, write_json

    tasks = [t.strip() for t in (lm_eval or "").split(",") if t.strip()]
    results = api.evaluate_checkpoints(
        models, suite=None if suite == "none" else suite, lm_eval=tasks, device=device, dtype=dtype, limit=limit,
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
    _execute(recipe, overwrite=overwrite, resume=resume)


@app.command()
def demo(
    out: Annotated[Path, opt("--out", "Run directory of the demo.")] = Path("moeprune-demo"),
    criterion: Annotated[str, opt("--criterion", "Within-layer criterion.")] = "frequency",
    sparsity: Annotated[float, opt("--sparsity", "Share of all routed experts removed.")] = 0.5,
    population: Annotated[int, opt("--population", "Plans per generation.")] = 16,
    generations: Annotated[int, opt("--generations", "Generations of the search.")] = 10,
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
    _execute(r, overwrite=overwrite)
    files = f"plots: {out}/allocation.png, {out}/fitness.png; results: {out}/evaluation.json"
    Console().print(f"load with moeprune.load('{out}'); {files}", highlight=False)


@app.command("criteria")
def list_criteria() -> None:
    """List the within-layer criteria (for --criterion)."""
    from .report.listings import criteria_table

    Console().print(criteria_table())


@app.command()
def families() -> None:
    """List the supported MoE families and how each routes tokens."""
    from .report.listings import families_table

    Console().print(families_table())


def main() -> None:
    """Entry point: user, usage and I/O errors are one line on stderr and exit 2; Ctrl-C or SIGTERM
    removes partial output, says so and exits 130/143; a bug keeps its traceback (`quiet.run_command`)."""
    from .quiet import run_command

    run_command(app, console)


if __name__ == "__main__":
    main()
