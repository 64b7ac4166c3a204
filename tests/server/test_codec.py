"""A batch message's chunks decoded together: the one-array paths give the same arrays as
decoding each chunk alone, and any chunk that is wrong is refused alone."""

import numpy as np

from lstm_stream.v1 import inference_pb2 as pb
from server.codec import decode_chunks, decode_steps
from server.errors import BadInput

WIDTH = 3


def packed(rows: np.ndarray) -> pb.SessionChunk:
    return pb.SessionChunk(session_id="s", packed_inputs=rows.astype("<f4").tobytes())


def rows(steps: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((steps, WIDTH)).astype(np.float32)


def test_chunks_of_one_length_and_of_mixed_lengths_decode_as_each_alone():
    for lengths in ([1] * 5, [2, 1, 4, 3], [3]):
        data = [rows(n, i) for i, n in enumerate(lengths)]
        decoded = decode_chunks([packed(d) for d in data], WIDTH, 8)
        for got, want in zip(decoded, data, strict=True):
            np.testing.assert_array_equal(got, want)
            np.testing.assert_array_equal(got, decode_steps((), WIDTH, 8, want.tobytes()))


def test_a_wrong_chunk_among_packed_ones_is_refused_alone():
    data = [rows(1, 0), rows(2, 1), rows(1, 2), rows(9, 3)]
    data[1][1, 2] = np.inf
    chunks = [packed(d) for d in data]
    chunks.append(pb.SessionChunk(session_id="s", packed_inputs=b"\0" * 5))
    chunks.append(pb.SessionChunk(session_id="s", inputs=[1.0] * WIDTH))
    chunks.append(pb.SessionChunk(session_id="s"))
    decoded = decode_chunks(chunks, WIDTH, 8)
    np.testing.assert_array_equal(decoded[0], data[0])
    np.testing.assert_array_equal(decoded[2], data[2])
    assert isinstance(decoded[1], BadInput) and "got inf at timestep 1, feature 2" in str(
        decoded[1]
    )
    assert isinstance(decoded[3], BadInput) and "at most max_chunk_steps=8" in str(decoded[3])
    assert isinstance(decoded[4], BadInput) and "multiple of 4 * input_size = 12 bytes" in str(
        decoded[4]
    )
    np.testing.assert_array_equal(decoded[5], np.ones((1, WIDTH), np.float32))
    assert decoded[6].shape == (0, WIDTH)


def test_nan_or_inf_in_a_message_of_packed_chunks_only_is_refused_alone():
    """Every chunk packed, whole rows, within the limit: the one-array path, which must check
    finiteness as the per-chunk path does. Equal lengths and mixed lengths take two branches."""
    for lengths in ([2, 2, 2], [1, 3, 2]):
        data = [rows(n, 10 + i) for i, n in enumerate(lengths)]
        data[1][-1, 0] = np.nan
        data[2][0, 1] = -np.inf
        decoded = decode_chunks([packed(d) for d in data], WIDTH, 8)
        np.testing.assert_array_equal(decoded[0], data[0])
        last = lengths[1] - 1
        assert isinstance(decoded[1], BadInput), lengths
        assert f"got nan at timestep {last}, feature 0" in str(decoded[1])
        assert isinstance(decoded[2], BadInput), lengths
        assert "got -inf at timestep 0, feature 1" in str(decoded[2])
