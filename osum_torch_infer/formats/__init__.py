"""One reader/writer per file format of the contract (torch- and JAX-free; ``osum_jax`` and the runtime import it).

* :mod:`.shards`: OSUM's ``shard_full_data`` tar shards (scan, read members, write) and shard lists.
* :mod:`.lists`: data lists: the one JSONL line reader (each bad line costs that line, with its reason and
  ``file:line``), format sniffing, ``extra`` fields, paths relative to the list.
* :mod:`.prompts`: the prompt book (``{task: [prompts]}``; load, check, pick, ``<no_prompt>``).
* :mod:`.preset`: the package's decoding preset (``generation_config.json``), the dtype table, the mel settings
  and ``processor_config.json``.

Writing files whole (temporary sibling, fsync, rename) is :func:`osum_torch_infer.files.atomic_file`; progress
bars are :func:`osum_torch_infer.progress.progress_bar`. Format descriptions: docs/package-format.md.
"""
