"""HTTP content codings for the tests, from the libraries themselves (not gptload's)."""

from __future__ import annotations

import gzip
import zlib

import brotli
from backports import zstd

CODINGS = ("gzip", "deflate", "br", "zstd")


def compress(body: bytes, coding: str) -> bytes:
    if coding == "gzip":
        return gzip.compress(body)
    if coding == "deflate":
        return zlib.compress(body)
    if coding == "br":
        return bytes(brotli.compress(body))
    return zstd.compress(body)


def decompress(body: bytes, coding: str) -> bytes:
    if coding == "gzip":
        return gzip.decompress(body)
    if coding == "deflate":
        return zlib.decompress(body)
    if coding == "br":
        return bytes(brotli.decompress(body))
    return zstd.decompress(body)
