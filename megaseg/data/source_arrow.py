"""Readers of the Arrow formats: parquet files and Hugging Face ``save_to_disk``
datasets, read in row batches of `_BATCH_ROWS` (they need pyarrow, and datasets).
Each yields one tuple of texts (one per key) per row; errors name the file and the row
(from 0).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from megaseg.data.source_paths import DataError, Source, first_line

_BATCH_ROWS = 1024


def _check_string_column(path: object, key: str, names: Sequence[str], arrow_type) -> None:
    import pyarrow as pa

    if key not in names:
        raise DataError(f"{path}: no column {key!r} (columns: {', '.join(names)})")

    def is_string(t) -> bool:
        view = getattr(pa.types, "is_string_view", lambda _: False)
        return pa.types.is_string(t) or pa.types.is_large_string(t) or view(t)

    if not (is_string(arrow_type) or (pa.types.is_dictionary(arrow_type) and is_string(arrow_type.value_type))):
        raise DataError(f"{path}: column {key!r} is {arrow_type}, expected a string")


def _rows(path: object, keys: Sequence[str], columns: Iterator[dict[str, list]]) -> Iterator[tuple[str, ...]]:
    """Per row, the values of ``keys`` out of batches of columns; DataError for a non-string."""
    row = 0
    for batch in columns:
        values = [batch[key] for key in keys]
        for texts in zip(*values):
            for key, text in zip(keys, texts):
                if not isinstance(text, str):
                    raise DataError(f"{path}: row {row}: {key!r} is {'null' if text is None else type(text).__name__}, "
                                    "expected a string")
            yield texts
            row += 1


def read_parquet(source: Source, keys: Sequence[str]) -> Iterator[tuple[str, ...]]:
    path = source.path
    try:
        import pyarrow
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading parquet needs the pyarrow package: pip install pyarrow") from None
    try:
        parquet = pq.ParquetFile(path)
    except (pyarrow.ArrowException, OSError) as exc:
        raise DataError(f"{path}: not a readable parquet file ({first_line(exc)})") from None
    with parquet:
        schema = parquet.schema_arrow
        for key in keys:
            _check_string_column(path, key, schema.names, schema.field(key).type if key in schema.names else None)
        unique = list(dict.fromkeys(keys))
        batches = parquet.iter_batches(batch_size=_BATCH_ROWS, columns=unique)
        try:
            yield from _rows(path, keys, ({k: b.column(k).to_pylist() for k in unique} for b in batches))
        except (pyarrow.ArrowException, OSError) as exc:
            raise DataError(f"{path}: corrupt parquet data ({first_line(exc)})") from None


def read_saved_dataset(source: Source, keys: Sequence[str]) -> Iterator[tuple[str, ...]]:
    try:
        from datasets import load_from_disk
    except ImportError:
        raise DataError(f"{source.name}: a Hugging Face save_to_disk dataset needs the datasets package: "
                        "pip install datasets") from None
    try:
        dataset = load_from_disk(str(source.path))
    except Exception as exc:  # datasets raises FileNotFoundError, ValueError, ArrowInvalid, ...
        raise DataError(f"{source.name}: not a readable save_to_disk dataset ({first_line(exc)})") from None
    if not hasattr(dataset, "column_names") or isinstance(dataset.column_names, dict):
        raise DataError(f"{source.name}: a DatasetDict; pass its directory (with dataset_dict.json) instead")
    names = list(dataset.column_names)
    arrow_schema = dataset.data.schema
    for key in keys:
        _check_string_column(source.name, key, names, arrow_schema.field(key).type if key in names else None)
    unique = list(dict.fromkeys(keys))
    columns = dataset.select_columns(unique).with_format(None)
    yield from _rows(source.name, keys, columns.iter(batch_size=_BATCH_ROWS))
