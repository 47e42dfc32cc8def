"""Recipes: YAML <-> callbacks round trip, and every error names the key's path."""

from __future__ import annotations

import pytest
import torch.nn as nn
import yaml

from compress_callbacks import CompressionManager, GradualMagnitudePruning, QuantizationAwareTraining
from compress_callbacks.recipes import callbacks_from_recipe, callbacks_to_recipe

RECIPE = """
version: 1
callbacks:
  GradualMagnitudePruning:
    target_sparsity: 0.8
    start_step: 10
    end_step: 100
    update_every: 5
    granularity: channel
    scope: global
    exclude: ["re:.*classifier.*", "type:torch.nn.Conv1d"]
  QuantizationAwareTraining:
    start_step: 50
    weight_bits: 4
    activation_bits: null
    freeze_observers_step: 90
    modules: ["type:torch.nn.Linear"]
"""


def test_yaml_text_builds_the_callbacks_with_their_arguments():
    gmp, qat = callbacks_from_recipe(RECIPE)
    assert isinstance(gmp, GradualMagnitudePruning) and isinstance(qat, QuantizationAwareTraining)
    assert (gmp.target_sparsity, gmp.start_step, gmp.end_step, gmp.update_every) == (0.8, 10, 100, 5)
    assert (gmp.granularity, gmp.scope) == ("channel", "global")
    assert gmp.exclude == ["re:.*classifier.*", nn.Conv1d]
    assert (qat.start_step, qat.weight_bits, qat.activation_bits, qat.freeze_observers_step) == (50, 4, None, 90)
    assert qat.modules == [nn.Linear]


def test_round_trip_through_dict_yaml_and_file(tmp_path):
    manager = CompressionManager.from_recipe(RECIPE)
    recipe = manager.to_recipe()
    assert recipe["callbacks"]["GradualMagnitudePruning"]["exclude"] == ["re:.*classifier.*", "type:torch.nn.Conv1d"]
    path = tmp_path / "recipe.yaml"
    path.write_text(manager.to_recipe_yaml())
    for source in (recipe, manager.to_recipe_yaml(), path, str(path)):
        again = CompressionManager.from_recipe(source)
        assert again.to_recipe() == recipe
        assert [cb.config() for cb in again.callbacks] == [cb.config() for cb in manager.callbacks]


def test_two_callbacks_of_one_class_use_the_list_form():
    callbacks = [
        GradualMagnitudePruning(0.5, start_step=0, end_step=10, modules=["re:0"]),
        GradualMagnitudePruning(0.9, start_step=5, end_step=20, modules=[nn.Linear], exclude=["0"]),
    ]
    recipe = callbacks_to_recipe(callbacks)
    assert isinstance(recipe["callbacks"], list) and len(recipe["callbacks"]) == 2
    rebuilt = callbacks_from_recipe(yaml.safe_dump(recipe))
    assert [cb.config() for cb in rebuilt] == [cb.config() for cb in callbacks]


def test_the_example_recipe_file_loads():
    manager = CompressionManager.from_recipe("examples/recipe.yaml")
    assert [cb.name for cb in manager.callbacks] == ["GradualMagnitudePruning", "QuantizationAwareTraining"]


@pytest.mark.parametrize(
    ("recipe", "error", "message"),
    [
        ({"callbacks": {"GradualMagnitudePruning": {"target_sparsity": 0.5, "start_step": 0, "end_step": 9, "sparsity": 1}}},
         ValueError, "callbacks.GradualMagnitudePruning.sparsity: unknown key"),
        ({"callbacks": {"GradualMagnitudePruning": {"target_sparsity": 0.5, "start_step": 10, "end_step": 5}}},
         ValueError, "callbacks.GradualMagnitudePruning.end_step: `end_step` (5) must be > `start_step` (10)"),
        ({"callbacks": {"GradualMagnitudePruning": {"target_sparsity": "high", "start_step": 0, "end_step": 5}}},
         TypeError, "callbacks.GradualMagnitudePruning.target_sparsity: `target_sparsity` must be a float in [0, 1), got 'high'"),
        ({"callbacks": {"GradualMagnitudePruning": {"target_sparsity": 1.5, "start_step": 0, "end_step": 5}}},
         ValueError, "callbacks.GradualMagnitudePruning.target_sparsity: `target_sparsity` must be a float in [0, 1)"),
        ({"callbacks": {"GradualMagnitudePruning": {"target_sparsity": 0.5, "start_step": True, "end_step": 5}}},
         TypeError, "callbacks.GradualMagnitudePruning.start_step: `start_step` must be an int >= 0, got True"),
        ({"callbacks": {"GradualMagnitudePruning": {"start_step": 0, "end_step": 5}}},
         ValueError, "callbacks.GradualMagnitudePruning: missing required key(s) target_sparsity"),
        ({"callbacks": [{"QuantizationAwareTraining": {"weight_bits": 16}}]},
         ValueError, "callbacks[0].QuantizationAwareTraining.weight_bits: `weight_bits` must be an int from 2 to 8"),
        ({"callbacks": {"QuantizationAwareTraining": {"modules": ["type:torch.nn.NoSuchLayer"]}}},
         ValueError, "callbacks.QuantizationAwareTraining.modules[0]: 'type:torch.nn.NoSuchLayer' does not name"),
        ({"callbacks": {"QuantizationAwareTraining": {"modules": ["type:os.path.join"]}}},
         ValueError, "callbacks.QuantizationAwareTraining.modules[0]"),
        ({"callbacks": {"QuantizationAwareTraining": {"modules": 3}}},
         TypeError, "callbacks.QuantizationAwareTraining.modules: `modules` takes a module name"),
        ({"callbacks": {"Pruning": {}}}, ValueError, "callbacks.Pruning: unknown callback 'Pruning'"),
        ({"callbacks": {"QuantizationAwareTraining": [8]}}, TypeError, "callbacks.QuantizationAwareTraining: expected a mapping"),
        ({"callbacks": [{"QuantizationAwareTraining": {}, "GradualMagnitudePruning": {}}]}, TypeError, "callbacks[0]: expected a one-key"),
        ({"callbacks": {}, "modifiers": []}, ValueError, "modifiers: unknown top-level key"),
        ({"version": 2, "callbacks": {}}, ValueError, "version: this package reads recipe version 1"),
        ({"GradualMagnitudePruning": {}}, ValueError, "unknown top-level key"),
        ({"version": 1}, ValueError, "callbacks: missing"),
        ({"callbacks": "GradualMagnitudePruning"}, TypeError, "callbacks: expected a mapping"),
    ],
)
def test_bad_recipes_name_the_key(recipe, error, message):
    with pytest.raises(error) as info:
        CompressionManager.from_recipe(recipe)
    assert message in str(info.value)


def test_text_that_is_neither_a_file_nor_yaml_fails_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither an existing file nor YAML"):
        callbacks_from_recipe(str(tmp_path / "missing.yaml"))
    with pytest.raises(ValueError, match="not valid YAML"):
        callbacks_from_recipe("callbacks: [unclosed")
    with pytest.raises(TypeError, match="must be a dict, YAML text or a path"):
        callbacks_from_recipe(42)


def test_unregistered_callback_cannot_be_written():
    from compress_callbacks import CompressionTechnique

    class Custom(CompressionTechnique):
        pass

    with pytest.raises(ValueError, match="register_callback"):
        callbacks_to_recipe([Custom()])


def test_import_compress_callbacks_loads_no_framework(run_python):
    code = (
        "import sys, compress_callbacks as cc;"
        "cc.CompressionManager.from_recipe({'callbacks': {'GradualMagnitudePruning': "
        "{'target_sparsity': 0.5, 'start_step': 0, 'end_step': 4}}});"
        "import compress_callbacks.integrations;"
        "print(sorted(m for m in ('transformers', 'lightning', 'pytorch_lightning') if m in sys.modules))"
    )
    out = run_python("-c", code)
    assert out.stdout.strip() == "[]"


# ------------------------------------------------------------------ YAML 1.1 quirks
def test_exponent_numbers_are_numbers():
    gmp, qat = callbacks_from_recipe("""
callbacks:
  GradualMagnitudePruning: {target_sparsity: 5e-1, initial_sparsity: 1E-1, start_step: 0, end_step: 10}
  QuantizationAwareTraining: {start_step: 0}
""")
    assert (gmp.target_sparsity, gmp.initial_sparsity) == (0.5, 0.1)
    assert CompressionManager.from_recipe(CompressionManager([gmp, qat]).to_recipe_yaml()).to_recipe()["callbacks"][
        "GradualMagnitudePruning"]["target_sparsity"] == 0.5


def test_an_exponent_number_for_an_int_key_is_a_float_and_is_refused_with_the_int_to_write():
    with pytest.raises(TypeError, match=r"callbacks\.GradualMagnitudePruning\.end_step: `end_step` must be an int >= 0, "
                                        r"got 1000\.0 \(a float: write 1000\)"):
        callbacks_from_recipe("callbacks:\n  GradualMagnitudePruning: {target_sparsity: 0.5, start_step: 0, end_step: 1e3}\n")


def test_unquoted_n_to_m_explains_the_quotes():
    text = "callbacks:\n  GradualMagnitudePruning:\n    target_sparsity: null\n    start_step: 0\n    end_step: 10\n    granularity: {}\n"
    with pytest.raises(ValueError, match='line 6: YAML 1.1 reads the unquoted 2:4 as the base-60 number 124; write "2:4" in quotes'):
        callbacks_from_recipe(text.format("2:4"))
    (gmp,) = callbacks_from_recipe(text.format('"2:4"'))
    assert (gmp.granularity, gmp.target_sparsity) == ("2:4", 0.5)
    assert "granularity: '2:4'" in CompressionManager(gmp).to_recipe_yaml()


@pytest.mark.parametrize("text, key, lines", [
    ("callbacks:\n  GradualMagnitudePruning:\n    target_sparsity: 0.5\n    start_step: 0\n    end_step: 10\n    start_step: 5\n",
     "start_step", (6, 4)),
    ("callbacks:\n  QuantizationAwareTraining: {start_step: 1}\n  QuantizationAwareTraining: {start_step: 2}\n",
     "QuantizationAwareTraining", (3, 2)),
    ("version: 1\ncallbacks: {}\nversion: 1\n", "version", (3, 1)),
])
def test_duplicate_keys_are_refused(text, key, lines):
    with pytest.raises(ValueError, match=f"recipe line {lines[0]}: duplicate key '{key}' \\(first at line {lines[1]}\\)"):
        callbacks_from_recipe(text)


def test_strings_that_would_read_as_numbers_are_quoted_when_written():
    manager = CompressionManager(GradualMagnitudePruning(0.5, start_step=0, end_step=10, exclude=["1e3"]))
    assert manager.to_recipe_yaml().count("'1e3'") == 1
    assert CompressionManager.from_recipe(manager.to_recipe_yaml()).callbacks[0].exclude == ["1e3"]


@pytest.mark.parametrize("cls, key", [
    (GradualMagnitudePruning, "start_step"), (GradualMagnitudePruning, "end_step"), (GradualMagnitudePruning, "update_every"),
    (QuantizationAwareTraining, "start_step"), (QuantizationAwareTraining, "weight_bits"),
    (QuantizationAwareTraining, "activation_bits"), (QuantizationAwareTraining, "freeze_observers_step"),
    (QuantizationAwareTraining, "freeze_bn_step"),
])
def test_every_int_argument_refuses_an_integral_float_in_code_and_in_recipes(cls, key):
    base = {"target_sparsity": 0.5, "start_step": 0, "end_step": 20} if cls is GradualMagnitudePruning else {}
    with pytest.raises(TypeError, match=f"`{key}` must be .*, got 8.0 \\(a float: write 8\\)"):
        cls(**{**base, key: 8.0})
    with pytest.raises(TypeError, match=f"callbacks.{cls.__name__}.{key}: `{key}`"):
        callbacks_from_recipe({"callbacks": {cls.__name__: {**base, key: 8.0}}})
    accepted = cls(**{**base, key: 8})  # and what is accepted round-trips
    assert callbacks_from_recipe(CompressionManager(accepted).to_recipe_yaml())[0].config() == accepted.config()


# ------------------------------------------------------------------ manager-level keys
def test_log_every_is_part_of_the_recipe_and_round_trips():
    manager = CompressionManager.from_recipe("log_every: 7\ncallbacks:\n  QuantizationAwareTraining: {start_step: 3}\n")
    assert manager.log_every == 7
    assert manager.to_recipe()["log_every"] == 7
    assert list(manager.to_recipe()) == ["version", "log_every", "callbacks"]
    again = CompressionManager.from_recipe(manager.to_recipe_yaml())
    assert (again.log_every, again.to_recipe()) == (7, manager.to_recipe())
    assert CompressionManager.from_recipe(manager.to_recipe(), log_every=0).log_every == 0  # a keyword overrides the file
    assert CompressionManager.from_recipe({"callbacks": {}}).log_every == CompressionManager().log_every


@pytest.mark.parametrize("value, error", [(-1, ValueError), (2.0, TypeError), ("often", TypeError)])
def test_a_bad_log_every_names_its_key(value, error):
    with pytest.raises(error, match="^log_every: `log_every` must be an int >= 0"):
        CompressionManager.from_recipe({"log_every": value, "callbacks": {}})
