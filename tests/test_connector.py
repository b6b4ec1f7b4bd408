"""A site's own file: exact round trips to the bundled arrays, one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from fedgov.datasets import DatasetSchema, load_dataset, load_table
from fedgov.errors import DataValidationError
from fedgov_data.connector import load_schema_file, read_site_table


@pytest.mark.parametrize("name", ["medpar", "loans", "randhie"])
@pytest.mark.parametrize("suffix", [".csv", ".parquet", ".pq"])
def test_round_trip_equals_bundled_arrays(tmp_path: Path, name: str, suffix: str) -> None:
    ds = load_dataset(name)
    table = load_table(name)
    path = tmp_path / f"site{suffix}"
    if suffix == ".csv":
        table.to_csv(path, index=False)
    else:
        table.to_parquet(path)
    x, y = read_site_table(path, ds.schema)
    assert x.dtype == np.float32 and y.dtype == np.int64
    assert np.array_equal(x, ds.x) and np.array_equal(y, ds.y)


def test_target_as_indices_reordered_and_extra_columns(tmp_path: Path) -> None:
    ds = load_dataset("medpar")
    table = load_table("medpar")
    table["died"] = ds.y  # integer indices instead of labels
    table["notes"] = "free text"  # ignored
    table = table[list(reversed(table.columns))]  # column order does not matter
    path = tmp_path / "site.csv"
    table.to_csv(path, index=False)
    x, y = read_site_table(path, ds.schema)
    assert np.array_equal(x, ds.x) and np.array_equal(y, ds.y)
    # a float-typed index column in Parquet (1.0) is an index too
    table["died"] = ds.y.astype(float)
    table.to_parquet(tmp_path / "site.parquet")
    assert np.array_equal(read_site_table(tmp_path / "site.parquet", ds.schema)[1], ds.y)


@pytest.mark.parametrize("suffix", [".yaml", ".yml", ".json"])
def test_schema_file_round_trip(tmp_path: Path, suffix: str) -> None:
    ds = load_dataset("loans")
    path = tmp_path / f"schema{suffix}"
    dump = json.dumps if suffix == ".json" else yaml.safe_dump
    path.write_text(dump(ds.schema.to_dict()))
    schema = load_schema_file(path)
    assert schema == ds.schema
    load_table("loans").head(50).to_csv(tmp_path / "site.csv", index=False)
    x, _ = read_site_table(tmp_path / "site.csv", schema)
    assert np.array_equal(x, ds.x[:50])


def _medpar_file(tmp_path: Path, edit=None, name: str = "site.csv") -> tuple[Path, DatasetSchema]:
    table = load_table("medpar").head(20).astype(object)
    if edit is not None:
        table = edit(table)
    path = tmp_path / name
    if path.suffix == ".csv":
        table.to_csv(path, index=False)
    else:
        table.to_parquet(path)
    return path, load_dataset("medpar").schema


def _error(path: Path, schema: DatasetSchema) -> str:
    with pytest.raises(DataValidationError) as info:
        read_site_table(path, schema)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"site data {path}: ")
    return message


def _set(column: str, row: int, value: object):
    def edit(table: pd.DataFrame) -> pd.DataFrame:
        table.loc[row, column] = value
        return table

    return edit


def test_missing_column_suggests_the_misspelling(tmp_path: Path) -> None:
    path, schema = _medpar_file(tmp_path, lambda t: t.rename(columns={"age80": "agee80"}))
    assert _error(path, schema) == (
        f"site data {path}: column 'age80' is missing (expected columns: los, hmo, white, age80, "
        "type2, type3, died; did you mean 'agee80'?)"
    )


def test_several_missing_columns_are_listed(tmp_path: Path) -> None:
    path, schema = _medpar_file(tmp_path, lambda t: t.drop(columns=["hmo", "died"]))
    message = _error(path, schema)
    assert "column 'hmo' is missing" in message and "also missing: died" in message


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (
            _set("white", 4, "yes"),
            "column 'white' value 'yes' at row 5 is not a number (expected int)",
        ),
        (
            _set("hmo", 2, 0.5),
            "column 'hmo' value 0.5 at row 3 is not a whole number (expected int)",
        ),
        (_set("los", 7, "inf"), "column 'los' value inf at row 8 is not finite"),
        (_set("los", 0, -3), "column 'los' value -3 at row 1 is <= -1 (expected > -1"),
        (
            _set("died", 6, "maybe"),
            "column 'died' value 'maybe' at row 7 is not a class "
            "(expected one of: survived, died, or an index 0-1)",
        ),
        (_set("died", 6, 2), "column 'died' value '2' at row 7 is not a class"),
    ],
)
def test_bad_values_name_column_and_row(tmp_path: Path, edit, expected: str) -> None:
    path, schema = _medpar_file(tmp_path, edit)
    assert expected in _error(path, schema)


def test_missing_values_give_count_and_first_row(tmp_path: Path) -> None:
    def edit(table: pd.DataFrame) -> pd.DataFrame:
        table.loc[[3, 9, 11], "type2"] = None
        return table

    path, schema = _medpar_file(tmp_path, edit)
    assert "column 'type2' has 3 missing value(s), first at row 4" in _error(path, schema)
    path, schema = _medpar_file(tmp_path, _set("died", 0, None), name="target.csv")
    assert "column 'died' has 1 missing value(s), first at row 1" in _error(path, schema)


def test_non_numeric_in_float_column_of_parquet(tmp_path: Path) -> None:
    def edit(table: pd.DataFrame) -> pd.DataFrame:
        table["debt_to_income"] = table["debt_to_income"].astype(str)
        table.loc[12, "debt_to_income"] = "n/a%"
        return table

    table = load_table("loans").head(20).astype(object)
    path = tmp_path / "loans.parquet"
    edit(table).to_parquet(path)
    message = _error(path, load_dataset("loans").schema)
    assert "column 'debt_to_income' value 'n/a%' at row 13 is not a number (expected float)" in (
        message
    )


def test_file_level_errors(tmp_path: Path) -> None:
    schema = load_dataset("medpar").schema
    cases = {
        tmp_path / "site.xlsx": "unknown file type '.xlsx' (expected .csv, .parquet, .pq)",
        tmp_path / "absent.csv": "file not found",
        tmp_path / "empty.csv": "file is empty",
        tmp_path / "header.csv": "file is empty (a header but no data rows)",
        tmp_path / "broken.parquet": "cannot be read as parquet",
        tmp_path / "folder.csv": "is not a file",
    }
    (tmp_path / "site.xlsx").write_text("x")
    (tmp_path / "empty.csv").write_text("")
    (tmp_path / "header.csv").write_text("los,hmo,white,age80,type2,type3,died\n")
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really parquet\nat all")
    (tmp_path / "folder.csv").mkdir()
    for path, expected in cases.items():
        assert expected in _error(path, schema), path


def test_image_schema_has_no_table(tmp_path: Path) -> None:
    path, _ = _medpar_file(tmp_path)
    assert "has no tabular features" in _error(path, load_dataset("digits").schema)


def test_schema_file_errors(tmp_path: Path) -> None:
    data = load_dataset("medpar").schema.to_dict()
    data["features"][2]["dtpe"] = "int"
    bad_key = tmp_path / "schema.yaml"
    bad_key.write_text(yaml.safe_dump(data))
    bad_yaml = tmp_path / "bad.yml"
    bad_yaml.write_text("name: [unclosed\n")
    cases = {
        bad_key: "schema.features[2]: unknown key 'dtpe'",
        bad_yaml: "is not valid YML",
        tmp_path / "absent.json": "file not found",
        tmp_path / "schema.txt": "unknown file type '.txt'",
    }
    for path, expected in cases.items():
        with pytest.raises(DataValidationError) as info:
            load_schema_file(path)
        message = str(info.value)
        assert message.startswith(f"schema file {path}: ") and "\n" not in message
        assert expected in message
