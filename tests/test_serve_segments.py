"""Long-audio segmentation and timestamps on a real osum-serve (tiny random package, free localhost port), on real
speech (espeak-ng utterances with known pauses): ``segment=vad`` cuts at the pauses, ``segment=fixed`` keeps the
equal 30 s windows, and the offsets reach every output: ``segments`` of ``/v1/understand``, OpenAI's
``verbose_json`` (``timestamp_granularities[]=word|segment``), SRT and VTT cues, and the streamed text."""

import io
import json

import httpx
import numpy as np
import pytest
import soundfile as sf

from tests.corpus import PAUSE_SR, speech_with_pauses
from tests.test_serve import Server, build_package

pytestmark = [pytest.mark.e2e, pytest.mark.speech]
SR = PAUSE_SR


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(build_package(tmp_path_factory), "--max-seconds", "90", "--max-wait-ms", "50")
    yield s
    s.close()


@pytest.fixture(scope="module")
def recording(espeak_ng):
    """~50 s of utterances with 0.6 .. 1.1 s pauses: (16-bit WAV bytes, seconds, pauses as (start, end) s)."""
    wave, gaps = speech_with_pauses(20, seed=1, gap_seconds=(0.6, 1.1))
    pauses = [(a / SR, b / SR) for a, b in gaps]
    buf = io.BytesIO()
    sf.write(buf, wave, SR, format="WAV", subtype="PCM_16")
    return buf.getvalue(), len(wave) / SR, pauses


def _post(server, path, wav, **fields):
    r = httpx.post(server.url + path, files={"file": ("talk.wav", wav, "audio/wav")}, data=fields, timeout=300)
    assert r.status_code == 200, r.text
    return r


def _clock(t: float, sep: str) -> str:
    ms = int(round(t * 1000))
    return f"{ms // 3600000:02d}:{ms // 60000 % 60:02d}:{ms // 1000 % 60:02d}{sep}{ms % 1000:03d}"


def test_vad_segments_are_cut_at_pauses_and_fixed_ones_are_equal_windows(server, recording):
    wav, seconds, pauses = recording
    assert seconds > 40
    vad = _post(server, "/v1/understand", wav, task="<TRANSCRIBE>", max_new_tokens="8").json()  # vad: the default
    fixed = _post(server, "/v1/understand", wav, task="<TRANSCRIBE>", max_new_tokens="8", segment="fixed").json()
    assert vad["segment"] == "vad" and fixed["segment"] == "fixed"
    for r in (vad, fixed):
        segs = r["segments"]
        assert len(segs) == r["windows"] >= 2 and [s["id"] for s in segs] == list(range(len(segs)))
        assert all(s["end"] - s["start"] <= 30.0 + 1e-6 for s in segs)
        assert all(a["end"] <= b["start"] + 1e-3 for a, b in zip(segs, segs[1:]))  # in order, no overlap
        assert r["window_offsets"] == [pytest.approx(s["start"], abs=1e-3) for s in segs]
    segs = fixed["segments"]  # the equal windows cover the whole recording
    assert segs[0]["start"] == 0 and segs[-1]["end"] == pytest.approx(seconds, abs=1e-3)
    assert all(a["end"] == pytest.approx(b["start"], abs=1e-3) for a, b in zip(segs, segs[1:]))
    segs = vad["segments"]  # each boundary between two VAD segments lies in one of the inserted pauses
    assert 0 <= segs[0]["start"] < pauses[0][0] and pauses[-2][1] < segs[-1]["end"] <= seconds + 1e-3
    for a, b in zip(segs, segs[1:]):
        assert any(p0 - 0.25 <= a["end"] and b["start"] <= p1 + 0.25 and a["end"] <= p1 + 0.25
                   for p0, p1 in pauses), (a["end"], b["start"])
    n = len(fixed["segments"])
    assert n == int(np.ceil(seconds / 30.0))
    assert [s["start"] for s in fixed["segments"]] == [pytest.approx(k * seconds / n, abs=1e-3) for k in range(n)]
    assert [s["end"] for s in vad["segments"]] != [s["end"] for s in fixed["segments"]]


def test_openai_verbose_json_srt_and_vtt_carry_the_segment_offsets(server, recording):
    wav = recording[0]
    ref = _post(server, "/v1/understand", wav, task="<TRANSCRIBE>").json()
    verbose = _post(server, "/v1/audio/transcriptions", wav, response_format="verbose_json").json()
    assert verbose["task"] == "transcribe" and verbose["duration"] == pytest.approx(ref["seconds"], abs=1e-3)
    assert verbose["text"] == ref["transcript"] and "words" not in verbose
    assert [(s["id"], s["start"], s["end"], s["text"]) for s in verbose["segments"]] == \
        [(s["id"], s["start"], s["end"], s["text"]) for s in ref["segments"]]
    assert [s["seek"] for s in verbose["segments"]] == [int(round(s["start"] * 100)) for s in ref["segments"]]
    cues = [s for s in ref["segments"] if s["text"].strip()]
    assert cues
    srt = _post(server, "/v1/audio/transcriptions", wav, response_format="srt").text
    assert srt == "".join(f"{i}\n{_clock(s['start'], ',')} --> {_clock(s['end'], ',')}\n{s['text'].strip()}\n\n"
                          for i, s in enumerate(cues, 1))
    vtt = _post(server, "/v1/audio/transcriptions", wav, response_format="vtt").text
    assert vtt.startswith("WEBVTT\n\n")
    assert [line for line in vtt.splitlines() if "-->" in line] == \
        [f"{_clock(s['start'], '.')} --> {_clock(s['end'], '.')}" for s in cues]


def test_word_granularity_is_the_align_task_with_shifted_words(server, recording):
    wav = recording[0]
    ref = _post(server, "/v1/understand", wav, task="<TRANSCRIBE> <ALIGN>").json()
    r = httpx.post(server.url + "/v1/audio/transcriptions", files={"file": ("talk.wav", wav, "audio/wav")},
                   data={"response_format": "verbose_json", "timestamp_granularities[]": ["word", "segment"]},
                   timeout=300)
    assert r.status_code == 200, r.text
    j = r.json()
    assert j["text"] == ref["transcript"]  # the <ALIGN> prompt was used
    assert j["words"] == ref["words"] == [{"word": t["token"], "start": t["start"], "end": t["end"]}
                                         for t in ref["timestamps"]]
    assert len(j["segments"]) == len(ref["segments"]) >= 2


@pytest.mark.parametrize("fields, needle", [
    ({"segment": "silence"}, "segment 'silence'"),
    ({"timestamp_granularities[]": "char", "response_format": "verbose_json"}, "timestamp_granularities[]"),
    ({"timestamp_granularities[]": "word"}, "needs response_format=verbose_json"),
])
def test_bad_segment_options_are_a_400(server, recording, fields, needle):
    r = httpx.post(server.url + "/v1/audio/transcriptions", files={"file": ("talk.wav", recording[0][:64000])},
                   data=fields, timeout=60)
    assert r.status_code == 400 and needle in r.json()["error"], r.text


def test_streamed_long_audio_equals_the_joined_answer(server, recording):
    wav = recording[0]
    plain = _post(server, "/v1/audio/transcriptions", wav).json()
    events = []
    with httpx.stream("POST", server.url + "/v1/audio/transcriptions", data={"stream": "true"},
                      files={"file": ("talk.wav", wav, "audio/wav")}, timeout=300) as r:
        for line in r.iter_lines():
            if line.startswith("data:"):
                events.append(json.loads(line[5:]))
    assert events[-1] == {"type": "transcript.text.done", "text": plain["text"]}
    assert "".join(e["delta"] for e in events[:-1]) == plain["text"]
