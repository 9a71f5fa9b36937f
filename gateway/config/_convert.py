"""The one converter that turns parsed TOML into :class:`~gateway.config.Config`.

cattrs coerces by default ("8081" -> 8081, 8081.9 -> 8081, true -> 1). A config file is written
by a person, so every such coercion would hide a mistake: the hooks here accept a value only
when it already has the right type (an int is accepted where a float is expected, a bool never
is), and unknown keys are errors. Failures are collected by cattrs into an exception tree that
:func:`load_config` renders as one line per error, each with its field path (``$.upstream.
connect_rate``).
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final, Literal, get_args, get_origin

import attrs
import cattrs
from cattrs.errors import AttributeValidationNote
from cattrs.gen import make_dict_structure_fn, override

from gateway.config._environ import apply_environ
from gateway.config._model import (
    ApiSection,
    ClusterSection,
    Config,
    ConfigProblems,
    FeedConfig,
    FixtureConfig,
    GatewaySection,
    ListenAddress,
    RecorderSection,
    ReplaySection,
    SubscribersSection,
    UpstreamSection,
)

#: The model's tables: a value that fails several of a table's checks gets every failure
#: reported (each with its field's path), not only the first (see :func:`_every_check`).
#: Tables before the tables that hold them: cattrs looks a field's hook up when it generates.
_TABLES: tuple[type, ...] = (
    GatewaySection,
    UpstreamSection,
    FeedConfig,
    FixtureConfig,
    SubscribersSection,
    ApiSection,
    RecorderSection,
    ReplaySection,
    ClusterSection,
    Config,
)


class ConfigError(Exception):
    """The configuration is invalid. ``errors`` holds one message per problem, with its path."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("invalid configuration:\n" + "\n".join(f"  {e}" for e in errors))
        self.errors = errors


def _strict_int(value: Any, _: type) -> int:
    if type(value) is not int:
        raise TypeError(f"expected an integer, got {type(value).__name__} {value!r}")
    return value


def _strict_float(value: Any, _: type) -> float:
    if type(value) not in (int, float):
        raise TypeError(f"expected a number, got {type(value).__name__} {value!r}")
    return float(value)


def _strict_str(value: Any, _: type) -> str:
    if type(value) is not str:
        raise TypeError(f"expected a string, got {type(value).__name__} {value!r}")
    return value


def _strict_bool(value: Any, _: type) -> bool:
    if type(value) is not bool:
        raise TypeError(f"expected true or false, got {type(value).__name__} {value!r}")
    return value


def _path(value: Any, _: type) -> Path:
    return Path(_strict_str(value, str))


def _listen(value: Any, _: type) -> ListenAddress:
    return ListenAddress.parse(_strict_str(value, str))


def _list(value: Any, what: str) -> list[Any]:
    if type(value) is not list:
        raise TypeError(f"expected a list of {what}, got {type(value).__name__} {value!r}")
    return value


def make_converter() -> cattrs.Converter:
    """Build the strict converter. Called once per load; cheap enough, and keeps no state."""
    conv = cattrs.Converter(forbid_extra_keys=True)
    conv.register_structure_hook(int, _strict_int)
    conv.register_structure_hook(float, _strict_float)
    conv.register_structure_hook(str, _strict_str)
    conv.register_structure_hook(bool, _strict_bool)
    conv.register_structure_hook(Path, _path)
    conv.register_structure_hook(ListenAddress, _listen)
    conv.register_unstructure_hook(ListenAddress, str)
    # A list, each element checked with its index in the path (a string is not a list of
    # its characters).
    addresses = tuple[ListenAddress, ...]
    conv.register_structure_hook_func(
        lambda t: t == addresses,
        lambda value, _: tuple(
            conv.structure(_list(value, "HOST:PORT strings"), list[ListenAddress])
        ),
    )
    conv.register_unstructure_hook(Path, str)
    for table in _TABLES:
        extra: dict[str, Any] = {"name": override(omit=True)} if table is FeedConfig else {}
        generated: Any = make_dict_structure_fn(
            table, conv, _cattrs_forbid_extra_keys=True, **extra
        )
        conv.register_structure_hook(table, _every_check(conv, table, generated))
    return conv


def _every_check(conv: cattrs.Converter, table: type, generated: Any) -> Any:
    """Wrap cattrs' structure function of *table*: when building the instance fails (an attrs
    validator or ``__attrs_post_init__``), every validator is run again on its own, so that
    all of the table's bad values are reported at once, each at its field's path.

    attrs stops at the first failing validator; a person fixing a config should not have to
    run the checker once per mistake.
    """

    def structure(value: Any, type_: type) -> Any:
        try:
            return generated(value, type_)
        except cattrs.ClassValidationError as group:
            # Types and unknown keys: cattrs collected them all already (each carries its
            # attribute's note). Without notes: building the instance failed (a validator).
            if any(_is_field_error(e) for e in group.exceptions):
                raise
            exc: Exception = group.exceptions[0] if len(group.exceptions) == 1 else group
            try:
                diagnosed = _diagnose(conv, table, value, exc)
            except Exception:  # the diagnosis is a courtesy: never worse than the first error
                raise group from None
            raise diagnosed from None

    return structure


def _is_field_error(exc: BaseException) -> bool:
    notes = getattr(exc, "__notes__", ())
    return isinstance(exc, (KeyError, cattrs.ForbiddenExtraKeysError)) or any(
        isinstance(n, AttributeValidationNote) for n in notes
    )


def _diagnose(
    conv: cattrs.Converter, table: type, value: Mapping[str, Any], first: Exception
) -> Exception:
    """The failures of every validator of *table* on the (well-typed) *value*, as a cattrs
    exception group whose members carry their attribute's path; *first* when no validator
    fails on its own (a cross-field check in ``__attrs_post_init__``)."""
    fields = attrs.fields(attrs.resolve_types(table))
    # An instance made without running __init__: validators may read other fields (a feed's
    # url depends on its kind), so every field gets its structured value or its default.
    inst: Any = object.__new__(table)
    for field in fields:
        name = field.alias or field.name
        if name in value:
            got = conv.structure(value[name], field.type)
        elif isinstance(field.default, attrs.Factory):  # type: ignore[arg-type]
            factory = field.default
            got = factory.factory(inst) if factory.takes_self else factory.factory()
        else:
            got = field.default
        if field.converter is not None and callable(field.converter):
            got = field.converter(got)
        object.__setattr__(inst, field.name, got)
    errors: list[Exception] = []
    for field in fields:
        if field.validator is None:
            continue
        try:
            field.validator(inst, field, getattr(inst, field.name))
        except (ValueError, TypeError) as exc:
            exc.__notes__ = [
                AttributeValidationNote(
                    f"Structuring class {table.__qualname__} @ attribute {field.name}",
                    field.name,
                    field.type,
                )
            ]
            errors.append(exc)
    if not errors:
        problems = first.problems if isinstance(first, ConfigProblems) else [str(first)]
        errors = [ValueError(p) for p in problems]
    return cattrs.ClassValidationError(f"While structuring {table.__name__}", errors, table)


def _message(exc: BaseException, type_: type | None) -> str:
    """One error's text; cattrs appends `` @ $.the.path``."""
    if isinstance(exc, KeyError):
        return "required field missing"
    if isinstance(exc, cattrs.ForbiddenExtraKeysError):
        return "unknown key(s): " + ", ".join(sorted(exc.extra_fields))
    if get_origin(type_) is Literal:
        allowed = ", ".join(repr(a) for a in get_args(type_))
        return f"expected one of {allowed}"
    return str(exc)


def structure_config(data: Mapping[str, Any]) -> Config:
    """Structure already-parsed TOML. Raises :class:`ConfigError` listing every problem."""
    try:
        return make_converter().structure(data, Config)
    except cattrs.BaseValidationError as exc:
        raise ConfigError(cattrs.transform_error(exc, format_exception=_message)) from None
    except ConfigProblems as exc:  # cross-field checks in Config itself
        raise ConfigError([f"{p} @ $" for p in exc.problems]) from None
    except (ValueError, TypeError) as exc:
        raise ConfigError([f"{exc} @ $"]) from None


def load_config(path: Path | None, *, environ: Mapping[str, str] | None = None) -> Config:
    """Read, parse and check a TOML config file, with the ``DDE_GATEWAY_*`` keys of *environ*
    (default: the process's environment) over it (:mod:`gateway.config._environ`); *path*
    None: the environment over an empty file. Raises :class:`ConfigError`, and only that; an
    error about a value that came from the environment names its variable.

    Whatever the file holds - a nesting deep enough to exhaust the parser's recursion, a size
    that exhausts memory, bytes that are not UTF-8 - becomes a :class:`ConfigError` with a
    message, never another exception: a reload must be refused cleanly, never crash the service.
    """
    data: dict[str, Any] = {}
    if path is not None:
        data = _read_toml(path)
    data, origins, env_errors = apply_environ(data, os.environ if environ is None else environ)
    where = "the environment" if path is None else str(path)
    try:
        config = structure_config(data)
    except ConfigError as exc:
        raise ConfigError(env_errors + [_named(e, origins) for e in exc.errors]) from None
    except RecursionError:
        raise ConfigError([f"{where}: a value is nested too deeply @ $"]) from None
    except Exception as exc:  # a converter bug must not take the service down on reload
        raise ConfigError(
            [f"{where}: cannot check the config ({type(exc).__name__}) @ $"]
        ) from None
    if env_errors:
        raise ConfigError(env_errors)
    return config


def load_partial(
    path: Path | None, *, environ: Mapping[str, str] | None = None
) -> tuple[Config, list[Any]] | None:
    """For a config :func:`load_config` refused: its tables that are valid on their own in a
    :class:`Config` (defaults for the others, no fixtures), and the raw ``[[fixtures]]`` list;
    None when the file cannot be read or parsed. Of a table with an error, only the keys that
    name files (and secrets' variables) are kept, when they are valid on their own.

    So that one run of ``check-config`` also checks the files the config names (token files,
    TLS, the recorder's directory) while a table has a typo. Nothing here is reported:
    :func:`load_config` reports the tables' errors.
    """
    try:
        data = {} if path is None else _read_toml(path)
    except ConfigError:
        return None
    data, _, _ = apply_environ(data, os.environ if environ is None else environ)
    conv = make_converter()

    def part(key: str, type_: Any) -> Any:
        try:
            return conv.structure(data[key], type_)
        except Exception:
            pass
        table = data[key]
        if not isinstance(table, dict):
            return None
        files = {k: v for k, v in table.items() if k in _FILE_KEYS}
        if type_ is ClusterSection:  # where Redis is does not matter to the file checks
            files["redis_url"] = "redis://127.0.0.1:6379"
        try:
            return conv.structure(files, type_)
        except Exception:
            return None

    sections: dict[str, Any] = {}
    for key, type_ in (
        ("upstream", UpstreamSection),
        ("gateway", GatewaySection),
        ("subscribers", SubscribersSection),
        ("api", ApiSection),
        ("recorder", RecorderSection),
        ("replay", ReplaySection),
        ("cluster", ClusterSection),
    ):
        if key in data and (value := part(key, type_)) is not None:
            sections[key] = value
    feeds = data.get("feeds")
    if isinstance(feeds, dict):
        good = {}
        for name, table in feeds.items():
            try:
                good[name] = conv.structure(table, FeedConfig)
            except Exception:
                continue
        sections["feeds"] = good
        if len(good) < len(feeds) and "subscribers" in sections:
            # Its feed lists are checked against the feeds: not against some of them.
            sections["subscribers"] = attrs.evolve(sections["subscribers"], tokens_file=None)
    # Only the tables' own files are checked: an upstream that failed names none.
    sections.setdefault("upstream", UpstreamSection(token_env="DDE_GATEWAY_UNSET"))
    fixtures = data.get("fixtures")
    raw = fixtures if isinstance(fixtures, list) else []
    try:
        return Config(**sections), raw
    except ValueError:  # the feeds' drop-in paths collide: leave the feeds out
        sections.pop("feeds", None)
        return Config(**sections), raw


#: The keys that name a file or a secret's variable (checked by the preflight).
_FILE_KEYS: Final = frozenset(
    {
        "token_file",
        "token_env",
        "tokens_file",
        "admin_tokens_file",
        "read_tokens_file",
        "tls_cert_file",
        "tls_key_file",
        "dir",
        "password_file",
        "password_env",
    }
)


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError([f"cannot read {str(path)!r}: {exc.strerror}"]) from None
    try:
        return tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError([f"{path}: not valid TOML: {exc}"]) from None
    except RecursionError:
        raise ConfigError([f"{path}: not valid TOML: nested too deeply"]) from None
    except MemoryError:
        raise ConfigError([f"{path}: too large to parse"]) from None


def _named(error: str, origins: Mapping[str, str]) -> str:
    """*error* (``message @ $.path``) with the variable its value came from, if one did."""
    message, sep, at = error.rpartition(" @ ")
    if not sep:
        return error
    for path, variable in origins.items():
        if at == path or at.startswith((path + ".", path + "[")):
            return f"{message} (from {variable}) @ {at}"
    return error


def config_to_dict(config: Config) -> dict[str, Any]:
    """A plain-data view for status output. Holds paths and names, never token values."""
    out: dict[str, Any] = make_converter().unstructure(config)
    return out
