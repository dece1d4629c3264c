"""osum-serve started for real on a free localhost port with a tiny random package, called with a real HTTP
client: both endpoints, the error cases (4xx with a one-line message, server still healthy), long audio, dynamic
batching (concurrent requests decoded together give the same results as one by one) and backpressure (503)."""

import concurrent.futures
import io
import json
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
from tests.helpers import headless_chromium, tiny_model_config

CFG = tiny_model_config()
pytestmark = pytest.mark.e2e


def _wav(seconds: float, seed: int = 0, sr: int = 16000) -> bytes:
    buf = io.BytesIO()
    x = (0.1 * np.random.default_rng(seed).standard_normal(int(seconds * sr))).astype(np.float32)
    sf.write(buf, x, sr, format="WAV", subtype="PCM_16")
    return buf.getvalue()


_BUILT: dict = {}


def build_package(tmp_path_factory) -> Path:
    """The tiny random package, built once per test process (tests/test_serve_abuse.py shares it)."""
    if "pkg" not in _BUILT:
        root = tmp_path_factory.mktemp("serve")
        tok = train_tokenizer(["transcribe the speech", "alpha bravo charlie"] * 4, root / "tok", vocab_size=300)
        export_torch_package(OSUM(CFG, rngs=nnx.Rngs(5)), CFG, root / "pkg", tokenizer_dir=tok, dtype="fp32",
                             progress=False)
        _BUILT["pkg"] = root / "pkg"
    return _BUILT["pkg"]


def endless_package(tmp_path_factory) -> Path:
    """A copy of the tiny random package whose greedy decoding never ends a window early (built once per test
    process): the final RMSNorm keeps only hidden unit 0 (``h = [h0, 0, ...]``), the EOS row of ``lm_head`` is zero
    and two word rows are ``+e0`` / ``-e0``, so one of them scores ``|h0| > 0`` where EOS scores 0. The random
    model stops wherever its argmax happens to land, which can move with the CPU's float rounding (on one CI
    machine after ~26 tokens a window); tests that need a request to run past a deadline use this one."""
    if "endless" in _BUILT:
        return _BUILT["endless"]
    import shutil

    from safetensors import safe_open
    from safetensors.numpy import load_file, save_file

    out = tmp_path_factory.mktemp("endless") / "pkg"
    shutil.copytree(build_package(tmp_path_factory), out)
    weights = out / "model.safetensors"
    with safe_open(weights, "np") as f:
        meta = f.metadata()
    t = load_file(weights)
    eos = json.loads((out / "config.json").read_text())["eos_token_id"]
    vocab = json.loads((out / "tokenizer.json").read_text())["model"]["vocab"]
    norm, head = t["llm.model.norm.weight"], t["llm.lm_head.weight"]
    norm[:] = 0.0
    norm[0] = 1.0
    head[eos] = 0.0
    for word, sign in (("alpha", 1.0), ("Ġbravo", -1.0)):
        head[vocab[word]] = 0.0
        head[vocab[word], 0] = sign
    save_file(t, weights, metadata=meta)
    _BUILT["endless"] = out
    return out


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    return build_package(tmp_path_factory)


class Server:
    """``osum-serve PACKAGE --device cpu ARGS`` on a free localhost port; its stderr goes to a file (a pipe nobody
    reads would block a server that logs a lot)."""

    def __init__(self, package, *args, timeout: float = 120, env: dict | None = None):
        import tempfile

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        env = dict(os.environ, JAX_PLATFORMS="cpu", **(env or {}))
        self.log = tempfile.NamedTemporaryFile("w+", prefix="osum-serve-", suffix=".log")
        self.proc = subprocess.Popen([str(Path(sys.executable).parent / "osum-serve"), str(package), "--device",
                                      "cpu", "--port", str(self.port), *args], env=env,
                                     stdout=subprocess.DEVNULL, stderr=self.log, text=True)
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(self.stderr())
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        raise RuntimeError("osum-serve did not start")

    def stderr(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text(errors="replace")

    def rss_mb(self) -> float:
        """The server's resident memory now (VmRSS of /proc/PID/status), MiB."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError("no VmRSS")

    def close(self):
        self.proc.terminate()  # SIGTERM; osum-serve --replicas shuts Ray Serve down on it
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=30)
        self.log.close()


@pytest.fixture(scope="module")
def server(package):
    s = Server(package, "--max-wait-ms", "300", "--max-mb", "1", "--max-seconds", "70",
               "--feedback-log", str(package.parent / "feedback.jsonl"))
    s.feedback_log = package.parent / "feedback.jsonl"
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
    s = Server(package, "--max-queue", "1", "--max-batch", "1", "--max-wait-ms", "0", "--max-seconds", "30")
    try:
        off = httpx.post(s.url + "/v1/feedback", json={"verdict": "correct"})
        assert off.status_code == 403 and "--feedback-log" in off.json()["error"]
        with concurrent.futures.ThreadPoolExecutor(8) as ex:
            rs = list(ex.map(lambda i: _understand(s.url, _wav(25.0, seed=i), max_new_tokens="8"), range(8)))
        codes = sorted(r.status_code for r in rs)
        assert 200 in codes and 503 in codes, codes
        busy = next(r for r in rs if r.status_code == 503)
        assert busy.headers["retry-after"] == "1" and "server busy" in busy.json()["error"]
        assert httpx.get(s.url + "/health").json()["status"] == "ok"
    finally:
        s.close()


def test_feedback_is_appended_as_one_json_line_and_bad_feedback_is_a_400(server):
    before = server.feedback_log.read_text(encoding="utf-8").splitlines() if server.feedback_log.exists() else []
    ok = httpx.post(server.url + "/v1/feedback", json={"verdict": "wrong", "task": "<TRANSCRIBE>", "result": "x",
                                                        "tags": {"gender": "female"}, "comment": "not a word"})
    assert ok.status_code == 200 and ok.json() == {"ok": True}
    lines = server.feedback_log.read_text(encoding="utf-8").splitlines()
    assert len(lines) == len(before) + 1
    rec = json.loads(lines[-1])
    assert rec["verdict"] == "wrong" and rec["tags"] == {"gender": "female"} and rec["model"] == "pkg" and rec["time"]
    for body, needle in [({"verdict": "maybe"}, "verdict"), ({"verdict": "correct", "extra": 1}, "unknown feedback"),
                         ({"verdict": "correct", "tags": "female"}, "'tags' must be a dict"), ([1, 2], "JSON object")]:
        r = httpx.post(server.url + "/v1/feedback", json=body)
        assert r.status_code == 400 and needle in r.json()["error"], r.text
    r = httpx.post(server.url + "/v1/feedback", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not JSON" in r.json()["error"]
    assert len(server.feedback_log.read_text(encoding="utf-8").splitlines()) == len(before) + 1


ARTIFACTS = Path(os.environ.get("OSUM_TEST_ARTIFACTS", Path(__file__).resolve().parents[1] / "test-artifacts"))


def test_web_page_in_headless_chromium(server, chromium, tmp_path):
    """Debian's chromium opens the page, uploads a wav, picks a task, submits, reads the result from the page
    (equal to what the API answers for the same request), marks it correct, and the feedback log has the line.
    A screenshot goes to test-artifacts/serve_page.png (OSUM_TEST_ARTIFACTS overrides the folder)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import Select, WebDriverWait

    wav = tmp_path / "hello.wav"
    wav.write_bytes(_wav(1.5, seed=7))
    task = "<TRANSCRIBE><GENDER>"
    api = _understand(server.url, wav.read_bytes(), task=task, max_new_tokens="6").json()
    driver = headless_chromium(chromium)
    try:
        wait = WebDriverWait(driver, 120)
        driver.get(server.url + "/")
        wait.until(lambda d: len(Select(d.find_element(By.ID, "task")).options) > 0)
        assert "pkg on cpu (float32)" in driver.find_element(By.ID, "model").text
        driver.find_element(By.ID, "file").send_keys(str(wav))
        Select(driver.find_element(By.ID, "task")).select_by_value(api["task"])  # the package's spelling of task
        box = driver.find_element(By.ID, "max_new_tokens")
        box.clear()
        box.send_keys("6")
        driver.find_element(By.ID, "submit").click()
        entry = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#history .entry")))
        result = driver.find_element(By.ID, "result")
        text = lambda el: el.get_attribute("textContent")  # noqa: E731  (the DOM's text, not the rendered one)
        assert text(result.find_element(By.CSS_SELECTOR, "code.raw")) == api["text"]
        if api["transcript"]:
            assert text(result.find_element(By.CSS_SELECTOR, ".transcript")) == api["transcript"]
        shown = {t.get_attribute("data-field"): text(t) for t in result.find_elements(By.CSS_SELECTOR, ".tag")}
        assert shown == api["tags"]
        entry.find_element(By.CSS_SELECTOR, "button.correct").click()
        wait.until(lambda d: "marked correct" in entry.find_element(By.CSS_SELECTOR, ".verdict").text)
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        assert driver.save_screenshot(str(ARTIFACTS / "serve_page.png"))
    finally:
        driver.quit()
    rec = json.loads(server.feedback_log.read_text(encoding="utf-8").splitlines()[-1])
    assert rec["verdict"] == "correct" and rec["audio"] == "hello.wav" and rec["task"] == api["task"]
    assert rec["result"] == " ".join(api["window_texts"])


@pytest.mark.slow
def test_two_ray_serve_replicas_answer_like_one_server(package, server):
    """``osum-serve PKG --replicas 2``: a local Ray instance, two CPU replicas of the same app behind Ray Serve's
    proxy; both replicas answer, with the results of the single-process server."""
    import ray.serve  # noqa: F401  (in ".[dev]" through the ".[ray]" extra: missing is a failure, not a skip)
    s = Server(package, "--replicas", "2", "--feedback-log", "", timeout=300)
    try:
        waves = [_wav(0.6 + 0.2 * i, seed=i) for i in range(4)]
        expected = [_understand(server.url, w, max_new_tokens="5").json()["text"] for w in waves]
        with concurrent.futures.ThreadPoolExecutor(4) as ex:
            got = list(ex.map(lambda w: _understand(s.url, w, max_new_tokens="5").json()["text"], waves))
        assert got == expected
        pids = set()
        for _ in range(60):  # Ray's router spreads requests; both replicas show up
            pids.add(httpx.get(s.url + "/health", timeout=30).json()["pid"])
            if len(pids) == 2:
                break
        assert len(pids) == 2, pids
        assert httpx.get(s.url + "/", timeout=30).text.startswith("<!doctype html>")
        events = []  # stream=true through Ray Serve's proxy: the events arrive, the deltas add up to the done text
        with httpx.stream("POST", s.url + "/v1/audio/transcriptions", data={"stream": "true"},
                          files={"file": ("a.wav", waves[0], "audio/wav")}, timeout=120) as r:
            assert r.headers["content-type"].startswith("text/event-stream")
            events = [json.loads(line[5:]) for line in r.iter_lines() if line.startswith("data:")]
        assert events[-1]["type"] == "transcript.text.done" and len(events) >= 2
        assert "".join(e["delta"] for e in events[:-1]) == events[-1]["text"]
    finally:
        s.close()
