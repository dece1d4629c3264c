"""The converter's safetensors reader (``osum_jax.convert.sources.SafetensorsSource``) refuses what
``safetensors.safe_open`` refuses, each case with one line naming the file, and reads valid files exactly."""

from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import pytest
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from osum_jax.convert.sources import SafetensorsSource, SourceError


def _write(path, header, data: bytes, raw_header: bytes | None = None):
    text = raw_header if raw_header is not None else json.dumps(header).encode()
    path.write_bytes(len(text).to_bytes(8, "little") + text + data)
    return path


@pytest.fixture
def valid(tmp_path):
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    b = np.arange(4, dtype=np.int64)
    f = tmp_path / "ok.safetensors"
    save_file({"a": a, "b": b}, str(f), metadata={"format": "np"})
    raw = f.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + n]), raw[8 + n:], a, b


def test_a_valid_file_reads_back_exactly(tmp_path, valid):
    header, data, a, b = valid
    src = SafetensorsSource(_write(tmp_path / "m.safetensors", header, data))
    assert sorted(src.keys()) == ["a", "b"]
    np.testing.assert_array_equal(src.numpy("a"), a)
    np.testing.assert_array_equal(src.numpy("b"), b)
    np.testing.assert_array_equal(src.numpy("a", rows=slice(1, 2)), a[1:2])
    # bfloat16 (which numpy cannot save): written by hand, read as ml_dtypes.bfloat16 without rounding
    bf = np.array([1.5, -2.25, 3.0], dtype=ml_dtypes.bfloat16)
    f = _write(tmp_path / "bf.safetensors", {"w": {"dtype": "BF16", "shape": [3], "data_offsets": [0, 6]}},
               bf.tobytes())
    np.testing.assert_array_equal(SafetensorsSource(f).numpy("w"), bf)
    # a zero-size tensor between two others is fine
    f = _write(tmp_path / "z.safetensors", {"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                                            "e": {"dtype": "F32", "shape": [0, 3], "data_offsets": [4, 4]},
                                            "y": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8)
    assert SafetensorsSource(f).shape("e") == (0, 3)


def _cases(header, data):
    def edit(**entries):
        h = json.loads(json.dumps(header))
        for key, value in entries.items():
            name, field = key.split("__")
            h[name][field] = value
        return h

    a_end = header["a"]["data_offsets"][1]
    first = "a" if header["a"]["data_offsets"][0] == 0 else "b"
    second = "b" if first == "a" else "a"
    f_end = header[first]["data_offsets"][1]
    s_len = header[second]["data_offsets"][1] - header[second]["data_offsets"][0]
    return {
        "overlapping offsets": (edit(**{f"{second}__data_offsets": [f_end - 8, f_end - 8 + s_len]}), data,
                                None, "overlaps"),
        "negative offset (would read header bytes)": (edit(**{f"{first}__data_offsets": [-8, f_end - 8]}), data,
                                                      None, "non-negative"),
        "gap between tensors": (edit(**{f"{second}__data_offsets": [f_end + 8, f_end + 8 + s_len]}),
                                data + b"\0" * 8, None, "gap of 8 bytes"),
        "bytes after the last tensor": (header, data + b"\0" * 8, None, "after the last tensor"),
        "reversed offsets": (edit(a__data_offsets=[a_end, a_end - 24]), data, None, "needs"),
        "size does not match shape": (edit(a__shape=[2, 4]), data, None, "needs"),
        "truncated data": (header, data[:-4], None, "truncated"),
        "header not JSON": (None, data, b"{not json" + b" " * 40, "corrupt safetensors header"),
        "header not UTF-8": (None, data, json.dumps(header).encode()[:-1] + b"\xff}", "corrupt safetensors header"),
        "header is a list": (None, b"", b"[1, 2]", "not a JSON object"),
        "entry without shape": (edit(a__shape=None), data, None, "shape"),
        "float in shape": (edit(a__shape=[2, 3.0]), data, None, "non-negative integers"),
        "three offsets": (edit(a__data_offsets=[0, 24, 30]), data, None, "two non-negative integers"),
        "metadata not strings": ({**header, "__metadata__": {"x": 1}}, data, None, "__metadata__"),
        "entry not an object": ({**header, "a": [1, 2]}, data, None, "needs dtype, shape and data_offsets"),
    }


def test_malformed_files_are_one_line_errors_and_safetensors_refuses_them_too(tmp_path, valid):
    header, data, _, _ = valid
    for name, (h, d, raw, needle) in _cases(header, data).items():
        f = _write(tmp_path / (name.replace(" ", "_").replace("(", "").replace(")", "") + ".safetensors"), h, d, raw)
        with pytest.raises(SafetensorError):  # the reference refuses it
            with safe_open(str(f), framework="numpy"):
                pass
        with pytest.raises(SourceError) as e:
            SafetensorsSource(f)
        msg = str(e.value)
        assert str(f) in msg and needle in msg and "\n" not in msg, (name, msg)


def test_a_header_over_100_mb_is_refused_before_it_is_read(tmp_path):
    f = tmp_path / "big.safetensors"
    f.write_bytes((200_000_000).to_bytes(8, "little") + b"{}")
    with pytest.raises(SourceError, match="header of 200000000 bytes > the format's limit"):
        SafetensorsSource(f)
    with pytest.raises(SafetensorError, match="header too large"):
        with safe_open(str(f), framework="numpy"):
            pass
