"""Logging set-up: JSON and text line formats, level filtering, idempotence, secret redaction.

Rules: no sockets and no time (a throttle's clock is a list); every test writes into a StringIO
and restores the root logger's handlers, level and warnings capture afterwards (the
``root_restored`` fixture), so nothing leaks into other tests. The token under test is
``TEST_TOKEN``; a test fails if it shows up anywhere in the output.
"""

from __future__ import annotations

import io
import logging
import os
import re
import unicodedata
from pathlib import Path
from typing import Final

import orjson
import pytest
import trio

from gateway.config import Secret, SecretError
from gateway.logs import LogThrottle, fields, log_context, own_log_context
from gateway.service import GatewayLogHandler, SecretRedactor, configure_logging, writes_to_journal
from tests.conftest import TEST_TOKEN

TS = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z"
log = logging.getLogger("gateway.upstream")


pytestmark = pytest.mark.usefixtures("root_restored")


def lines(out: io.StringIO) -> list[str]:
    text = out.getvalue()
    assert text.endswith("\n")
    return text[:-1].split("\n")


def json_lines(out: io.StringIO) -> list[dict[str, object]]:
    return [orjson.loads(line) for line in lines(out)]


def test_json_line_fields() -> None:
    out = io.StringIO()
    configure_logging(fmt="json", level="info", stream=out)
    log.info("connected to %s", "upstream", extra=fields(feed="soccer", fixture="123", n=4))
    (rec,) = json_lines(out)
    assert set(rec) == {"ts", "level", "logger", "msg", "feed", "fixture", "n"}
    assert re.fullmatch(TS, str(rec["ts"]))
    assert rec["level"] == "INFO"
    assert rec["logger"] == "gateway.upstream"
    assert rec["msg"] == "connected to upstream"
    assert (rec["feed"], rec["fixture"], rec["n"]) == ("soccer", "123", 4)


def test_json_exception_is_one_string_on_one_line() -> None:
    out = io.StringIO()
    configure_logging(fmt="json", level="info", stream=out)
    try:
        raise ValueError("boom\nsecond line")
    except ValueError:
        log.exception("failed", extra=fields(msg="shadow", attempt=2))
    (rec,) = json_lines(out)
    assert rec["msg"] == "failed"
    assert rec["msg_"] == "shadow"  # a field cannot overwrite the envelope
    exc = rec["exc"]
    assert isinstance(exc, str)
    assert exc.startswith("Traceback") and "ValueError: boom\nsecond line" in exc


def test_json_survives_unserialisable_fields() -> None:
    out = io.StringIO()
    configure_logging(fmt="json", level="info", stream=out)
    log.info("odd", extra=fields(obj=object(), big=2**80, secret=Secret(TEST_TOKEN)))
    (rec,) = json_lines(out)
    assert str(rec["obj"]).startswith("<object object")
    assert rec["big"] == str(2**80)
    assert rec["secret"] == "Secret(<redacted>)"


def test_text_line_format() -> None:
    out = io.StringIO()
    configure_logging(fmt="text", level="info", stream=out)
    log.info("connected", extra=fields(feed="soccer", fixture="123"))
    log.warning("two\nlines", extra=fields(detail='has "quotes" and spaces', empty=""))
    first, second = lines(out)
    assert re.fullmatch(TS + r" INFO gateway\.upstream connected feed=soccer fixture=123", first)
    assert re.fullmatch(
        TS
        + r' WARNING gateway\.upstream two\\nlines detail="has \\"quotes\\" and spaces" empty=""',
        second,
    )


def test_text_exception_stays_on_one_line() -> None:
    out = io.StringIO()
    configure_logging(fmt="text", level="info", stream=out)
    try:
        raise RuntimeError("bad thing")
    except RuntimeError:
        log.exception("failed")
    (line,) = lines(out)
    assert re.fullmatch(TS + r' ERROR gateway\.upstream failed exc="Traceback.*"', line)
    assert "RuntimeError: bad thing" in line


def test_levels_filter() -> None:
    out = io.StringIO()
    configure_logging(fmt="json", level="WARNING", stream=out)
    log.debug("d")
    log.info("i")
    log.warning("w")
    log.error("e")
    assert [r["msg"] for r in json_lines(out)] == ["w", "e"]


@pytest.mark.parametrize(("fmt", "level"), [("json", "loud"), ("xml", "info")])
def test_bad_format_or_level_is_a_clear_error(fmt: str, level: str) -> None:
    with pytest.raises(ValueError, match=r"unknown log (level|format)"):
        configure_logging(fmt=fmt, level=level, stream=io.StringIO())  # type: ignore[arg-type]  # the point of the test


def test_idempotent_and_leaves_other_handlers_alone() -> None:
    root = logging.getLogger()
    other = logging.NullHandler()
    root.addHandler(other)
    first, second = io.StringIO(), io.StringIO()
    configure_logging(fmt="json", level="info", stream=first)
    configure_logging(fmt="text", level="info", stream=second)
    log.info("once")
    assert sum(isinstance(h, GatewayLogHandler) for h in root.handlers) == 1
    assert other in root.handlers
    assert first.getvalue() == ""
    assert len(lines(second)) == 1


@pytest.mark.parametrize("fmt", ["json", "text"])
def test_token_is_redacted_everywhere(fmt: str) -> None:
    out = io.StringIO()
    configure_logging(fmt=fmt, level="debug", stream=out, secrets=lambda: [TEST_TOKEN])  # type: ignore[arg-type]  # parametrized
    log.info(f"sending token {TEST_TOKEN}")
    log.info("sending %s", TEST_TOKEN)
    log.info("field", extra=fields(auth={"authToken": TEST_TOKEN}))
    try:
        raise ConnectionError(f"server rejected {TEST_TOKEN!r}")
    except ConnectionError:
        log.exception("upstream failed")
    text = out.getvalue()
    assert TEST_TOKEN not in text
    assert text.count("<redacted>") >= 4
    assert len(lines(out)) == 4


def test_rotated_token_is_covered_and_old_one_remembered() -> None:
    out = io.StringIO()
    current = ["old-token-aaaa"]
    configure_logging(fmt="text", level="info", stream=out, secrets=lambda: list(current))
    log.info("a old-token-aaaa")
    current[0] = "new-token-bbbb"
    log.info("b new-token-bbbb old-token-aaaa")
    text = out.getvalue()
    assert "token-aaaa" not in text and "token-bbbb" not in text
    assert text.count("<redacted>") == 3


def test_reconfiguring_keeps_redacting_known_secrets() -> None:
    out = io.StringIO()
    configure_logging(fmt="text", level="info", stream=out, secrets=lambda: ["old-token-aaaa"])
    log.info("warm-up")  # the redactor learns the token when a record is rendered
    configure_logging(fmt="text", level="info", stream=out, secrets=lambda: ["new-token-bbbb"])
    log.info("old-token-aaaa new-token-bbbb")
    assert out.getvalue().splitlines()[-1].endswith("<redacted> <redacted>")


def test_failing_secrets_source_keeps_logging_and_known_values() -> None:
    out = io.StringIO()
    fail = [False]

    def source() -> list[Secret]:
        if fail[0]:
            raise SecretError("cannot read token file '/x'")
        return [Secret(TEST_TOKEN)]

    configure_logging(fmt="json", level="info", stream=out, secrets=source)
    log.info("first %s", TEST_TOKEN)
    fail[0] = True
    log.info("second %s", TEST_TOKEN)
    assert TEST_TOKEN not in out.getvalue()
    assert [r["msg"] for r in json_lines(out)] == ["first <redacted>", "second <redacted>"]


def test_json_escaped_secret_is_redacted() -> None:
    token = 'we"ird\\tok\u00e9n'
    out = io.StringIO()
    configure_logging(fmt="json", level="info", stream=out, secrets=lambda: [token])
    log.info("x %s y", token)
    (rec,) = json_lines(out)
    assert rec["msg"] == "x <redacted> y"


def test_short_values_are_not_treated_as_secrets() -> None:
    redactor = SecretRedactor(lambda: ["", "ab", TEST_TOKEN])
    redactor.refresh()
    assert redactor(f"ab {TEST_TOKEN}") == "ab <redacted>"


def test_bad_log_arguments_never_raise_nor_print_arguments(
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = io.StringIO()
    configure_logging(fmt="json", level="info", stream=out)
    root = logging.getLogger()
    # pytest's own capture handlers re-raise formatting errors; only ours is under test here.
    root.handlers[:] = [h for h in root.handlers if isinstance(h, GatewayLogHandler)]
    log.info("count %d", "ARG-MARKER")
    (rec,) = json_lines(out)
    assert rec["msg"] == "count %d <unformattable log arguments: TypeError>"
    assert "ARG-MARKER" not in out.getvalue()
    assert "ARG-MARKER" not in capsys.readouterr().err


HOSTILE = "evil\x1b[2J\x1b[31mred\x07\x9b1m\x7fend\rforged line\nsecond"


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_control_characters_never_reach_the_line_raw(fmt: str) -> None:
    """Upstream text and client input reach log lines: ESC and friends must arrive escaped."""
    out = io.StringIO()
    configure_logging(fmt=fmt, level="info", stream=out)  # type: ignore[arg-type]
    log.warning("upstream said: %s", HOSTILE, extra=fields(detail=HOSTILE, plain="ok"))
    (line,) = lines(out)
    assert not any(ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 for c in line), repr(line)
    if fmt == "json":
        rec = orjson.loads(line)
        assert rec["msg"] == f"upstream said: {HOSTILE}" and rec["detail"] == HOSTILE
    else:
        assert "evil\\x1b[2J\\x1b[31mred\\x07\\x9b1m\\x7fend\\rforged line\\nsecond" in line
        assert 'detail="evil\\x1b[2J' in line and " plain=ok" in line


#: What :func:`spellings` returns, in order (test ids).
SPELLING_NAMES: Final = ("upper", "zwsp", "word-joiner", "soft-hyphen", "bom-swapcase", "fullwidth")


def spellings(token: str) -> list[str]:
    """*token* as a hostile upstream may quote it: same characters, other code points."""
    fullwidth = "".join(chr(ord(c) + 0xFEE0) if "!" <= c <= "~" else c for c in token)
    return [
        token.upper(),
        "\u200b".join(token),  # zero-width space
        "\u2060".join(token),  # word joiner
        "\u00ad".join(token),  # soft hyphen
        token[:5] + "\ufeff" + token[5:].swapcase(),  # BOM inside, mixed case
        fullwidth,
    ]


def unfold(text: str) -> str:
    """What a reader sees in *text*: format characters dropped, NFKC, case folded (written
    independently of the gateway's matcher, to check it)."""
    shown = "".join(c for c in text if unicodedata.category(c) != "Cf")
    return unicodedata.normalize("NFKC", shown).casefold()


@pytest.mark.parametrize("fmt", ["json", "text"])
def test_token_is_redacted_however_spelled(fmt: str) -> None:
    """An upstream quoting the token upper-cased or split by U+200B once put it in log lines."""
    out = io.StringIO()
    configure_logging(fmt=fmt, level="info", stream=out, secrets=lambda: [TEST_TOKEN])  # type: ignore[arg-type]  # parametrized
    for spelled in spellings(TEST_TOKEN):
        log.warning("refused: x %s y", spelled, extra=fields(detail=f"a {spelled}!"))
    text = out.getvalue()
    assert TEST_TOKEN.casefold() not in unfold(text)
    if fmt == "json":
        for rec in json_lines(out):
            # Exactly the token's characters went: the text around it is intact.
            assert rec["msg"] == "refused: x <redacted> y" and rec["detail"] == "a <redacted>!"
    else:
        for line in lines(out):
            assert line.endswith('refused: x <redacted> y detail="a <redacted>!"'), line


def test_secret_scrub_covers_every_spelling_and_only_the_token() -> None:
    secret = Secret(TEST_TOKEN)
    for spelled in spellings(TEST_TOKEN):
        assert secret.scrub(f"Supplied token {spelled}, try again") == (
            "Supplied token <redacted>, try again"
        )
    assert secret.scrub("nothing here \u200b") == "nothing here \u200b"
    # Overlapping and adjacent occurrences: each character of every occurrence is covered.
    assert Secret("abab").scrub("xABABABy ab\u200babz") == "x<redacted>y <redacted>z"
    assert Secret("ab").scrub("AB ab") == "AB ab"  # too short to be a token


UNICODE_HOSTILE = "a\u200bb\u2028forged\u2029line\u202eevil\ufeff\U000e0041\ue000\u00a0end"


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_nonprinting_characters_never_reach_the_line_raw(fmt: str) -> None:
    """U+200B, U+2028 (a line break to some readers), bidi overrides, tag characters: escaped,
    like the control characters."""
    out = io.StringIO()
    configure_logging(fmt=fmt, level="info", stream=out)  # type: ignore[arg-type]
    log.warning("upstream said: %s", UNICODE_HOSTILE, extra=fields(detail=UNICODE_HOSTILE))
    (line,) = lines(out)
    assert line.isprintable(), repr(line)
    if fmt == "json":
        rec = orjson.loads(line)
        assert rec["msg"] == f"upstream said: {UNICODE_HOSTILE}"
        assert rec["detail"] == UNICODE_HOSTILE
    else:
        escaped = (
            "a\\u200bb\\u2028forged\\u2029line\\u202eevil\\ufeff\\udb40\\udc41\\ue000\\u00a0end"
        )
        assert f"upstream said: {escaped} " in line
        assert f'detail="{escaped}"' in line


# -- fields bound to the task, journald priorities, suppressed counts ---------------------------


async def test_bound_fields_reach_the_line_and_the_tasks_started_there() -> None:
    out = io.StringIO()
    configure_logging(fmt="json", level="info", stream=out)

    async def child() -> None:
        log.info("child")

    with log_context(feed="tracking", fixture="fx-1"):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(child)
        log.info("call wins", extra=fields(fixture="fx-2", n=1))
        with own_log_context(subscriber="7"):
            log.info("own")
    log.info("after")
    recs = {str(r["msg"]): r for r in json_lines(out)}
    assert (recs["child"]["feed"], recs["child"]["fixture"]) == ("tracking", "fx-1")
    assert (recs["call wins"]["fixture"], recs["call wins"]["n"]) == ("fx-2", 1)
    assert "feed" not in recs["own"] and recs["own"]["subscriber"] == "7"
    assert set(recs["after"]) == {"ts", "level", "logger", "msg"}


def test_own_log_context_keeps_the_instance() -> None:
    out = io.StringIO()
    configure_logging(fmt="text", level="info", stream=out)
    with log_context(instance="a", subscriber="3"), own_log_context(feed="tracking"):
        log.info("x")
    (line,) = lines(out)
    assert line.endswith(" x feed=tracking instance=a"), line  # bound fields: by name


def test_journal_priority_prefix() -> None:
    out = io.StringIO()
    configure_logging(fmt="text", level="debug", stream=out, journal=True)
    for level in (logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR, logging.CRITICAL):
        log.log(level, "m")
    log.log(logging.WARNING + 5, "between")  # a custom level: the standard one below it
    assert [line[:3] for line in lines(out)] == ["<7>", "<6>", "<4>", "<3>", "<2>", "<4>"]
    assert re.fullmatch("<4>" + TS + r" WARNING gateway\.upstream m", lines(out)[2])


def test_journal_stream_is_detected_only_on_the_stream_it_names(tmp_path: Path) -> None:
    named, other = tmp_path / "journal", tmp_path / "other"
    with named.open("w") as journal, other.open("w") as elsewhere:
        st = os.fstat(journal.fileno())
        env = {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        assert writes_to_journal(journal, env)
        # Inherited by a process whose stderr was redirected: not the journal.
        assert not writes_to_journal(elsewhere, env)
        assert not writes_to_journal(journal, {})
        assert not writes_to_journal(journal, {"JOURNAL_STREAM": "junk"})
        assert not writes_to_journal(io.StringIO(), env)


def test_a_throttled_line_says_how_many_were_suppressed() -> None:
    out = io.StringIO()
    configure_logging(fmt="json", level="info", stream=out)
    now = [0.0]
    throttle = LogThrottle(log, interval=10.0, clock=lambda: now[0])
    for i in range(5):
        throttle.warning("refused %d", i, extra=fields(peer="p"))
    now[0] = 10.0
    throttle.warning("refused %d", 5, extra=fields(peer="q"))
    first, second = json_lines(out)
    assert "suppressed" not in first
    assert (second["msg"], second["peer"], second["suppressed"]) == ("refused 5", "q", 4)
