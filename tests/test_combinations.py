"""Strategy → default data, and impossible combinations stopped before any work."""

from __future__ import annotations

import itertools
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from yaml import safe_load

from advarch.config import combinations
from advarch.config.combinations import (
    DATA,
    STRATEGY_DATA,
    check_combination,
    with_default_data,
    with_strategy_defaults,
)
from advarch.config.compose import CONFIG_DIR
from advarch.errors import ConfigError
from advarch.spec import TaskStream
from advarch.train import run
from tests.cli import run_python
from tests.conftest import ROOT, SMALL_TEXT
from tests.strategies.conftest import FAST


@pytest.mark.parametrize(
    ("overrides", "added"),
    [
        (["strategy=ewc"], "data=text_domains"),
        (["model=moe", "strategy=naive", "trainer.max_steps=3"], "data=text_domains"),
        (["-m", "strategy=naive,ewc"], "data=text_domains"),  # a sweep with one default
        (["strategy=multitask"], "data=mmoe_synthetic"),
        (["strategy=fewshot"], "data=fewshot_synthetic"),
        (["strategy=ewc", "data=permuted_digits"], None),  # an explicit data= wins
        (["strategy=ewc", "+data=permuted_digits"], None),
        (["experiment=ewc_permuted_digits", "strategy=ewc"], None),  # experiments pin data
        (["strategy=plain"], None),
        (["strategy=finetune"], None),
        (["-m", "strategy=plain,ewc"], None),  # a sweep over different defaults: the user's
        (["model=moe"], None),
    ],
)
def test_default_data_of_each_strategy(overrides: list[str], added: str | None) -> None:
    result = with_default_data(overrides)
    assert result == (overrides if added is None else [*overrides, added])


def test_defaults_join_the_overrides_before_a_flag() -> None:
    # Hydra reads the overrides as one run of words: `strategy=ewc --cfg job data=text_domains`
    # was "unrecognized arguments: data=text_domains"
    assert with_strategy_defaults(["strategy=ewc", "--cfg", "job"])[:2] == [
        "strategy=ewc", "data=text_domains"]  # fmt: skip
    assert with_strategy_defaults(["strategy=ewc", "--cfg", "job"])[-2:] == ["--cfg", "job"]
    assert with_default_data(["--cfg", "job", "strategy=ewc"]) == [
        "--cfg", "job", "strategy=ewc", "data=text_domains"]  # fmt: skip


def test_composed_config_gets_the_default_and_explicit_data_wins(make_cfg) -> None:
    for strategy, data in STRATEGY_DATA.items():
        cfg = make_cfg([f"strategy={strategy}"])
        expected = make_cfg([f"data={data}"]).data._target_
        assert cfg.data._target_ == expected, strategy
    assert make_cfg(["strategy=ewc", "data=split_digits"]).data._target_.endswith(
        "SplitDigitsDataModule"
    )


def test_the_table_of_data_facts_matches_the_datamodules(make_cfg) -> None:
    small = {
        "text": SMALL_TEXT,
        "text_domains": ["data.max_documents=6", "data.seq_len=32"],
    }
    checked = set()
    for yaml in sorted(Path(CONFIG_DIR, "data").glob("*.yaml")):
        if yaml.stem == "text_retrieval":
            continue  # the text datamodule with neighbours: its facts are text's
        cfg = make_cfg([f"data={yaml.stem}", *small.get(yaml.stem, [])])
        facts = DATA[cfg.data._target_]
        dm = instantiate(cfg.data, _convert_="all")
        spec = dm.spec
        stream = isinstance(dm, TaskStream)
        assert facts.kind == spec.kind, yaml.stem
        assert facts.stream == stream, yaml.stem
        assert facts.episodes == ("n_way" in spec.extras), yaml.stem
        assert facts.multitask == (spec.num_tasks > 1 and not stream and not facts.episodes)
        features = spec.num_features > 0
        assert facts.features in (None, features), yaml.stem
        assert facts.retrieval == (spec.retrieval_neighbours > 0), yaml.stem
        checked.add(cfg.data._target_)
    assert checked == set(DATA)


def cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return run_python([str(ROOT / "train.py"), *args], cwd)


@pytest.mark.parametrize(
    ("args", "start", "fix"),
    [
        (
            ["strategy=fewshot", "data=text"],
            "strategy=fewshot data=text:",
            "data=fewshot_synthetic",
        ),
        (["model=mmoe", "data=text"], "model=mmoe data=text:", "data=mmoe_synthetic"),
        (  # the data the strategy brought, said as the strategy the user typed
            ["model=mmoe", "strategy=ewc"],
            "model=mmoe strategy=ewc: model=mmoe reads feature vectors, but data=text_domains "
            "(strategy=ewc's) is",
            "use model=mmoe data=permuted_digits",
        ),
        (["model=seq2seq_moe"], "model=seq2seq_moe data=text:", "data=seq2seq_reverse"),
        (  # Longformer's global tokens see the future: a causal LM cannot have them
            ["model=longformer", "model.swa.global_tokens=[0]"],
            "model=longformer data=text: model=longformer has global tokens "
            "(model.swa.global_tokens=[0]), which need bidirectional attention",
            "use model=longformer data=digits",
        ),
        (["strategy=ewc", "data=text"], "strategy=ewc data=text:", "data=text_domains"),
        (["strategy=finetune"], "strategy=finetune fine-tunes", "strategy.pretrained="),
        (  # a base that fits: a plain decoder of its sizes on its data (new-user 37 F3: it
            # named a `python train.py` run, an MoE, which the retrofit then refused)
            ["model=retro", "strategy=retrofit", "debug=tiny"],
            "strategy=retrofit fine-tunes",
            "(e.g. of a `python train.py model=transformer data=text_retrieval debug=tiny` run)",
        ),
        (  # no data has neighbours and a task stream: another strategy, not a circle
            ["model=retro", "strategy=ewc", "debug=tiny"],
            "model=retro strategy=ewc:",
            "use strategy=plain data=text_retrieval",
        ),
        (
            ["data=fewshot_synthetic"],
            "strategy=plain data=fewshot_synthetic:",
            "use strategy=fewshot data=fewshot_synthetic",
        ),
    ],
)
def test_impossible_combination_stops_before_any_work(
    tmp_path: Path, args: list[str], start: str, fix: str
) -> None:
    result = cli(args, tmp_path)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {start}") and fix in lines[0]
    assert result.stdout == ""  # no config tree
    assert not (tmp_path / "outputs" / "cache").exists()  # no data read
    assert not list(tmp_path.glob("outputs/runs/*/*/config_tree.txt"))


def test_an_impossible_model_for_data_the_user_typed_names_that_data(tmp_path: Path) -> None:
    # review 37: data=text_domains typed by the user is not "strategy=ewc's": the line named
    # the strategy (`model=mmoe strategy=ewc: ... data=text_domains (strategy=ewc's)`) for any
    # data that happens to be the strategy's default, whoever chose it
    result = cli(["model=mmoe", "strategy=ewc", "data=text_domains"], tmp_path)
    assert result.returncode == 1
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: model=mmoe data=text_domains: "), line
    assert "(strategy=ewc's)" not in line, line


# debug=tiny: the job rewrites .hydra/config.yaml first (it imported torch there, where signals
# are not held: a Ctrl-C in torch's C++ callbacks aborted the process, exit -6)
@pytest.mark.parametrize(
    ("args", "said"),
    [(["model=mmoe", "data=text"], "model=mmoe data=text"),
     (["model=retro", "debug=tiny"], "model=retro data=text")],
)  # fmt: skip
def test_an_impossible_combination_never_imports_torch(
    tmp_path: Path, args: list[str], said: str
) -> None:
    code = (
        "import sys; from advarch.train import main\n"
        f"sys.argv = ['train.py', *{args!r}]\n"
        "try:\n    main()\nexcept SystemExit as stop:\n    print(stop, file=sys.stderr)\n"
        "print(sorted(m for m in ('torch', 'lightning', 'datasets') if m in sys.modules))"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.stdout.strip() == "[]", result.stdout + result.stderr
    assert f"error: {said}:" in result.stderr


def test_the_check_runs_before_anything_else(make_cfg) -> None:
    cfg = make_cfg(["strategy=multitask", "data=permuted_digits"])
    with pytest.raises(ConfigError, match="strategy=multitask data=permuted_digits: .*"):
        run(cfg)
    assert not Path(cfg.paths.output_dir).exists()


@pytest.mark.parametrize("model", ["moe", "transformer"])
@pytest.mark.parametrize("strategy", ["naive", "multitask", "fewshot"])
def test_strategies_run_as_typed_with_their_default_data(
    make_cfg, strategy: str, model: str
) -> None:
    size = ["model.dim=32", "model.depth=1", "model.num_heads=2"]
    stream = ["data.steps_per_task=2", "data.max_documents=6", "data.seq_len=32"]
    extra = stream if strategy == "naive" else []
    # (a stream's length is its own: trainer.max_steps is refused there)
    fast = [o for o in FAST if not (strategy == "naive" and o.startswith("trainer.max_steps"))]
    metrics = run(make_cfg([f"model={model}", f"strategy={strategy}", *fast, *size, *extra]))
    assert metrics


GROUPS = ("data", "model", "strategy")  # what the combination check reads
TRAIN_DEFAULTS = {  # train.yaml's choices of them
    group: choice
    for entry in OmegaConf.load(Path(CONFIG_DIR, "train.yaml")).defaults
    if isinstance(entry, DictConfig)
    for group, choice in entry.items()
    if group in GROUPS
}


@pytest.fixture(scope="module")
def group_nodes() -> dict[tuple[str, str], DictConfig]:
    """Every option of the three groups composed once: (group, option) → its node."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
        nodes = {
            (group, p.stem): compose(overrides=[f"+{group}={p.stem}"])[group]
            for group in GROUPS
            for p in Path(CONFIG_DIR, group).glob("*.yaml")
        }
    GlobalHydra.instance().clear()
    return nodes


def combination_error(nodes, monkeypatch, command: list[str]) -> str | None:
    """What the combination check says of `python train.py <command>` (None: it passes): the
    strategy's defaults added as the command line adds them, the three groups' nodes with the
    command's keys set (composing the whole tree 150 times would take half a minute)."""
    typed = dict(o.split("=", 1) for o in with_strategy_defaults(command))
    choices = {group: typed.get(group, TRAIN_DEFAULTS[group]) for group in GROUPS}
    cfg = OmegaConf.create({group: nodes[group, choice] for group, choice in choices.items()})
    for key, value in typed.items():
        if "." in key:  # (read as Hydra reads it: `data.domains=[text]` is a list)
            OmegaConf.update(cfg, key, safe_load(value))
    monkeypatch.setattr(combinations, "_choices", lambda: choices)
    monkeypatch.setattr(combinations, "typed_overrides", lambda: typed)
    try:
        check_combination(cfg)
    except ConfigError as err:
        return str(err)
    return None


def followed(command: list[str], hint: str) -> list[str]:
    """`command` with the keys one alternative of a hint names set as it says (a new strategy
    drops the old one's keys, as a user would)."""
    keys = dict(o.split("=", 1) for o in hint.split() if "=" in o)
    dropped = ("strategy.",) if "strategy" in keys else ()
    kept = [o for o in command if o.split("=", 1)[0] not in keys and not o.startswith(dropped)]
    return [*kept, *(f"{k}={v}" for k, v in keys.items())]


def test_every_hint_of_every_model_and_strategy_passes(
    group_nodes, monkeypatch, tmp_path: Path
) -> None:
    """Each model with each strategy as typed: it passes, or its one line names what to use,
    and every alternative named passes (no hint leads to another refusal)."""
    base = tmp_path / "base.ckpt"
    torch.save({}, base)  # (a fine-tune's base; the check reads only that it is torch's file)
    models, strategies = ({o for g, o in group_nodes if g == group} for group in GROUPS[1:])
    for model, strategy in itertools.product(sorted(models), sorted(strategies)):
        command = [f"model={model}", f"strategy={strategy}"]
        if "pretrained" in group_nodes["strategy", strategy]:  # (asked for first: tested above)
            command.append(f"strategy.pretrained={base}")
        error = combination_error(group_nodes, monkeypatch, command)
        if error is None:
            continue
        hint = re.search(r"(?:; use|, so it needs) ([^;]+)$", error)
        assert hint, error
        alternatives = [a for a in hint[1].split(" or ") if "leave data= out" not in a]
        for alternative in alternatives:
            fixed = followed(command, alternative)
            assert combination_error(group_nodes, monkeypatch, fixed) is None, (error, fixed)


def test_global_tokens_refuse_a_language_model_only_where_it_has_swa_layers(
    group_nodes, monkeypatch
) -> None:
    # review 39: the check read model.layers as written; model=hybrid model.depth=2 builds
    # [ssm, attn], no swa layer, yet was refused
    tokens = "model.swa.global_tokens=[0]"
    refused = combination_error(group_nodes, monkeypatch, ["model=hybrid", tokens])
    assert refused.startswith("model=hybrid data=text: model=hybrid has global tokens"), refused
    for command in (["model=hybrid", "model.depth=2", tokens],
                    ["model=longformer", "data=digits", tokens]):  # fmt: skip
        assert combination_error(group_nodes, monkeypatch, command) is None, command


def test_retrofit_onto_a_model_without_retro_says_so_before_asking_for_the_base(
    make_cfg, tmp_path: Path
) -> None:
    base = tmp_path / "plain.ckpt"
    torch.save({}, base)
    for pretrained in ([], [f"strategy.pretrained={base}"]):
        cfg = make_cfg(["model=transformer", "strategy=retrofit", "debug=tiny", *pretrained])
        with pytest.raises(ConfigError) as err:
            check_combination(cfg)
        assert str(err.value).startswith("model=transformer strategy=retrofit: strategy=retrofit")
        assert str(err.value).endswith("it needs model=retro or model=retro_moe")
    # the plain decoder trained on as a retrofit's control (scripts/retro_report.py --retrofit)
    unfrozen = ["strategy.trainable=[*]", f"strategy.pretrained={base}"]
    check_combination(make_cfg(["model=transformer", "strategy=retrofit", *unfrozen]))


@pytest.mark.parametrize("experiment", ["finetune_new_experts_5_9", "merge_digit_tasks"])
def test_a_fine_tuning_experiment_without_its_base_names_the_base_command(
    make_cfg, experiment: str
) -> None:
    # it suggested a `python train.py` run, whose LM checkpoint does not fit the digits model
    cfg = make_cfg([f"experiment={experiment}", "debug=tiny"])
    with pytest.raises(ConfigError) as err:
        check_combination(cfg)
    assert str(err.value).endswith(
        "(e.g. of a `python train.py experiment=pretrain_digits_0_4 debug=tiny` run)"
    ), err.value  # fmt: skip (its sizes)


@pytest.mark.parametrize("data", ["text_domains", "permuted_digits", "split_digits"])
def test_plain_training_of_a_task_stream_names_the_continual_strategies(make_cfg, data) -> None:
    cfg = make_cfg(["model=moe", f"data={data}", "strategy=plain", "debug=tiny"])
    with pytest.raises(ConfigError, match=f"^strategy=plain data={data}: ") as err:
        check_combination(cfg)
    assert "use strategy=naive" in str(err.value) and "strategy.joint=true" in str(err.value)


@pytest.mark.parametrize("data", ["text_domains", "permuted_digits", "split_digits"])
@pytest.mark.parametrize("strategy", ["plain", "finetune"])
def test_a_task_stream_without_task_boundaries_stops_with_alternatives_that_pass(
    group_nodes, monkeypatch, tmp_path: Path, strategy: str, data: str
) -> None:
    """strategy=finetune trained a stream's tasks in sequence without any cl/* metric, as
    strategy=plain did before it was refused; it says so before asking for its base, and each
    alternative named passes."""
    base = tmp_path / "base.ckpt"
    torch.save({}, base)
    command = ["model=moe", f"strategy={strategy}", f"data={data}"]
    for pretrained in ([], [f"strategy.pretrained={base}"]) if strategy == "finetune" else ([],):
        error = combination_error(group_nodes, monkeypatch, [*command, *pretrained])
        assert error is not None and error.startswith(f"strategy={strategy} data={data}: ")
        assert "one after another without continual metrics" in error and "strategy=naive" in error
    hint = re.search(r"; use ([^;]+)$", error)[1]
    for alternative in hint.split(" or "):
        fixed = followed([*command, *pretrained], alternative)
        assert combination_error(group_nodes, monkeypatch, fixed) is None, (error, fixed)


@pytest.mark.parametrize(
    "overrides",
    [
        ["strategy=plain", "data=text_domains", "data.domains=[codecs]"],  # one domain: a corpus
        ["strategy=finetune", "data=text_domains", "data.domains=[codecs]"],  # (README's command)
        ["strategy=finetune", "data=split_digits", "data.num_tasks=1"],
        ["strategy=naive", "data=text_domains"],
        ["strategy=naive", "strategy.joint=true", "data=permuted_digits"],
    ],
)
def test_a_task_stream_of_one_task_or_a_continual_strategy_passes(
    make_cfg, tmp_path: Path, overrides
) -> None:
    base = tmp_path / "base.ckpt"
    torch.save({}, base)
    pretrained = [f"strategy.pretrained={base}"] if "strategy=finetune" in overrides else []
    check_combination(make_cfg(["model=moe", *overrides, *pretrained]))


def test_typed_data_is_named_as_typed_after_a_compose_that_brought_it(make_cfg) -> None:
    # review 37b: STRATEGY_BROUGHT is a module-level set that only grows: once any compose in
    # the process (a test, the merge demo, the RETRO report, an earlier trial of a sequential
    # sweep) had strategy=ewc bring data=text_domains, data=text_domains typed later is said
    # to be `(strategy=ewc's)` again; and a parallel sweep's worker process starts with it
    # empty (the strategy's data is then said as typed)
    make_cfg(["strategy=ewc"])  # brings data=text_domains
    cfg = make_cfg(["model=mmoe", "strategy=ewc", "data=text_domains"])  # typed
    with pytest.raises(ConfigError) as err:
        check_combination(cfg)
    assert str(err.value).startswith("model=mmoe data=text_domains: "), str(err.value)
    assert "(strategy=ewc's)" not in str(err.value), str(err.value)


def test_a_fine_tune_on_other_data_names_a_base_of_that_data(make_cfg) -> None:
    # review 37b: fe2a264 names "a base that fits" for a retrofit only; `strategy=finetune
    # data=digits` still names `python train.py debug=tiny`, a text LM, which the fine-tune
    # then refuses (`was trained with data._target_=…TextDataModule, this run has
    # …DigitsDataModule: a fine-tune keeps its base's model sizes`)
    cfg = make_cfg(["strategy=finetune", "data=digits", "debug=tiny"])
    with pytest.raises(ConfigError) as err:
        check_combination(cfg)
    assert "data=digits" in str(err.value).split("(e.g. of a")[-1], str(err.value)
