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
