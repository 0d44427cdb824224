"""Content-coding for the fake provider: Accept-Encoding negotiation and compression.

Real providers compress what they answer whenever the client lets them, so a gateway in
front of them has to cope with br, zstd, gzip and deflate bodies, streams included. What
is known of each:

- OpenAI (api.openai.com) and Anthropic (api.anthropic.com) are behind Cloudflare, which
  prefers br, then gzip, and zstd first where a zone turns it on (Compression Rules);
  OpenAI has answered its JSON in br since late 2023, which broke more than one proxy.
  Cloudflare's default list of compressed types does not name text/event-stream, and it
  compresses error answers only for 403 and 404; but what the origin compressed itself
  passes through, and a gateway cannot tell which it will get.
- Google's front end (generativelanguage.googleapis.com), as far as known, answers gzip.

The fake offers every coding to every provider in one server preference order, br, zstd,
gzip, deflate (`CODINGS`), and compresses streams and every error too: the strictest of
the above, so a gateway that copes with it copes with each real one. `Behaviour.codings`
narrows the offer per key, e.g. `("gzip",)` for a Google-like upstream.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterable
from typing import Final, Literal, get_args

import brotli
from backports import zstd

__all__ = ["CODINGS", "Coding", "Encoder", "choose_coding", "encoder", "weights"]

Coding = Literal["br", "zstd", "gzip", "deflate"]
CODINGS: Final[tuple[Coding, ...]] = get_args(Coding)

# RFC 9110 §8.4.1.3: a recipient SHOULD treat x-gzip as gzip.
ALIASES: Final = {"x-gzip": "gzip"}

# Levels for dynamic content, as CDNs compress it: brotli's default quality (11) costs
# tens of milliseconds per answer, which would show in the standalone benchmark.
BROTLI_QUALITY: Final = 4
ZLIB_LEVEL: Final = 6
ZSTD_LEVEL: Final = 3


def weights(accept_encoding: str | None) -> dict[str, float]:
    """The q-value of each coding named in an Accept-Encoding header, by lower-cased name.

    A malformed or out-of-range q-value refuses its coding, and a coding named twice
    keeps its lower weight: neither can make the server send what the client refused.
    """
    found: dict[str, float] = {}
    for item in (accept_encoding or "").split(","):
        name, *params = (part.strip() for part in item.split(";"))
        name = ALIASES.get(name.lower(), name.lower())
        if not name:
            continue
        q = 1.0
        for param in params:
            key, _, value = param.partition("=")
            if key.strip().lower() == "q":
                try:
                    q = float(value.strip())
                except ValueError:
                    q = 0.0
                if math.isnan(q) or not 0 <= q <= 1:
                    q = 0.0
        found[name] = min(q, found.get(name, q))
    return found


def choose_coding(
    accept_encoding: str | None, offered: Iterable[Coding] = CODINGS
) -> Coding | None:
    """The first coding of `offered` that the client accepts; None: send it uncompressed.

    Like Cloudflare and most servers, the server's order decides among the codings the
    client accepts (q > 0); the client's q-values only refuse. No header, or only
    `identity`, means no compression: RFC 9110 allows any coding then, but no provider
    compresses for a client that did not ask.
    """
    accepted = weights(accept_encoding)
    wildcard = accepted.get("*", 0.0)
    for coding in offered:
        if accepted.get(coding, wildcard) > 0:
            return coding
    return None


class Encoder:
    """Compresses one body a piece at a time.

    `flush(data)` returns bytes that let a decoder produce everything given so far, so a
    stream event reaches the client when it is written, not when the compressor's buffer
    fills; `finish(data)` adds the coding's end (gzip trailer, last block, …).
    """

    coding: Coding

    def flush(self, data: bytes) -> bytes:
        raise NotImplementedError

    def finish(self, data: bytes = b"") -> bytes:
        raise NotImplementedError


class ZlibEncoder(Encoder):
    def __init__(self, coding: Literal["gzip", "deflate"]) -> None:
        self.coding = coding
        # HTTP's "deflate" is the zlib format (RFC 9110 §8.4.1.2), not raw deflate: wbits
        # 15 writes the zlib header and checksum, 16 + 15 the gzip ones.
        wbits = 16 + zlib.MAX_WBITS if coding == "gzip" else zlib.MAX_WBITS
        self._compressor = zlib.compressobj(ZLIB_LEVEL, zlib.DEFLATED, wbits)

    def flush(self, data: bytes) -> bytes:
        return self._compressor.compress(data) + self._compressor.flush(zlib.Z_SYNC_FLUSH)

    def finish(self, data: bytes = b"") -> bytes:
        return self._compressor.compress(data) + self._compressor.flush(zlib.Z_FINISH)


class BrotliEncoder(Encoder):
    coding: Coding = "br"

    def __init__(self) -> None:
        self._compressor = brotli.Compressor(mode=brotli.MODE_TEXT, quality=BROTLI_QUALITY)

    def flush(self, data: bytes) -> bytes:
        return bytes(self._compressor.process(data) + self._compressor.flush())

    def finish(self, data: bytes = b"") -> bytes:
        return bytes(self._compressor.process(data) + self._compressor.finish())


class ZstdEncoder(Encoder):
    coding: Coding = "zstd"

    def __init__(self) -> None:
        self._compressor = zstd.ZstdCompressor(level=ZSTD_LEVEL)

    def flush(self, data: bytes) -> bytes:
        return self._compressor.compress(data, zstd.ZstdCompressor.FLUSH_BLOCK)

    def finish(self, data: bytes = b"") -> bytes:
        return self._compressor.compress(data, zstd.ZstdCompressor.FLUSH_FRAME)


def encoder(coding: Coding) -> Encoder:
    """A fresh encoder for one body in `coding`."""
    if coding == "br":
        return BrotliEncoder()
    if coding == "zstd":
        return ZstdEncoder()
    return ZlibEncoder(coding)
