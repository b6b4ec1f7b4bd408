"""Plug-ins: one registry per kind, and ``_target_`` to name code that lives outside fedgov.

Every pluggable kind (strategy, model, dataset, partitioner, local objective) has one
:class:`Registry` holding fedgov's own options as *specs* (how to build one, which config fields it
owns, what the rest of fedgov may assume about it). A config names a plug-in either by its
registered name (``strategy=fedprox``) or, the Hydra way, by ``_target_``: a dotted path
``package.module.Attribute`` (``strategy._target_=examples.fedavgm.FedAvgM``) that is imported
and adapted into the same kind of spec. The plug-in's own fields (``strategy.server_lr``, ...)
are its *options*: checked against its config dataclass (or, for a plain class or function,
against its signature) before anything runs.

A mistake (an unknown name, a path that does not import, an object of the wrong kind, an unknown
or mistyped option) is one :class:`~fedgov.errors.ConfigError` line naming the key and what was
expected. No torch or flwr import here.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import difflib
import importlib
import inspect
import typing
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from fedgov.errors import ConfigError

Spec = TypeVar("Spec")
#: Option values a plug-in may take from the config (they travel as JSON in Flower's run config).
OptionValue = bool | int | float | str | list


def one_line(error: BaseException) -> str:
    """An exception as one line: its type and its message with whitespace collapsed."""
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def is_target(name: str) -> bool:
    """Whether ``name`` is a dotted import path (``mypkg.module.Class``), not a plain name."""
    return "." in name


#: Module prefixes a ``_target_`` may come from in this context; None = any (the coordinator's
#: own config, a simulation). A deployed site parses the coordinator's run config under its
#: operator's list (:func:`site_plugin_modules`), so the coordinator cannot make it import code.
_ALLOWED_MODULES: contextvars.ContextVar[tuple[str, ...] | None] = contextvars.ContextVar(
    "fedgov_plugin_modules", default=None
)
#: A site's node config key: the comma-separated module prefixes its operator lets runs import.
SITE_PLUGIN_MODULES_KEY = "plugin-modules"


@contextlib.contextmanager
def only_modules(prefixes: tuple[str, ...] | None) -> Iterator[None]:
    """Within the block, a ``_target_`` outside ``prefixes`` is refused before any import."""
    token = _ALLOWED_MODULES.set(prefixes)
    try:
        yield
    finally:
        _ALLOWED_MODULES.reset(token)


def site_plugin_modules(node_config: Mapping[str, Any]) -> tuple[str, ...] | None:
    """The module prefixes a site lets a run's ``_target_`` import: its node config's
    ``plugin-modules`` (none when absent); None (any) for a simulated site (``partition-id``),
    which runs on the researcher's own machine."""
    if "partition-id" in node_config:
        return None
    text = str(node_config.get(SITE_PLUGIN_MODULES_KEY, "") or "")
    return tuple(part.strip() for part in text.split(",") if part.strip())


def import_target(where: str, path: str, expected: str) -> Any:
    """The object at dotted ``path`` (module path, then attributes); ConfigError naming ``where``.

    ``mypkg.sub.Class`` imports ``mypkg.sub`` and returns its ``Class``; ``mypkg.sub.Class.attr``
    works too (the longest importable module prefix is used). Under :func:`only_modules` a path
    outside the allowed prefixes is refused before anything is imported.
    """
    parts = path.split(".")
    if len(parts) < 2 or not all(part.isidentifier() for part in parts):
        raise ConfigError(
            f"{where}: '{path}' is not a dotted import path (expected {expected}, "
            "as package.module.Name)"
        )
    allowed = _ALLOWED_MODULES.get()
    if allowed is not None and not any(path.startswith(f"{prefix}.") for prefix in allowed):
        raise ConfigError(
            f"{where}: '{path}' is not from a module this site allows (node config "
            f"'{SITE_PLUGIN_MODULES_KEY}': {', '.join(allowed) or 'none'}); a site imports only "
            "code its operator lists"
        )
    module = None
    for cut in range(len(parts) - 1, 0, -1):
        module_name = ".".join(parts[:cut])
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            missing = error.name or ""
            if module_name == missing or module_name.startswith(f"{missing}."):
                continue  # this prefix is not a module: try a shorter one
            raise ConfigError(
                f"{where}: importing '{module_name}' for '{path}' failed ({one_line(error)})"
            ) from None
        except Exception as error:  # the user's module raised while importing
            raise ConfigError(
                f"{where}: importing '{module_name}' for '{path}' failed ({one_line(error)})"
            ) from None
        obj: Any = module
        for attribute in parts[cut:]:
            if not hasattr(obj, attribute):
                owner = getattr(obj, "__name__", type(obj).__name__)
                raise ConfigError(
                    f"{where}: '{path}' not found: '{owner}' has no attribute '{attribute}' "
                    f"(expected {expected})"
                )
            obj = getattr(obj, attribute)
        return obj
    raise ConfigError(
        f"{where}: cannot import '{path}': no module '{parts[0]}' (expected {expected}; is its "
        "package installed, or on PYTHONPATH, at the server and every site?)"
    )


@dataclass
class Registry(Generic[Spec]):
    """The registered options of one kind, and how an imported ``_target_`` becomes a spec.

    ``key``: the config key that names the option (``strategy.name``); ``expected``: what a
    ``_target_`` must point at, in words; ``adapt(where, obj)``: an imported object → a spec
    (raising ConfigError when it is of the wrong kind).
    """

    kind: str
    key: str
    expected: str
    adapt: Callable[[str, Any], Spec]
    entries: dict[str, Spec] = dataclasses.field(default_factory=dict)

    def register(self, name: str, spec: Spec) -> Spec:
        """Add ``spec`` under ``name`` (a plain word, no dots); returns ``spec``."""
        if is_target(name) or not name:
            raise ValueError(f"{self.kind} name '{name}' must be a non-empty word without dots")
        self.entries[name] = spec
        return spec

    def __iter__(self):
        return iter(self.entries)

    def __contains__(self, name: object) -> bool:
        return name in self.entries

    def names(self) -> tuple[str, ...]:
        """The registered names, in registration order."""
        return tuple(self.entries)

    def resolve(self, name: str) -> Spec:
        """The spec registered as ``name``, or the adapted object at dotted path ``name``."""
        if name in self.entries:
            return self.entries[name]
        if is_target(name):
            where = f"{self.kind}._target_"
            return self.adapt(where, import_target(where, name, self.expected))
        hint = difflib.get_close_matches(name, self.entries, n=1)
        suffix = f"; did you mean '{hint[0]}'?" if hint else ""
        raise ConfigError(
            f"{self.key}: '{name}' is not one of {', '.join(self.entries)} (or a _target_ "
            f"naming {self.expected}){suffix}"
        )


@dataclass
class NoOptions:
    """The options of a plug-in without fields of its own."""


# ---- options -------------------------------------------------------------------------------------


def signature_config(obj: Callable[..., Any], skip: tuple[str, ...] = ()) -> type:
    """A config dataclass whose fields are ``obj``'s keyword parameters, less ``skip``.

    Parameters with a default become optional fields, the others required; annotations (when
    they resolve) type the fields, so a wrong type is refused like a built-in's.
    """
    target = obj.__init__ if inspect.isclass(obj) else obj
    try:
        hints = typing.get_type_hints(target)
    except Exception:  # unresolvable annotations: accept any value
        hints = {}
    fields: list[tuple[str, Any, Any]] = []
    for parameter in inspect.signature(obj).parameters.values():
        if parameter.name in skip or parameter.kind in (
            parameter.VAR_POSITIONAL,
            parameter.VAR_KEYWORD,
            parameter.POSITIONAL_ONLY,
        ):
            continue
        kind = hints.get(parameter.name, Any)
        if parameter.default is parameter.empty:
            fields.append((parameter.name, kind, dataclasses.field()))
        else:
            fields.append((parameter.name, kind, dataclasses.field(default=parameter.default)))
    fields.sort(key=lambda item: item[2].default is not dataclasses.MISSING)  # required first
    name = getattr(obj, "__name__", "Options")
    return dataclasses.make_dataclass(f"{name}Options", fields)


def check_options(
    where: str, options: Mapping[str, Any], config_cls: type, group_fields: tuple[str, ...] = ()
) -> Any:
    """``config_cls(**options)`` with every name and type checked; ConfigError naming the field.

    ``where`` is the config group (``strategy``); an error names ``strategy.<field>``. A config
    dataclass may check ranges in ``__post_init__`` by raising ConfigError. ``group_fields``: the
    group's own keys (``model.hidden``), offered too when a key looks misspelt.
    """
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    try:
        hints = typing.get_type_hints(config_cls)
    except Exception:
        hints = {}
    for key in options:
        if key not in fields:
            hint = difflib.get_close_matches(key, [*fields, *group_fields], n=1)
            suffix = f"; did you mean '{hint[0]}'?" if hint else ""
            known = ", ".join(fields) or "none"
            raise ConfigError(
                f"{where}.{key}: not a field of this {where} (its fields: {known}){suffix}"
            )
    values = {
        key: coerce(f"{where}.{key}:", value, hints.get(key, Any)) for key, value in options.items()
    }
    missing = [
        name
        for name, f in fields.items()
        if name not in values
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"{where}.{missing[0]}: required by this {where} and not given")
    try:
        return config_cls(**values)
    except ConfigError:
        raise
    except (TypeError, ValueError) as error:
        raise ConfigError(f"{where}: options refused ({one_line(error)})") from None


def coerce(label: str, value: Any, expected: Any) -> Any:
    """``value`` as the annotated scalar type (int → float, whole float → int), else ConfigError
    whose line starts with ``label`` (``strategy.server_lr:``)."""
    if expected is Any or expected not in (bool, int, float, str):
        return value
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if expected is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if not isinstance(value, expected) or (expected is not bool and isinstance(value, bool)):
        raise ConfigError(
            f"{label} {value!r} has type {type(value).__name__}, expected {expected.__name__}"
        )
    return value
