"""Strategy → default data, and impossible combinations stopped before any work."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.utils import instantiate

from advarch.config.combinations import DATA, STRATEGY_DATA, with_default_data
from advarch.config.compose import CONFIG_DIR
from advarch.config.validate import ConfigError
from advarch.spec import TaskStream
from advarch.train import run
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
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "offline"}
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,  # a loaded machine; the command itself needs about a second
    )


@pytest.mark.parametrize(
    ("args", "start", "fix"),
    [
        (
            ["strategy=fewshot", "data=text"],
            "strategy=fewshot data=text:",
            "data=fewshot_synthetic",
        ),
        (["model=mmoe", "data=text"], "model=mmoe data=text:", "data=mmoe_synthetic"),
        (["model=seq2seq_moe"], "model=seq2seq_moe data=text:", "data=seq2seq_reverse"),
        (["strategy=ewc", "data=text"], "strategy=ewc data=text:", "data=text_domains"),
        (["strategy=finetune"], "strategy=finetune fine-tunes", "strategy.pretrained="),
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


def test_an_impossible_combination_never_imports_torch(tmp_path: Path) -> None:
    code = (
        "import sys; from advarch.train import main\n"
        "sys.argv = ['train.py', 'model=mmoe', 'data=text']\n"
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
    assert "error: model=mmoe data=text:" in result.stderr


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
    metrics = run(make_cfg([f"model={model}", f"strategy={strategy}", *FAST, *size, *extra]))
    assert metrics
