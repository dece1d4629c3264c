"""Audio decoding and log-mel features against transformers.WhisperFeatureExtractor on real speech."""

import numpy as np
import pytest
import soundfile as sf
from transformers import WhisperFeatureExtractor
from transformers.audio_utils import mel_filter_bank, spectrogram, window_function

from osum_jax.data.audio import AudioError, decode_audio, log_mel_spectrogram, mel_filters


@pytest.mark.parametrize("n_mels", [80, 128])
def test_mel_filters_match_transformers(n_mels):
    ref = mel_filter_bank(num_frequency_bins=201, num_mel_filters=n_mels, min_frequency=0.0, max_frequency=8000.0,
                          sampling_rate=16000, norm="slaney", mel_scale="slaney")
    np.testing.assert_allclose(mel_filters(16000, 400, n_mels), ref.T, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("n_mels", [80, 128])
def test_log_mel_matches_whisper_feature_extractor_on_speech(speech_corpus, n_mels):
    """Parity with WhisperFeatureExtractor (its torch path == OSUM's float32 torch.stft code).

    Our features are computed in float64. Against the float32 reference they agree to <= 1e-5 on every bin
    within 5 decades of its frame's energy; bins 5-8 decades down carry float32 FFT rounding of the
    reference (~2e-5, also seen between numpy's and torch's float32 FFTs), so there the bound is 5e-5.
    Against the same formula evaluated in float64 (transformers' numpy spectrogram), <= 1e-5 everywhere.
    """
    fe = WhisperFeatureExtractor(feature_size=n_mels, sampling_rate=16000, hop_length=160, n_fft=400)
    for entry in speech_corpus["entries"][:5]:
        wave, sr, _ = decode_audio(entry["wav"])
        assert sr == 22050  # espeak's rate: the resampler really ran
        ours = log_mel_spectrogram(wave, n_mels)
        ref = fe(wave, sampling_rate=16000, return_tensors="np", padding="longest").input_features[0].T
        assert ours.shape == ref.shape == (len(wave) // 160, n_mels)
        diff = np.abs(ours - ref)
        level = ours * 4 - 4  # log10 power
        near = (level.max(axis=1, keepdims=True) - level) < 5
        assert diff[near].max() <= 1e-5 and diff.max() <= 5e-5 and diff.mean() <= 1e-6
        exact = spectrogram(wave.astype(np.float64), window_function(400, "hann"), frame_length=400, hop_length=160,
                            power=2.0, mel_filters=fe.mel_filters, log_mel="log10", dtype=np.float64)[:, :-1]
        exact = (np.maximum(exact, exact.max() - 8.0) + 4.0) / 4.0
        assert np.abs(ours - exact.T).max() <= 1e-5


def test_stereo_is_averaged_and_segments_honoured(speech_corpus, tmp_path):
    x, sr = sf.read(speech_corpus["entries"][0]["wav"], dtype="float32")
    mono, _, _ = decode_audio(speech_corpus["entries"][0]["wav"], target_sr=sr)
    stereo_path = tmp_path / "s.wav"
    sf.write(stereo_path, np.stack([x, 0.5 * x], 1), sr)
    avg, _, _ = decode_audio(str(stereo_path), target_sr=sr)
    np.testing.assert_allclose(avg, 0.75 * mono, atol=1e-4)  # 16-bit wav round trip
    seg, _, n = decode_audio(speech_corpus["entries"][0]["wav"], start=0.5, end=1.0, target_sr=sr)
    assert n == len(seg) == round(0.5 * sr)
    np.testing.assert_allclose(seg, mono[round(0.5 * sr):round(1.0 * sr)], atol=1e-6)
    res, _, _ = decode_audio(speech_corpus["entries"][0]["wav"], target_sr=16000)
    assert abs(len(res) - len(x) * 16000 / sr) <= 1


def test_bad_audio_raises_clear_errors(tmp_path):
    (tmp_path / "junk.wav").write_bytes(b"RIFF0000WAVEjunkjunk")
    with pytest.raises(AudioError, match="cannot decode"):
        decode_audio(str(tmp_path / "junk.wav"))
    sf.write(tmp_path / "empty.wav", np.zeros(0, np.float32), 16000)
    with pytest.raises(AudioError, match="empty"):
        decode_audio(str(tmp_path / "empty.wav"))
    sf.write(tmp_path / "nan.wav", np.array([0.0, np.nan, 0.1], np.float32), 16000, subtype="FLOAT")
    with pytest.raises(AudioError, match="NaN"):
        decode_audio(str(tmp_path / "nan.wav"))
    with pytest.raises(AudioError, match="at least 160"):
        log_mel_spectrogram(np.zeros(100, np.float32))
