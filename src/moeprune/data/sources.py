"""Read raw rows (text or chat messages, optional domain) from a local file or a hub dataset."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from ..errors import DataError

LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet", ".txt")
DEFAULT_DOMAIN = "all"


@dataclass(frozen=True)
class Row:
    """One example: plain text, a chat (list of ``{"role", "content"}``), or a prompt with its
    completion (only the completion is scored: answer-aware scoring)."""

    text: str | None
    messages: tuple[dict, ...] | None
    domain: str = DEFAULT_DOMAIN
    prompt: str | None = None
    completion: str | None = None


def read_rows(
    source: str | Path,
    *,
    text_field: str = "text",
    domain_field: str | None = "domain",
    messages_field: str = "messages",
    split: str = "train",
    config: str | None = None,
) -> list[Row]:
    """Rows of a local ``.jsonl``/``.json``/``.parquet``/``.txt`` file or a Hugging Face dataset name.

    A row uses ``text_field`` if present, else ``messages_field`` (chat), else ``prompt`` +
    ``completion`` (only the completion scored; a prompt alone is continued by the model for on-policy
    search data, `moeprune.data.onpolicy`). ``domain_field`` is optional
    per row (missing -> ``"all"``). Raises `DataError` for a missing/unparsable file, an empty set or
    rows without the text field.
    """
    path = Path(source)
    if path.suffix in LOCAL_SUFFIXES or path.exists():
        if not path.exists():
            raise DataError(f"data file {path} does not exist")
        if path.is_dir():
            raise DataError(f"data path {path} is a directory; give a .jsonl, .json, .parquet or .txt file")
        records = _read_local(path)
        where = str(path)
    elif not _could_be_hub_dataset(str(source)):
        raise DataError(f"data {source}: no such file (and not a hub dataset name like 'org/name')")
    else:
        records = _read_hub(str(source), config, split)
        where = f"dataset '{source}' (split {split})"
    rows = _to_rows(records, where, text_field, domain_field, messages_field)
    if not rows:
        raise DataError(f"{where} holds no rows: the calibration set is empty")
    return rows


def _could_be_hub_dataset(name: str) -> bool:
    from ..preflight import is_hub_id

    return is_hub_id(name)


def _read_local(path: Path) -> list:
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise DataError("reading .parquet needs pyarrow: pip install pyarrow") from None
        try:
            return pq.read_table(path).to_pylist()
        except Exception as e:  # pyarrow raises several types for bad files
            raise DataError(f"{path} is not a readable parquet file ({type(e).__name__})") from None
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DataError(f"{path} is not UTF-8 text") from None
    if path.suffix == ".txt":
        return [{"text": line} for line in text.splitlines() if line.strip()]
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path} is not valid JSON (line {e.lineno}: {e.msg})") from None
        if isinstance(data, Mapping):  # {"data": [...]} / {"rows": [...]}: the one list inside
            lists = [v for v in data.values() if isinstance(v, list)]
            data = lists[0] if len(lists) == 1 else [data]
        if not isinstance(data, list):
            raise DataError(f"{path} must hold a list of rows (objects)")
        return data
    records = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise DataError(
                f"{path} line {lineno} is not valid JSON ({e.msg}); expected one object per line"
            ) from None
    return records


def _read_hub(name: str, config: str | None, split: str) -> list:
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"'{name}' is not a local file; reading hub datasets needs `pip install datasets`"
        ) from None
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as e:  # network, unknown name, bad config/split: all user-facing
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DataError(f"cannot load '{name}' as a local file or hub dataset: {first}") from None
    return list(ds)


def _to_rows(
    records: Iterable, where: str, text_field: str, domain_field: str | None, messages_field: str
) -> list[Row]:
    rows = []
    for n, rec in enumerate(records, 1):
        if not isinstance(rec, Mapping):
            raise DataError(f"{where}: row {n} is not an object with a '{text_field}' field")
        domain = rec.get(domain_field) if domain_field else None
        domain = DEFAULT_DOMAIN if domain is None else str(domain)
        if text_field in rec:
            text = rec[text_field]
            if not isinstance(text, str):
                raise DataError(f"{where}: row {n} field '{text_field}' is {type(text).__name__}, not text")
            if text.strip():
                rows.append(Row(text=text, messages=None, domain=domain))
        elif messages_field in rec:
            rows.append(Row(text=None, messages=_messages(rec[messages_field], where, n), domain=domain))
        elif "prompt" in rec:  # with a completion: answer-aware; alone: the model writes it (on-policy)
            prompt, completion = rec["prompt"], rec.get("completion")
            if not isinstance(prompt, str) or not isinstance(completion, (str, type(None))):
                raise DataError(f"{where}: row {n} 'prompt' and 'completion' must be text")
            rows.append(Row(text=None, messages=None, domain=domain, prompt=prompt, completion=completion))
        else:
            fields = ", ".join(sorted(map(str, rec))) or "none"
            raise DataError(
                f"{where}: row {n} has no '{text_field}' field (fields: {fields}); "
                f"pass --text-field to choose the text field"
            )
    return rows


def _messages(value: object, where: str, n: int) -> tuple[dict, ...]:
    ok = (
        isinstance(value, list)
        and value
        and all(isinstance(m, Mapping) and "role" in m and "content" in m for m in value)
    )
    if not ok:
        raise DataError(f"{where}: row {n} 'messages' must be a non-empty list of {{role, content}} objects")
    return tuple(dict(m) for m in value)  # type: ignore[union-attr]
