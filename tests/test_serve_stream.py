"""``stream=true`` on a real osum-serve (the tiny random package, a free localhost port), read by real clients:
httpx reading the server-sent events as they arrive, a raw socket that never reads or hangs up, and Debian's
headless chromium running the page. What is checked: OpenAI's event shape (deltas, then one done event whose text
the deltas add up to and which equals the non-streaming answer), that the deltas arrive while the text is still
being generated (spread over the generation, not in one burst at its end), that a streaming request batched with a
plain one leaves the plain one's answer unchanged, that refusals stay one JSON line with a 4xx, and that a client
that disconnects, stops reading or runs past the deadline has its work stopped."""

import concurrent.futures
import json
import socket
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from tests.helpers import headless_chromium
from tests.test_serve import Server, _wav, build_package, endless_package

pytestmark = pytest.mark.e2e
KEY = "stream-test-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    return build_package(tmp_path_factory)


@pytest.fixture(scope="module")
def server(package):
    s = Server(package, "--max-wait-ms", "300", "--max-seconds", "70", "--read-timeout", "3",
               "--allowed-origin", "http://page.example:9000", env={"OSUM_SERVE_API_KEY": KEY})
    yield s
    s.close()


def _events(url, path, data: bytes, fields: dict, headers=AUTH, name="a.wav"):
    """``(status, [(seconds since the request was sent, event dict)])``, read line by line as they arrive."""
    t0 = time.perf_counter()
    out = []
    with httpx.stream("POST", url + path, files={"file": (name, data, "audio/wav")}, data=fields,
                      headers=headers, timeout=120) as r:
        if r.status_code != 200:
            r.read()
            return r.status_code, r.json()
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data:"):
                out.append((time.perf_counter() - t0, json.loads(line[5:])))
    return 200, out


def _health(s):
    return httpx.get(s.url + "/health", timeout=30).json()


def _metric(s, name: str) -> float:
    for line in httpx.get(s.url + "/metrics", headers=AUTH, timeout=30).text.splitlines():
        key, _, value = line.rpartition(" ")
        if key == name:
            return float(value)
    return 0.0


def _idle(s, timeout=60.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        h = _health(s)
        if not h["generating"] and not h["queued"] and not h["decoding"]:
            return h
        time.sleep(0.05)
    raise AssertionError(f"server still busy: {_health(s)}")


def test_transcription_stream_is_openai_deltas_then_done_and_equals_the_plain_answer(server):
    wav = _wav(2.0, seed=3)
    status, events = _events(server.url, "/v1/audio/transcriptions", wav, {"stream": "true"})
    assert status == 200, events
    kinds = [e["type"] for _, e in events]
    assert kinds[-1] == "transcript.text.done" and set(kinds[:-1]) == {"transcript.text.delta"}
    assert len(kinds) >= 3, kinds  # several deltas before the done event
    assert all(set(e) == {"type", "delta"} and e["delta"] for _, e in events[:-1])
    done = events[-1][1]
    assert set(done) == {"type", "text"}
    assert "".join(e["delta"] for _, e in events[:-1]) == done["text"]
    plain = httpx.post(server.url + "/v1/audio/transcriptions", files={"file": ("a.wav", wav, "audio/wav")},
                       headers=AUTH, timeout=120).json()
    assert plain == {"text": done["text"]}


def test_understand_stream_arrives_while_generating_and_ends_with_the_whole_answer(server):
    wav = _wav(1.5, seed=4)
    fields = {"task": "<TRANSCRIBE><GENDER>", "max_new_tokens": "120"}
    status, events = _events(server.url, "/v1/understand", wav, {**fields, "stream": "true"})
    assert status == 200, events
    partial = [(t, e) for t, e in events if e["type"] == "understand.partial"]
    (t_done, done), = [(t, e) for t, e in events if e["type"] == "understand.done"]
    assert events[-1][1] is done and len(partial) >= 5
    plain = httpx.post(server.url + "/v1/understand", files={"file": ("a.wav", wav, "audio/wav")}, data=fields,
                       headers=AUTH, timeout=120).json()
    assert {k: v for k, v in done.items() if k not in ("type", "delta")} == plain
    # each partial event's raw text and transcript are a beginning of the final ones, and they grow
    for _, e in partial:
        assert plain["text"].startswith(e["text"]) and plain["transcript"].startswith(e["transcript"])
    assert [len(e["text"]) for _, e in partial] == sorted(len(e["text"]) for _, e in partial)
    assert "".join(e["delta"] for _, e in events) == plain["transcript"]
    # streamed, not sent at the end: the first partial text arrives early in the generation (a server that sent
    # everything at the end would have all events within a few milliseconds of the done event)
    t_first = next(t for t, e in partial if e["text"])
    assert t_done - t_first > 0.5 * (t_done - partial[0][0]), (t_first, t_done, partial[0][0])


def test_a_plain_request_batched_with_a_streaming_one_is_unchanged(server):
    a, b = _wav(1.0, seed=11), _wav(1.2, seed=12)
    fields = {"task": "<TRANSCRIBE>", "max_new_tokens": "40"}

    def plain(wav):
        return httpx.post(server.url + "/v1/understand", files={"file": ("a.wav", wav, "audio/wav")}, data=fields,
                          headers=AUTH, timeout=120).json()

    alone = plain(a)
    _idle(server)
    before = _health(server)
    with concurrent.futures.ThreadPoolExecutor(2) as ex:
        streamed = ex.submit(_events, server.url, "/v1/understand", b, {**fields, "stream": "true"})
        together = ex.submit(plain, a)
        status, events = streamed.result()
        together = together.result()
    after = _health(server)
    assert status == 200 and events[-1][1]["type"] == "understand.done"
    assert together == alone
    assert after["batches"] - before["batches"] == 1 and after["windows"] - before["windows"] == 2  # one call


@pytest.mark.parametrize("path, fields, headers, status, needle", [
    ("/v1/audio/transcriptions", {"stream": "true"}, {}, 401, "API key"),
    ("/v1/audio/transcriptions", {"stream": "true"}, {**AUTH, "Origin": "http://evil.example"}, 403, "origin"),
    ("/v1/audio/transcriptions", {"stream": "true", "response_format": "srt"}, AUTH, 400, "stream=true"),
    ("/v1/understand", {"stream": "true", "max_new_tokens": "0"}, AUTH, 400, "max_new_tokens"),
    ("/v1/understand", {"stream": "true", "task": "<NO_SUCH_TASK>"}, AUTH, 400, "prompt file"),
    ("/v1/understand", {"stream": "maybe"}, AUTH, 400, "stream"),
    ("/v1/understand", {"stream": "true"}, AUTH, 400, "cannot decode"),
])
def test_stream_requests_are_refused_like_any_other(server, path, fields, headers, status, needle):
    data = b"not audio at all" if needle == "cannot decode" else _wav(0.5)
    got, body = _events(server.url, path, data, fields, headers=headers)
    assert got == status and needle in body["error"] and "\n" not in body["error"], body
    assert _health(server)["status"] == "ok"


def test_a_client_that_disconnects_mid_stream_stops_its_generation(tmp_path_factory):
    """Three 30 s windows of 400 tokens each (a package whose EOS never wins): the client reads the first delta and
    hangs up. The rows stop at their next token (far fewer tokens than the request would have generated), the
    queue is empty, and the disconnect is counted."""
    server = Server(endless_package(tmp_path_factory), env={"OSUM_SERVE_API_KEY": KEY})
    try:
        with httpx.stream("POST", server.url + "/v1/audio/transcriptions", headers=AUTH,
                          data={"stream": "true", "segment": "fixed"},
                          files={"file": ("long.wav", _wav(65.0, sr=8000), "audio/wav")}, timeout=120) as r:
            assert r.status_code == 200
            first = next(line for line in r.iter_lines() if line.startswith("data:"))
            assert json.loads(first[5:])["type"] == "transcript.text.delta"
        t0 = time.perf_counter()
        h = _idle(server, timeout=20)
        stopped = time.perf_counter() - t0
        generated = _metric(server, "osum_generated_tokens_total")
        assert h["queued"] == 0 and h["queued_requests"] == 0
        assert generated < 0.1 * 3 * 400, generated
        assert _metric(server, 'osum_cancelled_total{reason="disconnect"}') == 1
        assert stopped < 10, stopped
    finally:
        server.close()


def test_a_client_that_never_reads_holds_nothing_up(server):
    """A raw socket posts a streaming request and reads nothing: the server still finishes (or gives up) its work,
    and a plain request meanwhile is answered as usual."""
    _idle(server)
    req = httpx.Request("POST", server.url + "/v1/understand", headers=AUTH, data={
        "stream": "true", "max_new_tokens": "300", "task": "<TRANSCRIBE>"},
        files={"file": ("a.wav", _wav(20.0, seed=9), "audio/wav")})
    body = req.read()
    head = "".join(f"{k}: {v}\r\n" for k, v in req.headers.items())
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    try:
        sock.sendall(f"POST /v1/understand HTTP/1.1\r\n{head}\r\n".encode("latin-1") + body)
        time.sleep(0.5)
        r = httpx.post(server.url + "/v1/understand", files={"file": ("b.wav", _wav(0.8, seed=2), "audio/wav")},
                       data={"max_new_tokens": "5"}, headers=AUTH, timeout=60)
        assert r.status_code == 200 and "text" in r.json()
        _idle(server, timeout=60)
    finally:
        sock.close()
    assert _health(server)["status"] == "ok"


def test_a_stream_past_the_deadline_ends_with_an_error_event(tmp_path_factory):
    """Three 30 s windows of 1024 tokens each, one window per call (a package whose EOS never wins: at least 3 x
    1024 forward steps, about 5 s on a fast CPU), against a 2.5 s deadline."""
    s = Server(endless_package(tmp_path_factory), "--request-timeout", "2.5", "--max-batch", "1")
    try:
        status, events = _events(s.url, "/v1/understand", _wav(65.0, sr=8000),
                                 {"stream": "true", "segment": "fixed", "task": "<TRANSCRIBE>",
                                  "max_new_tokens": "1024"}, headers={})
        assert status == 200
        assert events[-1][1]["type"] == "error" and "--request-timeout" in events[-1][1]["error"]
        assert 1.5 < events[-1][0] < 2.5  # the event comes half a second before the guard would cut the stream
        assert len(events) > 10 and all(e["type"] == "understand.partial" for _, e in events[:-1])
        t0 = time.perf_counter()
        _idle(s, timeout=10)
        assert time.perf_counter() - t0 < 5  # its rows stopped (3 x 1024 tokens would take far longer)
    finally:
        s.close()


def test_the_page_shows_the_text_as_it_arrives(server, chromium):
    """Headless chromium: the page (key entered once) streams the answer; every text it showed before the end is a
    beginning of the final raw text, several of them were partial, and the final fields equal the API's."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import Select, WebDriverWait

    wav = Path(tempfile.mkdtemp()) / "stream.wav"
    wav.write_bytes(_wav(1.5, seed=21))
    fields = {"task": "<TRANSCRIBE>", "max_new_tokens": "120"}
    api = httpx.post(server.url + "/v1/understand", files={"file": ("stream.wav", wav.read_bytes(), "audio/wav")},
                     data=fields, headers=AUTH, timeout=120).json()
    driver = headless_chromium(chromium)
    try:
        wait = WebDriverWait(driver, 120)
        driver.get(server.url + "/")
        driver.find_element(By.ID, "apikey").send_keys(KEY)
        driver.find_element(By.ID, "usekey").click()
        wait.until(lambda d: len(Select(d.find_element(By.ID, "task")).options) > 0)
        assert driver.find_element(By.ID, "stream").is_selected()  # streaming is the page's default
        driver.find_element(By.ID, "file").send_keys(str(wav))
        Select(driver.find_element(By.ID, "task")).select_by_value(api["task"])
        box = driver.find_element(By.ID, "max_new_tokens")
        box.clear()
        box.send_keys(fields["max_new_tokens"])
        driver.execute_script("""
            window.seen = [];
            new MutationObserver(() => {
              const c = document.querySelector('#result code.raw.partial');
              if (c) window.seen.push(c.textContent);
            }).observe(document.getElementById('result'), {childList: true, subtree: true, characterData: true});""")
        driver.find_element(By.ID, "submit").click()
        wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#history .entry")))
        seen = driver.execute_script("return window.seen")
        final = driver.find_element(By.CSS_SELECTOR, "#result code.raw").get_attribute("textContent")
        assert driver.find_elements(By.CSS_SELECTOR, "#result .partial") == []
    finally:
        driver.quit()
    assert final == api["text"]
    partial = [t for t in seen if t and t != final]
    assert len(set(partial)) >= 3, seen
    assert all(final.startswith(t) for t in seen), seen


def test_each_row_streams_to_its_own_request_through_a_retried_call(package):
    """In process, the real model behind a wrapper that fails like CUDA out-of-memory on calls of more than 2 rows:
    six streaming requests of different lengths (the batcher sorts a call's rows by length) go in one call of 6,
    retried as halves. Each request's streamed tokens (from its last restart) are exactly the tokens of its final
    text, and the texts equal those of requests decoded one at a time without streaming."""
    import asyncio

    import numpy as np

    from osum_torch_infer.features import log_mel_spectrogram
    from osum_torch_infer.modeling import OSUMForConditionalGeneration
    from osum_torch_infer.serve.batcher import Batcher

    model = OSUMForConditionalGeneration.from_pretrained(package, device="cpu", dtype="fp32")

    class OutOfMemoryOver2Rows:
        calls: list = []

        def __getattr__(self, name):
            return getattr(model, name)

        def generate(self, *args, **kw):
            rows = len(args[2]) if args else len(kw["input_ids"])
            self.calls.append((rows, "streamer" in kw))
            if rows > 2:
                raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return model.generate(*args, **kw)

    ids = model.encode_text(model.prompt_for("<TRANSCRIBE>"))
    units = [(log_mel_spectrogram((0.1 * np.random.default_rng(i).standard_normal(6000 + 2500 * ((i * 5) % 6)))
                                  .astype(np.float32), model.config.encoder.num_mel_bins), ids) for i in range(6)]
    settings = {"decoding": "greedy", "max_new_tokens": 12}

    async def streamed(m):
        b = Batcher(m, max_batch=8, max_wait_ms=100)
        b.start()
        seen = [[] for _ in units]
        restarts = [0] * len(units)

        def on_update(k):
            def update(window, tokens, text):
                if tokens is None:
                    seen[k].clear()
                    restarts[k] += 1
                else:
                    seen[k].extend(tokens)
            return update

        try:
            jobs = [b.enqueue([u], settings, on_update=on_update(k)) for k, u in enumerate(units)]
            texts = [t[0] for t in await asyncio.gather(*[b.result(j) for j in jobs])]
        finally:
            await b.stop()
        return texts, seen, restarts, b.stats

    async def plain():
        b = Batcher(model, max_batch=1, max_wait_ms=0)
        b.start()
        try:
            return [(await b.submit([u], settings))[0] for u in units]
        finally:
            await b.stop()

    flaky = OutOfMemoryOver2Rows()
    texts, seen, restarts, stats = asyncio.run(streamed(flaky))
    assert texts == asyncio.run(plain())
    assert [model.decode_text(s) for s in seen] == texts
    assert all(len(s) > 0 for s in seen)
    assert flaky.calls[0] == (6, True) and stats["retried_batches"] == 3  # 6 -> 3 + 3 -> (1 + 2) + (1 + 2)
    assert all(streaming for _, streaming in flaky.calls) and min(restarts) >= 3  # every row restarted per try


def test_a_stream_whose_reader_stops_is_ended_and_given_up():
    """The streaming response itself (sse-starlette underneath) over an ASGI ``send`` that stops taking data after
    the first event, as a client that stopped reading makes uvicorn's ``send`` wait: after ``send_timeout`` the
    stream ends, is counted as a slow reader, and gives its request up (``on_close``); the event source is closed."""
    import asyncio

    from osum_torch_infer.serve.streaming import Stream, event

    async def run():
        calls, closed = [], asyncio.Event()

        async def source():
            try:
                for k in range(1000):
                    yield event({"type": "transcript.text.delta", "delta": f"w{k} "})
                    await asyncio.sleep(0)
            finally:
                closed.set()

        sent, stuck = [], asyncio.Event()

        async def send(msg):
            if msg["type"] == "http.response.body" and any(m["type"] == "http.response.body" for m in sent):
                await stuck.wait()  # the reader stopped: this send never completes
            sent.append(msg)

        async def receive():
            await asyncio.Event().wait()  # no disconnect: the client is there, it just does not read

        response = Stream(source(), on_close=lambda: calls.append("close"), on_slow=lambda: calls.append("slow"),
                          ping=0, send_timeout=0.3)
        t0 = asyncio.get_running_loop().time()
        await asyncio.wait_for(response({"type": "http", "method": "POST"}, receive, send), 5)
        return calls, closed.is_set(), asyncio.get_running_loop().time() - t0, sent

    calls, closed, took, sent = asyncio.run(run())
    assert calls == ["slow", "close"] and closed
    assert 0.3 <= took < 2.0
    assert sent[0]["status"] == 200 and b"w0 " in sent[1]["body"] and len(sent) == 2


def test_clients_that_keep_hanging_up_leak_no_work_or_memory(server):
    """Thirty streams read to their first delta and dropped, five at a time: afterwards nothing is queued or
    generating, every drop is counted, and the server's RSS has grown by less than 40 MiB (the first round warms
    it up and is not counted)."""
    def drop(seed):
        with httpx.stream("POST", server.url + "/v1/understand", headers=AUTH,
                          data={"stream": "true", "max_new_tokens": "400", "task": "<TRANSCRIBE>"},
                          files={"file": ("a.wav", _wav(3.0, seed=seed), "audio/wav")}, timeout=120) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("data:") and json.loads(line[5:]).get("text"):
                    return True
        return False

    with concurrent.futures.ThreadPoolExecutor(5) as ex:
        assert all(ex.map(drop, range(5)))
        _idle(server)
        rss0, gone0 = server.rss_mb(), _metric(server, 'osum_cancelled_total{reason="disconnect"}')
        assert all(ex.map(drop, range(100, 130)))
    h = _idle(server, timeout=30)
    assert h["queued"] == 0 and h["queued_requests"] == 0 and h["generating"] == 0
    assert _metric(server, 'osum_cancelled_total{reason="disconnect"}') - gone0 == 30
    assert server.rss_mb() - rss0 < 40, (rss0, server.rss_mb())
