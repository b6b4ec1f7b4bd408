"""A federation's own data that fedgov does not bundle: 30 numeric features, 2 classes.

Generated here (scikit-learn's ``make_classification``, nothing downloaded) and written as the
sites would hold it: one CSV per site in raw units with an extra column the schema does not name,
plus the ``schema.yaml`` the sites agree on (normalisation constants from the whole table).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import yaml

FEATURES = tuple(f"marker_{i:02d}" for i in range(30))
TARGET = "diagnosis"
CLASSES = ("benign", "malignant")
SCHEMA_NAME = "Tumour Markers"


def own_table(rows: int, seed: int = 0) -> pd.DataFrame:
    """``rows`` rows: 30 features in raw units (offsets and scales), the class label, a note."""
    from sklearn.datasets import make_classification

    x, y = make_classification(
        n_samples=rows,
        n_features=len(FEATURES),
        n_informative=8,
        n_redundant=4,
        class_sep=1.5,
        random_state=seed,
    )
    scales = np.linspace(0.5, 40.0, len(FEATURES))
    table = pd.DataFrame(x * scales + 3 * scales, columns=list(FEATURES))
    table[TARGET] = np.asarray(CLASSES)[y]
    table["record_note"] = [f"ref-{i}" for i in range(rows)]  # ignored by the schema
    return table


def own_schema(table: pd.DataFrame) -> dict:
    """The schema the sites agree on, as it is written in schema.yaml (no input_shape: derived)."""
    return {
        "name": SCHEMA_NAME,
        "target": TARGET,
        "classes": list(CLASSES),
        "features": [
            {
                "name": name,
                "dtype": "float",
                "mean": round(float(table[name].mean()), 6),
                "std": round(float(table[name].std(ddof=0)), 6),
            }
            for name in FEATURES
        ],
    }


def write_sites(
    root: Path, sites: list[str], rows_per_site: int, holdout_rows: int = 0, seed: int = 0
) -> dict[str, tuple[Path, Path]]:
    """Each site's folder with its CSV and its own copy of schema.yaml; ``"holdout"`` too when
    ``holdout_rows`` (the coordinator's own rows). Returns name → (csv, schema.yaml)."""
    table = own_table(rows_per_site * len(sites) + holdout_rows, seed)
    schema = own_schema(table)
    parts = {
        site: table.iloc[i * rows_per_site : (i + 1) * rows_per_site]
        for i, site in enumerate(sites)
    }
    if holdout_rows:
        parts["holdout"] = table.iloc[len(sites) * rows_per_site :]
    files = {}
    for name, part in parts.items():
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        part.to_csv(folder / "data.csv", index=False)
        (folder / "schema.yaml").write_text(yaml.safe_dump(schema, sort_keys=False))
        files[name] = (folder / "data.csv", folder / "schema.yaml")
    return files


def blank_a_cell(csv: Path, column: str, row: int) -> None:
    """Empty one cell (row counted from 1, header excluded), as a broken export would."""
    table = pd.read_csv(csv, dtype=str)
    table.loc[row - 1, column] = ""
    table.to_csv(csv, index=False)
