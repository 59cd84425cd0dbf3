"""The WebSocket speed-ups of transfer/wire.py: the C masker gives wsproto's exact bytes, and
an installed process masks and unmasks real frames with it."""

from __future__ import annotations

import os
import random

import wsproto.frame_protocol as frame_protocol
from wsproto.frame_protocol import FrameProtocol, Opcode

from cfms_trio.transfer import wire

# wsproto's own masker, kept before `install` replaces the module attribute.
PYTHON_MASKER = frame_protocol.XorMaskerSimple
if PYTHON_MASKER is wire.FastXorMasker:  # installed by an earlier test in this process
    PYTHON_MASKER = None


def _reference_mask(key: bytes, pieces: list[bytes]) -> list[bytes]:
    """XOR every byte of the concatenated pieces with key[i % 4], split as the pieces were."""
    out, position = [], 0
    for piece in pieces:
        out.append(bytes(b ^ key[(position + i) % 4] for i, b in enumerate(piece)))
        position += len(piece)
    return out


def test_fast_masker_matches_the_xor_definition_across_pieces_of_any_length():
    rng = random.Random(15)
    for _ in range(200):
        key = rng.randbytes(4)
        pieces = [rng.randbytes(rng.choice([0, 1, 2, 3, 5, 7, 64, 4097])) for _ in range(5)]
        masker = wire.FastXorMasker(bytearray(key))
        got = [masker.process(piece) for piece in pieces]
        assert got == _reference_mask(key, pieces)
        assert all(type(piece) is bytearray for piece in got)
        if PYTHON_MASKER is not None:
            python = PYTHON_MASKER(bytearray(key))
            assert [python.process(bytearray(piece)) for piece in pieces] == got


def test_installed_masker_round_trips_a_large_client_frame_in_pieces():
    wire.install()
    wire.install()  # idempotent
    assert frame_protocol.XorMaskerSimple is wire.FastXorMasker
    payload = os.urandom(1024 * 1024 + 3)
    client = FrameProtocol(client=True, extensions=[])
    server = FrameProtocol(client=False, extensions=[])
    frame = bytes(client.send_data(payload, True))
    assert payload not in frame  # it really is masked on the wire
    received = bytearray()
    for start in range(0, len(frame), 16384):
        server.receive_bytes(frame[start:start + 16384])
        for item in server.received_frames():
            assert item.opcode in (Opcode.BINARY, Opcode.CONTINUATION)
            received += item.payload
    assert bytes(received) == payload
