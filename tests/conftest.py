"""Shared test rules and fixtures.

Rules for every test module here:
- Real sockets bind 127.0.0.1 port 0; nothing assumes a fixed port or a fast machine.
- Time-dependent logic (backoff, timeouts) is tested with ``trio.testing.MockClock
  (autojump_threshold=0)`` over memory streams only: with real sockets the autojump fires while
  the kernel is still moving bytes and produces false timeouts.
- Every test has a hard guard (pytest-timeout, see pyproject.toml) and real-socket tests add a
  ``trio.fail_after`` with generous room for a loaded 2-core machine.
- The upstream token used in tests is ``TEST_TOKEN``; the leak checks grep for it.
"""

from __future__ import annotations

from typing import Final

TEST_TOKEN: Final = "tok-SECRET-5f0c2e9a-never-log-me"
