"""A site's CSV as real exports come: semicolons, Latin-1 bytes (fedgov_data/connector.py)."""

from __future__ import annotations

import numpy as np
import pytest
from own_data import TARGET, own_schema, own_table

from fedgov.datasets import DatasetSchema
from fedgov.errors import DataValidationError
from fedgov_data.connector import read_site_table


@pytest.fixture
def site(tmp_path):
    table = own_table(40, seed=5)
    schema = DatasetSchema.from_dict(own_schema(table))
    table.to_csv(tmp_path / "utf8.csv", index=False)
    return table, schema, tmp_path


def test_a_semicolon_separated_csv_gets_a_delimiter_hint(site):
    table, schema, folder = site
    table.to_csv(folder / "semi.csv", index=False, sep=";")
    with pytest.raises(DataValidationError) as raised:
        read_site_table(folder / "semi.csv", schema)
    assert str(raised.value) == (
        f"site data {folder / 'semi.csv'}: has one column only: its values are separated by "
        "semicolons, not commas (expected a comma-separated CSV; save it again with ',' as the "
        "separator)"
    )


def test_latin1_bytes_only_in_an_ignored_column_are_accepted(site):
    table, schema, folder = site
    table["record_note"] = [f"Mme Hélène Çavuş {i}" if i % 3 else "plain" for i in range(40)]
    table["record_note"] = table["record_note"].str.replace("ş", "s")  # Latin-1 has no ş
    table.to_csv(folder / "latin1.csv", index=False, encoding="latin-1")
    with pytest.raises(UnicodeDecodeError):
        (folder / "latin1.csv").read_bytes().decode("utf-8")  # really not UTF-8
    x, y = read_site_table(folder / "latin1.csv", schema)
    x_ref, y_ref = read_site_table(folder / "utf8.csv", schema)
    assert np.array_equal(x, x_ref) and np.array_equal(y, y_ref)


def test_latin1_bytes_in_a_used_column_are_refused_with_an_encoding_hint(site):
    table, _, folder = site
    table[TARGET] = table[TARGET].map({"benign": "bénin", "malignant": "malin"})
    spec = own_schema(table)
    spec["classes"] = ["bénin", "malin"]
    schema = DatasetSchema.from_dict(spec)
    table.to_csv(folder / "latin1.csv", index=False, encoding="latin-1")
    first = int(np.flatnonzero(table[TARGET].to_numpy() == "bénin")[0]) + 1
    with pytest.raises(DataValidationError) as raised:
        read_site_table(folder / "latin1.csv", schema)
    message = str(raised.value)
    assert message.startswith(f"site data {folder / 'latin1.csv'}: is not UTF-8 (byte 0xe9 at ")
    assert message.endswith(
        f"and column '{TARGET}' holds non-ASCII text at row {first} (expected UTF-8: save the "
        "file as UTF-8, e.g. iconv -f latin1 -t utf-8)"
    )
    # Saved as UTF-8, the same labels read fine.
    table.to_csv(folder / "utf8-accents.csv", index=False)
    _, y = read_site_table(folder / "utf8-accents.csv", schema)
    assert list(y[:5]) == [spec["classes"].index(v) for v in table[TARGET][:5]]
