"""The import rules of docs/architecture.md hold: `lint-imports` (import-linter, contracts in pyproject.toml)."""

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_import_contracts_are_kept():
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or shutil.which("lint-imports")
    assert exe, "lint-imports not found: pip install -e '.[dev]' installs import-linter"
    r = subprocess.run([exe, "--no-cache"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert "0 broken" in r.stdout and "10 kept" in r.stdout, r.stdout[-2000:]


def test_a_forbidden_import_breaks_a_contract(tmp_path):
    """The contracts can fail: a copy of the tree where convert imports train is refused."""
    for pkg in ("osum_jax", "osum_torch_infer"):
        shutil.copytree(ROOT / pkg, tmp_path / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    f = tmp_path / "osum_jax" / "convert" / "export_torch.py"
    f.write_text(f.read_text() + "\nfrom ..train import step  # noqa: E402\n")
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or shutil.which("lint-imports")
    r = subprocess.run([exe, "--no-cache"], cwd=tmp_path, capture_output=True, text=True,
                       env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert r.returncode != 0 and "train and convert never import each other" in r.stdout, r.stdout[-3000:]
    assert "BROKEN" in r.stdout
