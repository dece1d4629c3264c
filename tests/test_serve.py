"""osum-serve started for real on a free localhost port with a tiny random package, called with a real HTTP
client: both endpoints, the error cases (4xx with a one-line message, server still healthy), long audio, dynamic
batching (concurrent requests decoded together give the same results as one by one) and backpressure (503)."""

import concurrent.futures
import io
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile as sf
from flax import nnx

from osum_jax.convert.torch_package import export_torch_package
from osum_jax.models import OSUM
from tests.corpus import train_tokenizer
from tests.helpers import tiny_model_config

CFG = tiny_model_config()
pytestmark = pytest.mark.e2e


def _wav(seconds: float, seed: int = 0, sr: int = 16000) -> bytes:
    buf = io.BytesIO()
    x = (0.1 * np.random.default_rng(seed).standard_normal(int(seconds * sr))).astype(np.float32)
    sf.write(buf, x, sr, format="WAV", subtype="PCM_16")
    return buf.getvalue()


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    tok = train_tokenizer(["transcribe the speech", "alpha bravo charlie"] * 4, root / "tok", vocab_size=300)
    export_torch_package(OSUM(CFG, rngs=nnx.Rngs(5)), CFG, root / "pkg", tokenizer_dir=tok, dtype="fp32",
                         progress=False)
    return root / "pkg"


class Server:
    def __init__(self, package, *args):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        env = dict(os.environ, JAX_PLATFORMS="cpu")
        self.proc = subprocess.Popen([str(Path(sys.executable).parent / "osum-serve"), str(package), "--device",
                                      "cpu", "--port", str(self.port), *args], env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.time() + 120
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(self.proc.stderr.read())
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        raise RuntimeError("osum-serve did not start")

    def close(self):
        self.proc.terminate()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def server(package):
    s = Server(package, "--max-wait-ms", "300", "--max-mb", "1", "--max-seconds", "70")
    yield s
    s.close()


def _understand(url, data: bytes, **fields):
    return httpx.post(url + "/v1/understand", files={"file": ("a.wav", data, "audio/wav")}, data=fields, timeout=120)


def test_endpoints(server):
    c = httpx.Client(base_url=server.url, timeout=120)
    m = c.get("/v1/models").json()["data"][0]
    assert m["device"] == "cpu" and m["dtype"] == "float32" and "<TRANSCRIBE>" in m["tasks"]
    r = _understand(server.url, _wav(1.2), task="<TRANSCRIBE><GENDER>", max_new_tokens="4")
    assert r.status_code == 200, r.text
    j = r.json()
    assert j["task"] == "<TRANSCRIBE> <GENDER>" and j["windows"] == 1 and isinstance(j["text"], str)
    assert {"transcript", "tags"} <= set(j)
    r = _understand(server.url, _wav(1.2), prompt="alpha bravo", max_new_tokens="3")
    assert r.status_code == 200 and r.json()["prompt"] == "alpha bravo"
    long = _understand(server.url, _wav(65.0, sr=8000), max_new_tokens="2").json()  # 30 s windows, under 1 MB
    assert long["windows"] == 3 and long["window_offsets"][1] > 0
    f = {"file": ("a.wav", _wav(1.0), "audio/wav")}
    assert c.post("/v1/audio/transcriptions", files=f).json().keys() == {"text"}
    assert c.post("/v1/audio/transcriptions", files=f, data={"response_format": "text"}).headers[
        "content-type"].startswith("text/plain")
    srt = c.post("/v1/audio/transcriptions", files=f, data={"response_format": "srt"}).text
    assert srt.startswith("1\n00:00:00,000 --> 00:00:01,000\n")
    vtt = c.post("/v1/audio/transcriptions", files=f, data={"response_format": "vtt"}).text
    assert vtt.startswith("WEBVTT\n\n00:00:00.000 --> 00:00:01.000\n")


@pytest.mark.parametrize("payload, fields, status, needle", [
    (b"this is not audio", {}, 400, "cannot decode"),
    (b"", {}, 400, "empty upload"),
    (None, {"task": "<NO_SUCH_TASK>"}, 400, "not in the package's prompt file"),
    (None, {"max_new_tokens": "many"}, 400, "max_new_tokens"),
    (None, {"decoding": "magic"}, 400, "decoding"),
    ("nan", {}, 400, "a.wav"),
    ("big", {}, 413, "upload larger"),
    ("truncated", {}, 400, "truncated WAV"),
])
def test_bad_input_is_a_4xx_and_the_server_keeps_serving(server, payload, fields, status, needle):
    if payload is None:
        payload = _wav(0.5)
    elif payload == "nan":
        buf = io.BytesIO()
        x = np.zeros(8000, np.float32)
        x[10] = np.nan
        sf.write(buf, x, 16000, format="WAV", subtype="FLOAT")
        payload = buf.getvalue()
    elif payload == "big":
        payload = _wav(40.0)  # 1.28 MB > --max-mb 1
    elif payload == "truncated":
        payload = _wav(2.0)[:20000]
    r = _understand(server.url, payload, **fields)
    assert r.status_code == status, r.text
    assert needle in r.json()["error"] and "\n" not in r.json()["error"]
    assert httpx.get(server.url + "/health").json()["status"] == "ok"


def test_concurrent_requests_are_batched_and_equal_one_by_one(server):
    waves = [_wav(0.6 + 0.2 * i, seed=i) for i in range(4)]
    one_by_one = [_understand(server.url, w, max_new_tokens="5").json()["text"] for w in waves]
    before = httpx.get(server.url + "/health").json()
    with concurrent.futures.ThreadPoolExecutor(4) as ex:
        together = list(ex.map(lambda w: _understand(server.url, w, max_new_tokens="5").json()["text"], waves))
    after = httpx.get(server.url + "/health").json()
    assert together == one_by_one
    assert after["requests"] - before["requests"] == 4 and after["batches"] - before["batches"] < 4


def test_a_full_queue_answers_503_with_retry_after(package):
    s = Server(package, "--max-queue", "1", "--max-batch", "1", "--max-wait-ms", "0")
    try:
        with concurrent.futures.ThreadPoolExecutor(8) as ex:
            rs = list(ex.map(lambda i: _understand(s.url, _wav(25.0, seed=i), max_new_tokens="8"), range(8)))
        codes = sorted(r.status_code for r in rs)
        assert 200 in codes and 503 in codes, codes
        busy = next(r for r in rs if r.status_code == 503)
        assert busy.headers["retry-after"] == "1" and "server busy" in busy.json()["error"]
        assert httpx.get(s.url + "/health").json()["status"] == "ok"
    finally:
        s.close()
