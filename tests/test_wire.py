"""The WebSocket speed-ups of transfer/wire.py: the C masker gives wsproto's exact bytes, an
installed process masks and unmasks real frames with it, and a sped-up TLS stream hands out
many records per receive without losing a byte or the end of the stream."""

from __future__ import annotations

import os
import random
import ssl

import trio
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


TLS_RECORD_BYTES = 16 * 1024  # the most plaintext one TLS record carries


async def _receive_through_sped_up_tls(tls_files, client_ssl, payload: bytes):
    """Send `payload` over a real TCP socket and TLS, receive it through `speed_up_tls`
    until the sender's close; return what arrived and the size of each receive."""
    certfile, keyfile = tls_files
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(certfile, keyfile)
    received, sizes = bytearray(), []
    with trio.fail_after(20):
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listeners[0].socket.getsockname()[1]

        async def send() -> None:
            stream = await trio.open_ssl_over_tcp_stream("127.0.0.1", port,
                                                         ssl_context=client_ssl,
                                                         https_compatible=True)
            await stream.send_all(payload)
            await stream.aclose()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(send)
            raw = await listeners[0].accept()
            stream = wire.speed_up_tls(trio.SSLStream(raw, server_context, server_side=True,
                                                      https_compatible=True))
            while data := await stream.receive_some(wire.WS_RECEIVE_BYTES):
                sizes.append(len(data))
                received += data
            await stream.aclose()
        await listeners[0].aclose()
    return bytes(received), sizes


async def test_a_sped_up_tls_stream_returns_many_records_per_receive_and_still_ends(
        tls_files, client_ssl):
    """The receiver gets the sender's bytes unchanged, in pieces larger than one TLS record,
    and sees the end of the stream when the sender closes."""
    payload = os.urandom(4 * 1024 * 1024 + 5)
    received, sizes = await _receive_through_sped_up_tls(tls_files, client_ssl, payload)
    assert received == payload
    assert max(sizes) > TLS_RECORD_BYTES
    assert max(sizes) <= wire.WS_RECEIVE_BYTES


async def test_without_trios_tls_object_receives_take_the_public_path_unchanged(
        tls_files, client_ssl, monkeypatch):
    """A trio that keeps its ssl.SSLObject under another name (simulated by looking for a
    name no SSLStream has): the speed-up leaves receives to trio, one record each, and the
    bytes and the end of the stream arrive as before."""
    monkeypatch.setattr(wire, "_TRIO_TLS_OBJECT_ATTRIBUTE", "_no_such_attribute")
    payload = os.urandom(1024 * 1024 + 5)
    received, sizes = await _receive_through_sped_up_tls(tls_files, client_ssl, payload)
    assert received == payload
    assert max(sizes) <= TLS_RECORD_BYTES
