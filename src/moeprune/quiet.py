"""What the CLI shows of other libraries: their warnings that do not concern someone pruning a model
are dropped, moeprune's own warnings are one line each, and progress bars appear on a terminal only.

Results go to stdout; progress, notes, warnings and errors to stderr.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

# transformers notices that say nothing to a user of moeprune: data is tokenised whole, then cut into
# windows of --seq-len tokens; configs are read field by field
DROPPED_LOGS = (
    "Token indices sequence length is longer than the specified maximum sequence length",
    "You are using a model of type",
    # huggingface_hub's retries when the hub cannot be reached: the final error says so in one line
    "Retrying in",
    "thrown while requesting",
)


class _DropNotices(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(message.startswith(n) or n in message for n in DROPPED_LOGS)


def quiet_third_party(console) -> None:
    """Install the CLI's filters (idempotent). `console`: where moeprune's warnings are printed."""
    from .errors import MoepruneWarning

    for category in (DeprecationWarning, PendingDeprecationWarning, FutureWarning):
        warnings.filterwarnings("ignore", category=category)

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        if issubclass(category, MoepruneWarning):
            console.print(f"[yellow]warning:[/] {message}", highlight=False, soft_wrap=True, markup=True)
        else:
            origin = os.path.basename(os.path.dirname(filename)) or filename
            console.print(
                f"warning ({origin}): {' '.join(str(message).split())}", highlight=False, markup=False
            )

    warnings.showwarning = show
    import rich

    rich.reconfigure(stderr=True)  # progress bars on rich's default console go to stderr
    drop = _DropNotices()
    for name in (
        "transformers.tokenization_utils_base",
        "transformers.configuration_utils",
        "huggingface_hub.utils._http",
    ):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropNotices) for f in logger.filters):
            logger.addFilter(drop)
    if not sys.stderr.isatty():  # loading/writing bars only on a terminal (not in logs and pipes)
        if "transformers" in sys.modules or "huggingface_hub" in sys.modules:
            from huggingface_hub.utils import disable_progress_bars
            from transformers.utils import logging as hf_logging

            disable_progress_bars()
            hf_logging.disable_progress_bar()
        else:  # read when they are imported
            os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def _exception_types() -> tuple[tuple, tuple, tuple]:
    """(usage errors, aborts, exits) of click and of the click that typer vendors (typer >= 0.22 raises
    its own copies, which click's classes do not catch)."""
    import importlib

    usage: list[type] = []
    aborts: list[type] = []
    exits: list[type] = []
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


def run_command(app, console) -> None:
    """Run the typer `app` and exit: user errors (`MoepruneError`) and usage errors are one line on
    `console` (stderr) and exit code 2; Ctrl-C / SIGTERM say what was kept and exit 128 + signal; a bug
    keeps its traceback (exit 1). torch's OpenMP threads sleep at barriers instead of spinning, unless
    the user chose (OMP_WAIT_POLICY): spinning threads stall on a busy machine (benchmarks/threads.py)."""
    import signal

    from rich.markup import escape

    from .errors import Interrupted, MoepruneError
    from .interrupts import raise_on_signals

    def fail(message: str) -> None:
        console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True, markup=True)

    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # read once, when torch loads OpenMP
    usage, aborts, exits = _exception_types()
    quiet_third_party(console)
    try:
        with raise_on_signals():
            code = app(standalone_mode=False, prog_name="moeprune")
    except MoepruneError as e:
        fail(escape(str(e)))
        sys.exit(2)
    except usage as e:
        ctx = getattr(e, "ctx", None)
        if type(e).__name__ == "NoArgsIsHelpError":  # bare `moeprune`: the help on stdout
            print(
                ctx.get_help() if ctx is not None else "usage: moeprune COMMAND [OPTIONS] (moeprune --help)"
            )
        else:
            command = f" {ctx.info_name}" if ctx is not None and ctx.parent is not None else ""
            message = e.format_message() if hasattr(e, "format_message") else str(e)
            fail(escape(f"{' '.join(message.split())} (see moeprune{command} --help)"))
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
