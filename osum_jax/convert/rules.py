"""The vocabulary of the converter's rule tables: transforms, rows, the config flags that select optional rows,
and the expansion of rows over layers.

Every external format is one literal table of :class:`Rule` rows ``(JAX path, external key pattern, transform,
when)``, written out once in its own module: ``hf.WHISPER`` and ``hf.QWEN2`` (Hugging Face), ``osum_pt.OSUM``
(OSUM's ``.pt``), ``package_table.PACKAGE`` (the torch package). A row with ``when`` set exists only for configs
that have that flag (:func:`model_flags`: ``key_bias``, ``attention_bias``, ``untied``, ``lora:<module>``,
``conv<N>``); :func:`select` keeps the rows of one config. A row whose key pattern holds ``{i}`` is a stacked
(scanned) variable: :func:`expand` turns it into one :class:`Entry` per layer. Imports apply
``transform.forward`` to the external tensor; exports apply ``transform.inverse`` to the JAX value and know the
external shape beforehand from ``transform.external_shape``. Every transform is a transpose or a reshape, so both directions are exact (bit-identical).
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Callable, Mapping, NamedTuple, Sequence

import numpy as np

from ..checkpoint.tree import CheckpointMismatch

Shape = tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Transform:
    """External (torch) layout -> JAX layout (``forward``), back (``inverse``, may return a view), and the
    external shape of a JAX shape (``external_shape``)."""

    name: str
    forward: Callable[[np.ndarray], np.ndarray]
    inverse: Callable[[np.ndarray], np.ndarray]
    external_shape: Callable[[Shape], Shape]


def _pe_forward(x: np.ndarray) -> np.ndarray:
    if x.ndim != 3 or x.shape[0] != 1:
        raise ValueError(f"positional table of shape {x.shape}, expected [1, T, D]")
    return x[0]


IDENTITY = Transform("id", lambda x: x, lambda x: x, tuple)
# torch Linear [out, in] <-> JAX kernel [in, out]
LINEAR = Transform("linear", lambda x: np.ascontiguousarray(x.T), lambda x: x.T, lambda s: tuple(s)[::-1])
# torch Conv1d [out, in, k] <-> JAX kernel [k, in, out]
CONV = Transform("conv", lambda x: np.ascontiguousarray(np.transpose(x, (2, 1, 0))),
                 lambda x: np.transpose(x, (2, 1, 0)), lambda s: (s[2], s[1], s[0]))
# a stored sinusoid table [1, T, D] <-> the JAX buffer [T, D]
PE = Transform("pe", _pe_forward, lambda x: x[None], lambda s: (1,) + tuple(s))
TRANSFORMS = (IDENTITY, LINEAR, CONV, PE)


class Rule(NamedTuple):
    """One row of a table: a JAX variable path, its external key (``{i}`` = layer index of a stacked variable),
    the transform between the layouts, and the config flag the row depends on (``""``: every config)."""

    jax: str
    external: str
    transform: Transform
    when: str = ""

    @property
    def stacked(self) -> bool:
        return "{i}" in self.external


def prefixed(rows: Sequence[Rule], jax_prefix: str, external_prefix: str) -> list[Rule]:
    """The rows with both sides prefixed (a table applied to a submodule, e.g. ``llm.`` of ``OSUM``)."""
    return [r._replace(jax=jax_prefix + r.jax, external=external_prefix + r.external) for r in rows]


# -- which rows a config has ----------------------------------------------------------------------------------

MAX_CONVS = 3  # the adapter convs the OSUM and package tables declare (OSUM's down_sample_2 has three)


def encoder_flags(key_bias: bool) -> set[str]:
    """Flags of an encoder block: ``key_bias`` (Whisper's own blocks have no key bias)."""
    return {"key_bias"} if key_bias else set()


def llm_flags(llm, lora=None) -> set[str]:
    """Flags of the Qwen2 LLM (``LLMConfig``, ``LoRAConfig`` or ``None``): ``attention_bias``, ``untied``
    (an ``lm_head`` of its own) and ``lora:<module>`` for each module with LoRA."""
    flags = set()
    if llm.attention_bias:
        flags.add("attention_bias")
    if not llm.tie_word_embeddings:
        flags.add("untied")
    if lora is not None:
        modules = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
        flags |= {f"lora:{m}" for m in modules if lora.rank_of(m)}
    return flags


def model_flags(cfg) -> set[str]:
    """Flags of the whole ``OSUM(cfg)`` (``ModelConfig``): the encoder's, the LLM's, ``conv<N>`` per adapter conv."""
    return (encoder_flags(cfg.encoder.key_bias) | llm_flags(cfg.llm, cfg.lora)
            | {f"conv{n}" for n in range(len(cfg.adapter.conv_strides))})


def select(rows: Sequence[Rule], flags: set[str], *, table: str) -> list[Rule]:
    """The rows of ``table`` that exist for a config with ``flags``, in table order. Raises when the config
    needs an adapter conv the table does not declare."""
    convs = {f for f in flags if f.startswith("conv")}
    lacking = sorted(convs - {r.when for r in rows})
    if lacking:
        raise CheckpointMismatch(f"the {table} table declares {MAX_CONVS} adapter convs; the config has "
                                 f"{len(convs)} (model.adapter.conv_strides)")
    return [r for r in rows if not r.when or r.when in flags]


def model_stacks(cfg) -> dict[str, int]:
    """The scanned stacks of ``OSUM(cfg)`` (``ModelConfig``): JAX path prefix -> number of layers."""
    return {"encoder.layers.": cfg.encoder.num_layers, "adapter.transformer.layers.": cfg.adapter.num_layers,
            "llm.layers.": cfg.llm.num_layers}


@dataclasses.dataclass(frozen=True)
class Entry:
    """One external tensor <-> one JAX variable (``layer is None``) or one layer of a stacked variable."""

    torch_key: str  # the external key (OSUM: peft names reduced to the plain HF form)
    jax_path: str  # dotted path of the variable (``flat_variables``)
    layer: int | None
    transform: Transform

    def external_shape(self, jax_shape: Shape) -> Shape:
        """The external tensor's shape for the JAX variable's (whole, stacked) shape."""
        return tuple(self.transform.external_shape(tuple(jax_shape)[1:] if self.layer is not None else jax_shape))


def expand(rows: Sequence[Rule], stacks: Mapping[str, int], *, layer_major: bool = True) -> list[Entry]:
    """The entries of a table, in row order. ``stacks`` maps the JAX path prefix of each scanned stack to its
    number of layers; each run of consecutive stacked rows of one stack is expanded over its layers, layer by
    layer (``layer_major``, the order in which torch registers modules) or row by row."""
    def stack(r: Rule) -> str | None:
        if not r.stacked:
            return None
        found = [p for p in stacks if r.jax.startswith(p)]
        if len(found) != 1:
            raise ValueError(f"stacked rule {r.jax} <- {r.external}: no single stack among {sorted(stacks)}")
        return found[0]

    out: list[Entry] = []
    for prefix, run in itertools.groupby(rows, key=stack):
        run = list(run)
        if prefix is None:
            out += [Entry(r.external, r.jax, None, r.transform) for r in run]
        elif layer_major:
            out += [Entry(r.external.format(i=i), r.jax, i, r.transform) for i in range(stacks[prefix]) for r in run]
        else:
            out += [Entry(r.external.format(i=i), r.jax, i, r.transform) for r in run for i in range(stacks[prefix])]
    return out


def group(entries: Sequence[Entry], keys: Mapping[str, str]) -> dict[str, list[tuple[str, Entry]]]:
    """``{jax path: [(source key, entry)]}`` (layers in order) for the entries whose key ``keys`` maps to a
    source key."""
    leaves: dict[str, list[tuple[str, Entry]]] = {}
    for e in entries:
        if e.torch_key in keys:
            leaves.setdefault(e.jax_path, []).append((keys[e.torch_key], e))
    return leaves


def assemble(state: Mapping[str, np.ndarray], leaves: Mapping[str, Sequence[tuple[str, Entry]]], *,
             source: str) -> dict[str, np.ndarray]:
    """In-memory import: ``{jax path: forward(tensor)}``, the layers of a stacked variable stacked on axis 0."""
    out: dict[str, np.ndarray] = {}
    for path, items in leaves.items():
        arrays = [e.transform.forward(np.asarray(state[key])) for key, e in items]
        if items[0][1].layer is None:
            out[path] = arrays[0]
            continue
        shapes = {a.shape for a in arrays}
        if len(shapes) != 1:
            raise CheckpointMismatch(f"{source}: {path} has different shapes per layer {sorted(shapes)}")
        out[path] = np.stack(arrays)
    return out


def shape_problems(leaves: Mapping[str, Sequence[tuple[str, Entry]]], shape_of: Callable[[str], Shape],
                   jax_shapes: Mapping[str, Shape], *, source: str) -> list[str]:
    """Every source tensor whose shape is not the one ``jax_shapes`` (the config's variables) needs."""
    problems = []
    for path, items in leaves.items():
        for key, e in items:
            want = e.external_shape(jax_shapes[path])
            if tuple(shape_of(key)) != want:
                problems.append(f"{source}: {key} has shape {list(shape_of(key))}, the config needs {list(want)}")
    return problems
