"""Loading a checkpoint: ``load_weights`` into a whole model (its FusedMoE
layers and every other parameter), ``iterate_safetensors`` over a folder, and
vLLM's ``make_expert_params_mapping`` for models that write their own loop.

The expert tensor names a FusedMoE layer accepts, and the part of each that a
TP/EP rank keeps, are described in fused_moe.shards. This module sits above
fused_moe.layer: the layer loads its own tensors without it.

    model = MyModel(...)  # with FusedMoE layers in it
    load_weights(model, iterate_safetensors("path/to/checkpoint"))
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from .layer import FusedMoE
from .shards import make_expert_params_mapping

__all__ = ["iterate_safetensors", "load_weights", "make_expert_params_mapping"]


def iterate_safetensors(path: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of every tensor in the ``*.safetensors`` files of folder
    ``path``, files in sorted order, each tensor read when it is reached."""
    from safetensors import safe_open  # an optional dependency: needed only here

    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise ValueError(f"iterate_safetensors: path={str(path)!r} holds no *.safetensors file")
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def load_weights(model: torch.nn.Module, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
    """Loads a checkpoint into ``model`` and every FusedMoE layer in it.

    A name under a FusedMoE layer's module path (e.g. ``model.layers.0.mlp.
    experts.3.gate_proj.weight`` for a layer at ``model.layers.0.mlp.experts``)
    goes through that layer's weight_loader; any other name that is a parameter
    of ``model`` (the gate, a shared expert) is copied, or passed to the
    parameter's own ``weight_loader``. Names that match nothing are skipped: a
    checkpoint may hold more than the model. FP8 layers then make their
    kernels' scales (FusedMoE.process_weights_after_loading). Returns the
    names of the parameters loaded.
    """
    layers = [(path, m) for path, m in model.named_modules() if isinstance(m, FusedMoE)]
    # A layer's own parameters load through it; a submodule's (shared_experts) are plain ones.
    expert_params = {id(p) for _, m in layers for p in m.parameters(recurse=False)}
    plain = {n: p for n, p in model.named_parameters() if id(p) not in expert_params}
    loaded = set()
    for name, tensor in weights:
        if name in plain:
            _load_plain(plain[name], tensor, name)
            loaded.add(name)
            continue
        for path, layer in layers:
            if not path or name.startswith(path + "."):
                loaded |= layer.load_weights([(name, tensor)], prefix=path)
                break
    # Scale conversions and their checks once, at load time, not in a first forward.
    for _, layer in layers:
        layer.process_weights_after_loading()
    return loaded


def _load_plain(param, tensor, name):
    loader = getattr(param, "weight_loader", None)
    if loader is not None:
        loader(param, tensor)
        return
    if param.shape != tensor.shape:
        raise ValueError(f"{name}: checkpoint shape {list(tensor.shape)}, expected "
                         f"{list(param.shape)}")
    with torch.no_grad():
        param.copy_(tensor)
