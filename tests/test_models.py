"""Model registry, parameter counts and forward shapes."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from apf_ray.models import CharLSTM, LeNet5, ResNet18, build_model


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_lenet5_has_61706_parameters_on_1x32x32() -> None:
    # conv1 6*1*5*5+6 = 156, conv2 16*6*5*5+16 = 2416, fc1 16*5*5*120+120 = 48120,
    # fc2 120*84+84 = 10164, fc3 84*10+10 = 850: 156+2416+48120+10164+850 = 61706.
    assert num_params(build_model("lenet5", num_classes=10, input_shape=(1, 32, 32))) == 61706


def test_lenet5_on_rgb_adds_only_conv1_weights() -> None:
    # conv1 grows from 6*1*25 to 6*3*25 weights: 61706 + 300.
    assert num_params(build_model("lenet5", num_classes=10, input_shape=(3, 32, 32))) == 62006


def test_resnet18_has_11173962_parameters_for_10_classes() -> None:
    assert num_params(build_model("resnet18", num_classes=10, input_shape=(3, 32, 32))) == 11_173_962


def test_char_lstm_matches_leaf_shakespeare_size() -> None:
    # embedding 81*8 = 648; LSTM layer 1 4*256*(8+256) + 2*4*256 = 272384, layer 2
    # 4*256*(256+256) + 2*4*256 = 526336; fc 256*81+81 = 20817: total 820185.
    assert num_params(build_model("char_lstm", num_classes=81, input_shape=(80,))) == 820_185


@pytest.mark.parametrize(
    ("name", "input_shape", "num_classes", "batch"),
    [
        ("lenet5", (1, 32, 32), 10, torch.randn(4, 1, 32, 32)),
        ("lenet5", (1, 28, 28), 7, torch.randn(4, 1, 28, 28)),
        ("resnet18", (3, 32, 32), 10, torch.randn(2, 3, 32, 32)),
        ("char_lstm", (80,), 81, torch.randint(0, 81, (3, 80))),
    ],
)
def test_forward_returns_one_logit_per_class(
    name: str, input_shape: tuple, num_classes: int, batch: torch.Tensor
) -> None:
    model = build_model(name, num_classes=num_classes, input_shape=input_shape)
    assert model(batch).shape == (len(batch), num_classes)


def test_char_lstm_predicts_from_the_last_step() -> None:
    torch.manual_seed(0)
    model = CharLSTM(num_classes=81, input_shape=(5,))
    a = torch.tensor([[1, 2, 3, 4, 5]])
    b = torch.tensor([[1, 2, 3, 4, 6]])
    assert not torch.allclose(model(a), model(b))  # the last character changes the prediction


def test_same_seed_gives_the_same_initial_model() -> None:
    torch.manual_seed(7)
    a = build_model("resnet18", num_classes=10, input_shape=(3, 32, 32))
    torch.manual_seed(7)
    b = build_model("resnet18", num_classes=10, input_shape=(3, 32, 32))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def test_registry_returns_the_registered_classes() -> None:
    assert isinstance(build_model("lenet5", num_classes=10, input_shape=(1, 32, 32)), LeNet5)
    assert isinstance(build_model("resnet18", num_classes=10, input_shape=(3, 32, 32)), ResNet18)


def test_lenet5_rejects_images_too_small_for_two_conv_pool_stages() -> None:
    with pytest.raises(ValueError, match=r"LeNet5 needs .*sides >= 16, got \(1, 8, 8\)"):
        build_model("lenet5", num_classes=10, input_shape=(1, 8, 8))


@pytest.fixture
def user_models(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A user module with an nn.Module that takes input_shape, one that does not, and a non-module."""
    (tmp_path / "my_models.py").write_text(
        textwrap.dedent(
            """
            from torch import nn

            class Shaped(nn.Module):
                def __init__(self, num_classes, input_shape, width=3):
                    super().__init__()
                    self.input_shape = input_shape
                    self.fc = nn.Linear(input_shape[0] * width, num_classes)

            class Plain(nn.Module):
                def __init__(self, num_classes):
                    super().__init__()
                    self.fc = nn.Linear(4, num_classes)

            class NotAModule:
                def __init__(self, num_classes):
                    pass
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    return "my_models"


def test_import_path_builds_a_user_model_with_input_shape_and_kwargs(user_models: str) -> None:
    model = build_model(f"{user_models}:Shaped", num_classes=5, input_shape=(2,), width=4)
    assert model.input_shape == (2,) and model.fc.weight.shape == (5, 8)


def test_dotted_import_path_builds_a_model_without_input_shape(user_models: str) -> None:
    model = build_model(f"{user_models}.Plain", num_classes=6, input_shape=(1, 32, 32))
    assert model.fc.out_features == 6


def test_unknown_model_name_lists_known_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown model 'vgg16'; known: char_lstm, lenet5, resnet18"):
        build_model("vgg16", num_classes=10, input_shape=(3, 32, 32))


def test_missing_module_names_the_path() -> None:
    with pytest.raises(ValueError, match=r"model 'no_such_pkg.models:Net': cannot import module 'no_such_pkg.models'"):
        build_model("no_such_pkg.models:Net", num_classes=10, input_shape=(1, 32, 32))


def test_missing_class_names_the_module_and_attribute(user_models: str) -> None:
    with pytest.raises(ValueError, match=r"module 'my_models' has no attribute 'Nope'"):
        build_model("my_models:Nope", num_classes=10, input_shape=(1, 32, 32))


def test_non_module_class_is_rejected(user_models: str) -> None:
    with pytest.raises(ValueError, match=r"model 'my_models:NotAModule' is .* not a torch.nn.Module subclass"):
        build_model("my_models:NotAModule", num_classes=10, input_shape=(1, 32, 32))


def test_unexpected_keyword_names_the_model_and_argument() -> None:
    with pytest.raises(ValueError, match=r"model 'lenet5': cannot call LeNet5.*'dropout'"):
        build_model("lenet5", num_classes=10, input_shape=(1, 32, 32), dropout=0.5)
