"""The prompt book: OSUM's ``prompt_config.yaml`` format, ``{task: [prompt, ...]}`` (a single string is a list of
one). Task keys are normalised (:func:`osum_torch_infer.contract.normalize_task`); the prompt ``<no_prompt>``
stands for an empty prompt. Training picks one at random per utterance (:func:`choose`), inference takes a task's
first (:func:`first`). A package carries its book as ``prompts.yaml`` (and in ``processor_config.json``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from ..contract import normalize_task

NO_PROMPT = "<no_prompt>"


def prompt_text(prompt: str) -> str:
    """A book entry as the text the model sees: ``<no_prompt>`` -> ``""``."""
    return "" if prompt == NO_PROMPT else prompt


def parse_book(data: Any, source: str = "<dict>") -> dict[str, list[str]]:
    """``{normalised task: [prompts]}`` from a loaded YAML/JSON mapping; ``ValueError`` naming ``source`` and the
    task for anything else."""
    if not isinstance(data, Mapping) or not data:
        raise ValueError(f"{source}: a prompt file must map task keys to lists of prompts")
    book: dict[str, list[str]] = {}
    for task, items in data.items():
        if isinstance(items, str):
            items = [items]
        if not isinstance(items, list) or not items or not all(isinstance(p, str) for p in items):
            raise ValueError(f"{source}: task {task!r} must have a non-empty list of prompt strings")
        book[normalize_task(task)] = list(items)
    return book


def load_book(path: str | Path) -> dict[str, list[str]]:
    """Read and check a prompt file; ``ValueError`` naming the file."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise ValueError(f"cannot read the prompt file {path}: {e}") from None
    return parse_book(data, str(path))


def unknown_tasks(book: Mapping[str, list[str]], tasks) -> list[str]:
    """The tasks (normalised, sorted) that ``book`` has no prompt for."""
    return sorted({normalize_task(t) for t in tasks} - set(book))


def first(book: Mapping[str, list[str]], task: str | None) -> str:
    """The text of ``task``'s first prompt (inference's choice); ``ValueError`` naming the known tasks."""
    key = normalize_task(task)
    if key not in book:
        raise ValueError(f"task {key!r} is not in the package's prompt file; known tasks: {sorted(book)}; "
                         f"or pass a prompt text")
    return prompt_text(book[key][0])


def choose(book: Mapping[str, list[str]], task: str | None, seed: int, epoch: int, index: int) -> str:
    """The text of a prompt for ``task``, random but a pure function of ``(seed, epoch, index)`` (training's)."""
    import numpy as np

    items = book[normalize_task(task)]
    rng = np.random.default_rng([seed, epoch, index, 0x9E3779B9])
    return prompt_text(items[int(rng.integers(len(items)))])
