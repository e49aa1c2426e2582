"""Shards over HTTP(S) with limits: a connect timeout, a stall timeout (seconds without a byte)
and a bounded number of retries, so a server that stalls, resets or errors costs that shard (it
is counted like a damaged one), never a hung run. webdataset's own reader runs curl with no
overall limit and 30 retries 2 s apart per shard. `requests` gives the two timeouts directly
(`timeout=(connect, read)`, the read one per socket read)."""

from __future__ import annotations

import io
import time
from typing import Optional

import requests

from lit_restore.config.data import NetworkConfig

# Statuses worth another try: the server or a proxy is busy or restarting.
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
MAX_BACKOFF_S = 30.0


class ShardUnreachable(OSError):
    """An HTTP(S) shard that could not be read: its status, the timeout or the connection error."""


def is_http(url: str) -> bool:
    return url.startswith(("http://", "https://"))


def _why(e: requests.RequestException, net: NetworkConfig) -> str:
    if isinstance(e, requests.ConnectTimeout):
        return f"no connection within {net.connect_timeout:g} s (data.network.connect_timeout)"
    if isinstance(e, requests.ReadTimeout):
        return f"no response within {net.stall_timeout:g} s (data.network.stall_timeout)"
    return f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"


class _Body(io.RawIOBase):
    """The response body as a raw stream whose failures are `ShardUnreachable` with a short reason."""

    def __init__(self, response: requests.Response, net: NetworkConfig) -> None:
        self.response, self.net = response, net

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        try:
            data = self.response.raw.read(len(buffer), decode_content=True)
        except Exception as e:  # urllib3's read timeout, reset or protocol error
            stalled = "timed out" in str(e).lower()
            raise ShardUnreachable(f"no byte for {self.net.stall_timeout:g} s (data.network.stall_timeout)" if stalled
                                   else f"connection lost mid-shard ({type(e).__name__})") from None
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        self.response.close()
        super().close()


def open_http(url: str, net: NetworkConfig) -> io.BufferedReader:
    """A readable stream of `url`'s body. Refused connections, timeouts before the headers and
    the statuses of RETRY_STATUSES are tried `net.retries` more times, waiting 1, 2, 4, ... s;
    other 4xx statuses fail at once. Raises `ShardUnreachable`."""
    last: Optional[str] = None
    for attempt in range(net.retries + 1):
        if attempt:
            time.sleep(min(2.0 ** (attempt - 1), MAX_BACKOFF_S))
        try:
            response = requests.get(url, stream=True, timeout=(net.connect_timeout, net.stall_timeout))
        except requests.RequestException as e:
            last = _why(e, net)
            continue
        if response.status_code < 400:
            return io.BufferedReader(_Body(response, net), buffer_size=1 << 16)
        response.close()
        last = f"HTTP {response.status_code} {response.reason}"
        if response.status_code not in RETRY_STATUSES:
            raise ShardUnreachable(last)
    tries = f" ({net.retries + 1} tries, data.network.retries={net.retries})" if net.retries else ""
    raise ShardUnreachable(f"{last}{tries}")
