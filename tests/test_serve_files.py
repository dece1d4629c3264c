"""Issue 31, files: ``osum-infer --out`` never replaces a file silently, ``atomic_file`` writes whole files or
nothing, and the web page loads nothing from elsewhere."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from osum_torch_infer import cli
from osum_torch_infer.files import atomic_file


def test_infer_out_refuses_an_existing_file_without_overwrite(tmp_path, capsys):
    out = tmp_path / "results.jsonl"
    out.write_text("yesterday's results\n")
    args = ["--model", str(tmp_path / "no-package"), "--wav", "x.wav", "--out", str(out), "--no-progress"]
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"osum-infer: error: --out {out} exists; pass --resume to finish it or --overwrite to replace it"
    assert out.read_text() == "yesterday's results\n"
    # with --overwrite the file is no obstacle: the run goes on to load the (missing) package and stops there
    assert cli.main(args + ["--overwrite"]) == 2
    err = capsys.readouterr().err
    assert "exists" not in err and "no-package" in err and len(err.strip().splitlines()) == 1
    assert out.read_text() == "yesterday's results\n"


def test_atomic_file_writes_all_or_nothing(tmp_path):
    target = tmp_path / "sub" / "report.json"
    with atomic_file(target) as tmp:
        tmp.write_text('{"a": 1}')
        assert not target.exists()
    assert target.read_text() == '{"a": 1}'
    with pytest.raises(RuntimeError):
        with atomic_file(target) as tmp:
            tmp.write_text('{"a": 2, "half')
            raise RuntimeError("interrupted")
    assert target.read_text() == '{"a": 1}'
    assert sorted(p.name for p in target.parent.iterdir()) == ["report.json"]  # no temporary left behind
    with pytest.raises(FileNotFoundError):  # nothing written: nothing renamed, the old file stays
        with atomic_file(target):
            pass
    assert target.read_text() == '{"a": 1}'


def test_the_page_loads_nothing_from_other_origins():
    page = (Path(cli.__file__).parent / "serve" / "static" / "index.html").read_text(encoding="utf-8")
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page, re.I)
    assert not re.search(r"""(fetch|import)\s*\(\s*["'`](https?:)?//""", page)
    # (FastAPI's /docs, which pulls JavaScript from a CDN, is off: tests/test_serve_abuse.py asks for it, 404)
