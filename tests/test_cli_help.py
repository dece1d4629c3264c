"""Every option of every command has help text, and dtype options take both spellings everywhere."""

import argparse

import pytest

from osum_jax.convert import cli as convert_cli
from osum_jax.data import cli as data_cli
from osum_jax.train import cli as train_cli
from osum_torch_infer import cli as infer_cli
from osum_torch_infer import evaluate


def _recorded(monkeypatch, build):
    calls = []
    real = argparse._ActionsContainer.add_argument

    def spy(self, *args, **kw):
        action = real(self, *args, **kw)
        calls.append((getattr(self, "prog", "?"), args, action))
        return action

    monkeypatch.setattr(argparse._ActionsContainer, "add_argument", spy)
    build()
    return calls


@pytest.mark.parametrize("name, build", [
    ("osum-convert", lambda: convert_cli._parser()),
    ("osum-infer", lambda: infer_cli._infer_parser()),
    ("osum-infer export-onnx", lambda: infer_cli._export_parser()),
    ("osum-infer subtitles", lambda: infer_cli._subtitles_parser()),
    ("osum-data", lambda: data_cli.main(["--help"])),
    ("osum-train", lambda: train_cli.main(["--help"])),
    ("osum-eval", lambda: evaluate.main(["--help"])),
])
def test_every_option_has_help(monkeypatch, name, build):
    def run():
        try:
            build()
        except SystemExit:
            pass

    calls = _recorded(monkeypatch, run)
    options = [(prog, args) for prog, args, a in calls if "-h" not in args]
    assert options, name
    missing = [f"{prog} {args[0]}" for prog, args, a in calls if "-h" not in args and not (a.help or "").strip()]
    assert not missing, f"{name}: options without help: {missing}"


def test_dtype_takes_both_spellings():
    p = convert_cli._parser()
    for spelled, short, long in (("bf16", "bf16", "bfloat16"), ("bfloat16", "bf16", "bfloat16"),
                                 ("float16", "fp16", "float16"), ("fp32", "fp32", "float32")):
        assert p.parse_args(["export-torch", "c", "--tokenizer", "t", "--out", "o", "--dtype", spelled]).dtype == short
        assert p.parse_args(["export-osum", "c", "--out", "o.pt", "--dtype", spelled]).dtype == long
    with pytest.raises(SystemExit) as e:
        p.parse_args(["export-osum", "c", "--out", "o.pt", "--dtype", "int8"])
    assert e.value.code == 2
