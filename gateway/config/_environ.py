"""Config keys from the environment: ``DDE_GATEWAY_<SECTION>_<KEY>`` over the file's value.

For containers and CI, where a file is baked into an image and a few values differ per
deployment. The rule (docs/configuration.md, "From the environment"):

- ``DDE_GATEWAY_<SECTION>_<KEY>`` sets ``KEY`` of the table ``[SECTION]`` (``gateway``,
  ``upstream``, ``subscribers``, ``api``, ``recorder``, ``replay``, ``cluster``); both parts
  are upper case with ``_`` between words, e.g. ``DDE_GATEWAY_SUBSCRIBERS_QUEUE_BYTES``.
- ``DDE_GATEWAY_FEEDS_<NAME>_<KEY>`` sets ``KEY`` of ``[feeds.NAME]``: ``NAME`` is the file's
  feed whose name, upper-cased with ``-`` as ``_``, is ``NAME``; else a new feed named
  ``NAME`` lower-cased.
- ``DDE_GATEWAY_FIXTURES`` replaces the whole ``[[fixtures]]`` list (a TOML array of inline
  tables).
- The environment wins over the file. A value is taken as written for a key that holds text
  (strings, paths, addresses, one of a set of words); for any other key it is a TOML value
  (``4194304``, ``true``, ``2.5``, ``["h:26379", "h2:26379"]``).
- A variable whose first word after the prefix is not a section (``DDE_GATEWAY_INSTANCE``,
  ``DDE_GATEWAY_SLOW_STEPS``) is not a config key and is left to its reader; one that names
  a section but no key of it is an error, like an unknown key in the file.

No key holds a secret's value (only the file or the variable that holds it: ``token_file``,
``token_env``, ``password_file``, ``password_env``), so none comes inline from here either.
Errors name the variable, never its value.
"""

from __future__ import annotations

import tomllib
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final, Literal, Union, get_args, get_origin

import attrs

from gateway.config._model import (
    ApiSection,
    ClusterSection,
    FeedConfig,
    GatewaySection,
    ListenAddress,
    RecorderSection,
    ReplaySection,
    SubscribersSection,
    UpstreamSection,
)

ENV_PREFIX: Final = "DDE_GATEWAY_"
#: The tables a variable may name, by their TOML name.
SECTIONS: Final[Mapping[str, type]] = {
    "gateway": GatewaySection,
    "upstream": UpstreamSection,
    "subscribers": SubscribersSection,
    "api": ApiSection,
    "recorder": RecorderSection,
    "replay": ReplaySection,
    "cluster": ClusterSection,
}
_TEXT_TYPES: Final = (str, Path, ListenAddress)


class EnvironError(Exception):
    """Variables that do not fit the rule; ``errors`` holds one message per variable."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("; ".join(errors))
        self.errors = errors


def env_name(*parts: str) -> str:
    """The variable for a key: ``env_name("feeds", "tracking", "history")`` is
    ``DDE_GATEWAY_FEEDS_TRACKING_HISTORY``."""
    return ENV_PREFIX + "_".join(p.upper().replace("-", "_") for p in parts)


def _fields(table: type) -> dict[str, attrs.Attribute[Any]]:
    return {f.name: f for f in attrs.fields(attrs.resolve_types(table)) if f.init}


def _is_text(type_: Any) -> bool:
    """True for a key whose value is text: a str, a path, an address, a word of a Literal."""
    if type_ in _TEXT_TYPES:
        return True
    origin = get_origin(type_)
    if origin is Literal:
        return all(isinstance(a, str) for a in get_args(type_))
    if origin is Union or origin is types.UnionType:
        args = [a for a in get_args(type_) if a is not type(None)]
        return len(args) == 1 and _is_text(args[0])
    return False


def _parse(name: str, text: str, type_: Any) -> Any:
    if type_ is not None and _is_text(type_):
        return text
    try:
        parsed = tomllib.loads(f"v = {text}")
    except tomllib.TOMLDecodeError:
        raise EnvironError([f"{name}: not a TOML value (quote text, e.g. '\"...\"')"]) from None
    if list(parsed) != ["v"]:  # "1\nother = 2" would smuggle in a key
        raise EnvironError([f"{name}: not one TOML value"])
    return parsed["v"]


def apply_environ(
    data: dict[str, Any], environ: Mapping[str, str]
) -> tuple[dict[str, Any], dict[str, str], list[str]]:
    """*data* (parsed TOML) with every ``DDE_GATEWAY_*`` key of *environ* set over it; for
    each key set that way its field path (``$.subscribers.queue_bytes``) -> the variable; and
    an error for each variable that does not fit the rule (the others are applied).
    """
    out: dict[str, Any] = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    feeds = out.get("feeds")
    if isinstance(feeds, dict):
        out["feeds"] = {k: (dict(v) if isinstance(v, dict) else v) for k, v in feeds.items()}
    origins: dict[str, str] = {}
    errors: list[str] = []
    for name in sorted(environ):
        if not name.startswith(ENV_PREFIX):
            continue
        rest = name[len(ENV_PREFIX) :].lower()
        try:
            if rest == "fixtures":
                out["fixtures"] = _parse(name, environ[name], None)
                origins["$.fixtures"] = name
                continue
            section, _, key = rest.partition("_")
            if section == "feeds":
                path = _set_feed_key(out, name, key, environ[name])
            elif section in SECTIONS:
                path = _set_key(out, name, section, key, environ[name])
            else:
                continue  # not a config variable (DDE_GATEWAY_INSTANCE, ...)
        except EnvironError as exc:
            errors.extend(exc.errors)
            continue
        origins[path] = name
    return out, origins, errors


def _table(out: dict[str, Any], name: str, key: str) -> dict[str, Any]:
    table = out.setdefault(key, {})
    if not isinstance(table, dict):
        raise EnvironError([f"{name}: [{key}] in the file is not a table"])
    return table


def _set_key(out: dict[str, Any], name: str, section: str, key: str, text: str) -> str:
    fields = _fields(SECTIONS[section])
    if key not in fields:
        raise EnvironError(
            [f"{name}: [{section}] has no key {key!r} (keys: {', '.join(sorted(fields))})"]
        )
    _table(out, name, section)[key] = _parse(name, text, fields[key].type)
    return f"$.{section}.{key}"


def _set_feed_key(out: dict[str, Any], name: str, rest: str, text: str) -> str:
    fields = {k: f for k, f in _fields(FeedConfig).items() if k != "name"}
    # The longest key that ends the name: "tracking_max_on_demand" is feed "tracking", key
    # "max_on_demand" (feed names may hold "_" too).
    key = next((k for k in sorted(fields, key=len, reverse=True) if rest.endswith("_" + k)), None)
    feed_part = "" if key is None else rest[: -len(key) - 1]
    if key is None or not feed_part:
        raise EnvironError(
            [
                f"{name}: expected {ENV_PREFIX}FEEDS_<NAME>_<KEY> with a key of a feed "
                f"({', '.join(sorted(fields))})"
            ]
        )
    feeds = _table(out, name, "feeds")
    feed = next(
        (f for f in feeds if f.lower().replace("-", "_") == feed_part),
        feed_part,
    )
    table = feeds.setdefault(feed, {})
    if not isinstance(table, dict):
        raise EnvironError([f"{name}: [feeds.{feed}] in the file is not a table"])
    table[key] = _parse(name, text, fields[key].type)
    return f"$.feeds[{feed!r}].{key}"
