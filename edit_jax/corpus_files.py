"""Documents from a user's text files, read as a stream: the formats both `data.source=files`
and `edit-jax prepare` take.

  .txt                  one document per paragraph (text between blank lines)
  .jsonl, .jsonl.gz,    one JSON object per line, the text under `data.text_field`
  .jsonl.zst
  .parquet              one document per row of the `data.text_field` column (pyarrow)

`read_documents` yields each document with the bytes of the file consumed so far, so a caller
can show progress over files of tens of GB without holding one in memory.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import re
from pathlib import Path
from typing import IO, Iterator, Sequence

from edit_jax.errors import UserError

SUFFIXES = (".txt", ".jsonl", ".jsonl.gz", ".jsonl.zst", ".parquet")
_BLANK_LINE = re.compile(r"[ \t\r]*\n?")


def kind(path: Path) -> str | None:
    """The format suffix of `path` among SUFFIXES (None if it has none)."""
    name = path.name
    return next((s for s in sorted(SUFFIXES, key=len, reverse=True) if name.endswith(s)), None)


def expand_paths(patterns: Sequence[str]) -> list[Path]:
    """The files that `patterns` name, in order, each once; every pattern must match."""
    files: dict[Path, None] = {}
    for pattern in patterns:
        expanded = str(Path(pattern).expanduser())
        if glob.has_magic(expanded):
            matches = sorted(glob.glob(expanded, recursive=True))
            if not matches:
                raise UserError(f"no files match data.paths pattern '{pattern}'; "
                                f"fix the pattern or point it at {_KINDS} files")
        else:
            matches = [expanded]
        for match in matches:
            path = Path(match).resolve()
            if not path.is_file():
                raise UserError(f"data file not found: {match}; "
                                f"set data.paths to existing {_KINDS} files")
            if kind(path) is None:
                raise UserError(f"unsupported data file {match}; data.paths takes .txt files "
                                "(paragraphs split on blank lines), .jsonl (.gz, .zst) files or "
                                ".parquet files")
            files[path] = None
    return list(files)


_KINDS = ", ".join(SUFFIXES)


def read_documents(path: Path, text_field: str) -> Iterator[tuple[str, int]]:
    """(document, bytes of `path` read so far) for every document of the file, in order."""
    suffix = kind(path)
    try:
        if suffix == ".parquet":
            yield from _parquet_documents(path, text_field)
            return
        with open(path, "rb") as raw:
            lines = _text_lines(path, raw, suffix)
            documents = (_paragraphs(lines) if suffix == ".txt"
                         else _jsonl_documents(path, lines, text_field))
            for document in documents:
                yield document, raw.tell()
    except (OSError, UnicodeDecodeError, EOFError) as e:
        raise UserError(f"cannot read data file {path}: {e}; data files must be readable "
                        "UTF-8 text (or gzip / zstandard compressed .jsonl)") from None


def _text_lines(path: Path, raw: IO[bytes], suffix: str | None) -> Iterator[str]:
    if suffix == ".jsonl.gz":
        stream: IO[bytes] = gzip.GzipFile(fileobj=raw)
    elif suffix == ".jsonl.zst":
        import zstandard  # only compressed jsonl needs it

        stream = zstandard.ZstdDecompressor().stream_reader(raw)
    else:
        stream = raw
    return iter(io.TextIOWrapper(stream, encoding="utf-8"))  # universal newlines


def _paragraphs(lines: Iterator[str]) -> Iterator[str]:
    """Text between blank lines (lines of spaces, tabs and carriage returns), stripped."""
    paragraph: list[str] = []
    for line in lines:
        if _BLANK_LINE.fullmatch(line):
            text = "".join(paragraph).strip()
            if text:
                yield text
            paragraph = []
        else:
            paragraph.append(line)
    text = "".join(paragraph).strip()
    if text:
        yield text


def _jsonl_documents(path: Path, lines: Iterator[str], text_field: str) -> Iterator[str]:
    for line_number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{line_number}: invalid JSON ({e.msg}); "
                            "a .jsonl file holds one JSON object per line") from None
        if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
            raise UserError(f"{path}:{line_number}: no string field '{text_field}'; "
                            "set data.text_field to the key that holds the text")
        yield record[text_field]


def _parquet_documents(path: Path, text_field: str) -> Iterator[tuple[str, int]]:
    """The text column row group by row group; progress is the row groups' compressed bytes."""
    import pyarrow.parquet as pq  # only parquet needs it

    try:
        parquet = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid for files that are not parquet
        raise UserError(f"cannot read parquet file {path}: {str(e).splitlines()[0]}; "
                        "pass a valid .parquet file") from None
    if text_field not in parquet.schema_arrow.names:
        raise UserError(f"parquet file {path} has no column '{text_field}'; set "
                        f"data.text_field to one of: {', '.join(parquet.schema_arrow.names)}")
    done = 0
    size = path.stat().st_size
    groups = parquet.metadata.num_row_groups
    for group in range(groups):
        column = parquet.read_row_group(group, columns=[text_field]).column(0)
        done = size if group == groups - 1 else done + parquet.metadata.row_group(
            group).total_byte_size
        for text in column.to_pylist():
            if text is not None:
                yield str(text), min(done, size)
