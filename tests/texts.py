"""Test texts shared by the server tests."""

import itertools
from pathlib import Path

BOOK = Path(__file__).parent / "data" / "kjv_genesis_exodus.txt"  # plain ASCII: char offsets are byte offsets


def book(start: int, end: int) -> str:
    return BOOK.read_text()[start:end]


def byte_pieces(data: bytes, sizes=(1, 7, 333, 4097)) -> list[bytes]:
    """``data`` cut into consecutive pieces whose sizes cycle through ``sizes``."""
    pieces, pos = [], 0
    for size in itertools.cycle(sizes):
        if pos >= len(data):
            return pieces
        pieces.append(data[pos : pos + size])
        pos += size
