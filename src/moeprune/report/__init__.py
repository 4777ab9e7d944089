"""What a run leaves for people: the model card, plots, the manifest and run files, tables (terminal
and Markdown). Everything here formats results it is given; nothing computes or loads a model."""

from .card import model_card
from .manifest import manifest
from .plots import allocation_png, history_png
from .tables import (
    evaluation_cells,
    format_table,
    lm_eval_cells,
    markdown_table,
    suite_cells,
    table,
    write_json,
)

__all__ = [
    "allocation_png",
    "evaluation_cells",
    "format_table",
    "history_png",
    "lm_eval_cells",
    "manifest",
    "markdown_table",
    "model_card",
    "suite_cells",
    "table",
    "write_json",
]
