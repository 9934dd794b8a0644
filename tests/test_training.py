"""Masked local training: frozen scalars stay bit-identical (SPEC §3)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from apf_ray.data import load_dataset
from apf_ray.flat import get_params
from apf_ray.models import build_model
from apf_ray.training import TrainSettings, train_local


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def test_frozen_scalars_stay_bit_identical_through_sgd_with_momentum_and_weight_decay(digits):
    torch.manual_seed(0)
    model = build_model("lenet5", num_classes=10, input_shape=digits.input_shape)
    params = get_params(model)
    mask = np.random.default_rng(1).random(params.size) < 0.5
    edge = np.flatnonzero(~mask)[:5]  # frozen positions holding the values most easily disturbed
    params[edge] = [0.0, -0.0, 1e-30, -3.5, 7.0]
    assert np.signbit(params[edge[1]]) and params[edge[2]] == np.float32(1e-30)  # really planted
    settings = TrainSettings(local_steps=5, batch_size=16, lr=0.1, momentum=0.9, weight_decay=0.01)
    out = train_local(model, digits.x_train[:64], digits.y_train[:64], params=params,
                      buffers=np.zeros(0, np.float32), mask=mask, settings=settings, seed=3)
    assert out.params[~mask].tobytes() == params[~mask].tobytes()
    assert (out.params[mask] != params[mask]).mean() > 0.5  # the active ones did train


def test_without_a_mask_every_scalar_trains(digits):
    torch.manual_seed(0)
    model = build_model("lenet5", num_classes=10, input_shape=digits.input_shape)
    params = get_params(model)
    settings = TrainSettings(local_steps=3, batch_size=16, lr=0.1)
    out = train_local(model, digits.x_train[:64], digits.y_train[:64], params=params,
                      buffers=np.zeros(0, np.float32), mask=None, settings=settings, seed=3)
    assert (out.params != params).mean() > 0.5
    assert out.num_samples == 64 and out.loss > 0


def test_without_a_mask_the_step_is_exactly_torchs_sgd_with_momentum_and_weight_decay(digits):
    from apf_ray.training import batch_indices, loss_fn

    torch.manual_seed(0)
    model = build_model("lenet5", num_classes=10, input_shape=digits.input_shape)
    start = get_params(model)
    settings = TrainSettings(local_steps=6, batch_size=16, lr=0.1, momentum=0.9, weight_decay=0.01)
    ours = train_local(model, digits.x_train[:80], digits.y_train[:80], params=start,
                       buffers=np.zeros(0, np.float32), mask=None, settings=settings, seed=4).params
    torch.manual_seed(0)
    reference = build_model("lenet5", num_classes=10, input_shape=digits.input_shape)
    sgd = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
    x, y = torch.from_numpy(digits.x_train[:80]), torch.from_numpy(digits.y_train[:80])
    for idx in batch_indices(80, 6, 16, seed=4):
        sgd.zero_grad()
        loss_fn(reference(x[idx]), y[idx]).backward()
        sgd.step()
    assert ours.tobytes() == get_params(reference).tobytes()


def test_a_model_trained_many_times_keeps_one_flat_binding_and_its_values(digits):
    from apf_ray.flat import bind_flat

    torch.manual_seed(0)
    model = build_model("lenet5", num_classes=10, input_shape=digits.input_shape)
    before = get_params(model)
    flat = bind_flat(model, torch.device("cpu"))
    assert flat.params.numpy().tobytes() == before.tobytes()  # binding keeps the values
    settings = TrainSettings(local_steps=2, batch_size=8, lr=0.1)
    for seed in range(3):
        out = train_local(model, digits.x_train[:32], digits.y_train[:32], params=before,
                          buffers=np.zeros(0, np.float32), mask=None, settings=settings, seed=seed)
        assert bind_flat(model, torch.device("cpu")) is flat
        assert get_params(model).tobytes() == out.params.tobytes()  # the parameters are the flat views
