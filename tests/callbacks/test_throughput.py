"""Throughput callback and the FLOPs count behind MFU."""

from __future__ import annotations

from collections.abc import Callable

import lightning as L
import pytest
import torch
from torch import nn

from advarch.callbacks.throughput import ThroughputCallback, batch_counts
from advarch.console_summary import throughput_line
from advarch.models.blocks.moe import MoE
from advarch.models.blocks.ssd import Mamba2
from advarch.models.flops import training_flops_per_token
from advarch.models.mmoe import MultiGateMoE
from advarch.spec import DataSpec
from advarch.train import run
from tests.conftest import SMALL_TEXT


class _TinyLM(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.model = nn.Sequential(nn.Embedding(11, 8), nn.Linear(8, 11, bias=False))

    def training_step(self, batch, batch_idx):
        logits = self.model(batch["input_ids"])
        return nn.functional.cross_entropy(logits.flatten(0, 1), batch["input_ids"].flatten())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        ids = torch.randint(0, 11, (24, 5))
        return torch.utils.data.DataLoader([{"input_ids": row} for row in ids], batch_size=3)


def test_rates_and_mfu_over_a_run() -> None:
    callback = ThroughputCallback(peak_flops=1e9)
    trainer = L.Trainer(max_steps=8, log_every_n_steps=2, callbacks=[callback], logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)  # fmt: skip
    trainer.fit(_TinyLM())
    m = trainer.callback_metrics
    tokens, samples = float(m["train/tokens_per_s"]), float(m["train/samples_per_s"])
    assert tokens == pytest.approx(5 * samples) and tokens > 0
    assert callback.flops_per_token == 6 * 8 * 11  # the head's matmul; the lookup is free
    assert float(m["train/mfu"]) == pytest.approx(tokens * 6 * 8 * 11 / 1e9, rel=1e-5)
    assert callback._total[0] == 7 * 3  # samples after the warm-up batch


def test_batch_counts_tokens_only_for_token_ids() -> None:
    assert batch_counts({"input_ids": torch.zeros(4, 7, dtype=torch.long)}) == (4, 28)
    assert batch_counts({"inputs": torch.zeros(4, 64)}) == (4, 4)  # feature vectors
    assert batch_counts({"inputs": torch.zeros(4, 64)}, feature_tokens=8) == (4, 32)  # patches
    assert batch_counts([torch.zeros(2)]) == (0, 0)
    episode = {"support": torch.zeros(5, 64), "support_labels": torch.zeros(5),
               "query": torch.zeros(15, 64), "query_labels": torch.zeros(15)}  # fmt: skip
    assert batch_counts(episode) == (20, 20)  # a few-shot episode: its support and query


def test_moe_flops_count_only_routed_experts() -> None:
    moe = MoE(16, 32, num_experts=8, top_k=2)
    dense_equivalent = 16 * 8 + 2 * (16 * 32 + 32 * 16)  # router + two experts
    assert training_flops_per_token(moe, 10) == 6 * dense_equivalent
    soft = MoE(16, 32, num_experts=8, soft=True)
    assert training_flops_per_token(soft, 10) == 6 * (16 * 8 + 8 * (16 * 32 + 32 * 16))


def counted_training_flops(module: Callable, *inputs: torch.Tensor) -> float:
    """Matmul FLOPs of one forward and backward as torch's FlopCounterMode counts them."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        out = module(*(x.requires_grad_() if x.is_floating_point() else x for x in inputs))
        (out if isinstance(out, torch.Tensor) else out.logits).sum().backward()
    return counter.get_total_flops()


@pytest.mark.parametrize(("seq_len", "chunk"), [(128, 32), (96, 96)])
def test_mamba2_flops_count_its_chunked_matmuls(seq_len: int, chunk: int) -> None:
    # Mamba-2's SSD is matmuls (C Bᵀ, its weighted sum, states): left out, its MFU read about
    # a third low beside attention's (hunter 31)
    block = Mamba2(32, d_state=16, head_dim=16, chunk_size=chunk, d_conv=4).double()
    x = torch.randn(2, seq_len, 32, dtype=torch.float64)
    counted = counted_training_flops(block, x) / (2 * seq_len)
    conv = 6 * block.conv.weight.numel()  # (counted as weights; on CPU it runs as addcmul)
    assert training_flops_per_token(block, seq_len) == pytest.approx(counted + conv, rel=1e-9)


@pytest.mark.parametrize("gating", ["per_task", "shared", "none"])
def test_mmoe_flops_count_experts_gates_and_towers(gating: str) -> None:
    # an MMoE counted 0 FLOPs (einsums over parameters, no nn.Linear): no MFU (hunter 31)
    spec = DataSpec(kind="regression", num_features=10, task_names=("a", "b", "c"))
    model = MultiGateMoE(spec, num_experts=1 if gating == "none" else 4, gating=gating).double()
    x = torch.randn(5, 10, dtype=torch.float64)
    counted = counted_training_flops(model, x) / 5  # a token is an example
    assert training_flops_per_token(model, 1) == pytest.approx(counted, rel=1e-9)


def test_seq2seq_flops_count_the_decoders_cross_attention() -> None:
    # cross-attention counted 0 FLOPs ("its memory is short"): a seq2seq decoder's attends the
    # whole source, as much as its self-attention (hunter 31)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from advarch.models.model import Model

    spec = DataSpec(kind="seq2seq", vocab_size=20, seq_len=12, target_vocab_size=20,
                    target_len=12, pad_id=19, bos_id=18)  # fmt: skip
    model = Model(spec, dim=16, depth=2, num_heads=2).double()
    source, target = torch.randint(0, 18, (2, 12)), torch.randint(0, 18, (2, 12))
    with sdpa_kernel(SDPBackend.MATH):  # (attention as matmuls, which the counter counts)
        counted = counted_training_flops(lambda x: model(x, decoder_input_ids=target), source)
    assert training_flops_per_token(model, 12) == pytest.approx(counted / source.numel())


@pytest.mark.parametrize("tied", [True, False])
def test_a_frozen_base_counts_no_gradients_of_its_own(tied: bool) -> None:
    # new user 42: a head-only fine-tune's MFU counted every frozen weight's gradients (14%
    # high with a tied head, 2.4x with an untied one): torch's count of the same step, with
    # only the head trained; a tied head trains the input embeddings, so the whole body
    # passes its gradient back
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from advarch.models.model import Model

    spec = DataSpec(kind="lm", vocab_size=50, seq_len=12)
    model = Model(spec, dim=16, depth=2, num_heads=2, tie_embeddings=tied).double()
    model.requires_grad_(False)
    model.head.requires_grad_(True)  # (tied: model.input.weight, the same tensor)
    ids = torch.randint(0, 50, (2, 12))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(ids).logits.sum().backward()
    counted = counter.get_total_flops() / ids.numel()
    # (a trained weight counts 6 per multiply-add, as in 6·P: its input's gradient too, which
    # torch computes only where a trained tensor lies before it; the untied head's has none)
    convention = 0 if tied else 2 * model.head.weight.numel()
    assert training_flops_per_token(model, 12) == pytest.approx(counted + convention)
    full = Model(spec, dim=16, depth=2, num_heads=2, tie_embeddings=tied)
    assert training_flops_per_token(model, 12) < training_flops_per_token(full, 12) * (
        0.9 if tied else 0.5
    )


def test_fomaml_counts_its_inner_loop_in_the_flops() -> None:
    # hunter 39: MFU counted one pass over support and query; first-order MAML runs 10 more
    # over the support (1-shot 5-way, 15 queries a class: 1.6x the FLOPs, 5-shot 3.4x)
    from torch.nn.functional import cross_entropy
    from torch.utils.flop_counter import FlopCounterMode

    from tests.strategies.test_fewshot import small_episodes, small_fewshot

    (episode,) = small_episodes(1)
    counted = {}
    for adaptation in ("none", "fomaml"):
        strategy = small_fewshot(adaptation)
        strategy.hparams.adapt_steps = 10
        with FlopCounterMode(display=False) as counter:  # one training step's passes
            logits = strategy.episode_logits(episode).logits
            cross_entropy(logits, episode["query_labels"]).backward()
        counted[adaptation] = counter.get_total_flops()
        callback = ThroughputCallback()
        callback.on_train_batch_end(object(), strategy, None, episode, 0)
        assert callback.flops_per_token == pytest.approx(
            training_flops_per_token(strategy.model, 1) * strategy.model_passes(episode)
        )
    assert strategy.model_passes(episode) == pytest.approx(1 + 10 * 5 / 80)
    ratio = counted["fomaml"] / counted["none"]  # (the head's matmuls aside)
    assert ratio == pytest.approx(strategy.model_passes(episode), rel=0.02)


def test_summary_line_shows_mfu_when_known() -> None:
    line = throughput_line({"train/tokens_per_s": 12345.6, "train/samples_per_s": 3.25})
    assert line == "training throughput 12,346 tokens/s · 3.2 samples/s"
    assert throughput_line({"train/tokens_per_s": 1.0, "train/mfu": 0.4123}).endswith("MFU 41.2%")
    images = throughput_line({"train/tokens_per_s": 233.0, "train/samples_per_s": 233.0})
    assert images == "training throughput 233.0 samples/s"  # a sample is not a token sequence
    assert throughput_line({"train/samples_per_s": 233.0}) == images


def test_a_sample_of_one_token_logs_no_token_rate() -> None:
    """Feature vectors (a few-shot episode's examples, MMoE's rows) are one token a sample:
    `train/tokens_per_s` equalled samples/s in the CSV, summary.json and report, a series
    that read as a token count. MFU still counts their FLOPs."""
    callback = ThroughputCallback(peak_flops=1e9)
    callback.flops_per_token = 10.0
    assert callback._rates([4, 4, 2.0]) == {"samples_per_s": 2.0, "mfu": 2.0 * 10 / 1e9}
    assert callback._rates([4, 32, 2.0])["tokens_per_s"] == 16.0  # digits: 8 patches each


def test_every_run_reports_throughput(make_cfg, capsys) -> None:
    metrics = run(make_cfg(["debug=tiny", *SMALL_TEXT, "test=false"]))
    assert metrics["train/tokens_per_s"] > 0 and "train/mfu" not in metrics  # CPU: no peak
    assert "training throughput" in capsys.readouterr().out


class _Clock:
    """A clock that moves only when told: a training step takes 1 s, an epoch's end 100 s."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class _SlowEpochEnds(_TinyLM):
    def __init__(self, clock: _Clock) -> None:
        super().__init__()
        self.clock = clock

    def training_step(self, batch, batch_idx):
        self.clock.now += 1.0
        return super().training_step(batch, batch_idx)

    def on_train_epoch_end(self) -> None:  # a task boundary's evaluation and Fisher
        self.clock.now += 100.0


def test_epoch_end_work_is_not_training_time(monkeypatch: pytest.MonkeyPatch) -> None:
    # a continual run's task boundaries counted as training: EWC read 11x slower than naive
    clock = _Clock()
    monkeypatch.setattr("advarch.callbacks.throughput.time.perf_counter", clock)
    callback = ThroughputCallback()
    trainer = L.Trainer(max_epochs=3, log_every_n_steps=2, callbacks=[callback], logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0)  # fmt: skip
    trainer.fit(_SlowEpochEnds(clock))
    assert callback._total[0] == 23 * 3  # 3 epochs of 8 batches, the warm-up one aside
    assert callback._total[2] == 23.0  # a second a step; none of the 200 s of epoch ends


def test_ddp_rates_are_the_jobs() -> None:
    # each of 2 processes trains its own batch of 3: the job's rate counts both (it printed
    # one process's, half the job's tokens/s); MFU divides by both devices' peaks
    from types import SimpleNamespace

    callback = ThroughputCallback(peak_flops=1e9)
    trainer = SimpleNamespace(world_size=2, precision="32-true", log_every_n_steps=1000,
                              callback_metrics={}, loggers=[])  # fmt: skip
    module = _TinyLM()
    callback.on_train_start(trainer, module)
    batch = {"input_ids": torch.zeros(3, 5, dtype=torch.long)}
    for i in range(4):
        callback.on_train_batch_start(trainer, module, batch, i)
        callback.on_train_batch_end(trainer, module, None, batch, i)
    callback.on_train_end(trainer, module)
    assert callback._total[:2] == [3 * 3 * 2, 3 * 3 * 2 * 5]  # the warm-up batch aside
    m = trainer.callback_metrics
    per_device = float(m["train/tokens_per_s"]) / 2 * callback.flops_per_token / 1e9
    assert float(m["train/mfu"]) == pytest.approx(per_device, rel=1e-5)


@pytest.mark.parametrize(("name", "bf16", "tf32"), [
    ("NVIDIA H100 80GB HBM3", 989e12, 494e12), ("NVIDIA H100 PCIe", 756e12, 378e12),
    ("NVIDIA H100 NVL", 835e12, 418e12), ("NVIDIA H200", 989e12, 494e12),
    ("NVIDIA H200 NVL", 835e12, 418e12), ("NVIDIA A100-SXM4-80GB", 312e12, 156e12),
])  # fmt: skip
def test_each_card_has_its_own_dense_peak(monkeypatch, name: str, bf16: float, tf32: float):
    # a PCIe or NVL card got the SXM peak: its MFU 1.2-1.3x too low
    from advarch.callbacks.throughput import peak_flops

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    cuda = torch.device("cuda", 0)
    assert (peak_flops(cuda, "bf16-mixed"), peak_flops(cuda, "32-true")) == (bf16, tf32)


def test_a_feature_model_counts_its_patches_as_tokens() -> None:
    # a digits classifier cuts 64 features into 8 patch tokens: throughput counted one token an
    # example and FLOPs at sequence length 1, so its MFU read ~8x too low
    from advarch.models.flops import feature_tokens, training_flops_per_token
    from advarch.models.model import Model
    from advarch.spec import DataSpec

    spec = DataSpec(kind="classification", num_features=100, num_classes=10)
    model = Model(spec, dim=16, depth=1, num_heads=2, feature_patch=8)
    assert feature_tokens(model) == 13  # ⌈100/8⌉
    assert feature_tokens(_TinyLM()) == 1
    assert training_flops_per_token(model, 13) > training_flops_per_token(model, 1)
