"""Speech-aware segmentation of long audio (osum_torch_infer.segment, Silero VAD, on real espeak-ng speech), joining
segment outputs (offsets, de-duplicated overlaps, per-segment tags, ALIGN word timestamps), and the SRT / VTT /
verbose_json writers; osum-infer's --segment, segments/words fields and subtitles on a tiny real package."""

import json

import numpy as np
import pytest
import soundfile as sf

from osum_torch_infer import cli
from osum_torch_infer.features import split_windows
from osum_torch_infer.segment import (Segment, join_segments, segment_audio, speech_regions, to_srt, to_vtt,
                                      verbose_json)
from tests.corpus import PAUSE_SENTENCES, PAUSE_SR, say, speech_with_pauses
from tests.test_torch_infer_e2e import package  # noqa: F401 (the tiny package fixture)

SR = PAUSE_SR


@pytest.fixture(scope="module")
def recording(espeak_ng):
    """~75 s: utterances with pauses of 0.5 .. 1.2 s between them; the truth is where each pause is (samples)."""
    return speech_with_pauses(32, seed=0, gap_seconds=(0.5, 1.2))


def test_vad_cuts_long_speech_at_the_known_pauses(recording):
    wave, pauses = recording
    assert len(wave) / SR > 70
    segs = segment_audio(wave, SR, mode="vad", max_seconds=30.0)
    assert len(segs) >= 3
    for a, b in zip(segs, segs[1:]):
        # no overlap: one segment ends and the next starts in the same pause (the silence between is left out)
        assert not a.cut_in_speech and a.end <= b.start
        end, start = int(round(a.end * SR)), int(round(b.start * SR))
        assert any(p0 <= end <= start <= p1 for p0, p1 in pauses), f"cut at {a.end:.2f} s is not in a pause"
    covered = np.zeros(len(wave), bool)
    for s in segs:
        assert 0 < s.end - s.start <= 30.0
        np.testing.assert_array_equal(s.samples, wave[int(round(s.start * SR)):int(round(s.end * SR))])
        covered[int(round(s.start * SR)):int(round(s.end * SR))] = True
    speech = np.ones(len(wave), bool)
    for p0, p1 in pauses:
        speech[p0:p1] = False
    assert covered[speech].all()  # all the speech is in some segment
    # the VAD's speech regions leave every inserted pause (nearly) silent: none spans one whole
    regions = speech_regions(wave, SR)
    for p0, p1 in pauses[:-1]:
        assert not any(r0 <= p0 and r1 >= p1 for r0, r1 in regions)


def test_vad_cuts_mid_speech_with_an_overlap_when_no_pause_fits(recording):
    wave, _ = recording
    x = wave[:int(12 * SR)]
    # no pause shorter than 5 s counts as one: every cut must fall in speech, the next segment starting earlier
    segs = segment_audio(x, SR, mode="vad", max_seconds=4.0, overlap_seconds=1.0, min_silence_ms=5000)
    assert len(segs) >= 3
    for a, b in zip(segs, segs[1:]):
        assert a.cut_in_speech and a.end - a.start == pytest.approx(4.0)
        assert b.start == pytest.approx(a.end - 1.0)
    assert not segs[-1].cut_in_speech and segs[-1].end <= len(x) / SR


def test_fixed_mode_and_short_audio_are_the_old_windows(recording):
    wave, _ = recording
    old = split_windows(wave, 30.0, SR)
    new = segment_audio(wave, SR, mode="fixed", max_seconds=30.0)
    assert [s.start for s in new] == [off for off, _ in old]
    for s, (_, w) in zip(new, old):
        np.testing.assert_array_equal(s.samples, w)
        assert not s.cut_in_speech
    short = wave[:SR * 5]
    for mode in ("vad", "fixed"):
        (one,) = segment_audio(short, SR, mode=mode)
        assert (one.start, one.end, one.cut_in_speech) == (0.0, 5.0, False) and one.samples is not None
    # no speech at all (the VAD finds none): the fixed windows
    quiet = np.zeros(SR * 70, np.float32)
    assert [(s.start, s.end) for s in segment_audio(quiet, SR)] == [(off, off + len(w) / SR)
                                                                    for off, w in split_windows(quiet, 30.0, SR)]
    with pytest.raises(ValueError, match="segment mode 'pauses'"):
        segment_audio(wave, SR, mode="pauses")
    with pytest.raises(ValueError, match="overlap_seconds"):
        segment_audio(wave, SR, max_seconds=2.0, overlap_seconds=1.0)


def test_join_deduplicates_the_words_of_an_overlap():
    segs = [Segment(0.0, 30.0, None, True), Segment(29.0, 50.0, None, True), Segment(49.0, 60.0, None, False)]
    texts = ["the cat sat on the ma", "at on the mat and then it sle", "it slept well"]
    r = join_segments(segs, texts, "<TRANSCRIBE>")
    assert r["transcript"] == "the cat sat on the mat and then it slept well"
    assert r["text"] == r["transcript"] and r["window_texts"] == texts
    assert [(s["start"], s["end"]) for s in r["segments"]] == [(0.0, 29.5), (29.5, 49.5), (49.5, 60.0)]
    assert [s["text"] for s in r["segments"]] == ["the cat sat on the", "mat and then it", "slept well"]
    # nothing shared: both kept whole; a cut at a pause (no overlap) is never de-duplicated, even "the the"
    r = join_segments(segs[:2], ["good morning", "dear friends"], "<TRANSCRIBE>")
    assert r["transcript"] == "good morning dear friends"
    r = join_segments([Segment(0.0, 20.0, None), Segment(20.0, 30.0, None)], ["say the", "the word"], "<TRANSCRIBE>")
    assert r["transcript"] == "say the the word"
    # CJK: characters are the tokens, joined without spaces
    r = join_segments(segs[:2], ["今天天气很", "天气很好"], "<TRANSCRIBE>")
    assert r["transcript"] == "今天天气很好"


def test_join_keeps_a_long_word_heard_on_both_sides_of_an_overlap_once():
    segs = [Segment(0.0, 10.0, None, True), Segment(9.0, 20.0, None, False)]
    # "extraordinarily" spans 8.7 .. 10.4 s: longer than the 1 s overlap, each side hears most of it
    texts = ["word<7.9,8.5>extraordinarily<8.7,10.0>", "extraordinarily<0.0,1.4>next<1.6,2.0>"]
    r = join_segments(segs, texts, "<TRANSCRIBE> <ALIGN>")
    assert r["words"] == [{"word": "word", "start": 7.9, "end": 8.5},
                          {"word": "extraordinarily", "start": 8.7, "end": 10.4},
                          {"word": "next", "start": 10.6, "end": 11.0}]
    assert r["transcript"] == "word extraordinarily next"


def test_join_carries_offsets_to_tags_per_segment_and_chat():
    segs = [Segment(0.0, 25.0, None), Segment(25.0, 50.0, None), Segment(50.0, 61.0, None)]
    r = join_segments(segs, ["one<happy>", "two<sad>", "three<sad>"], "<TRANSCRIBE> <EMOTION>")
    assert r["tags"] == {"emotion": "sad"} and r["transcript"] == "one two three"
    assert [s["tags"] for s in r["segments"]] == [{"emotion": "happy"}, {"emotion": "sad"}, {"emotion": "sad"}]
    assert [(s["start"], s["end"]) for s in r["segments"]] == [(0.0, 25.0), (25.0, 50.0), (50.0, 61.0)]
    r = join_segments(segs[:2], ["hi<开始回答>hello", "bye<开始回答>see you"], "<TRANSCRIBE> <S2TCHAT>")
    assert r["answer"] == "hello see you" and [s["answer"] for s in r["segments"]] == ["hello", "see you"]


def _align_output(words, seg: Segment) -> str:
    """What an SRWT model says for one segment: each word it hears (clipped to the segment), times relative to the
    segment's start at OSUM's resolution (0.1 s)."""
    out = ""
    for w, s, e in words:
        s2, e2 = max(s, seg.start), min(e, seg.end)
        if e2 - s2 > 0.02:
            out += f"{w}<{round(s2 - seg.start, 1)},{round(e2 - seg.start, 1)}>"
    return out


def test_align_word_timestamps_through_mid_speech_cuts(recording):
    """Words with known times (espeak words laid end to end), cut mid-speech into overlapping segments: every
    word comes out once, at its true time within the tolerance of the ALIGN reference data (0.1 s)."""
    words, parts, pos = [], [], 0
    for k, w in enumerate(" ".join(PAUSE_SENTENCES).split()):
        x = say(w)
        words.append((w, pos / SR, (pos + len(x)) / SR))
        parts.append(x)
        pos += len(x)
        parts.append(np.zeros(int(0.05 * SR), np.float32))
        pos += int(0.05 * SR)
    wave = np.concatenate(parts)
    segs = segment_audio(wave, SR, mode="vad", max_seconds=3.0, overlap_seconds=1.0, min_silence_ms=2000)
    assert sum(s.cut_in_speech for s in segs) >= 2
    task = "<TRANSCRIBE> <ALIGN>"
    r = join_segments(segs, [_align_output(words, s) for s in segs], task)
    assert [w["word"] for w in r["words"]] == [w for w, _, _ in words]
    for got, (_, s, e) in zip(r["words"], words):
        assert got["start"] == pytest.approx(s, abs=0.1) and got["end"] == pytest.approx(e, abs=0.1)
    assert r["timestamps"] == [{"token": w["word"], "start": w["start"], "end": w["end"]} for w in r["words"]]
    assert r["transcript"] == " ".join(PAUSE_SENTENCES)
    # the joined text re-parses (osum-eval reads it) to the same shifted words
    from osum_torch_infer.parsing import parse_timestamps

    assert parse_timestamps(r["text"]) == r["timestamps"]
    v = verbose_json(r, len(wave) / SR, words=True)
    assert v["words"] == r["words"] and v["text"] == r["transcript"]
    assert [s["start"] for s in v["segments"]] == [s["start"] for s in r["segments"]]
    assert "words" not in verbose_json(r, 1.0)


def test_srt_and_vtt_cues():
    segments = [{"id": 0, "start": 0.0, "end": 2.5, "text": "hello there"},
                {"id": 1, "start": 2.5, "end": 3661.0456, "text": "a <b> & c\nd"},
                {"id": 2, "start": 3661.0456, "end": 3662.0, "text": "  "}]
    assert to_srt(segments) == ("1\n00:00:00,000 --> 00:00:02,500\nhello there\n\n"
                                "2\n00:00:02,500 --> 01:01:01,046\na <b> & c d\n\n")
    assert to_vtt(segments) == ("WEBVTT\n\n00:00:00.000 --> 00:00:02.500\nhello there\n\n"
                                "00:00:02.500 --> 01:01:01.046\na &lt;b&gt; &amp; c d\n\n")


def test_osum_infer_segment_fields_and_subtitles(speech_corpus, package, recording, tmp_path, capsys):  # noqa: F811
    wave, pauses = recording
    sf.write(tmp_path / "long.wav", wave, SR)
    root = speech_corpus["root"]
    data = tmp_path / "data.list"
    data.write_text(json.dumps({"key": "long/a", "wav": str(tmp_path / "long.wav")}) + "\n"
                    + json.dumps({"key": "utt1", "wav": str(root / "utt1.wav"), "task": "<TRANSCRIBE> <GENDER>"})
                    + "\n")
    rows, vtt_of = {}, {}
    for mode in ("vad", "fixed"):
        out = tmp_path / f"{mode}.jsonl"
        assert cli.main(["--model", str(package), "--data", str(data), "--out", str(out), "--max-new-tokens", "4",
                         "--device", "cpu", "--no-progress", "--segment", mode, "--subtitles", "vtt"]) == 0
        rows[mode] = {r["key"]: r for r in map(json.loads, out.read_text().splitlines())}
        long = rows[mode]["long/a"]
        assert long["windows"] == len(long["segments"]) >= 3
        assert 0.0 <= long["segments"][0]["start"] < 0.5 and long["segments"][-1]["end"] <= len(wave) / SR
        short = rows[mode]["utt1"]
        assert len(short["segments"]) == 1 and set(short["segments"][0]["tags"]) <= {"gender"}
        vtt_of[mode] = vtt = (tmp_path / f"{mode}_vtt" / "long%2Fa.vtt").read_text()
        assert vtt.startswith("WEBVTT\n\n") and vtt.count(" --> ") == len(long["segments"]) - sum(
            not s["text"] for s in long["segments"])
    vad = rows["vad"]["long/a"]["segments"]
    assert all(any(p0 <= round(a["end"] * SR) <= round(b["start"] * SR) <= p1 for p0, p1 in pauses)
               for a, b in zip(vad, vad[1:]))
    fixed = [s["start"] for s in rows["fixed"]["long/a"]["segments"]]
    assert fixed == [round(off, 3) for off, _ in split_windows(wave, 30.0, SR)]
    # a finished run resumed with --subtitles loads nothing and writes the subtitles of the whole file
    (tmp_path / "vad_vtt" / "long%2Fa.vtt").unlink()
    capsys.readouterr()
    assert cli.main(["--model", str(package), "--data", str(data), "--out", str(tmp_path / "vad.jsonl"), "--resume",
                     "--device", "cpu", "--no-progress", "--subtitles", "vtt"]) == 0
    err = capsys.readouterr().err
    assert "nothing to do" in err and "Loading weights" not in err and "2 subtitle file(s)" in err
    assert (tmp_path / "vad_vtt" / "long%2Fa.vtt").read_text() == vtt_of["vad"]
    # the subtitles subcommand makes the same files from a results file; user mistakes are one line, exit 2
    assert cli.main(["subtitles", str(tmp_path / "vad.jsonl"), "--out-dir", str(tmp_path / "subs"),
                     "--format", "vtt"]) == 0
    assert (tmp_path / "subs" / "long%2Fa.vtt").read_text() == (tmp_path / "vad_vtt" / "long%2Fa.vtt").read_text()
    assert cli.main(["subtitles", str(tmp_path / "vad.jsonl"), "--out-dir", str(tmp_path / "subs")]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
    (tmp_path / "bad.jsonl").write_text('{"key": "a", "segments": []}\nnot json\n')
    assert cli.main(["subtitles", str(tmp_path / "bad.jsonl"), "--out-dir", str(tmp_path / "s2")]) == 2
    assert f"{tmp_path / 'bad.jsonl'}:2" in capsys.readouterr().err and not (tmp_path / "s2").exists()
    assert cli.main(["--model", str(package), "--wav", str(root / "utt1.wav"), "--out", str(tmp_path / "x.jsonl"),
                     "--overlap-seconds", "20"]) == 2
    assert "--overlap-seconds must be" in capsys.readouterr().err and not (tmp_path / "x.jsonl").exists()
