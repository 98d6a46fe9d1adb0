"""Strict state-dict loading: every tensor present, none extra, shapes equal, or a clear error."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

__all__ = ["WeightsMismatchError", "load_weights"]


class WeightsMismatchError(ValueError):
    """A state dict does not fit a model: missing, unexpected or mis-shaped tensors."""


def _listing(names: list[str], limit: int = 8) -> str:
    more = f" ... and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def load_weights(
    model: nn.Module,
    state_dict: Mapping[str, Tensor],
    source: str = "state dict",
    assign: bool = True,
) -> None:
    """Load ``state_dict`` into ``model`` all or nothing.

    With ``assign`` (the default) the tensors become the parameters: their dtype is kept, and a
    model built on the meta device receives real weights without allocating its own. Pass
    ``assign=False`` to copy into the existing parameters, e.g. when an optimizer holds them.

    Raises:
        WeightsMismatchError: naming every missing, unexpected or mis-shaped tensor; the model is
            left untouched.
    """
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    mismatched = [
        f"{k} (got {tuple(state_dict[k].shape)}, model has {tuple(v.shape)})"
        for k, v in expected.items()
        if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)
    ]
    problems = []
    if mismatched:
        problems.append(f"shape mismatch: {_listing(mismatched)}")
    if missing:
        problems.append(f"missing: {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected: {_listing(unexpected)}")
    if problems:
        raise WeightsMismatchError(f"{source} does not fit the model; " + "; ".join(problems))
    model.load_state_dict(dict(state_dict), strict=True, assign=assign)
    device = next(iter(state_dict.values())).device if state_dict else None
    for module in model.modules():  # buffers outside the state dict (counters) left on meta
        for name, buffer in list(module.named_buffers(recurse=False)):
            if buffer.is_meta:
                module.register_buffer(
                    name,
                    torch.zeros(buffer.shape, dtype=buffer.dtype, device=device),
                    persistent=name not in module._non_persistent_buffers_set,
                )
