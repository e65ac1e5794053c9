"""Property tests of the agent protocol's frame decoding (kata_py/protocol/framing.py).

The host reads frames from an untrusted guest, the guest from the host: whatever the
bytes and however they are split, the three readers (FrameDecoder, the asyncio
read_frame, the blocking recv_frame) return JSON objects or raise FrameError/EOFError,
never buffer more than one capped frame, and everything they return can be encoded
again. Budget: tests/fuzz_budget.py (KATA_PY_FUZZ_EXAMPLES for a long run).
"""

from __future__ import annotations

import asyncio
import json

import pytest
from hypothesis import given, strategies as st

from kata_py.protocol import framing
from kata_py.protocol.framing import HEADER, FrameDecoder, FrameError
from tests.fuzz_budget import fuzz

# -- generators ---------------------------------------------------------------

json_scalars = st.one_of(
    st.none(), st.booleans(),
    st.integers(-(2**63), 2**64),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=40),
)
keys = st.text(max_size=8)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(keys, inner, max_size=4)),
    max_leaves=10,
)
messages = st.dictionaries(keys, json_values, max_size=5)

# Bytes a hostile peer might send: noise, JSON texts with a flipped/cut/inserted byte,
# the awkward corners of JSON as Python parses it.
nasty_bodies = st.sampled_from([
    b"", b"{", b"}", b"[]", b"null", b"1", b'"x"', b"{}", b'{"a":NaN}', b'{"a":Infinity}',
    b'{"a":-Infinity}', b'{"a":1e999}', b'{"a":-1e999}', b'{"a":"\\ud800"}', b'{"a":"\\udfff\\ud800"}',
    b'{"a":"\\u0000"}', b'{"a":' + b"9" * 5000 + b"}", b'{"a":' + b"[" * 5000 + b"]" * 5000 + b"}",
    b"\xef\xbb\xbf{}", b'{"a":"\xed\xa0\x80"}', b"\xc0\x80", b'{"a":1}{"b":2}', b'{"a":1,}',
    b'{"\xff":1}', b'{"a":"\\x41"}', b' {"a" : 1 } ',
])


@st.composite
def mutated_json(draw):
    text = bytearray(json.dumps(draw(json_values)).encode())
    for _ in range(draw(st.integers(0, 3))):
        kind = draw(st.sampled_from(["flip", "cut", "insert"]))
        pos = draw(st.integers(0, len(text)))
        if kind == "flip" and pos < len(text):
            text[pos] ^= draw(st.integers(1, 255))
        elif kind == "cut":
            del text[pos:]
        else:
            text[pos:pos] = draw(st.sampled_from([b"{", b"[", b'"', b"\\", b"\\u", b"\xff", b",", b"}"]))
    return bytes(text)


bodies = st.one_of(st.binary(max_size=200), mutated_json(), nasty_bodies)


def frame(body: bytes, claim: int | None = None) -> bytes:
    return HEADER.pack(len(body) if claim is None else claim) + body


@st.composite
def streams(draw):
    """A byte stream: frames whose bodies may be junk, headers that may lie, noise."""
    parts = []
    for _ in range(draw(st.integers(0, 5))):
        kind = draw(st.sampled_from(["good", "body", "lie", "noise"]))
        if kind == "good":
            parts.append(framing.encode_frame(draw(messages), max_frame=1 << 30))
        elif kind == "body":
            parts.append(frame(draw(bodies)))
        elif kind == "lie":
            body = draw(bodies)
            parts.append(frame(body, draw(st.integers(0, 2**32 - 1))))
        else:
            parts.append(draw(st.binary(max_size=12)))
    return b"".join(parts)


@st.composite
def split(draw, data: bytes):
    """`data` cut into pieces at arbitrary points (possibly inside the header)."""
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=8)))
    bounds = [0] + cuts + [len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:])]


# -- the three readers ---------------------------------------------------------

def via_decoder(chunks, max_frame):
    """Everything FrameDecoder yields, and the error that stopped it (or None)."""
    decoder = FrameDecoder(max_frame)
    out = []
    for chunk in list(chunks) + [b""]:     # the last, empty feed reports a held-back error
        try:
            out += decoder.feed(chunk)
        except FrameError as exc:
            with pytest.raises(FrameError):
                decoder.feed(b"{}")         # a broken stream stays broken
            return out, exc
        # Bounded memory: all it keeps is one incomplete frame of at most max_frame.
        assert decoder.pending < HEADER.size + max_frame
    return out, None


class ChunkSocket:
    """recv() hands out the given chunks, then EOF, as a peer socket would."""

    def __init__(self, chunks):
        self.data = bytearray(b"".join(chunks))
        self.sizes = [len(c) for c in chunks if c]

    def recv(self, n):
        size = min(n, self.sizes.pop(0) if self.sizes else len(self.data)) or len(self.data)
        out = bytes(self.data[:size])
        del self.data[:size]
        return out


def via_recv_frame(chunks, max_frame):
    sock = ChunkSocket(chunks)
    out = []
    while True:
        try:
            out.append(framing.recv_frame(sock, max_frame))
        except EOFError:
            return out, None
        except FrameError as exc:
            return out, exc


def via_read_frame(chunks, max_frame):
    async def go():
        reader = asyncio.StreamReader(limit=1 << 16)
        for chunk in chunks:
            reader.feed_data(chunk)
        reader.feed_eof()
        out = []
        while True:
            try:
                out.append(await framing.read_frame(reader, max_frame))
            except EOFError:
                return out, None
            except FrameError as exc:
                return out, exc
    return asyncio.run(go())


# -- properties -----------------------------------------------------------------

@fuzz(200)
@given(st.lists(messages, max_size=3), st.data())
def test_any_message_round_trips_through_every_reader(msgs, data):
    wire = b"".join(framing.encode_frame(m, max_frame=1 << 30) for m in msgs)
    chunks = data.draw(split(wire))
    max_frame = max([len(framing.encode_frame(m, max_frame=1 << 30)) for m in msgs] + [0])
    for read in (via_decoder, via_recv_frame, via_read_frame):
        out, err = read(chunks, max_frame)
        assert err is None and out == msgs, read.__name__


@fuzz(250)
@given(streams(), st.data(), st.one_of(st.integers(0, 400), st.just(framing.MAX_FRAME)))
def test_hostile_streams_yield_objects_or_frame_errors(wire, data, max_frame):
    chunks = data.draw(split(wire))
    results = []
    for read in (via_decoder, via_recv_frame, via_read_frame):
        out, err = read(chunks, max_frame)
        assert err is None or type(err) is FrameError
        for message in out:
            assert isinstance(message, dict)
            # Whatever was accepted can be sent on and reads back the same.
            again = framing.encode_frame(message, max_frame=1 << 30)
            assert framing.decode_body(again[HEADER.size:]) == message
        results.append((out, err is None))
    # All three agree: the same messages, and an error exactly when one of them sees one.
    assert results[0] == results[1] == results[2]


@fuzz(300)
@given(bodies)
def test_decode_body_only_raises_frame_error(body):
    try:
        message = framing.decode_body(body)
    except FrameError:
        return
    assert isinstance(message, dict)
    assert framing.decode_body(framing.encode_frame(message, max_frame=1 << 30)[HEADER.size:]) == message


@fuzz(100)
@given(st.integers(1, 200_000), st.sampled_from([b"[", b'{"a":', b"[{\"a\":"]))
def test_deep_nesting_is_a_frame_error(depth, opener):
    closer = {b"[": b"]", b'{"a":': b"}", b"[{\"a\":": b"}]"}[opener]
    body = b"{\"x\":" + opener * depth + b"1" + closer * depth + b"}"
    try:
        message = framing.decode_body(body)
    except FrameError:
        return
    assert isinstance(message, dict)


@fuzz(100)
@given(st.integers(1, 2**32 - 1), st.integers(0, 1 << 20))
def test_announced_length_is_checked_before_buffering(length, max_frame):
    decoder = FrameDecoder(max_frame)
    if length > max_frame:
        with pytest.raises(FrameError, match="limit"):
            decoder.feed(HEADER.pack(length) + b"x" * 16)
    else:
        assert decoder.feed(HEADER.pack(length)) == []
        assert decoder.pending == HEADER.size


# -- regressions found by the properties above ---------------------------------

@pytest.mark.parametrize("body, why", [
    (b'{"a":' + b"1" * 5000 + b"}", "more digits than int() takes: plain ValueError escaped"),
    (b'{"a":NaN}', "NaN is not JSON: accepted, then refused by the peer's encoder"),
    (b'{"a":1e999}', "overflows to inf: encoded again as the non-JSON Infinity"),
    (b'{"a":"\\ud800"}', "lone surrogate: accepted, then UnicodeEncodeError on the way out"),
])
def test_regression_decode_refuses_what_cannot_be_sent_on(body, why):
    with pytest.raises(FrameError):
        framing.decode_body(body)


def test_regression_agent_client_sees_a_frame_error_for_a_huge_integer():
    """A guest reply holding a 5000-digit id used to kill the host's reply reader with
    ValueError (outside the errors it handles), leaving every request to time out."""
    async def go():
        reader = asyncio.StreamReader()
        reader.feed_data(frame(b'{"id":' + b"7" * 5000 + b',"ok":true}'))
        with pytest.raises(FrameError):
            await framing.read_frame(reader)
    asyncio.run(go())


@pytest.mark.parametrize("message", [{"a": float("nan")}, {"a": float("inf")}, {"a": "\ud800"}])
def test_regression_encode_refuses_non_json_with_frame_error(message):
    with pytest.raises(FrameError):
        framing.encode_frame(message)


def test_regression_decoder_keeps_the_messages_before_a_bad_frame():
    """feed() used to raise at the bad frame and lose the good ones decoded before it
    in the same call."""
    decoder = FrameDecoder()
    assert decoder.feed(framing.encode_frame({"a": 1}) + frame(b"[1]")) == [{"a": 1}]
    with pytest.raises(FrameError, match="list"):
        decoder.feed(b"")
    with pytest.raises(FrameError):
        decoder.feed(framing.encode_frame({"b": 2}))


def test_surrogate_pairs_and_escapes_still_decode():
    assert framing.decode_body(b'{"a":"\\ud83d\\ude00\\u00e9\\n"}') == {"a": "\U0001F600\u00e9\n"}
    assert framing.decode_body(b'{"a":1.5e3,"b":-0.0}') == {"a": 1500.0, "b": -0.0}
