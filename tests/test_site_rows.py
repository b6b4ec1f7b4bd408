"""A site's own file is read and validated once per version of it (clients/site_data.py)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import yaml

from clients import site_data
from fedgov.datasets import load_dataset, load_table
from fedgov.errors import FedgovError


@pytest.fixture
def site_files(tmp_path):
    table = load_table("medpar")
    rows = table[table["provnum"] == "030006"].drop(columns=["provnum"])
    if rows.empty:  # any one hospital will do
        first = table["provnum"].iloc[0]
        rows = table[table["provnum"] == first].drop(columns=["provnum"])
    data, schema = tmp_path / "rows.csv", tmp_path / "schema.yaml"
    rows.to_csv(data, index=False)
    schema.write_text(yaml.safe_dump(load_dataset("medpar").schema.to_dict()))
    site_data._ROWS.clear()
    yield data, schema, rows
    site_data._ROWS.clear()


def test_rows_are_read_once_and_again_only_when_a_file_changes(site_files):
    data, schema, rows = site_files
    _, x, y = site_data.read_site_rows(data, schema)
    assert len(y) == len(rows) and not x.flags.writeable and not y.flags.writeable
    again = site_data.read_site_rows(data, schema)
    assert again[1] is x and again[2] is y  # served from memory

    rows.iloc[: len(rows) // 2].to_csv(data, index=False)
    stat = os.stat(data)
    os.utime(data, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    _, x2, y2 = site_data.read_site_rows(data, schema)
    assert len(y2) == len(rows) // 2 and x2 is not x

    data.write_text("not,the,schema\n1,2,3\n")
    with pytest.raises(FedgovError):
        site_data.read_site_rows(data, schema)


def test_the_zygote_preloads_the_files_the_environment_names(site_files):
    data, schema, _ = site_files
    assert not site_data.preload_site_rows({})
    env = {site_data.DATA_ENV: str(data), site_data.SCHEMA_ENV: str(schema)}
    assert site_data.preload_site_rows(env)
    (key,) = site_data._ROWS
    assert key == (str(data), str(schema))
    _, x, _ = site_data._ROWS[key][1]
    assert np.array_equal(site_data.read_site_rows(str(data), str(schema))[1], x)
