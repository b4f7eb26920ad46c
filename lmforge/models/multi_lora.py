"""Many LoRA adapters in one batch (Punica, arXiv:2310.18547; S-LoRA, arXiv:2311.03285).

The model files know nothing of LoRA. ``LoRAManager`` swaps each target linear of the served
model for a ``MultiLoRALinear`` (``lora_targets``: a module named as a PEFT target, ``q_proj`` ...
``down_proj`` or GPT's ``c_attn``, ``c_proj``, ``c_fc``, or a fused layer the model lists in
``fused_parts``), as ``packing.py`` and ``quant.py`` swap in their layers; a model family
gets multi-LoRA by naming its projections so.
The served model is fused (q|k|v, gate|up) and its linears may be prepacked bf16 or 4-bit, so the
wrapper takes whatever linear is there and adds each adapter's update to the rows (tokens) of
that adapter only, into the output slice of the projection it targets.

The ``LoRABatch`` of a step says which rows use which adapter. The engine sets it for one forward
pass on the ``LoRAContext`` that every wrapper of the model shares
(``with manager.applying(names, counts): model(...)``), the part vLLM's Punica wrapper plays, so
the model's forward is the plain model's. ``LoRAManager`` keeps the registered adapters and
loads them into the model on demand, at most ``max_loras`` resident. Adapters are PEFT
directories (``models/lora.py``).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lmforge.errors import InvalidRequestError, ModelLoadError
from lmforge.models.lora import (
    SUPPORTED_TARGETS,
    LoRAConfig,
    adapter_pairs,
    load_peft_adapter,
    read_peft_config,
)


@dataclass
class LoRABatch:
    """Which rows of a step's flat batch use which adapter (rows of the base model: none).

    ``groups``: (slot, rows) per adapter in the step; ``rows`` is a (n,) int64 tensor of row
    indices into the flat batch of T tokens, or None when every row uses that adapter.
    """

    groups: list[tuple[int, torch.Tensor | None]]


class LoRAContext:
    """The ``LoRABatch`` of the forward pass in progress, read by every ``MultiLoRALinear`` of
    one model.

    ``batch`` is None (the base model) outside ``applying``, so a forward pass that sets none
    (an embeddings request, a plain call) runs the base model.
    """

    def __init__(self) -> None:
        self.batch: LoRABatch | None = None

    @contextmanager
    def applying(self, batch: LoRABatch | None) -> Iterator[None]:
        """``batch`` for the forward passes inside the ``with`` block; None again after it,
        also when the block raises."""
        self.batch = batch
        try:
            yield
        finally:
            self.batch = None


class MultiLoRALinear(nn.Module):
    """Any linear layer (``nn.Linear``, ``PackedLinear``, ``Int4DecodeLinear``) plus the
    updates of every resident adapter that targets it, each applied to its own rows.

    ``forward(x (T, in)) -> (T, out)``: ``base(x)``, then for each (slot, rows) of the
    ``LoRABatch`` set on ``context``: ``y[rows] += (x[rows] @ A^T) @ B^T`` with the adapter's
    A (R, in) and B (out, R), scaling folded into B. A fused layer (``parts`` q|k|v or
    gate|up) stacks the parts' A along R and makes B block-diagonal, so each part's update
    lands in its output slice and a part the adapter does not target gets zeros: one pair of
    matmuls per adapter (the "gather, shrink, expand, scatter" of Punica's BGMV, as a loop over
    the few adapters of a step). Base outputs are untouched: no batch on the context costs one
    check.

    Args:
        base: the layer to wrap.
        parts: (HF module name, output size) of each projection in ``base``'s output, in order.
        context: where the step's ``LoRABatch`` is read, shared by the model's wrappers.
    """

    def __init__(self, base: nn.Module, parts: list[tuple[str, int]], context: LoRAContext):
        super().__init__()
        self.base = base
        self.parts = parts
        self.context = context
        self.in_features, self.out_features = base.in_features, base.out_features
        # slot -> (A^T (in, R), B^T (R, out)): pre-transposed so both matmuls read rows
        self.adapters: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        lora = self.context.batch
        if lora is None:
            return y
        for slot, rows in lora.groups:
            weights = self.adapters.get(slot)
            if weights is None:  # this adapter does not target this layer
                continue
            a_t, b_t = weights
            if rows is None:
                y += (x @ a_t @ b_t).to(y.dtype)
            else:
                delta = x.index_select(0, rows) @ a_t @ b_t  # (n, in) -> (n, R) -> (n, out)
                # in place into the fresh base output; index_put_ is 2x faster than index_add
                y.index_put_((rows,), delta.to(y.dtype), accumulate=True)
        return y

    def set_adapter(self, slot: int, pairs: dict[str, tuple[torch.Tensor, torch.Tensor]],
                    scaling: float) -> None:
        """Install an adapter's (A (r, in), B (out_part, r)) per HF part name (missing parts: no
        update) under ``slot``, in the layer's dtype and device."""
        present = [(name, size, pairs[name]) for name, size in self.parts if name in pairs]
        if not present:
            return
        ref = next(t for t in self.base.state_dict().values() if t.is_floating_point())
        rank = sum(a.shape[0] for _, _, (a, _) in present)
        a_all = torch.cat([a for _, _, (a, _) in present]).float()  # (R, in)
        b_all = torch.zeros(self.out_features, rank)  # (out, R), block-diagonal
        offset, r0 = 0, 0
        for name, size in self.parts:
            if name in pairs:
                a, b = pairs[name]
                b_all[offset:offset + size, r0:r0 + a.shape[0]] = b.float() * scaling
                r0 += a.shape[0]
            offset += size
        self.adapters[slot] = (a_all.t().contiguous().to(ref.device, ref.dtype),
                               b_all.t().contiguous().to(ref.device, ref.dtype))

    def remove_adapter(self, slot: int) -> None:
        self.adapters.pop(slot, None)


def lora_targets(model: nn.Module) -> dict[str, list[tuple[str, int]]]:
    """The linears of ``model`` that adapters may target, as the model is now (fused or not).

    A module whose own name is a PEFT target (``SUPPORTED_TARGETS``: ``q_proj`` ...) is its one
    part; a fused layer that the model lists in ``fused_parts``
    (``LlamaForCausalLM.fuse_projections_``) holds several.

    Returns:
        module name (``model.layers.0.self_attn.qkv_proj``) -> [(HF part name, output size)],
        the parts in the layer's output order.
    """
    fused = getattr(model, "fused_parts", {})
    return {name: fused.get(name) or [(name, module.out_features)]
            for name, module in model.named_modules()
            if name in fused or name.rpartition(".")[2] in SUPPORTED_TARGETS}


@dataclass
class RegisteredAdapter:
    """An adapter the engine may serve: where it lives and its unique id (its slot)."""

    name: str
    directory: Path
    config: LoRAConfig
    lora_id: int  # unique per registration: the wrappers' slot and the prefix-cache salt


class LoRAManager:
    """Registered adapters by name, and which of them are loaded into the model (resident).

    Adapters are read from disk at first use (``activate``); past ``max_loras`` resident ones,
    the least recently used adapter that the current step does not need is dropped (it is read
    again when next used). A step needs all of its adapters at once, so it may hold more than
    ``max_loras`` for as long as it runs them. The model's target linears (``lora_targets``)
    are wrapped in ``MultiLoRALinear`` when the first adapter is registered, so a base-only
    server runs the plain model. Not thread-safe: the engine loop thread owns it.

    Args:
        model: the served model (fused or not, any linear kind).
        max_loras: adapters kept resident.
    """

    def __init__(self, model: nn.Module, max_loras: int):
        self.model, self.max_loras = model, max_loras
        self.context = LoRAContext()  # the step's LoRABatch, read by the wrappers
        self.registered: dict[str, RegisteredAdapter] = {}
        self.resident: OrderedDict[str, int] = OrderedDict()  # name -> slot, LRU first
        self.layers: dict[str, MultiLoRALinear] | None = None
        self._next_id = 1
        self.num_loads = 0  # adapters read from disk, cumulative

    def register(self, name: str, directory: str | Path) -> RegisteredAdapter:
        """Register an adapter under ``name`` (its weights are read at first use).

        Raises:
            InvalidRequestError: ``name`` is already registered.
            ModelLoadError: missing/invalid adapter, or targets the model lacks.
        """
        if name in self.registered:
            raise InvalidRequestError(f"a LoRA adapter named {name!r} is already loaded; "
                                      "remove it first or pick another name", param="lora_name")
        config = read_peft_config(directory)
        adapter = RegisteredAdapter(name, Path(directory), config, self._next_id)
        self._next_id += 1
        self._wrap_model()
        self.registered[name] = adapter
        return adapter

    def unregister(self, name: str) -> None:
        """Forget an adapter and drop its weights. Raises InvalidRequestError if unknown."""
        self.get(name)
        self._evict(name)
        del self.registered[name]

    def get(self, name: str) -> RegisteredAdapter:
        """Raises InvalidRequestError naming an unknown adapter and the known ones."""
        adapter = self.registered.get(name)
        if adapter is None:
            known = ", ".join(sorted(self.registered)) or "none"
            raise InvalidRequestError(f"the LoRA adapter {name!r} does not exist (loaded "
                                      f"adapters: {known})", param="model",
                                      code="model_not_found")
        return adapter

    def activate(self, names: set[str]) -> dict[str, int]:
        """Make ``names`` resident (most recently used), evicting over the limit; their slots.

        Raises:
            InvalidRequestError: an unknown name. ModelLoadError: an adapter cannot be read or
                does not fit the model.
        """
        for name in names:
            if name in self.resident:
                self.resident.move_to_end(name)
            else:
                self._load(self.get(name))
        for name in [n for n in self.resident if n not in names]:
            if len(self.resident) <= self.max_loras:
                break
            self._evict(name)
        return {name: self.resident[name] for name in names}

    def batch(self, names: list[str | None], counts: list[int]) -> LoRABatch | None:
        """The ``LoRABatch`` of a step whose flat batch holds ``counts[i]`` consecutive rows of
        request i, which uses adapter ``names[i]`` (None = the base model); None when no
        request uses an adapter."""
        wanted = {n for n in names if n is not None}
        if not wanted:
            return None
        slots = self.activate(wanted)
        if len(wanted) == 1 and None not in names:
            return LoRABatch([(slots[names[0]], None)])
        rows: dict[int, list[int]] = {}
        start = 0
        for name, n in zip(names, counts):
            if name is not None:
                rows.setdefault(slots[name], []).extend(range(start, start + n))
            start += n
        device = next(self.model.parameters()).device
        return LoRABatch([(slot, torch.tensor(r, device=device)) for slot, r in rows.items()])

    def applying(self, names: list[str | None], counts: list[int]) -> AbstractContextManager[None]:
        """Each request's adapter on its rows in the forward pass inside the ``with`` block:
        ``with loras.applying(names, counts): model(...)``; the arguments are ``batch``'s.

        Raises:
            as ``activate``, when called (before the block runs).
        """
        return self.context.applying(self.batch(names, counts))

    def _wrap_model(self) -> None:
        if self.layers is not None:
            return
        self.layers = {}
        if getattr(self.model, "fused_decoder", None) is not None:
            self.model.fused_decoder = None  # it would run the unwrapped projections
        for name, parts in lora_targets(self.model).items():
            parent_name, _, attr = name.rpartition(".")
            parent = self.model.get_submodule(parent_name)
            wrapper = MultiLoRALinear(getattr(parent, attr), parts, self.context)
            setattr(parent, attr, wrapper)
            self.layers[name] = wrapper

    def _load(self, adapter: RegisteredAdapter) -> None:
        config, weights = load_peft_adapter(adapter.directory)
        pairs = adapter_pairs(weights, str(adapter.directory))
        part_of = {part: (name, size) for name, layer in self.layers.items()
                   for part, size in layer.parts}
        by_layer: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
        for module, (a, b) in pairs.items():
            where = part_of.get(module)
            if where is None:
                raise ModelLoadError(f"adapter {adapter.name!r} targets {module}, which this "
                                     "model does not have (or lmforge cannot adapt)")
            layer, size = where
            in_features = self.layers[layer].in_features
            if a.shape[1] != in_features or b.shape[0] != size:
                raise ModelLoadError(
                    f"adapter {adapter.name!r} does not fit this model: {module} has A "
                    f"{tuple(a.shape)} and B {tuple(b.shape)}, the model's layer maps "
                    f"{in_features} -> {size}; was it trained on another base model?")
            by_layer.setdefault(layer, {})[module] = (a, b)
        for layer, layer_pairs in by_layer.items():
            self.layers[layer].set_adapter(adapter.lora_id, layer_pairs, config.scaling)
        self.resident[adapter.name] = adapter.lora_id
        self.num_loads += 1

    def _evict(self, name: str) -> None:
        slot = self.resident.pop(name, None)
        if slot is not None:
            for layer in self.layers.values():
                layer.remove_adapter(slot)
