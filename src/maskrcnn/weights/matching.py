"""Lining up a state dict with a model by tensor name and shape, for the two ways weights are
loaded: exactly (a converted or saved model: every tensor must fit) and partially (fine-tuning
from pretrained weights: what fits is copied, the rest keeps its fresh initialisation)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import WeightsError

#: BatchNorm's step counter: in torch state dicts, never in Keras or frozen-BN weights.
_COUNTER = "num_batches_tracked"


@dataclass
class StateMatch:
    """How the tensors of a state dict fit a model, each list in the order of its dict.

    matched:    {name: tensor} with the model's name and shape.
    reshaped:   (name, shape in the state, shape in the model) for a name both have.
    missing:    the model's names the state lacks.
    unexpected: the state's names the model lacks.
    """

    matched: dict[str, torch.Tensor]
    reshaped: list[tuple[str, tuple, tuple]]
    missing: list[str]
    unexpected: list[str]


def match_state(model: torch.nn.Module, state: dict) -> StateMatch:
    """Compare ``state`` ({name: tensor}) with ``model.state_dict()`` by name and shape."""
    own = model.state_dict()
    matched, reshaped, unexpected = {}, [], []
    for name, value in state.items():
        if name not in own:
            unexpected.append(name)
        elif tuple(value.shape) != tuple(own[name].shape):
            reshaped.append((name, tuple(value.shape), tuple(own[name].shape)))
        else:
            matched[name] = value
    missing = [name for name in own if name not in state]
    return StateMatch(matched, reshaped, missing, unexpected)


def _first(names: list[str], n: int = 5) -> str:
    return f"{names[:n]}{'...' if len(names) > n else ''}"


def load_state_exact(model: torch.nn.Module, state: dict, source: str) -> None:
    """Load ``state`` into ``model``, every tensor (BatchNorm step counters aside) by name and
    shape.  Raises WeightsError naming ``source`` and the first layer whose shape differs (with
    both shapes), or the missing and unexpected names."""
    m = match_state(model, state)
    if m.reshaped:
        name, theirs, ours = m.reshaped[0]
        raise WeightsError(f"{source}: layer {name} has shape {theirs} in the weights but {ours} in the "
                           f"model (check num_classes/backbone in the config)")
    missing = [k for k in m.missing if not k.endswith(_COUNTER)]
    if missing or m.unexpected:
        raise WeightsError(f"{source}: weights do not fit the model: missing {_first(missing)}, "
                           f"unexpected {_first(m.unexpected)}")
    model.load_state_dict(m.matched, strict=False)


def load_state_partial(model: torch.nn.Module, state: dict) -> StateMatch:
    """Copy the tensors of ``state`` that match ``model`` by name and shape; the model's other
    tensors keep their values.  Returns the match.  Raises WeightsError when nothing matches
    (weights of another model)."""
    m = match_state(model, state)
    if not m.matched:
        raise WeightsError("pretrained weights share no tensor (name and shape) with this model")
    model.load_state_dict(m.matched, strict=False)
    return m
