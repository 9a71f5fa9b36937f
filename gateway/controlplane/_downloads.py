"""Recording downloads: how many stream at once, and a response that ends its connection.

A download holds a connection, a file cursor and a disk reader for as long as the client takes
to read it, so their number is bounded: ``[api] max_downloads_per_client`` per client address
(more: 429) and ``[api] max_downloads`` overall (more: 503), both with ``Retry-After``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Final

import attrs
import trio
from starlette.exceptions import HTTPException
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from gateway.config import ApiSection

#: Seconds a refused download is told to wait (``Retry-After``).
DOWNLOAD_RETRY_AFTER: Final = 5
#: The limits a download can be refused by: the ``limit`` label of
#: ``dde_api_downloads_refused_total``.
DOWNLOAD_LIMITS: Final = ("client", "overall")


@attrs.define
class DownloadSlots:
    """Downloads in progress, per client address and overall; refusals counted per limit."""

    max_total: int
    max_per_client: int
    total: int = 0
    per_client: dict[str, int] = attrs.field(factory=dict)
    refused: dict[str, int] = attrs.field(factory=lambda: dict.fromkeys(DOWNLOAD_LIMITS, 0))

    @classmethod
    def for_config(cls, api: ApiSection) -> DownloadSlots:
        return cls(max_total=api.max_downloads, max_per_client=api.max_downloads_per_client)

    def acquire(self, client: str) -> None:
        """Take a slot for *client*, or raise the 429 / 503 :class:`HTTPException`."""
        held = self.per_client.get(client, 0)
        headers = {"retry-after": str(DOWNLOAD_RETRY_AFTER)}
        if held >= self.max_per_client:
            self.refused["client"] += 1
            raise HTTPException(
                429,
                f"{held} recording downloads of this client in progress "
                "([api] max_downloads_per_client)",
                headers=headers,
            )
        if self.total >= self.max_total:
            self.refused["overall"] += 1
            raise HTTPException(
                503, f"{self.total} recording downloads in progress ([api] max_downloads)", headers
            )
        self.per_client[client] = held + 1
        self.total += 1

    def release(self, client: str) -> None:
        held = self.per_client[client] - 1
        if held:
            self.per_client[client] = held
        else:
            del self.per_client[client]
        self.total -= 1


class DownloadResponse(StreamingResponse):
    """A streamed download that gives back its slot when done and ends its HTTP message so
    that hypercorn can end or reuse the connection.

    hypercorn (ASGI spec 2.1) ends the stream inside the app's final ``more_body=False`` send:
    it hands the app ``http.disconnect`` and then closes the connection (``Connection: close``)
    or starts the keep-alive idle timer, in the same call. Starlette's ``StreamingResponse``
    (for a server older than spec 2.4) cancels its sending task as soon as ``http.disconnect``
    arrives, which cut that call short at its next checkpoint: the connection stayed open with
    no idle timer, for ever. The final send is therefore shielded (it writes the last chunk's
    5 bytes; hypercorn's own writes are shielded anyway).
    """

    def __init__(self, chunks: AsyncIterator[bytes], slots: DownloadSlots, client: str) -> None:
        super().__init__(chunks, media_type="application/x-ndjson")
        self._slots = slots
        self._client = client

    async def stream_response(self, send: Send) -> None:
        await send(
            {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
        )
        async for chunk in self.body_iterator:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        with trio.CancelScope(shield=True):
            await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._slots.release(self._client)
