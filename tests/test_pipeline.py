"""Building a run from a composed config: validation before any work (the typed block configs,
through `Model.check_options`), one ConfigError line for a constructor's complaint, monitors."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf, open_dict

from advarch.errors import ConfigError
from advarch.models.model import Model
from advarch.pipeline import (
    build_all,
    check_model_options,
    check_monitors,
    instantiate_checked,
    validate,
    validate_run,
)

DIGITS = ["data=digits", "model=transformer", "debug=tiny"]


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["model.moe.top_k=9"], "model.moe.top_k=9 exceeds model.moe.num_experts=8"),
        (["+model.moe.bogus=1"], "model.moe.bogus is not an option of model.moe"),
        (["model=longformer", "model.swa.window=0"], "model.swa.window=0 must be >= 1"),
        (["model=mamba2", "model.ssd.head_dim=48"], "model.ssd.head_dim=48 must divide"),
        (["model=ssm", "model.ssm.dt_min=0.5"], "model.ssm.dt_min=0.5 must be in (0,"),
        (["model=retro", "model.retro.cca_layers=[9]"], "model.retro.cca_layers=[9] must be"),
        (["model.num_heads=5"], "model.num_heads=5 must divide model.dim=128"),
        (["model.dropout=1.5"], "model.dropout=1.5 must be in [0, 1)"),
        (["model.ffn=[dense,bogus]"], "model.ffn: unknown ffn 'bogus'"),
    ],
)
def test_validate_names_the_bad_model_key_before_anything_is_built(
    make_cfg, monkeypatch: pytest.MonkeyPatch, overrides: list[str], expected: str
) -> None:
    def never(*args, **kwargs):
        raise AssertionError("validation built something")

    monkeypatch.setattr(Model, "_make_input", never)
    monkeypatch.setattr("advarch.pipeline.instantiate", never)
    with pytest.raises(ConfigError) as err:
        validate(make_cfg(overrides))
    assert str(err.value).startswith(expected) and "\n" not in str(err.value)


def test_every_model_config_passes_the_model_checks(make_cfg) -> None:
    for name in ("moe", "hybrid", "longformer", "mamba2", "ssm", "soft_moe", "retro"):
        check_model_options(make_cfg([f"model={name}"]).model)


def test_models_that_are_not_model_check_in_their_own_constructor(make_cfg) -> None:
    cfg = make_cfg(["model=mmoe", "data=mmoe_synthetic", "strategy=multitask"])
    check_model_options(cfg.model)  # nothing of Model's applies to MultiGateMoE
    with open_dict(cfg):
        cfg.model.num_experts = 0
    with pytest.raises(ConfigError, match="model.num_experts=0"):
        build_all(cfg)


def test_a_build_time_complaint_is_one_config_error_line(make_cfg) -> None:
    cfg = make_cfg([*DIGITS, "model.feature_patch=0"])
    with pytest.raises(ConfigError) as err:
        build_all(cfg)
    assert str(err.value) == "model.feature_patch=0 must be >= 1"


def test_monitors_must_be_metrics_the_strategy_logs(make_cfg) -> None:
    cfg = make_cfg(DIGITS)
    _, _, module = build_all(cfg)
    check_monitors(cfg, module)
    with open_dict(cfg):
        cfg.optimized_metric = "val/bogus"
    with pytest.raises(ConfigError, match="optimized_metric=val/bogus is not a metric"):
        check_monitors(cfg, module)
    check_monitors(cfg, object())  # a user's own LightningModule: its names are unknown


def test_instantiate_checked_names_the_key() -> None:
    node = OmegaConf.create({"_target_": "datetime.timedelta", "days": "x"})
    with pytest.raises(ConfigError, match=r"^callbacks\.clock: "):
        instantiate_checked(node, "callbacks.clock")


def test_a_message_naming_its_key_gets_no_prefix() -> None:
    from advarch.pipeline import naming

    assert naming("model", ValueError("model=retro needs data=text_retrieval")) == (
        "model=retro needs data=text_retrieval"  # (was "model: model=retro …")
    )
    assert naming("model", ValueError("model.dim=3 is odd")) == "model.dim=3 is odd"
    assert naming("model", TypeError("bad width")) == "model: bad width"


def test_the_optimizers_ranges_are_a_training_runs_not_evals(make_cfg) -> None:
    # eval.py validates a checkpoint's saved config and builds no optimizer: a run saved with
    # a momentum now out of range still evaluates
    cfg = make_cfg(["optimizer=sgd", "optimizer.momentum=1.0"])
    validate(cfg)
    with pytest.raises(ConfigError, match=r"optimizer.momentum=1.0 must be in \[0, 1\)"):
        validate_run(cfg)
