"""AdaLoRAConfig: the one home of the settings (validation, JSON, PEFT), the method table, and every place that reads
the settings from it (callback, task modules, command line)."""

from __future__ import annotations

import dataclasses
import inspect
import json

import pytest

from adalora_pl.config import METHODS, RESUME_FIELDS, AdaLoRAConfig, Method, config_for_method, method_spec
from adalora_pl.errors import ConfigError

FIELDS = [f.name for f in dataclasses.fields(AdaLoRAConfig)]


@pytest.mark.parametrize(
    "settings,message",
    [
        (dict(init_r=2, target_r=3), r"target_r \(3\) must not exceed init_r \(2\)"),
        (dict(init_r=0), r"init_r must be a positive integer, got 0"),
        (dict(lora_dropout=1.0), r"lora_dropout must be in \[0, 1\), got 1.0"),
        (dict(beta1=1.0), r"beta1 must be in \[0, 1\), got 1.0"),
        (dict(importance="fisher"), r"importance must be one of .*'sensitivity_uncertainty'.*got 'fisher'"),
        (dict(orth_reg_weight=-0.1), r"orth_reg_weight must be >= 0, got -0.1"),
        (dict(delta_t=0), r"delta_t must be an integer >= 1, got 0"),
        (dict(tinit=1.5), r"tinit as a fraction of training must be in \[0, 1\), got 1.5"),
        (dict(tfinal=-3), r"tfinal must be >= 0 steps, got -3"),
        (dict(total_step=0), r"total_step must be a positive integer or None, got 0"),
        (dict(tinit=10, tfinal=10, total_step=20), r"tinit \+ tfinal must be < total_step.*total_step=20"),
        (dict(adapter_init="svd"),
         r"adapter_init must be one of \['reference', 'orthogonal', 'weight_svd', 'gradient_svd'\], got 'svd'"),
        (dict(target_modules="query"), r"target_modules must be a list of module name suffixes, got 'query'"),
        (dict(target_modules=[]), r"target_modules is empty"),
    ],
)
def test_a_bad_value_is_refused_naming_the_field_and_the_value(settings, message):
    with pytest.raises(ConfigError, match=message):
        AdaLoRAConfig(**settings)


def test_json_round_trip_and_unknown_keys():
    config = AdaLoRAConfig(target_modules=["query", "value"], init_r=3, target_r=1, tinit=0.1, tfinal=400)
    assert config.target_modules == ("query", "value")  # lists from YAML become tuples: frozen, compares by value
    text = json.dumps(config.to_dict())
    assert AdaLoRAConfig.from_dict(json.loads(text)) == config
    with pytest.raises(ConfigError, match=r"unknown AdaLoRA settings \['deltaT'\]"):
        AdaLoRAConfig.from_dict({**config.to_dict(), "deltaT": 3})


def test_resolved_puts_the_schedule_in_steps_and_lets_a_short_run_through():
    config = AdaLoRAConfig(init_r=3, target_r=1, tinit=0.1, tfinal=0.3)
    resolved = config.resolved(200)
    assert (resolved.tinit, resolved.tfinal, resolved.total_step) == (20, 60, 200)
    assert resolved.schedule_gap() is None
    short = AdaLoRAConfig(init_r=3, target_r=1, tinit=800, tfinal=3500).resolved(1)
    assert short.schedule_gap() == "1 optimizer steps leave no budgeting phase after tinit=800 and before tfinal=3500"


def test_a_resume_compares_the_schedule_fields_only():
    run = AdaLoRAConfig(init_r=3, target_r=1, tinit=2, tfinal=6).resolved(16)
    run.check_resume(dataclasses.replace(run, lora_dropout=0.1, target_modules=["query"]).to_dict())  # not schedule
    with pytest.raises(ConfigError, match=r"target_r 2 -> 1, importance 'sensitivity' -> 'sensitivity_uncertainty'"):
        run.check_resume(dataclasses.replace(run, target_r=2, importance="sensitivity").to_dict())
    assert set(RESUME_FIELDS) <= set(FIELDS)


def test_peft_config_converts_both_ways():
    peft = pytest.importorskip("peft")
    ours = AdaLoRAConfig(target_modules=["query", "value"], init_r=6, target_r=2, lora_alpha=16, lora_dropout=0.1,
                         tinit=50, tfinal=100, delta_t=5, beta1=0.8, beta2=0.9, orth_reg_weight=0.3, total_step=400)
    theirs = peft.AdaLoraConfig(target_modules=["query", "value"], **ours.to_peft())
    for name, field in (("init_r", "init_r"), ("target_r", "target_r"), ("tinit", "tinit"), ("tfinal", "tfinal"),
                        ("deltaT", "delta_t"), ("beta1", "beta1"), ("beta2", "beta2"), ("total_step", "total_step"),
                        ("orth_reg_weight", "orth_reg_weight"), ("lora_alpha", "lora_alpha"),
                        ("lora_dropout", "lora_dropout")):
        assert getattr(theirs, name) == getattr(ours, field), name
    assert AdaLoRAConfig.from_peft(theirs) == ours
    with pytest.raises(ConfigError, match="needs the schedule in steps"):
        AdaLoRAConfig(tinit=0.1).to_peft()


def test_the_method_table_and_its_overrides():
    assert tuple(METHODS) == Method.__args__
    settings = dict(init_r=4, target_r=2, orth_reg_weight=0.3)
    assert config_for_method("adalora", **settings) == AdaLoRAConfig(**settings)
    assert config_for_method("svd_lora", **settings).target_r == 4  # a constant budget: nothing is ever masked
    assert config_for_method("prune_lora", **settings).orth_reg_weight == 0.0  # LoRA factors: no singular vectors
    # A method without a schedule keeps init_r: the unused default target_r=8 is not refused against init_r=4.
    assert config_for_method("lora", init_r=4).target_r == 4
    with pytest.raises(ConfigError, match=r"target_r \(8\) must not exceed init_r \(4\)"):
        config_for_method("adalora", init_r=4)
    assert [m for m, spec in METHODS.items() if spec.scheduled] == ["adalora", "svd_lora", "prune_lora"]
    with pytest.raises(ConfigError, match=r"method must be one of \['adalora', .*\], got 'loar'"):
        method_spec("loar")


def test_the_callback_takes_a_config_or_its_fields_but_not_both():
    from adalora_pl import AdaLoRACallback

    config = AdaLoRAConfig(init_r=3, target_r=1, tinit=0.1)
    assert AdaLoRACallback(config).config is config
    assert AdaLoRACallback(init_r=3, target_r=1, tinit=0.1).config == config
    with pytest.raises(ConfigError, match=r"a config or settings, not both \(settings \['init_r'\]\)"):
        AdaLoRACallback(config, init_r=4)
    with pytest.raises(ConfigError, match=r"target_r \(5\) must not exceed init_r \(3\)"):
        AdaLoRACallback(init_r=3, target_r=5)


def test_the_settings_are_written_out_once():
    """The task modules and the callback take the fields by name through **kwargs, not as copies of the list."""
    from adalora_pl.callback import AdaLoRACallback
    from adalora_pl.module import AdapterModule

    for cls in (AdapterModule, AdaLoRACallback):
        parameters = inspect.signature(cls.__init__).parameters
        assert not set(FIELDS) & set(parameters), cls
        assert any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()), cls


def test_the_command_line_shows_every_field_as_a_module_option():
    """LightningCLI follows the modules' **kwargs into AdaLoRAConfig: --model.init_r etc., with its defaults."""
    from jsonargparse import ArgumentParser

    from adalora_pl.module import AdapterModule

    parser = ArgumentParser()
    parser.add_subclass_arguments(AdapterModule, "model")
    for task in ("adalora_pl.tasks.glue_module.GLUEClassifier", "adalora_pl.tasks.causal_lm_module.CausalLMModule"):
        args = ["--model", task, "--model.backbone", "x", "--model.init_r", "3", "--model.target_r", "1",
                "--model.tinit", "0.25", "--model.target_modules", "[query, value]"]
        init_args = parser.parse_args(args).model.init_args
        assert set(FIELDS) <= set(vars(init_args)), task
        assert (init_args.init_r, init_args.target_r, init_args.tinit) == (3, 1, 0.25)
        assert list(init_args.target_modules) == ["query", "value"]
        assert init_args.beta1 == AdaLoRAConfig().beta1  # the dataclass's default
    with pytest.raises(SystemExit):
        parser.parse_args(["--model", "adalora_pl.tasks.glue_module.GLUEClassifier", "--model.backbone", "x",
                           "--model.importance", "fisher"])
