"""A site's own data file: read a CSV or Parquet table and validate it against the site's schema.

Every problem raises :class:`DataValidationError` with one line naming the file, the column and
what was expected. Rows are counted from 1, the header not included. The whole file is validated
before anything is returned; columns the schema does not name are ignored. A CSV is UTF-8; one
that is not (a Latin-1 export) is accepted only when the columns the schema uses are plain ASCII,
so that stray accents in an ignored column (a name, a note) do not stop a site. A CSV separated by
semicolons or tabs is refused with that hint.
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from fedgov.datasets import DatasetSchema, normalise_frame
from fedgov.errors import ConfigError, DataValidationError

TABLE_SUFFIXES: tuple[str, ...] = (".csv", ".parquet", ".pq")
SCHEMA_SUFFIXES: tuple[str, ...] = (".yaml", ".yml", ".json")
_NOT_UTF8 = "fedgov-not-utf8"  # frame.attrs key: where a CSV first broke UTF-8


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _fail(source: str, message: str) -> DataValidationError:
    return DataValidationError(_one_line(f"{source}: {message}"))


def load_schema_file(path: str | Path) -> DatasetSchema:
    """Read a schema file (YAML or JSON, as written from ``DatasetSchema.to_dict()``)."""
    path = Path(path)
    source = f"schema file {path}"
    if path.suffix.lower() not in SCHEMA_SUFFIXES:
        raise _fail(
            source, f"unknown file type '{path.suffix}' (expected {', '.join(SCHEMA_SUFFIXES)})"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise _fail(source, "file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise _fail(source, f"cannot be read ({exc})") from None
    try:
        data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise _fail(source, f"is not valid {path.suffix.lstrip('.').upper()} ({exc})") from None
    if data is None:
        raise _fail(source, "file is empty")
    try:
        return DatasetSchema.from_dict(data)
    except ConfigError as exc:
        raise _fail(source, str(exc)) from None


def _read_frame(path: Path, source: str) -> pd.DataFrame:
    suffix = path.suffix.lower()
    if suffix not in TABLE_SUFFIXES:
        raise _fail(
            source, f"unknown file type '{path.suffix}' (expected {', '.join(TABLE_SUFFIXES)})"
        )
    if not path.exists():
        raise _fail(source, "file not found")
    if not path.is_file():
        raise _fail(source, "is not a file")
    if path.stat().st_size == 0:
        raise _fail(source, "file is empty")
    try:
        if suffix == ".csv":
            # Read as text: numbers are parsed below, so a bad cell can be named by row.
            try:
                return pd.read_csv(path, dtype=str, encoding="utf-8")
            except UnicodeDecodeError as error:
                # Maybe a Latin-1 export: read it so; read_site_table refuses it unless the
                # bytes that are not UTF-8 sit only in columns the schema does not use.
                frame = pd.read_csv(path, dtype=str, encoding="latin-1")
                frame.attrs[_NOT_UTF8] = (
                    f"byte 0x{error.object[error.start]:02x} at offset {error.start}"
                )
                return frame
        return pd.read_parquet(path)
    except pd.errors.EmptyDataError:
        raise _fail(source, "file is empty") from None
    except Exception as exc:  # any reader failure is a property of the file, reported as such
        raise _fail(source, f"cannot be read as {suffix.lstrip('.')} ({exc})") from None


def _missing_columns(source: str, frame: pd.DataFrame, expected: list[str]) -> None:
    present = [str(c) for c in frame.columns]
    missing = [name for name in expected if name not in present]
    if not missing:
        return
    for separator, called in ((";", "semicolons"), ("\t", "tabs")):
        if len(present) == 1 and separator in present[0]:
            raise _fail(
                source,
                f"has one column only: its values are separated by {called}, not commas "
                "(expected a comma-separated CSV; save it again with ',' as the separator)",
            )
    unused = [c for c in present if c not in expected]
    hint = difflib.get_close_matches(missing[0], unused, n=1)
    others = f"; also missing: {', '.join(missing[1:])}" if len(missing) > 1 else ""
    did_you_mean = f"; did you mean '{hint[0]}'?" if hint else ""
    raise _fail(
        source,
        f"column '{missing[0]}' is missing (expected columns: {', '.join(expected)}"
        f"{others}{did_you_mean})",
    )


def _check_text_needs_no_encoding(source: str, frame: pd.DataFrame, used: list[str]) -> None:
    """A file that is not UTF-8 (read as Latin-1) is accepted only when every column the schema
    uses is plain ASCII, where Latin-1 and UTF-8 agree; else one line says how to fix it."""
    for column in used:
        cells = frame[column].dropna().astype(str)
        odd = cells.map(lambda cell: not cell.isascii()).to_numpy()
        if odd.any():
            row = int(np.flatnonzero(odd)[0]) + 1
            raise _fail(
                source,
                f"is not UTF-8 ({frame.attrs[_NOT_UTF8]}) and column '{column}' holds non-ASCII "
                f"text at row {row} (expected UTF-8: save the file as UTF-8, e.g. "
                "iconv -f latin1 -t utf-8)",
            )


def _check_no_missing(source: str, column: str, series: pd.Series) -> None:
    missing = series.isna().to_numpy()
    if missing.any():
        first = int(np.flatnonzero(missing)[0]) + 1
        raise _fail(
            source,
            f"column '{column}' has {int(missing.sum())} missing value(s), first at row {first} "
            "(expected a value in every row)",
        )


def _numeric_column(source: str, column: str, dtype: str, series: pd.Series) -> np.ndarray:
    """The column as float64, or an error naming the first value that is not a number."""
    if pd.api.types.is_numeric_dtype(series.dtype):  # bool included: True is 1
        values = series.to_numpy(dtype=np.float64)
    else:
        cells = series.to_numpy(dtype=object)
        try:
            # numpy parses text with Python's correctly rounded float(): CSV round trips exactly.
            values = np.asarray(cells.astype(str), dtype=np.float64)
        except ValueError:
            values = np.empty(len(cells))
            for row, cell in enumerate(cells):
                try:
                    values[row] = float(str(cell))
                except ValueError:
                    raise _fail(
                        source,
                        f"column '{column}' value {str(cell)!r} at row {row + 1} is not a number "
                        f"(expected {dtype})",
                    ) from None
    if not np.all(np.isfinite(values)):
        row = int(np.flatnonzero(~np.isfinite(values))[0]) + 1
        raise _fail(
            source,
            f"column '{column}' value {values[row - 1]} at row {row} is not finite "
            f"(expected a finite {dtype})",
        )
    if dtype == "int":
        fractional = values != np.round(values)
        if fractional.any():
            row = int(np.flatnonzero(fractional)[0]) + 1
            raise _fail(
                source,
                f"column '{column}' value {values[row - 1]:g} at row {row} is not a whole number "
                "(expected int)",
            )
    return values


def _target_indices(source: str, schema: DatasetSchema, series: pd.Series) -> np.ndarray:
    """Class indices from labels (``"died"``) or integer indices (``1``, ``"1"``, ``1.0``)."""
    by_label = {label: index for index, label in enumerate(schema.classes)}
    codes = np.empty(len(series), dtype=np.int64)
    lookup: dict[object, int] = {}
    for row, cell in enumerate(series.to_numpy(dtype=object)):
        if cell in lookup:
            codes[row] = lookup[cell]
            continue
        text = str(cell).strip()
        code = by_label.get(text)
        if code is None:
            try:
                number = float(text)
            except ValueError:
                number = float("nan")
            if number.is_integer() and 0 <= number < len(schema.classes):
                code = int(number)
        if code is None:
            raise _fail(
                source,
                f"column '{schema.target}' value {text!r} at row {row + 1} is not a class "
                f"(expected one of: {', '.join(schema.classes)}, "
                f"or an index 0-{len(schema.classes) - 1})",
            )
        lookup[cell] = codes[row] = code
    return codes


def read_site_table(path: str | Path, schema: DatasetSchema) -> tuple[np.ndarray, np.ndarray]:
    """Read a site's CSV (``.csv``) or Parquet (``.parquet``/``.pq``) file against ``schema``.

    Returns ``(x, y)``: x float32 of shape ``(rows, num_features)``, normalised with the schema's
    published constants; y int64 class indices. Raises DataValidationError (one line naming the
    file and column) on any problem; nothing is returned for invalid data.
    """
    path = Path(path)
    source = f"site data {path}"
    if not schema.features:
        raise _fail(source, f"schema '{schema.name}' has no tabular features to read")
    frame = _read_frame(path, source)
    if len(frame) == 0:
        raise _fail(source, "file is empty (a header but no data rows)")
    _missing_columns(source, frame, [*schema.feature_names, schema.target])
    if _NOT_UTF8 in frame.attrs:
        _check_text_needs_no_encoding(source, frame, [*schema.feature_names, schema.target])
    numeric = {}
    for spec in schema.features:
        series = frame[spec.name]
        if isinstance(series, pd.DataFrame):
            raise _fail(source, f"column '{spec.name}' appears more than once (expected once)")
        _check_no_missing(source, spec.name, series)
        values = _numeric_column(source, spec.name, spec.dtype, series)
        if spec.log1p and np.any(values <= -1):
            row = int(np.flatnonzero(values <= -1)[0]) + 1
            raise _fail(
                source,
                f"column '{spec.name}' value {values[row - 1]:g} at row {row} is <= -1 "
                "(expected > -1: the column is log1p-transformed)",
            )
        numeric[spec.name] = values
    _check_no_missing(source, schema.target, frame[schema.target])
    y = _target_indices(source, schema, frame[schema.target])
    x = normalise_frame(pd.DataFrame(numeric), schema, source=source)
    return x, y
