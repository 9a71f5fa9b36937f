"""Logging set-up: one line per event, JSON for machines or ``key=value`` text for people.

``configure_logging`` installs a single handler on the root logger. Each record becomes exactly
one line (newlines inside messages and tracebacks are escaped), because journald and most log
shippers split on newlines and a traceback spread over twenty entries cannot be searched.

JSON line::

    {"ts":"2026-11-22T01:02:03.456Z","level":"INFO","logger":"gateway.upstream",
     "msg":"connected","feed":"soccer","fixture":"123"}

Text line::

    2026-11-22T01:02:03.456Z INFO gateway.upstream connected feed=soccer fixture=123

The line is rendered by structlog's :class:`~structlog.stdlib.ProcessorFormatter`: code logs
with :mod:`logging`; :func:`_envelope` turns the record into the event dict (ts, level, logger,
msg, the call's fields, then the fields bound to the task), then the JSON or text renderer.
Fields of a call travel in ``extra`` under one key (``gateway.logs.fields``), fields of a task
are bound with ``gateway.logs.log_context``::

    log.info("connected", extra=fields(feed="soccer", fixture="123"))

journald: when the stream is the one ``$JOURNAL_STREAM`` names (under systemd), each line
starts with its syslog priority (``<4>`` for WARNING, :mod:`gateway.service._journald`), which
journald strips and stores, so ``journalctl -p warning`` filters by level.

Secrets: as defence in depth (the token is a :class:`~gateway.config.Secret` and should never
reach a log call), every rendered line is searched for the current secret values, taken from the
``secrets`` callable on every record so a rotated token is covered, and each occurrence is
replaced by ``<redacted>`` - however spelled: upper-cased, split by zero-width characters, in
full-width letters (:class:`~gateway.config.SecretMatcher`, the matcher ``Secret.scrub`` uses).
Recently seen values stay redacted after rotation. A failing ``secrets`` callable never breaks
logging: the values already known keep being redacted.

Non-printing characters: control characters are escaped by the formatters; after redaction
every other character :meth:`str.isprintable` refuses (format characters such as U+200B, line
and paragraph separators U+2028/U+2029, private-use, unassigned and surrogate code points,
spaces other than U+0020) is written as a ``\\uXXXX`` escape, so nothing invisible or
line-breaking from upstream text or client input reaches a line raw. (Redaction comes first:
the matcher must see a token split by U+200B as it was, not as escape sequences.)

Errors: a record that cannot be rendered (bad ``%`` arguments, an unserialisable field) still
produces a line saying so, never an exception in the caller; the stdlib's "--- Logging error ---"
dump, which prints the record's arguments, is replaced by a short redacted note.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Iterable, Mapping, MutableMapping
from typing import Any, Final, Literal, TextIO

import orjson
import structlog

from gateway.config import MIN_SECRET_LENGTH, Secret, SecretMatcher
from gateway.logs import FIELDS_ATTR, bound_fields
from gateway.service._journald import journal_priority, writes_to_journal

LogFormat = Literal["json", "text"]
SecretsSource = Callable[[], Iterable[str | Secret]]
EventDict = MutableMapping[str, Any]

#: How many distinct secret values stay redacted (current one plus recently rotated ones).
DEFAULT_REMEMBERED_SECRETS: Final = 8

_LEVELS: Final = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}
_RESERVED: Final = frozenset({"ts", "level", "logger", "msg", "exc", "stack"})
#: The stdlib's own rendering of tracebacks and stacks (one string each; the line escapes it).
_STDLIB: Final = logging.Formatter()


def _timestamp(record: logging.LogRecord) -> str:
    # ISO 8601, UTC, milliseconds: sortable as text and unambiguous across hosts.
    secs = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
    return f"{secs}.{int(record.msecs):03d}Z"


def _message(msg: object, args: object) -> str:
    # LogRecord.getMessage, except that bad %-arguments keep the template and drop the
    # arguments (they may hold anything).
    text = str(msg)
    if not args:
        return text
    try:
        return text % args
    except Exception as exc:
        return f"{text} <unformattable log arguments: {type(exc).__name__}>"


def _envelope(_logger: object, _method: str, ed: EventDict) -> EventDict:
    """structlog processor: the event dict of a stdlib record, in line order - ts, level,
    logger, msg, then the call's fields (``extra=fields(...)``), then the task's bound ones
    (``log_context``; a call's field of the same name wins), then exc and stack."""
    record: logging.LogRecord = ed["_record"]
    out: EventDict = {
        "ts": _timestamp(record),
        "level": record.levelname,
        "logger": record.name,
        "msg": _message(ed["event"], ed.get("positional_args")),
    }
    given = getattr(record, FIELDS_ATTR, None)
    if isinstance(given, Mapping):
        for key, value in given.items():
            name = str(key)
            # A field may not overwrite the envelope: "msg" becomes "msg_".
            out[f"{name}_" if name in _RESERVED else name] = value
    for name, value in bound_fields():
        out.setdefault(f"{name}_" if name in _RESERVED else name, value)
    exc_info = ed.get("exc_info")
    if exc_info and exc_info[0] is not None:
        out["exc"] = _STDLIB.formatException(exc_info)
    elif record.exc_text:
        out["exc"] = record.exc_text
    if record.stack_info:
        out["stack"] = _STDLIB.formatStack(record.stack_info)
    return out


def _json_dumps(ed: EventDict, **_kw: object) -> str:
    try:
        line = orjson.dumps(ed, default=str).decode()
    except (TypeError, orjson.JSONEncodeError):
        # e.g. an int beyond 64 bits, which orjson refuses without consulting ``default``.
        safe = {k: v if isinstance(v, str) else str(v) for k, v in ed.items()}
        line = orjson.dumps(safe).decode()
    # JSON escapes C0 controls itself; DEL and C1 (U+009B is a terminal's CSI) it may leave.
    return line.translate(_JSON_C1)


# Control characters (C0, DEL, C1) written as escapes: upstream texts and client input reach log
# lines, and a raw ESC would let them drive the terminal of whoever reads the log (colours,
# cursor moves, erasing earlier lines); a raw CR or LF would forge a line.
_CONTROLS: Final = {
    **{c: f"\\x{c:02x}" for c in (*range(0x20), *range(0x7F, 0xA0))},
    ord("\\"): "\\\\",
    ord("\n"): "\\n",
    ord("\r"): "\\r",
    ord("\t"): "\\t",
}
_NEEDS_QUOTES: Final = frozenset(' "=') | frozenset(map(chr, _CONTROLS))
_JSON_C1: Final = {c: f"\\u{c:04x}" for c in range(0x7F, 0xA0)}


def _text_value(value: object) -> str:
    text = value if isinstance(value, str) else str(value)
    if text and _NEEDS_QUOTES.isdisjoint(text) and text.isprintable():
        return text
    # Quoted, with every control character escaped: the value can neither make the line
    # ambiguous nor split it nor reach a terminal raw.
    return '"' + text.translate(_CONTROLS).replace('"', '\\"') + '"'


def _render_text(_logger: object, _method: str, ed: EventDict) -> str:
    """structlog renderer: ``TS LEVEL LOGGER msg key=value ...`` on one line (exc and stack
    are fields like the others, quoted)."""
    parts = [
        str(ed.pop("ts")),
        str(ed.pop("level")),
        str(ed.pop("logger")),
        # The message: every control character (newlines included) escaped.
        str(ed.pop("msg")).translate(_CONTROLS),
    ]
    parts.extend(f"{k}={_text_value(v)}" for k, v in ed.items())
    return " ".join(parts)


def _formatter(fmt: LogFormat) -> logging.Formatter:
    """The stdlib formatter of *fmt*: structlog's :class:`~structlog.stdlib.ProcessorFormatter`
    running :func:`_envelope`, then the renderer."""
    renderer: Any
    if fmt == "json":
        renderer = structlog.processors.JSONRenderer(serializer=_json_dumps)
    elif fmt == "text":
        renderer = _render_text
    else:
        raise ValueError(f"unknown log format {fmt!r}; expected 'json' or 'text'")
    return structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[_envelope],
        processors=[renderer],
        # The message is formatted by _envelope (bad %-arguments must not raise).
        use_get_message=False,
        pass_foreign_args=True,
    )


def _unicode_escape(ch: str) -> str:
    code = ord(ch)
    if code < 0x10000:
        return f"\\u{code:04x}"
    # Beyond the BMP (tag characters U+E0001..., private use): a UTF-16 surrogate pair, the
    # only way JSON can escape it; the text format writes the same.
    code -= 0x10000
    return f"\\u{0xD800 + (code >> 10):04x}\\u{0xDC00 + (code & 0x3FF):04x}"


def escape_nonprinting(line: str) -> str:
    """*line* with every character :meth:`str.isprintable` refuses written as ``\\uXXXX``.

    Runs on every rendered line, after redaction: an ASCII line (nearly all) costs one
    ``str.isascii`` (its control characters are escaped by the formatters already).
    """
    if line.isascii() or line.isprintable():
        return line
    return "".join(ch if ch.isprintable() else _unicode_escape(ch) for ch in line)


class SecretRedactor:
    """Replaces every known secret value in a string with ``<redacted>``.

    ``source`` is called on every :meth:`refresh`; values it returned recently (up to
    *remember*) stay known after they disappear from it, so a token rotated a moment ago is
    still covered. Both the raw value and its JSON-escaped form are replaced, each however
    spelled (:class:`~gateway.config.SecretMatcher`).
    """

    def __init__(
        self, source: SecretsSource | None, *, remember: int = DEFAULT_REMEMBERED_SECRETS
    ) -> None:
        self._source = source
        self._remember = remember
        self._known: list[str] = []  # most recent first
        self._matcher = SecretMatcher(())

    def refresh(self) -> None:
        if self._source is None:
            return
        try:
            current = [s.reveal() if isinstance(s, Secret) else str(s) for s in self._source()]
        except Exception:
            # A token file mid-rotation or missing: keep redacting what we already know.
            return
        self._learn(current)

    def adopt(self, other: SecretRedactor) -> None:
        """Keep redacting what *other* knew (used when logging is reconfigured on reload)."""
        self._learn(reversed(other._known))

    def _learn(self, current: Iterable[str]) -> None:
        known = list(self._known)
        for value in current:
            if len(value) < MIN_SECRET_LENGTH:
                continue
            if value in known:
                known.remove(value)
            known.insert(0, value)
        known = known[: self._remember]
        if known != self._known:
            self._known = known
            patterns: set[str] = set()
            for value in known:
                patterns.add(value)
                patterns.add(orjson.dumps(value).decode()[1:-1])
            self._matcher = SecretMatcher(patterns)

    def __call__(self, text: str) -> str:
        return self._matcher.redact(text)


class GatewayLogHandler(logging.StreamHandler[TextIO]):
    """The handler :func:`configure_logging` installs: one redacted line per record, with its
    syslog priority prefix (``<4>``) when *journal* is set."""

    def __init__(self, stream: TextIO, redactor: SecretRedactor, *, journal: bool) -> None:
        super().__init__(stream)
        self.redactor = redactor
        self.journal = journal

    def format(self, record: logging.LogRecord) -> str:
        self.redactor.refresh()
        try:
            line = super().format(record)
        except Exception as exc:
            line = (
                f"{_timestamp(record)} ERROR gateway.logging cannot render a record from "
                f"{record.name}: {type(exc).__name__}"
            )
        line = escape_nonprinting(self.redactor(line))
        if self.journal:
            return f"<{journal_priority(record.levelno)}>{line}"
        return line

    def handleError(self, record: logging.LogRecord) -> None:
        # The stdlib version prints the record's message and arguments to stderr: a leak path.
        if not logging.raiseExceptions:
            return
        exc = sys.exc_info()[1]
        note = f"logging error in {record.name}: {type(exc).__name__}: {exc}\n"
        if self.journal:
            note = f"<{journal_priority(logging.ERROR)}>{note}"
        try:
            if sys.__stderr__ is not None:
                sys.__stderr__.write(escape_nonprinting(self.redactor(note)))
        except Exception:
            pass  # nowhere left to report to


def configure_logging(
    *,
    fmt: LogFormat,
    level: str,
    stream: TextIO | None = None,
    secrets: SecretsSource | None = None,
    journal: bool | None = None,
) -> None:
    """Send all logging to *stream* (default: ``sys.stderr`` at call time), one line per event.

    *level* is a name (``debug``, ``info``, ``warning``, ``error``, ``critical``; any case).
    Calling again replaces the handler installed before (no duplicates) and keeps redacting the
    secrets it knew; handlers installed by others are left alone. *secrets* is called for every
    record, so it should be cheap (reading a small token file is). Captures ``warnings`` into
    logging. *journal*: prefix each line with its syslog priority (``<4>``) for journald;
    None (the default) does so when *stream* is the journal stream ``$JOURNAL_STREAM`` names.
    Raises ValueError for an unknown *fmt* or *level*.
    """
    try:
        numeric = _LEVELS[level.lower()]
    except KeyError:
        raise ValueError(
            f"unknown log level {level!r}; expected one of {', '.join(_LEVELS)}"
        ) from None
    formatter = _formatter(fmt)
    redactor = SecretRedactor(secrets)
    out = sys.stderr if stream is None else stream
    if journal is None:
        journal = writes_to_journal(out)
    handler = GatewayLogHandler(out, redactor, journal=journal)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, GatewayLogHandler)]:
        # A token rotated before this reconfiguration stays redacted after it.
        redactor.adopt(old.redactor)
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(numeric)
    # Warnings (deprecations from libraries) go through the same handler, in the same format.
    logging.captureWarnings(True)
