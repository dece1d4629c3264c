"""What ``osum-train`` checks before it builds a mesh, reads a weight or creates a file.

Every ordinary mistake (a missing or empty data list, no ``data.train``, a missing tokenizer or prompt file, an
``init_from`` that is not a checkpoint, an ``output_dir`` that is a file or holds a run of another model) is one
:class:`~osum_jax.config.ConfigError` naming the path and what to do; the CLI prints it as one line, exit code 2.
"""

from __future__ import annotations

from pathlib import Path

from ..checkpoint import CheckpointError, read_config, resolve
from ..config import RUNTIME_MODEL_KEYS, Config, ConfigError


def _diff(a, b, prefix: str) -> list[str]:
    """Dotted keys where two config dicts differ, with both values."""
    out = []
    for k in sorted(set(a) | set(b)):
        x, y = a.get(k), b.get(k)
        if isinstance(x, dict) and isinstance(y, dict):
            out += _diff(x, y, f"{prefix}{k}.")
        elif x != y:
            out.append(f"{prefix}{k}: {x!r} there, {y!r} here")
    return out


def _data_file(key: str, path: str) -> None:
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"{key}={path}: no such file")
    if p.is_dir():  # a folder of tar shards: the source checks it
        return
    try:
        with open(p, "rb") as f:
            if not any(line.strip() for line in f):
                raise ConfigError(f"{key}={path} is empty: no utterances to train on")
    except OSError as e:
        raise ConfigError(f"{key}={path}: cannot read ({e.strerror})") from None


def check(cfg: Config) -> None:
    """Raise :class:`ConfigError` for the first input or output that cannot work; creates nothing."""
    d, tc = cfg.data, cfg.train
    if not d.train:
        raise ConfigError("data.train is not set: give the training data list, e.g. data.train=data/train.list")
    _data_file("data.train", d.train)
    if d.dev:
        _data_file("data.dev", d.dev)
    if not d.tokenizer:
        raise ConfigError("data.tokenizer is not set: give a local Hugging Face tokenizer directory "
                          "(with tokenizer.json)")
    tok = Path(d.tokenizer)
    if not (tok / "tokenizer.json").is_file() and not (tok.is_file() and tok.suffix == ".json"):
        raise ConfigError(f"data.tokenizer={d.tokenizer}: no tokenizer.json there (a local Hugging Face tokenizer "
                          f"directory is needed; nothing is downloaded)")
    if d.prompts and not Path(d.prompts).is_file():
        raise ConfigError(f"data.prompts={d.prompts}: no such file")
    if tc.init_from:
        try:
            theirs = read_config(tc.init_from)
        except (CheckpointError, ConfigError) as e:
            raise ConfigError(f"train.init_from={tc.init_from} is not a checkpoint osum-jax can read "
                              f"(osum-convert import-* output or an osum-train run): {e}") from None
        diff = _diff(theirs.to_dict()["model"], cfg.to_dict()["model"], "model.")
        shape_keys = ("encoder", "adapter", "llm", "lora", "speech_token_num")
        diff = [x for x in diff if x.split(".")[1].split(":")[0] in shape_keys]
        if diff:
            raise ConfigError(f"train.init_from={tc.init_from} holds another model than this config: "
                              + "; ".join(diff[:8]) + (" ..." if len(diff) > 8 else ""))
    out = Path(tc.output_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"train.output_dir={tc.output_dir} is a file, not a directory")
    if (out / "checkpoints").is_dir():
        try:
            root, step = resolve(out)
        except CheckpointError:
            return  # no finished step yet: the run starts afresh
        theirs = read_config(root, step).to_dict()["model"]
        diff = [x for x in _diff(theirs, cfg.to_dict()["model"], "model.")
                if not x.startswith(RUNTIME_MODEL_KEYS)]
        if diff:
            raise ConfigError(f"train.output_dir={tc.output_dir} holds a run of another model (step {step}); "
                              f"resume it with its config or pick a new output_dir. Differences: "
                              + "; ".join(diff[:8]) + (" ..." if len(diff) > 8 else ""))
