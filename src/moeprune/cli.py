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


CriterionOpt = Annotated[
    str | None, typer.Option("--criterion", help="Within-layer criterion (frequency, reap, naee, mop, ...).")
]
SparsityOpt = Annotated[
    float | None, typer.Option("--sparsity", help="Fraction of routed experts removed in every MoE layer.")
]
DataOpt = Annotated[
    str | None,
    typer.Option("--data", help="Calibration data: .jsonl/.json/.parquet/.txt file or hub dataset."),
]
TextFieldOpt = Annotated[str, typer.Option("--text-field", help="Field of a data row that holds its text.")]
StatsOpt = Annotated[
    Path | None,
    typer.Option("--stats", help="Expert statistics from `moeprune observe` (skips calibration)."),
]
NumSamplesOpt = Annotated[int, typer.Option("--num-samples", help="Calibration samples (seeded draw).")]
SeqLenOpt = Annotated[int, typer.Option("--seq-len", help="Tokens per calibration sample (rows are packed).")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed of sampling, random criterion and K-means.")]
SearchSamplesOpt = Annotated[int, typer.Option("--search-samples", help="Search samples (seeded draw).")]
SearchSeqLenOpt = Annotated[int, typer.Option("--search-seq-len", help="Tokens per search sample.")]
CacheOpt = Annotated[str, typer.Option("--cache", help="Teacher cache: sparse (top-K + tail) or dense.")]
TopKOpt = Annotated[int, typer.Option("--top-k", help="Teacher probabilities kept per token (sparse).")]
CandidateBatchOpt = Annotated[
    int,
    typer.Option(
        "--candidate-batch",
        help="Candidates stacked into one forward; pays on a GPU, not on a CPU (1 = one at a time).",
    ),
]
DeviceOpt = Annotated[str, typer.Option("--device", help="Where the model runs: cpu, cuda, cuda:1, mps.")]


def _check_cache(cache: str, top_k: int) -> None:
    if cache not in ("sparse", "dense"):
        fail(f"--cache must be 'sparse' or 'dense', got '{cache}'")
    if top_k < 1:
        fail(f"--top-k must be >= 1, got {top_k}")


def _check_candidate_batch(candidate_batch: int) -> None:
    if candidate_batch < 1:
        fail(f"--candidate-batch must be >= 1, got {candidate_batch}")


def _device_map(device: str) -> dict:
    """``from_pretrained`` keyword for `device`; one line and exit 2 for a device this machine lacks."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        fail(f"--device '{device}' is not a device name (cpu, cuda, cuda:1, mps)")
    if dev.type == "cpu":
        return {}
    backend = getattr(torch, dev.type, None)
    count = backend.device_count() if backend is not None and backend.is_available() else 0
    if count == 0 or (dev.index or 0) >= count:
        fail(
            f"--device {device}: no such {dev.type} device on this machine ({count} found); use --device cpu"
        )
    return {"device_map": str(dev)}


def _calibration(api, model: str, data: str, text_field: str, num_samples: int, seq_len: int, seed: int):
    """Tokenised calibration data (every data error raised here, before model weights load)."""
    return api.load_calibration(
        data,
        api.load_tokenizer(model),
        text_field=text_field,
        seq_len=seq_len,
        num_samples=num_samples,
        seed=seed,
    )


def _criterion_plan(api, model, criterion, sparsity, data, text_field, stats, num_samples, seq_len, seed):
    """Validate every input, then load the model, observe (unless --stats) and choose the plan."""
    from .criteria import get_criterion, uniform_counts
    from .observe import ExpertStats

    get_criterion(criterion)
    if sparsity is None:
        fail("--criterion needs --sparsity (fraction of routed experts removed in every MoE layer)")
    if not 0.0 <= sparsity < 1.0:
        fail(f"--sparsity must be in [0, 1), got {sparsity}")
    if stats is None and data is None:
        fail("--criterion needs calibration data (--data FILE_OR_HUB_ID) or statistics (--stats DIR)")
    api.check_model(model)
    expert_stats = ExpertStats.load(stats) if stats is not None else None
    if expert_stats is not None:
        get_criterion(criterion, expert_stats)
        api.check_stats(model, expert_stats)
    tokens = (
        _calibration(api, model, data, text_field, num_samples, seq_len, seed)
        if expert_stats is None
        else None
    )
    loaded = api.load(model)
    counts = api.expert_counts(loaded)
    if expert_stats is None:
        expert_stats = api.observe(loaded, tokens, criteria=[criterion], seed=seed)
    api.check_stats(loaded, expert_stats)
    plan = api.criterion_plan(
        expert_stats, criterion, counts=uniform_counts(expert_stats, sparsity), seed=seed
    )
    return plan, loaded, counts


def _uniform_from(api, model, run_dir, criterion, data, text_field, stats, num_samples, seq_len, seed):
    """The uniform plan nearest to the plan searched in `run_dir` (see `nearest_uniform`)."""
    from .allocate.space import AllocationSpace
    from .arch import moe_layers
    from .criteria import get_criterion, removal_order
    from .nearest_uniform import ORDER_FILE, check_order, nearest_uniform, run_criterion, run_order, run_plan
    from .observe import ExpertStats

    searched, order = run_plan(run_dir), run_order(run_dir)
    criterion = criterion or run_criterion(run_dir)
    if order is None:
        if criterion is None:
            fail(f"{run_dir} records no criterion; give the search's --criterion")
        get_criterion(criterion)
        if stats is None and data is None:
            fail(
                f"{run_dir} holds no {ORDER_FILE}; give the search's --data (and --num-samples, --seq-len, "
                "--seed) or --stats to recompute its removal order"
            )
    api.check_model(model, searched)
    tokens = None
    if order is None and stats is None:
        tokens = _calibration(api, model, data, text_field, num_samples, seq_len, seed)
    loaded = api.load(model)
    counts = api.expert_counts(loaded)
    if order is None:
        expert_stats = ExpertStats.load(stats) if stats is not None else None
        if expert_stats is None:
            expert_stats = api.observe(loaded, tokens, criteria=[criterion], seed=seed)
        api.check_stats(loaded, expert_stats)
        order = removal_order(expert_stats, criterion, seed)
    rooms = AllocationSpace.from_layers(moe_layers(loaded), budget=0).layers
    groups = {r.index: r.step for r in rooms}
    check_order(searched, order, groups)
    plan = nearest_uniform(searched, order, groups=groups, max_remove={r.index: r.max_remove for r in rooms})
    return plan, loaded, counts, criterion


@app.command()
def observe(
    model: ModelArg,
    data: Annotated[str, typer.Option("--data", help="Calibration data: local file or hub dataset name.")],
    out: Annotated[Path, typer.Option("--out", help="Directory for the expert statistics.")],
    text_field: TextFieldOpt = "text",
    num_samples: NumSamplesOpt = 128,
    seq_len: SeqLenOpt = 512,
    criteria: Annotated[
        str, typer.Option("--criteria", help="Comma-separated criteria to support ('all' includes mop).")
    ] = "all",
    dense_tokens: Annotated[
        int, typer.Option("--dense-tokens", help="Tokens on which every expert runs (only for mop).")
    ] = 2048,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Samples per forward pass.")] = 8,
    seed: SeedOpt = 0,
    overwrite: OverwriteOpt = False,
) -> None:
    """Run calibration data through MODEL once and save per-expert statistics for `prune --stats`."""
    from . import api
    from .criteria import get_criterion
    from .surgery.checkpoint import check_output_dir

    check_output_dir(out, overwrite)
    names = None if criteria.strip() == "all" else [c.strip() for c in criteria.split(",") if c.strip()]
    for name in names or []:
        get_criterion(name)
    api.check_model(model)
    tokens = _calibration(api, model, data, text_field, num_samples, seq_len, seed)
    loaded = api.load(model)
    stats = api.observe(
        loaded,
        tokens,
        criteria=names,
        dense_tokens=dense_tokens,
        batch_size=batch_size,
        seed=seed,
        out_dir=out,
        overwrite=overwrite,
    )
    console.print(
        f"observed {stats.meta['num_tokens']} tokens in {len(stats.layers)} MoE layers -> {out} "
        f"(criteria: {', '.join(stats.meta['criteria_supported'])})"
    )


@app.command()
def prune(
    model: ModelArg,
    out: OutOpt,
    plan: Annotated[
        Path | None,
        typer.Option("--plan", help='JSON file {"removed": {"<layer index>": <list of expert ids>}}.'),
    ] = None,
    overwrite: OverwriteOpt = False,
    criterion: CriterionOpt = None,
    sparsity: SparsityOpt = None,
    data: DataOpt = None,
    text_field: TextFieldOpt = "text",
    stats: StatsOpt = None,
    num_samples: NumSamplesOpt = 128,
    seq_len: SeqLenOpt = 512,
    seed: SeedOpt = 0,
    uniform_from: Annotated[
        Path | None,
        typer.Option(
            "--uniform-from",
            help="A `moeprune search` run directory: remove the uniform plan nearest to its searched plan "
            "(one expert count for llama.cpp/vLLM/SGLang). The removal order comes from the run, else "
            "from --data/--stats with the search's --criterion, --num-samples, --seq-len and --seed.",
        ),
    ] = None,
) -> None:
    """Remove experts from MODEL and write a smaller checkpoint to --out."""
    from . import api
    from .surgery import ExpertPlan
    from .surgery.checkpoint import check_output_dir

    check_output_dir(out, overwrite)
    if uniform_from is not None:
        if plan is not None or sparsity is not None:
            fail("--uniform-from takes the plan and its size from the search run; drop --plan/--sparsity")
        expert_plan, loaded, counts, criterion = _uniform_from(
            api, model, uniform_from, criterion, data, text_field, stats, num_samples, seq_len, seed
        )
    elif plan is None and criterion is None:
        fail("say which experts to remove: --plan PLAN.json, or --criterion NAME --sparsity S --data FILE")
    elif plan is not None and criterion is not None:
        fail("give either --plan or --criterion, not both")
    elif criterion is not None:
        expert_plan, loaded, counts = _criterion_plan(
            api, model, criterion, sparsity, data, text_field, stats, num_samples, seq_len, seed
        )
    else:
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
        **({"criterion": criterion, "sparsity": sparsity} if criterion is not None else {}),
        **({"uniform_from": str(uniform_from)} if uniform_from is not None else {}),
    )
    left = sum(len(v) for v in kept.values())
    console.print(f"pruned {sum(counts.values()) - left} of {sum(counts.values())} routed experts -> {path}")


@app.command()
def search(
    model: ModelArg,
    criterion: Annotated[
        str, typer.Option("--criterion", help="Within-layer criterion (frequency, reap, ...).")
    ],
    sparsity: Annotated[float, typer.Option("--sparsity", help="Fraction of all routed experts removed.")],
    data: Annotated[
        str, typer.Option("--data", help="Calibration data (file or hub dataset) for the criterion.")
    ],
    search_data: Annotated[
        str,
        typer.Option("--search-data", help="Search data (file or hub dataset) the fitness is measured on."),
    ],
    out: Annotated[
        Path, typer.Option("--out", help="Run directory: pruned checkpoint, plan, history, plots.")
    ],
    fitness: Annotated[
        str, typer.Option("--fitness", help="esap, kl_teacher_draft, kl_draft_teacher, nll.")
    ] = "esap",
    population: Annotated[int, typer.Option("--population", help="Plans per generation.")] = 32,
    generations: Annotated[
        int, typer.Option("--generations", help="Generations of the evolutionary search.")
    ] = 50,
    seed: SeedOpt = 0,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the search saved in --out.")] = False,
    overwrite: OverwriteOpt = False,
    cache: CacheOpt = "sparse",
    top_k: TopKOpt = 64,
    text_field: TextFieldOpt = "text",
    num_samples: NumSamplesOpt = 128,
    seq_len: SeqLenOpt = 512,
    search_samples: SearchSamplesOpt = 16,
    search_seq_len: SearchSeqLenOpt = 256,
    device: DeviceOpt = "cpu",
    candidate_batch: CandidateBatchOpt = 1,
) -> None:
    """EvoESAP: search how many experts each layer loses (global --sparsity), prune, save to --out."""
    from . import api
    from .allocate.run import check_run_dir
    from .criteria import get_criterion, removal_order
    from .fitness import FITNESS

    check_run_dir(out, resume, overwrite)
    get_criterion(criterion)
    FITNESS.get(fitness)
    if not 0.0 <= sparsity < 1.0:
        fail(f"--sparsity must be in [0, 1), got {sparsity}")
    _check_cache(cache, top_k)
    _check_candidate_batch(candidate_batch)
    placement = _device_map(device)
    api.check_model(model)
    calib = _calibration(api, model, data, text_field, num_samples, seq_len, seed)
    tokens = _calibration(api, model, search_data, text_field, search_samples, search_seq_len, seed)
    loaded = api.load(model, **placement)
    stats = api.observe(loaded, calib, criteria=[criterion], seed=seed)
    order = removal_order(stats, criterion, seed)
    outcome = api.search(
        loaded,
        order,
        tokens,
        out,
        sparsity=sparsity,
        source=model,
        tokenizer=api.load_tokenizer(model),
        fitness=fitness,
        cache=cache,
        top_k=top_k,
        population=population,
        generations=generations,
        seed=seed,
        resume=resume,
        overwrite=overwrite,
        candidate_batch=candidate_batch,
        criterion=criterion,
    )
    b, u = outcome.best_fitness, outcome.uniform_fitness
    console.print(
        f"EvoESAP ({criterion}, {fitness}): best {b['value']:.5f} vs uniform {u['value']:.5f}; "
        f"{outcome.result.evaluations} candidates in {outcome.result.seconds:.1f}s "
        f"(hidden-state reuse hit rate {outcome.reuse['hit_rate']:.0%}) -> {out} "
        f"(plan.json, search_history.json, allocation.png, fitness.png)",
        highlight=False,
    )


@app.command("eep-prune")
def eep_prune(
    model: ModelArg,
    sparsity: Annotated[float, typer.Option("--sparsity", help="Fraction of each layer's experts removed.")],
    search_data: Annotated[
        str,
        typer.Option("--search-data", help="Search data (file or hub dataset) the fitness is measured on."),
    ],
    out: Annotated[Path, typer.Option("--out", help="Output directory of the pruned checkpoint.")],
    criterion: Annotated[
        str | None,
        typer.Option("--criterion", help="Seed the population with this criterion's plan (needs --data)."),
    ] = None,
    data: Annotated[str | None, typer.Option("--data", help="Calibration data for --criterion.")] = None,
    fitness: Annotated[
        str, typer.Option("--fitness", help="esap, kl_teacher_draft, kl_draft_teacher, nll.")
    ] = "esap",
    population: Annotated[int, typer.Option("--population", help="Selections per iteration.")] = 16,
    iterations: Annotated[int, typer.Option("--iterations", help="Iterations of the search.")] = 100,
    merge_iterations: Annotated[
        int,
        typer.Option(
            "--merge-iterations", help="Then merge every expert into the kept ones (0: prune only)."
        ),
    ] = 0,
    merge_population: Annotated[
        int, typer.Option("--merge-population", help="Merge candidates per iteration.")
    ] = 8,
    active: Annotated[
        int | None,
        typer.Option(
            "--active-experts", help="Route every token to this many experts (below the model's top-k)."
        ),
    ] = None,
    seed: SeedOpt = 0,
    overwrite: OverwriteOpt = False,
    text_field: TextFieldOpt = "text",
    num_samples: NumSamplesOpt = 128,
    seq_len: SeqLenOpt = 512,
    search_samples: SearchSamplesOpt = 16,
    search_seq_len: SearchSeqLenOpt = 256,
    cache: CacheOpt = "sparse",
    top_k: TopKOpt = 64,
    device: DeviceOpt = "cpu",
    candidate_batch: CandidateBatchOpt = 1,
) -> None:
    """EEP: search which experts each layer keeps (uniform --sparsity), optionally merge the others into
    them (--merge-iterations), and save the smaller checkpoint to --out."""

    from . import api
    from .criteria import get_criterion
    from .fitness import FITNESS
    from .surgery.checkpoint import check_output_dir

    check_output_dir(out, overwrite)
    FITNESS.get(fitness)
    if not 0.0 <= sparsity < 1.0:
        fail(f"--sparsity must be in [0, 1), got {sparsity}")
    if (criterion is None) != (data is None):
        fail("--criterion and --data go together (the criterion's plan seeds the search)")
    from .merge import EEPConfig
    from .merge.merge_search import MergeConfig

    EEPConfig(population=population, iterations=iterations)  # bad settings fail here, before any work
    if merge_iterations > 0:
        MergeConfig(population=merge_population, iterations=merge_iterations)
    if criterion is not None:
        get_criterion(criterion)
    _check_cache(cache, top_k)
    _check_candidate_batch(candidate_batch)
    placement = _device_map(device)
    api.check_model(model)
    tokens = _calibration(api, model, search_data, text_field, search_samples, search_seq_len, seed)
    calib = _calibration(api, model, data, text_field, num_samples, seq_len, seed) if data else None
    loaded = api.load(model, **placement)
    seeds = ()
    if active is not None:
        from .merge.active import reduced_active_experts

        with reduced_active_experts(loaded, active):  # a bad count fails here, before any search
            pass
    if criterion is not None:
        stats = api.observe(loaded, calib, criteria=[criterion], seed=seed)
        seeds = (api.criterion_plan(stats, criterion, sparsity=sparsity, seed=seed),)
    extra = {"criterion": f"{criterion} (seed of the search)"} if criterion is not None else {}
    done = api.eep(
        loaded, tokens, out, sparsity=sparsity, source=model, tokenizer=api.load_tokenizer(model), seeds=seeds,
        fitness=fitness, cache=cache, top_k=top_k, population=population, iterations=iterations,
        merge_population=merge_population, merge_iterations=merge_iterations, active_experts=active, seed=seed,
        candidate_batch=candidate_batch, overwrite=overwrite, **extra,
    )  # fmt: skip
    result, merged = done["prune"], done["merge"]
    summary = f"EEP prune ({fitness}): best {result.best_score:.5f} after {result.evaluations} candidates"
    if merged is not None:
        summary += (
            f"; merge: {merged.start_score:.5f} (pruned) -> {merged.best_score:.5f} after "
            f"{merged.evaluations} candidates (merging.json)"
        )
    console.print(f"{summary} -> {out} (checkpoint, moeprune.json, eep_history.json)", highlight=False)


def _print_results(results: dict[str, dict], title: str) -> None:
    """`api.evaluate` results per checkpoint as one table on stdout (rows: metrics; columns: checkpoints)."""
    from rich.markup import escape
    from rich.table import Table

    from .evaluate import lm_eval_cells, suite_cells

    cells = {
        name: suite_cells(r.get("suite", {})) | lm_eval_cells(r.get("lm_eval", {}))
        for name, r in results.items()
    }
    table = Table(title=title)
    table.add_column("metric")
    for name in cells:
        table.add_column(escape(name), justify="right")
    for metric in dict.fromkeys(m for col in cells.values() for m in col):
        table.add_row(escape(metric), *(col.get(metric, "") for col in cells.values()))
    Console().print(table)  # the command's output: stdout (progress and errors go to stderr)


@app.command()
def evaluate(
    models: Annotated[
        list[str],
        typer.Argument(help="Checkpoints (hub ids or directories, pruned or not), one column each."),
    ],
    suite: Annotated[
        str,
        typer.Option("--suite", help="Suite directory, 'testbed' (bundled) or 'none'."),
    ] = "testbed",
    lm_eval: Annotated[
        str | None,
        typer.Option(
            "--lm-eval",
            help="lm-eval tasks, comma-separated (moeprune_mc / moeprune_generation: the suite's own sets).",
        ),
    ] = None,
    lm_eval_include: Annotated[
        Path | None, typer.Option("--lm-eval-include", help="A folder of extra lm-eval task YAMLs.")
    ] = None,
    limit: Annotated[int | None, typer.Option("--limit", help="lm-eval documents per task.")] = None,
    max_items: Annotated[
        int | None, typer.Option("--max-items", help="Suite generation / multiple-choice items.")
    ] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Write every result as JSON here.")] = None,
    device: DeviceOpt = "cpu",
    dtype: Annotated[
        str | None,
        typer.Option(
            "--dtype", help="float32, bfloat16, float16 or auto (default: float32 on a CPU, else auto)."
        ),
    ] = None,
) -> None:
    """Evaluate checkpoints side by side: the testbed-style suite and/or lm-eval tasks, in process."""
    from . import api
    from .evaluate import write_json

    tasks = [t.strip() for t in (lm_eval or "").split(",") if t.strip()]
    suite_dir = None if suite == "none" else suite
    if suite_dir is None and not tasks:
        fail("nothing to evaluate: give a --suite or --lm-eval TASKS")
    if suite_dir not in (None, "testbed") and not Path(suite_dir).is_dir():
        fail(f"--suite {suite_dir}: no such directory (a folder with test.jsonl, generation.jsonl, ...)")
    if lm_eval_include is not None and not lm_eval_include.is_dir():
        fail(f"--lm-eval-include {lm_eval_include}: no such directory")
    placement = _device_map(device)
    dtype = dtype or ("float32" if device == "cpu" else "auto")
    if dtype not in ("float32", "bfloat16", "float16", "auto"):
        fail(f"--dtype must be float32, bfloat16, float16 or auto, got '{dtype}'")
    results: dict[str, dict] = {}
    for name in models:
        model = api.load(name, dtype=dtype, **placement)
        results[name] = api.evaluate(
            model, api.load_tokenizer(name), suite=suite_dir, lm_eval=tasks, limit=limit,
            max_items=max_items, lm_eval_include=lm_eval_include,
        )  # fmt: skip
        del model
    _print_results(results, "moeprune evaluate")
    if out is not None:
        console.print(f"results -> {write_json(results, out)}", highlight=False)


@app.command()
def run(
    recipe: Annotated[
        Path, typer.Argument(help="Recipe YAML (model, out, sparsity, criterion, allocation, ...).")
    ],
    overwrite: OverwriteOpt = False,
) -> None:
    """Carry out a pruning recipe: prune, save the checkpoint with recipe.yaml, evaluate it if asked."""
    from . import api
    from .recipe import Recipe

    r = Recipe.from_yaml(recipe)
    _device_map(r.device)
    done = api.run(r, overwrite=overwrite)
    console.print(f"{r.allocation} pruning at {r.sparsity:.0%} -> {done['out']} (checkpoint, recipe.yaml)")
    if done["evaluation"] is not None:
        _print_results({str(done["out"]): done["evaluation"]}, f"{r.allocation} at {r.sparsity:.0%}")
        console.print(f"evaluation -> {done['out'] / 'evaluation.json'}")


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", help="Run directory of the demo.")] = Path("moeprune-demo"),
    criterion: Annotated[str, typer.Option("--criterion", help="Within-layer criterion.")] = "frequency",
    sparsity: Annotated[
        float, typer.Option("--sparsity", help="Fraction of all routed experts removed.")
    ] = 0.5,
    population: Annotated[int, typer.Option("--population", help="Plans per generation.")] = 12,
    generations: Annotated[int, typer.Option("--generations", help="Generations of the search.")] = 6,
    seed: SeedOpt = 0,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace --out if it exists.")] = True,
    model_dir: Annotated[
        Path | None, typer.Option("--model-dir", help="Another testbed-like model (default: bundled).")
    ] = None,
    data_dir: Annotated[
        Path | None, typer.Option("--data-dir", help="Its data (calibration/search/test splits, suite).")
    ] = None,
) -> None:
    """On the bundled testbed: observe -> EvoESAP search -> prune -> evaluate against uniform."""
    from .criteria import get_criterion
    from .demo import run_demo

    get_criterion(criterion)
    if not 0.0 <= sparsity < 1.0:
        fail(f"--sparsity must be in [0, 1), got {sparsity}")
    summary = run_demo(
        out,
        model_dir=model_dir,
        data_dir=data_dir,
        criterion=criterion,
        sparsity=sparsity,
        population=population,
        generations=generations,
        seed=seed,
        overwrite=overwrite,
        console=console,
    )
    Console().print(summary["table"])
    s = summary["search"]
    Console().print(
        f"search: {s['evaluations']} candidates in {s['seconds']}s (hidden-state reuse hit rate "
        f"{s['reuse']['hit_rate']:.0%}); removed per layer uniform {summary['counts_removed']['uniform']} "
        f"vs EvoESAP {summary['counts_removed']['EvoESAP']}\n"
        f"checkpoint: {out}/ (load with moeprune.load); plots: {out}/allocation.png, {out}/fitness.png; "
        f"results: {out}/demo_results.json; total {summary['seconds']['total']}s",
        highlight=False,
    )


@app.command("criteria")
def list_criteria() -> None:
    """List the within-layer criteria (for --criterion)."""
    from rich.table import Table

    from .criteria import CRITERIA

    table = Table("criterion", "ranks experts by", "needs")
    for name in CRITERIA.names():
        crit = CRITERIA.get(name)
        table.add_row(name, crit.summary, "dense token subsample" if crit.needs_dense else "")
    Console().print(table)


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
