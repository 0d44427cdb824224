"""Reads a response as it streams past, without holding it back: its token usage and,
for event streams, whether the answer's last event came.

The bytes sent on are the upstream's own, compressed or not; a decoded copy (gzip,
deflate, br, zstd) is what gets read. SSE responses are scanned event by event, and only
events that mention usage or look like the provider's last event are parsed; other
bodies are kept whole up to a bound and parsed at the end, or past the bound searched
from their tail. When gptload asked OpenAI for the usage chunk on the client's behalf
(`stream_options.include_usage`), that chunk is taken out again (the upstream is then
asked for an uncompressed answer, so that events can be cut out).
"""

from __future__ import annotations

import json
import re
import zlib
from collections.abc import Callable
from typing import Any

import orjson

from gptload.lib.providers.base import Provider, Usage

WHOLE_BODY_LIMIT = 1 << 20
TAIL = 64 << 10
EVENT_END = re.compile(rb"\r?\n\r?\n")
USAGE_FIELDS = (b'"usageMetadata"', b'"usage"')
# A usage object, not OpenAI's `"usage":null` that every chunk carries once it is asked for.
HAS_USAGE = re.compile(rb'"usage(?:Metadata)?"\s*:\s*\{')
_decoder = json.JSONDecoder()


def decoder_for(encoding: str) -> Callable[[bytes], bytes] | None:
    """An incremental decoder for a `Content-Encoding`; None for identity or one unknown."""
    encoding = encoding.strip().lower()
    if encoding in ("gzip", "x-gzip", "deflate"):
        # 47: zlib or gzip header, detected; "deflate" is zlib-wrapped in HTTP (RFC 9110).
        return zlib.decompressobj(47).decompress
    if encoding == "br":
        import brotli

        return brotli.Decompressor().process
    if encoding == "zstd":
        from backports import zstd

        return zstd.ZstdDecompressor().decompress
    return None


def decode_whole(body: bytes, encoding: str) -> bytes | None:
    """`body` decoded, for reading only (None: an encoding or a body we cannot read)."""
    if not encoding or encoding == "identity":
        return body
    decode = decoder_for(encoding)
    if decode is None:
        return None
    try:
        return decode(body)
    except Exception:  # a corrupt body stays the client's to judge
        return None


class UsageTap:
    def __init__(self, provider: Provider, sse: bool, encoding: str, strip: bool) -> None:
        self.provider = provider
        self.sse = sse
        encoding = encoding.strip().lower()
        plain = encoding in ("", "identity")
        self.strip = strip and sse and plain
        self.usage: Usage | None = None
        self.terminal = False  # the provider's last event has gone by (SSE only)
        self.pending = b""
        self.parts: list[bytes] | None = None if sse else []
        self.size = 0
        self.decode = None if plain else decoder_for(encoding)
        self.readable = plain or self.decode is not None

    def feed(self, chunk: bytes) -> bytes:
        """Notes what `chunk` tells; returns the bytes to send on."""
        if not self.readable:
            return chunk
        plain = chunk
        if self.decode is not None:
            try:
                plain = self.decode(chunk)
            except Exception:  # corrupt: pass it on untouched, read no more
                self.readable = False
                return chunk
        if not self.sse:
            self._keep(plain)
            return chunk
        data = self.pending + plain if self.pending else plain
        end = last_event_end(data)
        if end < 0:
            self.pending = data if len(data) <= WHOLE_BODY_LIMIT else b""
            return b"" if self.strip else chunk
        if end == len(data):
            events, self.pending = data, b""
        else:
            events, self.pending = data[:end], data[end:]
        events = self._scan(events)
        return events if self.strip else chunk

    def finish(self) -> bytes:
        """End of the body: the usage found at the end, and any bytes still held."""
        if self.sse:
            rest, self.pending = self.pending, b""
            if rest.strip() and self.readable:
                rest = self._scan(rest)
            return rest if self.strip else b""
        if not self.readable:
            return b""
        if self.parts is not None:
            body = b"".join(self.parts)
            try:
                self._note(orjson.loads(body))
            except orjson.JSONDecodeError:
                self._note_tail(body)
        else:
            self._note_tail(self.pending)
        return b""

    def body_text(self) -> bytes:
        """What was read of a non-stream body (decoded), for its error message."""
        if self.parts is not None:
            return b"".join(self.parts)
        return self.pending

    def _keep(self, plain: bytes) -> None:
        self.size += len(plain)
        if self.parts is not None:
            self.parts.append(plain)
            if self.size > WHOLE_BODY_LIMIT:
                self.pending, self.parts = b"".join(self.parts)[-TAIL:], None
        else:
            self.pending = (self.pending + plain)[-TAIL:]

    def _scan(self, events: bytes) -> bytes:
        """Reads the events that matter in `events` (whole events): those with a usage
        object, and the provider's last one. The others are never split or parsed."""
        dropped: list[tuple[int, int]] = []
        after = 0
        for match in HAS_USAGE.finditer(events):
            if match.start() < after:
                continue  # the event already read
            start, after = event_bounds(events, match.start())
            payload = parse_data(events[start:after])
            self._note(payload)
            if self.strip and _is_usage_chunk(payload):
                dropped.append((start, after))
        if not self.terminal:
            for mark in self.provider.terminal_marks:
                at = events.rfind(mark)
                if at >= 0:
                    start, end = event_bounds(events, at)
                    event = events[start:end]
                    if self.provider.is_terminal(event_data(event), parse_data(event)):
                        self.terminal = True
                        break
        if not dropped:
            return events
        kept, position = [], 0
        for start, end in dropped:
            kept.append(events[position:start])
            position = end
        kept.append(events[position:])
        return b"".join(kept)

    def _note(self, payload: Any) -> None:
        if isinstance(payload, list):  # Gemini's streamed JSON array: usage so far per item
            for item in payload:
                self._note(item)
            return
        found = self.provider.usage_of(payload)
        if found is None:
            return
        if self.usage is None:
            self.usage = found
            return
        if found.prompt_tokens is not None:
            self.usage.prompt_tokens = found.prompt_tokens
        if found.completion_tokens is not None:
            self.usage.completion_tokens = found.completion_tokens

    def _note_tail(self, tail: bytes) -> None:
        """A body too big (or not JSON) to parse whole: the last usage object in its tail."""
        text = tail.decode(errors="replace")
        for field in USAGE_FIELDS:
            at = text.rfind(field.decode())
            if at < 0:
                continue
            colon = text.find(":", at + len(field))
            start = colon + 1
            while start < len(text) and text[start] in " \t\r\n":
                start += 1
            try:
                value, _ = _decoder.raw_decode(text, start)
            except ValueError:
                continue
            self._note({field.decode().strip('"'): value})
            return


def last_event_end(data: bytes) -> int:
    """Where the last whole event in `data` ends (after its blank line), or -1."""
    if data.endswith(b"\n\n"):
        return len(data)
    lf = data.rfind(b"\n\n")
    if b"\r" not in data:
        return lf + 2 if lf >= 0 else -1
    crlf = data.rfind(b"\n\r\n")
    return max(lf + 2 if lf >= 0 else -1, crlf + 3 if crlf >= 0 else -1)


def event_bounds(events: bytes, at: int) -> tuple[int, int]:
    """The span of the event around position `at` (its blank line included)."""
    if b"\r" not in events:  # LF line ends, as every provider sends them
        before = events.rfind(b"\n\n", 0, at)
        after = events.find(b"\n\n", at)
        return before + 2 if before >= 0 else 0, after + 2 if after >= 0 else len(events)
    before = max(events.rfind(b"\n\n", 0, at), events.rfind(b"\n\r\n", 0, at))
    start = (
        0
        if before < 0
        else (before + 2 if events[before + 1 : before + 2] == b"\n" else before + 3)
    )
    end = EVENT_END.search(events, at)
    return start, end.end() if end else len(events)


def event_data(event: bytes) -> bytes:
    """The `data:` of one SSE event (its lines joined)."""
    return b"".join(line[5:].strip() for line in event.splitlines() if line.startswith(b"data:"))


def parse_data(event: bytes) -> Any:
    data = event_data(event)
    if data[:1] not in (b"{", b"["):
        return None
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return None


def _is_usage_chunk(payload: Any) -> bool:
    return (
        isinstance(payload, dict)
        and payload.get("choices") == []
        and isinstance(payload.get("usage"), dict)
    )
