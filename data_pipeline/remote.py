"""Opening a shard by URL: local paths as files, `pipe:` commands and http(s) URLs through
WebDataset's own `gopen` handlers, with retries.

A remote shard is a forward-only byte stream. Reading it from byte `start` (a resumed cursor or a
buffered sample) re-opens the URL and skips `start` bytes. A failed read (the handler's process
exits non-zero, e.g. curl on a refused connection or an HTTP error) re-opens the URL at the
current position after a backoff of `backoff * 2**attempt` seconds; after the last attempt the
error names the URL and the reason.

See docs/methods.md, 'Data: remote shards'.
"""

from __future__ import annotations

import io
import re
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

CHUNK = 1 << 20
CURL_REASONS = {
    6: "could not resolve the host",
    7: "could not connect to the server",
    22: "the server answered with an HTTP error (4xx/5xx)",
    28: "the transfer timed out",
}


@dataclass(frozen=True, kw_only=True)
class Retry:
    attempts: int
    """Re-opens of a remote shard after a failed read before giving up."""
    backoff: float
    """Seconds before the first re-open; doubled for each further one."""


ONCE = Retry(attempts=0, backoff=0.0)


def is_remote(url: str) -> bool:
    """True for 'pipe:...' commands and scheme URLs such as 'http://...' (not local paths)."""
    return url.startswith("pipe:") or len(urlparse(url).scheme) > 1


def _reason(error: BaseException) -> str:
    found = re.search(r"exit (\d+)", str(error))
    status = int(found.group(1)) if found else None
    if status in CURL_REASONS:
        return f"{CURL_REASONS[status]} (exit status {status})"
    if status is not None:
        return f"the reading command exited with status {status}"
    return str(error) or type(error).__name__


class RemoteShard(io.RawIOBase):
    """Read-only, forward-only stream of a remote shard from byte `start`, re-opened on failure."""

    def __init__(self, url: str, start: int, retry: Retry) -> None:
        super().__init__()
        self.url, self.position, self.retry = url, start, retry
        self._stream: Any = None
        self._ended = False

    def readable(self) -> bool:
        return True

    def _open(self) -> Any:
        from webdataset.gopen import gopen  # imports torch: only when a remote shard is read

        stream = gopen(self.url, "rb")
        left = self.position
        while left:
            skipped = stream.read(min(left, CHUNK))
            if not skipped:
                stream.close()
                raise OSError(f"the shard ends before byte {self.position}")
            left -= len(skipped)
        return stream

    def _drop(self) -> None:
        stream, self._stream = self._stream, None
        try:
            if stream is not None:
                stream.close()
        except (OSError, ValueError):
            pass

    def _read_once(self, size: int) -> bytes:
        if self._stream is None:
            self._stream = self._open()
        data = self._stream.read(size)
        if len(data) < size:  # end of stream: closing checks the handler's exit status
            stream, self._stream = self._stream, None
            stream.close()
            self._ended = True
        return data

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            raise ValueError("RemoteShard.read needs a size")
        if self._ended:
            return b""
        attempt = 0
        while True:
            try:
                data = self._read_once(size)
            except (OSError, ValueError) as error:
                self._drop()
                if attempt == self.retry.attempts:
                    raise OSError(
                        f"shard {self.url}: unreachable after {attempt + 1} attempts: {_reason(error)}"
                    ) from error
                time.sleep(self.retry.backoff * 2**attempt)
                attempt += 1
                continue
            self.position += len(data)
            return data

    def close(self) -> None:
        self._drop()
        super().close()


def open_shard(url: str, start: int, retry: Retry) -> io.RawIOBase | io.BufferedReader:
    """A binary stream of the shard at `url` positioned at byte `start`."""
    if not is_remote(url):
        handle = open(url, "rb")  # noqa: SIM115 (the caller closes it)
        handle.seek(start)
        return handle
    return RemoteShard(url, start, retry)
