"""Technique configs: one dataclass per technique validates its keyword arguments, for every user of them."""

from __future__ import annotations

import dataclasses
import inspect
import logging

import pytest
import torch
import torch.nn as nn

from compress_callbacks import (
    CompressionManager,
    CompressionTechnique,
    GradualMagnitudePruning,
    PruningConfig,
    QuantizationAwareTraining,
    QuantizationConfig,
)
from compress_callbacks.config import ArgumentError
from compress_callbacks.quantization.ptq import calibrate
from compress_callbacks.quantization.spec import LayerQuantSpec, get_qparams


@pytest.mark.parametrize("cls", [GradualMagnitudePruning, QuantizationAwareTraining])
def test_config_fields_are_the_keyword_arguments_with_the_same_defaults(cls):
    parameters = list(inspect.signature(cls.__init__).parameters.values())[1:]
    fields = dataclasses.fields(cls.config_class)
    assert [p.name for p in parameters] == [f.name for f in fields]
    for parameter, field in zip(parameters, fields):
        default = dataclasses.MISSING if parameter.default is parameter.empty else parameter.default
        assert field.default == default, field.name


def test_the_technique_reads_its_config_and_its_fields_are_read_only():
    gmp = GradualMagnitudePruning(None, start_step=2, end_step=8, granularity="2:4", modules="re:0")
    assert gmp.settings == PruningConfig(0.5, 2, 8, granularity="2:4", modules=["re:0"])
    assert (gmp.target_sparsity, gmp.modules) == (0.5, ["re:0"])  # normalized once, here
    with pytest.raises(AttributeError):
        gmp.target_sparsity = 0.9  # would bypass validation
    gmp.config()["modules"].append("re:1")
    assert gmp.modules == ["re:0"]  # config() hands out copies
    qat = QuantizationAwareTraining.from_config(QuantizationConfig(start_step=3, weight_bits=4))
    assert (qat.start_step, qat.weight_bits, qat.config()) == (3, 4, QuantizationConfig(3, 4).to_kwargs())
    with pytest.raises(TypeError, match="QuantizationConfig"):
        QuantizationAwareTraining.from_config(gmp.settings)


@pytest.mark.parametrize("make, argument, error", [
    (lambda: PruningConfig(0.5, 0, 10, scope="model"), "scope", ValueError),
    (lambda: PruningConfig(0.3, 0, 10, granularity="2:4"), "target_sparsity", ValueError),
    (lambda: PruningConfig(0.5, 0, 10, granularity="4:2"), "granularity", ValueError),
    (lambda: PruningConfig(0.5, 0, 10, granularity=4), "granularity", TypeError),
    (lambda: PruningConfig(0.5, 5, 5), "end_step", ValueError),
    (lambda: PruningConfig(0.5, 0, 10, initial_sparsity=0.6), "initial_sparsity", ValueError),
    (lambda: PruningConfig(float("nan"), 0, 10), "target_sparsity", ValueError),
    (lambda: PruningConfig(None, 0, 10), "target_sparsity", TypeError),
    (lambda: PruningConfig(0.5, 0, 10, modules=3), "modules", TypeError),
    (lambda: PruningConfig(0.5, 0, 10, exclude=["re:("]), "exclude", ValueError),
    (lambda: QuantizationConfig(weight_bits=True), "weight_bits", TypeError),
    (lambda: QuantizationConfig(freeze_bn_step=-1), "freeze_bn_step", ValueError),
])
def test_errors_name_their_argument_in_the_message_and_as_an_attribute(make, argument, error):
    with pytest.raises(error) as info:
        make()
    assert isinstance(info.value, ArgumentError) and info.value.argument == argument
    assert f"`{argument}`" in str(info.value)


def test_calibrate_and_the_spec_check_bits_as_qat_does():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(TypeError, match="`activation_bits` must be 8 or None"):
        calibrate(model, [torch.randn(2, 4)], activation_bits=8.0)
    with pytest.raises(TypeError, match="`weight_bits` must be an int from 2 to 8"):
        calibrate(model, [torch.randn(2, 4)], weight_bits=4.0)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()) and not get_qparams(model)
    calibrate(model, [torch.randn(2, 4)], weight_bits=4, modules=(name for name in ["0", "2"]), exclude=iter(["2"]))
    assert list(get_qparams(model)) == ["0"]
    with pytest.raises(ValueError, match="`weight_bits` must be an int from 2 to 8, got 9"):
        LayerQuantSpec(weight_bits=9, weight_scale=torch.ones(2))


def test_a_technique_without_config_class_reads_its_attributes():
    class Every(CompressionTechnique):
        def __init__(self, every: int = 1):
            super().__init__()
            self.every = every

    assert Every(every=4).config() == {"every": 4}
    with pytest.raises(TypeError, match="config_class"):
        class Broken(CompressionTechnique, config_class=dict):
            pass


def test_the_manager_logs_through_accelerates_main_process_logger(caplog):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    model = nn.Sequential(nn.Linear(4, 4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    manager = CompressionManager(GradualMagnitudePruning(0.5, 0, 2), accelerator=Accelerator(cpu=True))
    try:
        with caplog.at_level(logging.INFO, logger="compress_callbacks"):
            manager.attach(model, optimizer)
    finally:
        AcceleratorState._reset_state(True)
    assert "[RANK 0] attach at step 0" in caplog.text  # Accelerate's MultiProcessAdapter prefix
