"""Finetune strategy: frozen base bit-identical under AdamW with decay, new experts, delta files."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from omegaconf import OmegaConf

from advarch.atomic import save_atomic
from advarch.checkpoint import CheckpointError, model_weights, read_checkpoint
from advarch.data.digits import DigitsDataModule
from advarch.errors import ConfigError
from advarch.models.mmoe import MultiGateMoE
from advarch.models.model import Model
from advarch.pipeline import build_all, build_model
from advarch.spec import DataSpec
from advarch.strategies.evaluation import accuracy
from advarch.strategies.finetune import DELTA_FILE, FinetuneStrategy, load_finetuned
from advarch.strategies.optimization import parameter_groups
from advarch.train import run
from tests.conftest import compose_config
from tests.strategies.conftest import FAST

SPEC = DataSpec(kind="classification", num_features=16, num_classes=10)
TINY = ["model.dim=32", "model.depth=2", "model.num_heads=2", "model.ffn_hidden=32"]
QUIET = ["callbacks.rich_model_summary=null", "callbacks.expert_load=null"]
OLD, NEW = [0, 1, 2, 3, 4], [5, 6, 7, 8, 9]


class ModeProbe(L.Callback):
    """Records, at every training batch, which modules are in training mode."""

    seen: list[dict[str, bool]] = []

    def on_train_batch_start(self, trainer, pl_module, *args) -> None:
        model = pl_module.model
        ModeProbe.seen.append(
            {
                "input": model.input.training,
                "mixer": model.layers[0].mixer.training,
                "moe": model.layers[0].ffn.training,
                "head": model.head.training,
            }
        )


def tiny_model(ffn: str = "moe", seed: int = 0) -> Model:
    torch.manual_seed(seed)
    moe = {"num_experts": 3, "top_k": 2}
    return Model(
        SPEC, dim=16, depth=1, num_heads=2, ffn=ffn, ffn_hidden=8, feature_patch=4, moe=moe
    )


def write_base(path: Path, model: Model) -> str:
    state = {f"model.{k}": v.clone() for k, v in model.state_dict().items()}
    save_atomic({"state_dict": state, "hyper_parameters": {"cfg": {}}}, path)
    return str(path)


def strategy(tmp_path: Path, ffn: str = "moe", **kwargs) -> FinetuneStrategy:
    base = write_base(tmp_path / "base.ckpt", tiny_model(ffn))
    options = {"pretrained": base, "trainable": [], "new_experts": 2, "head_classes": NEW}
    return FinetuneStrategy(tiny_model(ffn, seed=1), SPEC, **{**options, **kwargs})


# -- unit tests -------------------------------------------------------------------------------
def test_old_rows_move_under_adamw_decay_and_are_restored_bit_exactly(tmp_path: Path) -> None:
    module = strategy(tmp_path)
    moe = module.model.layers[0].ffn
    before = {n: p.detach().clone() for n, p in moe.named_parameters()}
    head_before = module.model.head.weight.detach().clone()
    opt = torch.optim.AdamW(parameter_groups(module.model), lr=0.1, weight_decay=0.1)
    for _ in range(3):
        out = module.model(torch.rand(8, 16))
        (out.logits.square().sum() + out.aux_loss).backward()
        module.on_before_optimizer_step(opt)
        assert moe.w_in.grad[:3].abs().sum() == 0 and moe.w_in.grad[3:].abs().sum() > 0
        opt.step()
        opt.zero_grad()
    # AdamW's decoupled decay moved the old rows although their gradients were zero …
    assert not torch.equal(moe.w_in[:3], before["w_in"][:3])
    for frozen in module.frozen:  # (what BaseStrategy.optimizer_step does after the step)
        frozen.restore()
    # … the restore puts them back bit-exactly; the new rows keep their training
    for name, value in before.items():
        assert torch.equal(getattr(moe, name)[:3], value[:3]), name
        assert not torch.equal(getattr(moe, name)[3:], value[3:]), name
    assert torch.equal(module.model.head.weight[:5], head_before[:5])
    assert not torch.equal(module.model.head.weight[5:], head_before[5:])


def test_plan_freezes_what_it_should_and_counts_rows(tmp_path: Path, capsys) -> None:
    module = strategy(tmp_path, trainable=["*router*"])
    model = module.model
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained == {
        "layers.0.ffn.router",
        "layers.0.ffn.w_in",
        "layers.0.ffn.w_out",
        "head.weight",
        "head.bias",
    }
    assert module.plan["model.layers.0.ffn.router"] is None  # a whole-tensor glob wins
    assert module.plan["model.layers.0.ffn.w_in"].tolist() == [3, 4]
    moe = model.layers[0].ffn
    expected = moe.router.numel() + 2 * moe.w_in[0].numel() + 2 * moe.w_out[0].numel() + 5 * 16 + 5
    assert module.hparams["params/trainable"] == expected
    assert module.hparams["params/total"] == sum(p.numel() for p in model.parameters())
    module.train()
    assert not model.input.training and not model.layers[0].mixer.training
    assert moe.training and model.head.training and model.training
    assert module.base_expert_mask().tolist() == [True, True, True, False, False]
    module.on_fit_start()
    assert capsys.readouterr().out == ""  # the counts are the model summary's `params:` line
    assert module.parameter_counts()["params/trainable"] == expected  # the model summary's count


def test_default_head_glob_trains_a_language_models_tied_head(tmp_path: Path, caplog) -> None:
    # strategy=finetune's default trainable ["model.head.*"] on an LM whose head is its
    # input embedding: the shared matrix trains (it matched nothing before), and a warning
    # says so (new user 42: the "frozen base" moved) and how to untie it
    lm_spec = DataSpec(kind="lm", vocab_size=40, seq_len=8)
    torch.manual_seed(0)
    model = Model(lm_spec, dim=16, depth=1, num_heads=2, ffn_hidden=8)
    base = {f"model.{k}": v.clone() for k, v in model.state_dict().items()}
    save_atomic({"state_dict": base, "hyper_parameters": {"cfg": {}}}, tmp_path / "lm.ckpt")
    module = FinetuneStrategy(model, lm_spec, pretrained=str(tmp_path / "lm.ckpt"))
    assert list(module.plan) == ["model.input.weight"]
    trained = [n for n, p in module.model.named_parameters() if p.requires_grad]
    assert trained == ["input.weight"] and module.model.head.weight.requires_grad
    assert not caplog.messages  # (eval.py, generate.py build it too: said as training starts)
    module.on_fit_start()
    assert caplog.messages == [
        "finetune: model.input.weight and model.head.weight are one tensor "
        "(model.tie_embeddings=true): training one trains the other; "
        "model.tie_embeddings=false trains a head of its own on frozen embeddings"
    ]

    caplog.clear()  # ["*"] trains the embeddings on purpose: nothing to say
    everything = FinetuneStrategy(model, lm_spec, pretrained=str(tmp_path / "lm.ckpt"),
                                  trainable=["*"])  # fmt: skip
    everything.on_fit_start()
    assert not caplog.messages

    # model.tie_embeddings=false: the tied base loads (the head starts as the embeddings),
    # the head alone trains, nothing is said
    caplog.clear()
    torch.manual_seed(1)
    untied = Model(lm_spec, dim=16, depth=1, num_heads=2, ffn_hidden=8, tie_embeddings=False)
    module = FinetuneStrategy(untied, lm_spec, pretrained=str(tmp_path / "lm.ckpt"))
    module.on_fit_start()
    assert list(module.plan) == ["model.head.weight"] and not caplog.messages
    assert torch.equal(untied.head.weight, base["model.input.weight"])
    assert not untied.input.weight.requires_grad


def test_eval_rebuild_without_pretrained_has_the_same_architecture(tmp_path: Path) -> None:
    trained = strategy(tmp_path)
    rebuilt = FinetuneStrategy(
        tiny_model(seed=2), SPEC, trainable=[], new_experts=2, head_classes=NEW
    )
    rebuilt.load_state_dict(trained.state_dict())  # strict: same names and shapes
    with pytest.raises(ConfigError, match="strategy.pretrained is not set"):
        rebuilt.setup("fit")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"pretrained": "/nonexistent/base.ckpt"},
            r"strategy.pretrained='/nonexistent/base.ckpt' "
            r"is not a file",
        ),
        ({"ffn": "dense"}, r"strategy.new_experts=2 needs a model with MoE layers"),
        ({"trainable": ["*nothing*"]}, r"strategy.trainable pattern '\*nothing\*' matches no"),
        ({"trainable": ["*head*"]}, r"strategy.head_classes trains rows of model.head.weight"),
        ({"head_classes": [12]}, r"strategy.head_classes=\[12\] must be classes 0..9"),
        ({"new_experts": 0, "head_classes": None}, "leaves nothing to train"),
    ],
)
def test_bad_options_are_one_line_errors(tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message) as info:
        strategy(tmp_path, **kwargs)
    assert "\n" not in str(info.value)


def test_shape_mismatch_names_the_tensor_and_the_checkpoint(tmp_path: Path) -> None:
    base = write_base(tmp_path / "base.ckpt", tiny_model())
    torch.manual_seed(0)
    wider = Model(
        SPEC,
        dim=16,
        depth=1,
        num_heads=2,
        ffn="moe",
        ffn_hidden=12,
        feature_patch=4,
        moe={"num_experts": 3, "top_k": 2},
    )
    with pytest.raises(
        ValueError,
        match=r"strategy.pretrained='.*base.ckpt': tensor "
        r"model.layers.0.ffn.w_in has shape \(3, 16, 8\)",
    ):
        FinetuneStrategy(wider, SPEC, pretrained=base, trainable=["model.head.*"])
    # a wholly trainable tensor may change shape: it starts fresh
    fresh = FinetuneStrategy(wider, SPEC, pretrained=base, trainable=["*.ffn.w_*"])
    assert fresh.plan == {"model.layers.0.ffn.w_in": None, "model.layers.0.ffn.w_out": None}


# -- end to end: pretrain on 0–4, new experts on 5–9 -----------------------------------------
@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("finetune")
    common = [*FAST, *TINY, *QUIET, "trainer.max_steps=6"]
    base_cfg = compose_config(["experiment=pretrain_digits_0_4", *common], root / "base", cache_dir)
    run(base_cfg)
    base = Path(base_cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    ModeProbe.seen.clear()
    ft_cfg = compose_config(
        [
            "experiment=finetune_new_experts_5_9",
            *common,
            f"strategy.pretrained={base}",
            "optimizer.weight_decay=0.5",
            f"+callbacks.probe._target_={__name__}.ModeProbe",
        ],
        root / "ft",
        cache_dir,
    )
    metrics = run(ft_cfg)
    return {"base": base, "ft": Path(ft_cfg.paths.output_dir), "metrics": metrics}


def test_finetune_run_keeps_the_base_bit_identical(runs: dict) -> None:
    base = torch.load(runs["base"], weights_only=False)["state_dict"]
    ft = torch.load(runs["ft"] / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    for name, value in base.items():
        frozen = ft[name][: value.shape[0]]  # old expert rows lead the grown tensors
        if name.startswith("model.head."):
            value, frozen = value[:5], frozen[:5]
        assert torch.equal(value, frozen), name
    assert not torch.equal(base["model.head.weight"][5:], ft["model.head.weight"][5:])
    assert ft["model.layers.0.ffn.w_in"].shape[0] == base["model.layers.0.ffn.w_in"].shape[0] + 2


def test_finetune_run_logs_params_and_keeps_frozen_modules_in_eval(runs: dict) -> None:
    metrics = runs["metrics"]
    assert 0 < metrics["params/trainable"] < metrics["params/total"]
    assert ModeProbe.seen
    for modes in ModeProbe.seen:
        assert modes == {"input": False, "mixer": False, "moe": True, "head": True}


def test_delta_holds_only_trained_rows_and_reproduces_the_model(runs: dict) -> None:
    delta = torch.load(runs["ft"] / DELTA_FILE, weights_only=False)
    assert Path(delta["base"]) == runs["base"].resolve()
    assert set(delta["tensors"]) == {
        *(f"model.layers.{i}.ffn.{n}" for i in (0, 1) for n in ("router", "w_in", "w_out")),
        "model.head.weight",
        "model.head.bias",
    }
    assert delta["tensors"]["model.layers.0.ffn.w_in"].shape[0] == 2
    assert delta["rows"]["model.head.bias"] == NEW
    rebuilt = load_finetuned(runs["ft"] / DELTA_FILE)
    x = torch.rand(16, 64)
    with torch.no_grad():
        assert torch.equal(rebuilt(x).logits, finetuned_model(runs)(x).logits)
    # the tools that read checkpoints (eval.py, generate.py, merge.py) name the run's own: it
    # holds the whole model (they said the delta had no 'state_dict' entry)
    with pytest.raises(CheckpointError) as err:
        read_checkpoint(runs["ft"] / DELTA_FILE)
    assert str(err.value) == (
        f"ckpt_path='{runs['ft'] / DELTA_FILE}' is a fine-tune's delta (its trained tensors and "
        "the base it extends, "
        f"{runs['base'].resolve()}); give the fine-tune run's checkpoint, which holds the whole "
        f"model ({runs['ft'] / 'checkpoints' / 'last.ckpt'}), or rebuild it in Python with "
        "advarch.strategies.finetune.load_finetuned"
    )


def finetuned_model(runs: dict) -> torch.nn.Module:
    """The finetune run's last.ckpt rebuilt the way eval.py does (no base checkpoint needed)."""
    ckpt = torch.load(runs["ft"] / "checkpoints" / "last.ckpt", weights_only=False)
    saved = OmegaConf.create(ckpt["hyper_parameters"]["cfg"])
    saved.strategy.pop("pretrained")
    _, _, module = build_all(saved)
    module.load_state_dict(ckpt["state_dict"])
    return module.model.eval()


def test_old_classes_with_new_experts_masked_equal_the_base(runs: dict) -> None:
    base_ckpt = torch.load(runs["base"], weights_only=False)
    cfg = OmegaConf.create(base_ckpt["hyper_parameters"]["cfg"])
    old = build_model(cfg, DataSpec(**base_ckpt["hyper_parameters"]["spec"]))
    old.load_state_dict(model_weights(base_ckpt["state_dict"]))
    old.eval()
    new = finetuned_model(runs)
    E = new.moe_layers()[0].num_experts
    mask = torch.arange(E) < E - 2
    dm = DigitsDataModule(classes=OLD)
    dm.setup()
    with torch.no_grad():
        for batch in dm.test_dataloader():
            a = old(batch["inputs"]).logits[:, :5]
            b = new(batch["inputs"], expert_mask=mask).logits[:, :5]
            assert torch.equal(a, b)
    before = accuracy(old, dm.test_dataloader(), classes=OLD)
    assert accuracy(new, dm.test_dataloader(), expert_mask=mask, classes=OLD) == before


def test_load_finetuned_refuses_a_changed_base(runs: dict, tmp_path: Path) -> None:
    delta = torch.load(runs["ft"] / DELTA_FILE, weights_only=False)
    ckpt = torch.load(runs["base"], weights_only=False)
    ckpt["state_dict"]["model.head.bias"] += 1.0
    delta["base"] = str(save_atomic(ckpt, tmp_path / "changed.ckpt"))
    with pytest.raises(ValueError, match="changed since"):
        load_finetuned(save_atomic(delta, tmp_path / DELTA_FILE))


def test_new_expert_rows_are_those_of_every_expert_tensor(tmp_path: Path) -> None:
    """The plan trains the new rows of every tensor `MoE.expert_tensors` names that the model
    saves (router, stacked experts, routing bias), and nothing else."""
    moe = {"num_experts": 3, "top_k": 2, "aux_free_bias": True}
    sizes = {"dim": 16, "depth": 1, "num_heads": 2, "ffn": "moe", "ffn_hidden": 8}
    base = write_base(tmp_path / "base.ckpt", Model(SPEC, **sizes, feature_patch=4, moe=moe))
    model = Model(SPEC, **sizes, feature_patch=4, moe=moe)
    module = FinetuneStrategy(model, SPEC, pretrained=base, trainable=[], new_experts=2)
    saved = {f"model.{k}" for k in model.state_dict()}
    expected = {f"model.layers.0.ffn.{n}" for n in model.layers[0].ffn.expert_tensors()} & saved
    assert set(module.plan) == expected and "model.layers.0.ffn.routing_bias" in expected
    assert all(rows.tolist() == [3, 4] for rows in module.plan.values())


def test_a_base_that_does_not_fit_says_what_to_change() -> None:
    from advarch.strategies.finetune_base import copy_base

    model = torch.nn.Module()
    model.ffn = torch.nn.Module()
    model.ffn.router = torch.nn.Parameter(torch.zeros(10, 4))
    model.ffn.w_in = torch.nn.Parameter(torch.zeros(10, 4, 8))
    fewer_experts = {"model.ffn.router": torch.zeros(8, 4), "model.ffn.w_in": torch.zeros(8, 4, 8)}
    with pytest.raises(ValueError, match="the base has 8 experts: add more with strategy.new_"):
        copy_base(model, fewer_experts, "base.ckpt", set())
    narrower = {"model.ffn.router": torch.zeros(10, 2), "model.ffn.w_in": torch.zeros(10, 2, 8)}
    with pytest.raises(ValueError, match=r"\(10, 2\).*other model settings: give this run the"):
        copy_base(model, narrower, "base.ckpt", set())  # a base of model.dim=2


def test_a_base_of_another_tokenizer_is_refused(tmp_path: Path, caplog) -> None:
    # a BPE base fine-tuned on other files trained on ids that mean other text, silently
    from types import SimpleNamespace

    from advarch.data.tokenizer import BPETokenizer, ByteTokenizer, tokenizer_state

    model = tiny_model()
    path = write_base(tmp_path / "base.ckpt", model)
    base = torch.load(path, weights_only=False)
    bpe = BPETokenizer.train(["alpha beta gamma " * 40], 300, tmp_path / "bpe.json")
    save_atomic({**base, "tokenizer": tokenizer_state(bpe)}, Path(path))
    strategy = FinetuneStrategy(model, SPEC, pretrained=path, trainable=["model.head.*"])
    for tokenizer, fits in ((ByteTokenizer(), False), (bpe, True), (None, True)):
        strategy.trainer = SimpleNamespace(datamodule=SimpleNamespace(tokenizer=tokenizer))
        if fits:  # the same tokenizer, or data without one
            strategy.setup("fit")
            continue
        with pytest.raises(ConfigError, match=r"was trained on a tokenizer \(BPE, \d+ ids\) "
                           r"other than this data's \(bytes, 259 ids\)"):  # fmt: skip
            strategy.setup("fit")
    # a user's datamodule's own tokenizer cannot be compared: said so (it was called "bytes")
    strategy.trainer = SimpleNamespace(datamodule=SimpleNamespace(tokenizer=SimpleNamespace()))
    strategy.setup("fit")
    assert "this data's tokenizer (SimpleNamespace) is not one of advarch's" in caplog.text


@pytest.mark.parametrize("family", ["model", "mmoe"])
def test_by_default_the_output_layers_train(tmp_path: Path, family: str) -> None:
    # (the default was `model.head.*`, which the multi-task models lack: mmoe, one_gate_moe
    # and shared_bottom stopped with 'matches no parameter' as typed)
    spec = DataSpec(kind="classification", num_features=16, num_classes=10,
                    task_names=("a", "b"))  # fmt: skip

    def build() -> torch.nn.Module:
        torch.manual_seed(0)
        return MultiGateMoE(spec, num_experts=2) if family == "mmoe" else tiny_model()

    module = FinetuneStrategy(build(), spec, pretrained=write_base(tmp_path / "base.ckpt", build()))
    trained = [n for n, p in module.model.named_parameters() if p.requires_grad]
    assert trained == (["tower_in", "tower_bias", "tower_out", "out_bias"] if family == "mmoe"
                       else ["head.weight", "head.bias"])  # fmt: skip


def test_a_finetune_from_before_the_null_default_resumes(make_cfg) -> None:
    # review 36: a fine-tune started before `strategy.trainable` defaulted to null saved
    # `trainable: ['model.head.*']`; the same command after the upgrade composes `null`, which
    # trains the same tensors, yet `config_mismatch` calls the checkpoint another
    # configuration: ckpt_path=<it> stops ("strategy.trainable=['model.head.*'] there, None
    # now"), ckpt_path=auto skips it and trains from the base again
    from omegaconf import OmegaConf

    from advarch.config.runs import config_mismatch

    overrides = ["debug=tiny", "strategy=finetune", "strategy.pretrained=/base/last.ckpt"]
    now = make_cfg(overrides)
    before = make_cfg([*overrides, "strategy.trainable=[model.head.*]"])
    ckpt = {"hyper_parameters": {"cfg": OmegaConf.to_container(before, resolve=True)}}
    assert config_mismatch(ckpt, now) is None


def test_a_model_that_names_no_output_layers_trains_its_head_by_default(tmp_path: Path) -> None:
    # (review 36: a user's model without OUTPUT_LAYERS stopped where `model.head.*`, the old
    # default, trained its head)
    class OwnModel(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.body, self.head = torch.nn.Linear(16, 8), torch.nn.Linear(8, 10)

        def moe_layers(self) -> list:  # (`ExpertModel`: none)
            return []

    base = tmp_path / "base.ckpt"
    save_atomic({"state_dict": {f"model.{k}": v for k, v in OwnModel().state_dict().items()},
                 "hyper_parameters": {"cfg": {}}}, base)  # fmt: skip
    module = FinetuneStrategy(OwnModel(), SPEC, pretrained=str(base))
    trained = [n for n, p in module.model.named_parameters() if p.requires_grad]
    assert trained == ["head.weight", "head.bias"]


def test_a_base_that_trained_on_this_runs_held_out_documents_is_said(
    tmp_path: Path, caplog
) -> None:
    # hunter 37: a fine-tune on more of the base's corpus (data.max_documents) splits it
    # otherwise: 15 of 34 validation documents had been the base's training text, silently
    from types import SimpleNamespace

    from advarch.callbacks.data_identity import KEY, data_cache
    from advarch.data.text import TextDataModule

    def text(documents: int) -> TextDataModule:
        dm = TextDataModule(seq_len=32, batch_size=2, max_documents=documents,
                            cache_dir=str(tmp_path / "cache"))  # fmt: skip
        dm.setup()
        return dm

    base_data, more = text(40), text(60)
    path = write_base(tmp_path / "base.ckpt", tiny_model())
    save_atomic({**torch.load(path, weights_only=False), KEY: data_cache(base_data)}, Path(path))
    strategy = FinetuneStrategy(tiny_model(), SPEC, pretrained=path)
    trained = set(base_data.meta["documents"]["train"])
    seen = [n for s in ("val", "test") for n in more.meta["documents"][s] if n in trained]
    assert seen  # (the premise: the other split puts some of them in this run's val/test)
    for datamodule, said in ((base_data, False), (more, True)):
        caplog.clear()
        strategy.trainer = SimpleNamespace(datamodule=datamodule)
        strategy.setup("fit")
        assert ("trained on " in caplog.text) == said, caplog.text
    assert f"strategy.pretrained={Path(path).resolve()} trained on " in caplog.text
    assert (
        "trained on 2 of the 3 validation and 2 of the 3 test documents of this run (e.g. "
        in caplog.text
    )
    assert "their metrics partly measure text the base learnt" in caplog.text


def test_a_fine_tune_of_a_continual_expert_mask_base_routes_as_its_base(tmp_path: Path) -> None:
    # review 37: expert masks close the experts no task owns (MoE.open_experts), but the buffer
    # is non-persistent and only ContinualStrategy sets it: a fine-tune of such a base (its head
    # by default, the body frozen) routed to the untrained experts its base never used, so its
    # starting model was not the base that the base's own evaluation measured
    spec, options, base, path = continual_expert_base(tmp_path)
    assert base.model.layers[0].ffn.open_experts.tolist() == [True] * 6 + [False] * 2
    module = FinetuneStrategy(Model(spec, **options), spec, pretrained=path)
    assert_routes_as(module.model, base.model)


def test_a_base_that_trained_on_a_domain_stream_is_checked_for_held_out_documents(
    tmp_path: Path,
) -> None:
    # review 37: a continual LM base (strategy=ewc: data=text_domains) names its documents per
    # domain (`meta.domains.<d>.train_documents`), not in `meta.documents`: a fine-tune on the
    # same files as data=text (split otherwise) was never warned, its val/test partly the
    # base's training text
    import sysconfig

    from advarch.callbacks.data_identity import KEY, data_cache, held_out_trained_on
    from advarch.data.text import TextDataModule
    from advarch.data.text_domains import TextDomainsDataModule

    stream = TextDomainsDataModule(domains=["net"], max_documents=12, seq_len=32, batch_size=2,
                                   cache_dir=str(tmp_path / "cache"))  # fmt: skip
    stream.setup()  # net's first 12 files: asynchat.py … email/contentmanager.py
    net = stream.meta["domains"]["net"]
    email = Path(sysconfig.get_paths()["stdlib"]) / "email" / "*.py"
    text = TextDataModule(files=str(email), max_documents=8, seq_len=32, batch_size=2,
                          cache_dir=str(tmp_path / "cache"))  # fmt: skip
    text.setup()
    trained = set(net["train_documents"])
    seen = {s: [n for n in text.meta["documents"][s] if n in trained] for s in ("val", "test")}
    assert any(seen.values())  # (the premise: data=text's split puts some in its val/test)
    found = held_out_trained_on({KEY: data_cache(stream)}, text)
    assert found == {s: names for s, names in seen.items() if names}


def test_a_fine_tune_of_a_continual_expert_mask_base_evaluates_as_it_trained(
    tmp_path: Path,
) -> None:
    # review 37b: eval.py and generate.py (trained_lm.load_lm) rebuild a fine-tune without its
    # base (`saved.strategy.pop("pretrained")`: weights from the checkpoint itself), and the
    # closed experts lived only in the base's checkpoint (`open_experts` is a non-persistent
    # buffer, the fine-tune's checkpoint kept no copy): the evaluated model
    # routes to the never-trained experts the fine-tune itself never used
    from advarch.strategies.base import open_experts

    spec, options, _, path = continual_expert_base(tmp_path)
    tuned = FinetuneStrategy(Model(spec, **options), spec, pretrained=path)
    # as eval.py builds it: strategy.pretrained popped, the fine-tune's checkpoint loaded
    # (which keeps its model's open experts: `BaseStrategy.on_save_checkpoint`)
    checkpoint = {"state_dict": tuned.state_dict(), "open_experts": open_experts(tuned.model),
                  "advarch_finetune": {"base": str(path), "trained": {}}}  # fmt: skip
    evaluated = FinetuneStrategy(Model(spec, **options), spec)
    evaluated.load_state_dict(checkpoint["state_dict"])
    evaluated.on_load_checkpoint(checkpoint)
    assert_routes_as(evaluated.model, tuned.model)


def continual_expert_base(tmp_path: Path) -> tuple[DataSpec, dict, torch.nn.Module, str]:
    """(spec, model options, strategy, checkpoint path) of a continual expert-mask run of 3
    tasks on 8 experts: experts 6 and 7 no task owns, closed, saved so in its checkpoint."""
    from advarch.data.digits import PermutedDigitsDataModule
    from advarch.strategies.continual import ContinualStrategy

    spec = PermutedDigitsDataModule(num_tasks=3, scenario="domain").spec
    options = dict(dim=16, depth=1, num_heads=2, ffn_hidden=32, ffn=["moe"], feature_patch=8,
                   moe={"num_experts": 8, "top_k": 1})  # fmt: skip
    torch.manual_seed(0)
    base = ContinualStrategy(Model(spec, **options), spec, expert_masks=True)
    path = write_base(tmp_path / "base.ckpt", base.model)
    ckpt = torch.load(path, weights_only=False)  # with the entry its checkpoints have
    save_atomic({**ckpt, "open_experts": [True] * 6 + [False] * 2}, Path(path))
    return spec, options, base, path


def assert_routes_as(model: torch.nn.Module, reference: torch.nn.Module) -> None:
    """`model` gives `reference`'s logits and routes no token to experts 6 and 7."""
    x = torch.rand(64, 64)
    model.eval(), reference.eval()
    with torch.no_grad():
        loads = model(x).stats
        torch.testing.assert_close(model(x).logits, reference(x).logits)
    for name, load in loads.items():
        if name.endswith("/load"):
            assert load[6:].sum() == 0, (name, load.tolist())
