"""Model registry: build a ``torch.nn.Module`` by name or by import path."""

from __future__ import annotations

import importlib
import inspect

from torch import nn

from apf_ray.models.nets import BasicBlock, CharLSTM, LeNet5, ResNet18

__all__ = ["MODELS", "BasicBlock", "CharLSTM", "LeNet5", "ResNet18", "build_model"]

MODELS: dict[str, type[nn.Module]] = {
    "lenet5": LeNet5,
    "resnet18": ResNet18,
    "char_lstm": CharLSTM,
}


def _import_model_class(path: str) -> type[nn.Module]:
    """The nn.Module subclass named by ``package.module:ClassName`` or ``package.module.ClassName``."""
    module_name, sep, attr = path.partition(":") if ":" in path else path.rpartition(".")
    if not (module_name and sep and attr):
        raise ValueError(f"model {path!r}: an import path must look like 'package.module:ClassName'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"model {path!r}: cannot import module {module_name!r} ({err})") from err
    cls = getattr(module, attr, None)
    if cls is None:
        raise ValueError(f"model {path!r}: module {module_name!r} has no attribute {attr!r}")
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ValueError(f"model {path!r}: {attr!r} is {cls!r}, not a torch.nn.Module subclass")
    return cls


def build_model(name: str, *, num_classes: int, input_shape: tuple[int, ...], **kwargs: object) -> nn.Module:
    """Construct the model ``name``: a key of :data:`MODELS` or an import path to your own
    ``nn.Module`` subclass (``"package.module:ClassName"``).

    The class is called with ``num_classes``, with ``input_shape`` when its constructor
    accepts it, and with ``kwargs``.
    """
    if name in MODELS:
        cls = MODELS[name]
    elif ":" in name or "." in name:
        cls = _import_model_class(name)
    else:
        raise ValueError(
            f"unknown model {name!r}; known models: {sorted(MODELS)}, "
            "or an import path 'package.module:ClassName' to an nn.Module subclass"
        )
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
