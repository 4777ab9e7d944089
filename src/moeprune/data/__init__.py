"""Calibration and search sets: text or chat rows -> fixed-length token samples with masks.

One call builds a `TokenSet` that both ``moeprune.observe`` (calibration) and ``moeprune.fitness``
(search set, teacher cache) use::

    from moeprune.data import load_data
    data = load_data("calib.jsonl", tokenizer, seq_len=256, num_samples=64, seed=0)
    data.input_ids        # (B, L) int64, right-padded with the pad id
    data.attention_mask   # (B, L) int64, 1 = real token, 0 = padding
    data.score_mask       # (B, L) bool, True = token t is a scored target (predicted from t-1);
                          #   all real tokens but the first for text, assistant tokens for chat rows
    data.domains          # list[str], one label per sample ("all" when the rows have none)
    data.fingerprint      # sha256 prefix of the tokens and masks (recorded with saved statistics)
    for batch in data.batches(8): ...  # TokenSet slices of <= 8 samples

Sources (`read_rows`): a local ``.jsonl`` / ``.json`` / ``.parquet`` / ``.txt`` file (txt: one row per
non-empty line), or a Hugging Face dataset name (+ ``config``, ``split``) read with ``datasets``.
A row holds its text in ``text_field`` (default ``text``) or a chat in ``messages`` (a list of
``{"role", "content"}``, rendered with the tokenizer's chat template, only assistant tokens scored),
and optionally a domain label in ``domain_field`` (default ``domain``).

Errors are `DataError` one-liners: missing file, unparsable file, empty set, missing field, chat
rows with a tokenizer that has no chat template.
"""

from .build import TokenSet, load_data, tokenize_rows
from .onpolicy import continue_prompts, is_prompt_set
from .sources import Row, read_rows

__all__ = ["Row", "TokenSet", "continue_prompts", "is_prompt_set", "load_data", "read_rows", "tokenize_rows"]
