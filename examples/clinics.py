"""A user dataset in one file: a folder of CSV files, one per site (the file's stem names it).

    python -m simulations.run dataset._target_=examples.clinics.load_clinics \\
        dataset.partitioner=natural

Every CSV holds the same columns: numeric features and a ``target`` column of class labels. The
loader publishes one normalisation (mean, std of each feature over all files), so every site
feeds the model the same scale, and labels each row with its file's site: the ``natural``
partitioner then gives every clinic its own rows. ``folder`` defaults to the bundled sample
(examples/data/clinics: three clinics, 210 rows).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from fedgov.datasets import Dataset, DatasetSchema, FeatureSpec, normalise_frame

SAMPLE = Path(__file__).resolve().parent / "data" / "clinics"


def load_clinics(folder: str = str(SAMPLE), target: str = "readmitted") -> Dataset:
    """Every ``*.csv`` in ``folder`` as one dataset whose natural sites are the files."""
    files = sorted(Path(folder).glob("*.csv"))
    if not files:
        raise FileNotFoundError(f"no *.csv in {folder}")
    frames = [pd.read_csv(path).assign(_site=path.stem) for path in files]
    table = pd.concat(frames, ignore_index=True)
    if target not in table.columns:
        raise KeyError(f"column '{target}' not in {files[0]}")
    names = [column for column in table.columns if column not in (target, "_site")]
    features = tuple(
        FeatureSpec(name, mean=float(table[name].mean()), std=float(table[name].std()) or 1.0)
        for name in names
    )
    classes = tuple(sorted(str(label) for label in table[target].unique()))
    schema = DatasetSchema(
        name="clinics",
        features=features,
        target=target,
        classes=classes,
        input_shape=(len(features),),
        site_column=None,  # the site is the file, not a column
    )
    x = normalise_frame(table, schema, source=f"clinics {folder}")
    labels = table[target].astype(str)
    y = pd.Categorical(labels, categories=classes).codes.astype(np.int64)
    return Dataset(x, y, table["_site"].to_numpy(dtype=str), schema)
