"""Model registry: build a ``torch.nn.Module`` by name or by import path."""

from __future__ import annotations

import inspect

from torch import nn

from apf_ray.models.nets import BasicBlock, CharLSTM, LeNet5, ResNet18
from apf_ray.plugins import resolve, subclass_of

__all__ = ["MODELS", "BasicBlock", "CharLSTM", "LeNet5", "ResNet18", "build_model"]

MODELS: dict[str, type[nn.Module]] = {
    "lenet5": LeNet5,
    "resnet18": ResNet18,
    "char_lstm": CharLSTM,
}


def build_model(name: str, *, num_classes: int, input_shape: tuple[int, ...], **kwargs: object) -> nn.Module:
    """Construct the model ``name``: a key of :data:`MODELS` or an import path to your own
    ``nn.Module`` subclass (``"package.module:ClassName"``).

    The class is called with ``num_classes``, with ``input_shape`` when its constructor
    accepts it, and with ``kwargs``.
    """
    cls = resolve(name, MODELS, "model", check=subclass_of(nn.Module), expected="a torch.nn.Module subclass")
    signature = inspect.signature(cls)
    takes_input_shape = "input_shape" in signature.parameters or any(
        p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values()
    )
    arguments: dict[str, object] = {"num_classes": num_classes}
    if takes_input_shape:
        arguments["input_shape"] = tuple(input_shape)
    arguments.update(kwargs)
    try:
        signature.bind(**arguments)
    except TypeError as err:
        raise ValueError(
            f"model {name!r}: cannot call {cls.__qualname__}{signature} with {sorted(arguments)}: {err}"
        ) from None
    return cls(**arguments)
