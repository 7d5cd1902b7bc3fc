"""Config-group choices checked before Hydra: one line for a misspelt option, nothing else
stopped (own config folders, Hydra's groups, edits, sweeps)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from advarch.config.choices import (
    PATTERN_BLOCKS,
    check_group_choices,
    check_override_keys,
    check_override_syntax,
    check_single_run,
)
from advarch.config.combinations import packaged_config
from advarch.config.compose import compose_packaged
from advarch.errors import ConfigError
from advarch.models.registry import BLOCKS, PATTERNS

CONFIGS = Path(__file__).resolve().parents[2] / "advarch" / "configs"


@pytest.mark.parametrize("argv", [
    ["model=moe", "strategy=naive,ewc", "debug=tiny", "model.dim=64", "-m"],
    ["hydra/launcher=joblib", "hydra/sweeper=optuna"],  # Hydra's plugins' groups
    ["+model=anything", "~logger", "model@extra=moe", "model=glob(*)"],
    ["hydra.searchpath=[file:///elsewhere]", "model=from_elsewhere"],
])  # fmt: skip
def test_valid_or_unknowable_choices_pass(argv: list[str]) -> None:
    check_group_choices(argv)


def test_own_config_folder_options_count(tmp_path: Path) -> None:
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "mine.yaml").write_text("dim: 8\n")
    (tmp_path / "model" / "sub").mkdir()
    (tmp_path / "model" / "sub" / "deep.yaml").write_text("dim: 8\n")
    for argv in (["--config-dir", str(tmp_path)], [f"--config-dir={tmp_path}"]):
        check_group_choices([*argv, "model=mine", "model=sub/deep"])
    with pytest.raises(ConfigError, match=r"model=mien is not a model config \(did you mean "
                       r"model=mine\? options: hybrid, .*mine"):  # fmt: skip
        check_group_choices(["-cd", str(tmp_path), "model=mien"])


def test_null_choice_says_how_to_leave_a_group_out() -> None:
    with pytest.raises(ConfigError, match="logger=null is not a choice: write ~logger to leave"):
        check_group_choices(["logger=null"])


def test_group_names_read_as_english() -> None:
    with pytest.raises(ConfigError, match=r"optimizer=sgdd is not an optimizer config \(did you"):
        check_group_choices(["optimizer=sgdd"])


def test_the_blocks_of_layer_patterns_match_the_registry() -> None:
    patterns = {role: key.split(".")[1] for role, (key, _) in PATTERNS.items()}
    registered = {
        n: patterns[b.role] for n, b in BLOCKS.items() if b.config.name and b.role in patterns
    }
    assert registered == PATTERN_BLOCKS


@pytest.mark.parametrize("model", sorted(p.stem for p in (CONFIGS / "model").glob("*.yaml")))
def test_the_options_of_every_block_a_packaged_model_has_are_accepted(model: str) -> None:
    """Each packaged model's own block sections (hybrid's swa and ssm, retro_moe's moe and
    retro) take an override; a null section takes `+` where the pattern adds its block."""
    config = packaged_config("model", model)
    sections = {b: config[b] for b in [*PATTERN_BLOCKS, "retro"] if isinstance(config.get(b), dict)}
    check_override_keys(
        [f"model={model}", *(f"model.{b}.{setting(s)}" for b, s in sections.items())]
    )
    if config.get("_target_") == "advarch.models.Model" and "swa" not in sections:
        check_override_keys([f"model={model}", "model.layers=[attn,swa]", "+model.swa.window=8"])


def setting(section: dict) -> str:
    """`key=value` of a section's first option that is set (its own value again)."""
    key, value = next((k, v) for k, v in section.items() if v is not None)
    return f"{key}={str(value).lower()}"


@pytest.mark.parametrize(
    ("argv", "hint", "following"),
    [
        (
            ["data.retrieval.num_neighbours=4"],
            "data.retrieval is null in data=text; data=text_retrieval has it: write "
            "data=text_retrieval data.retrieval.num_neighbours=4",
            ["data=text_retrieval", "data.retrieval.num_neighbours=4"],
        ),
        (
            ["model=transformer", "model.retro.encoder_depth=3"],
            "model.retro is null in model=transformer; model=retro or model=retro_moe have it",
            ["model=retro", "model.retro.encoder_depth=3"],
        ),
        (  # a block no layer has: its `add swa to model.layers` then met the null section
            ["model=transformer", "model.swa.window=32"],
            "add swa to model.layers (model.layers=[attn,swa] +model.swa.window=32)",
            ["model=transformer", "model.layers=[attn,swa]", "+model.swa.window=32"],
        ),
        (  # a block's options: `+` (the rest take the block's defaults)
            ["model.layers=[attn,swa]", "model.swa.window=32"],
            "model.swa is null in this config; write +model.swa.window=32 to set it",
            ["model.layers=[attn,swa]", "+model.swa.window=32"],
        ),
    ],
)
def test_a_null_section_names_the_options_that_have_it(
    argv: list[str], hint: str, following: list[str]
) -> None:
    with pytest.raises(ConfigError, match=re.escape(hint)):
        check_override_keys(argv)
    check_override_keys(following)


def test_a_misspelt_option_of_a_null_block_section_gets_the_nearest_option() -> None:
    # (`+model.ssm.d_stat=4`, as the plain advice said, would be refused only by the run)
    with pytest.raises(ConfigError) as err:
        check_override_keys(["model.layers=[ssm,attn]", "model.ssm.d_stat=4"])
    assert str(err.value) == (
        "model.ssm.d_stat=4: d_stat is not an option of model.ssm (did you mean "
        "model.ssm.d_state? options: d_conv, d_state, dt_max, dt_min, dt_rank, expand, selective)"
    )


def test_the_packaged_models_write_every_option_of_each_block() -> None:
    # (the check above takes a block's options from them, without importing torch)
    import dataclasses

    from advarch.config.choices import PATTERN_BLOCKS, _packaged
    from advarch.config.combinations import packaged_config
    from advarch.models.registry import BLOCKS

    for block in PATTERN_BLOCKS:
        written = {k for m in _packaged("model")
                   for k in (packaged_config("model", m).get(block) or {})}  # fmt: skip
        assert written == {f.name for f in dataclasses.fields(BLOCKS[block].config)}, block


def test_options_of_a_block_the_depth_cuts_from_the_pattern_are_refused() -> None:
    # model=hybrid cycles [ssm,attn,ssm,swa] to depth 2: [ssm,attn], no swa layer
    with pytest.raises(ConfigError) as err:
        check_override_keys(["model=hybrid", "model.depth=2", "model.swa.window=32"])
    assert str(err.value) == (
        "model.swa.window=32: model.depth=2 cycles model.layers=[ssm,attn,ssm,swa] to "
        "[ssm,attn], which has no swa layer, so nothing would read model.swa; raise model.depth "
        "to 4 or put swa earlier in model.layers"
    )
    check_override_keys(["model=hybrid", "model.depth=4", "model.swa.window=32"])  # followed
    check_override_keys(["model=hybrid", "model.depth=2", "model.layers=[swa,ssm]",
                         "model.swa.window=32"])  # fmt: skip
    check_override_keys(["model=hybrid", "model.depth=2", "model.ssm.d_state=8"])  # ssm is kept
    with pytest.raises(ConfigError, match="model.depth=1 cycles model.ffn=.dense,moe. to .dense."):
        check_override_keys(["model=hybrid", "model.depth=1", "model.moe.top_k=1"])


def test_an_option_of_another_mode_is_refused_only_where_typed() -> None:
    # strategy.gamma decays online EWC's importance; with the default mode=separate it trained
    # exactly as without it
    with pytest.raises(ConfigError) as err:
        check_override_keys(["strategy=ewc", "strategy.gamma=0.9"])
    assert str(err.value) == (
        "strategy.gamma=0.9 applies with strategy.mode=online (add strategy.mode=online)"
    )
    check_override_keys(["strategy=ewc", "strategy.gamma=0.9", "strategy.mode=online"])  # followed
    # the experiment's own gamma (0.7, mode=online) is not the user's: comparing modes passes
    check_override_keys(["experiment=ewc_permuted_digits", "strategy.mode=separate"])
    # a sweep over the modes: gamma is read by the online trials
    check_override_keys(
        ["-m", "strategy=ewc", "strategy.mode=separate,online", "strategy.gamma=0.9"]
    )


def test_eval_refusal_lists_every_key_it_takes_and_each_is_taken() -> None:
    # data (a group chosen as null) was left out of the keys, though eval.py takes it
    with pytest.raises(
        ConfigError, match="model=ssm: eval.py evaluates the checkpoint's own"
    ) as err:
        check_override_keys(["ckpt_path=x.ckpt", "model=ssm"], "eval")
    keys = str(err.value).split("keys: ")[1].rstrip(")").split(", ")
    assert "data" in keys and "model" not in keys
    values = {"data": "text", "strategy_overrides": "{}", "data_overrides": "{}", "paths": "{}"}
    for key in keys:
        check_override_keys(["ckpt_path=x.ckpt", f"{key}={values.get(key, 'x')}"], "eval")


@pytest.mark.parametrize(("override", "line", "followed", "config", "key", "value"), [
    (  # (it said to quote the list, which makes it one string)
        "model.layers=[ssm,attn",
        "model.layers=[ssm,attn: the list has no closing ]: write model.layers=[ssm,attn]",
        "model.layers=[ssm,attn]", "train", "model.layers", ["ssm", "attn"],
    ),
    (  # (it said to quote the list whole: "has the wrong type (expected list of str)")
        "bench_overrides=[debug=tiny,model.dim=3]",
        "bench_overrides=[debug=tiny,model.dim=3]: Hydra cannot read a list element with = in "
        "it unquoted; quote each element, for Hydra and the shell: "
        "'bench_overrides=[\"debug=tiny\",\"model.dim=3\"]'",
        'bench_overrides=["debug=tiny","model.dim=3"]', "generate", "bench_overrides",
        ["debug=tiny", "model.dim=3"],
    ),
    (  # (Hydra's "missing EQUAL at '<EOF>'", a link and HYDRA_FULL_ERROR)
        "model.depth", "model.depth has no value: write model.depth=<value>",
        "model.depth=3", "train", "model.depth", 3,
    ),
])  # fmt: skip
def test_an_unreadable_override_gets_a_hint_that_reads(
    override: str, line: str, followed: str, config: str, key: str, value: object
) -> None:
    with pytest.raises(ConfigError) as err:
        check_override_syntax(["debug=tiny", override])
    assert str(err.value) == line
    check_override_syntax(["debug=tiny", followed])  # the hint, followed, is read as meant
    composed = compose_packaged([followed], config)
    assert OmegaConf.to_container(OmegaConf.select(composed, key)) == value if isinstance(
        value, list) else OmegaConf.select(composed, key) == value  # fmt: skip


def test_a_sweep_without_multirun_says_to_add_it() -> None:
    # (Hydra's "Ambiguous value for argument", five lines and HYDRA_FULL_ERROR)
    with pytest.raises(ConfigError) as err:
        check_single_run(["model.depth=2,4", "debug=tiny"])
    assert str(err.value) == (
        "model.depth=2,4 is a sweep (one run per value): add -m to run the sweep, or give "
        "model.depth one value"
    )
    for sweep in ("model.depth=range(2,5)", "model.depth=choice(2,4)", "model=glob(m*)"):
        with pytest.raises(ConfigError, match=re.escape(f"{sweep} is a sweep (one run per")):
            check_single_run([sweep])
    with pytest.raises(ConfigError) as err:
        check_single_run(["optimizer.lr=interval(0.001,0.01)"])
    assert str(err.value) == (
        "optimizer.lr=interval(0.001,0.01) is a search interval: sample it with -m "
        "hparams_search=optuna, or give optimizer.lr one value"
    )
    for multirun in (["-m"], ["--multirun"], ["hparams_search=optuna"], ["hydra.mode=MULTIRUN"]):
        check_single_run([*multirun, "model.depth=2,4", "debug=tiny"])
    check_single_run(["-cn", "mine", "~logger", "prompt='a,b'", "model.layers=[ssm,attn]"])
    check_override_syntax(["--config-dir", "conf", "-cn", "mine", "~logger", "prompt='a,b'"])


def test_a_sweep_checks_each_value_of_what_decides_the_readers() -> None:
    # depth 2 of hybrid's [ssm,attn,ssm,swa] has no swa layer, depth 4 reads model.swa
    check_override_keys(["-m", "model=hybrid", "model.depth=2,4", "model.swa.window=32"])
    with pytest.raises(ConfigError, match=r"^model.swa.window=32: model.depth=2 cycles"):
        check_override_keys(["-m", "model=hybrid", "model.depth=2,3", "model.swa.window=32"])
    # an interval's trials are checked as `key=null`: the line quotes what was typed
    with pytest.raises(ConfigError) as err:
        check_override_keys(["-m", "hparams_search=optuna", "strategy=ewc",
                             "strategy.gamma=interval(0.5,1.0)"])  # fmt: skip
    assert str(err.value) == (
        "strategy.gamma=interval(0.5,1.0) applies with strategy.mode=online (add "
        "strategy.mode=online)"
    )


def test_an_option_no_block_has_is_not_advised_with_a_plus() -> None:
    # review 37: a key near none of the block's options kept the plain advice, `write
    # +model.ssm.xyz=4 to set it`, which the run then refuses (`model.ssm.xyz is not an option
    # of model.ssm (options: d_state, …)`): the advice must not lead to a second error
    with pytest.raises(ConfigError) as err:
        check_override_keys(["model.layers=[ssm,attn]", "model.ssm.xyz=4"])
    assert "+model.ssm.xyz=4" not in str(err.value), str(err.value)
    assert "xyz is not an option of model.ssm" in str(err.value)


@pytest.mark.parametrize(
    ("typed", "meant"),
    [("optimizer.learning_rate=1e-3", "optimizer.lr"), ("model.num_layers=3", "model.depth")],
)
def test_another_librarys_name_for_a_key_gets_ours(typed: str, meant: str) -> None:
    # new-user 37 F12: no spelling of learning_rate is near lr: no did-you-mean
    with pytest.raises(ConfigError, match=f"did you mean {re.escape(meant)}\\?"):
        check_override_keys([typed])


@pytest.mark.parametrize(
    "value",
    ["plain", "64", "a, b", "it's", "my docs/*.txt", "", True, None, 0.001, [0, 1],
     {"seq_len": 16, "tokens": ["x y", "2"]}, [{"seq_len": 64, "num_tokens_to_copy": 8}]],
)  # fmt: skip
def test_a_value_written_for_an_override_reads_back_as_itself(value: object) -> None:
    # (review 41: a suggested `data.curriculum=[{"seq_len": 16}]` was JSON, which Hydra refuses)
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from advarch.config.choices import hydra_value

    override = OverridesParser.create().parse_override(f"key={hydra_value(value)}")
    assert override.value() == value


def test_a_mapping_for_a_group_sets_its_keys_and_an_unknown_one_is_named() -> None:
    # Hydra merges `trainer={max_steps: 2}` into the chosen trainer's keys; it was refused
    # ("trainer={max_steps: 2} is not a trainer config"), and a mapping of two keys was cut at
    # its comma
    check_override_keys(["trainer={max_steps: 2, deterministic: true}"])
    check_group_choices(["trainer={max_steps: 2, deterministic: true}"])
    with pytest.raises(ConfigError, match=r"^trainer\.foo is not a key of trainer \(keys: acc"):
        check_override_keys(["trainer={max_steps: 2, foo: 1}"])
