"""The data contracts: what a datamodule tells the model builder, the Trainer and strategies.

`DataSpec` sizes the model; `TaskSchedule` says which task a stream trains in each epoch;
`ConfiguresTrainer` and `TaskStream` are the interfaces train.py and the continual strategies
call instead of probing datamodules for attributes. They live on their own so that
`advarch.data`, `advarch.models` and `advarch.strategies` can import them without importing
each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

if TYPE_CHECKING:
    from torch.utils.data import DataLoader

Kind = Literal["lm", "classification", "seq2seq", "regression"]
KIND_NAMES = {"lm": "language modelling", "classification": "classification",
              "seq2seq": "sequence-to-sequence", "regression": "regression"}  # fmt: skip


def kind_name(kind: str) -> str:
    """What a `DataSpec.kind` means, in words for an error line (`language modelling`)."""
    return KIND_NAMES.get(kind, kind)


@dataclass(frozen=True)
class DataSpec:
    """Shapes and task layout of a datamodule's batches.

    Attributes:
        kind: what the model predicts: next tokens (`lm`), a class per sequence
            (`classification`), a target sequence (`seq2seq`) or real values (`regression`).
        vocab_size: number of input token ids (0 when inputs are feature vectors).
        seq_len: tokens per training sequence (source length for seq2seq).
        num_features: width of feature-vector inputs (0 for token inputs).
        num_classes: classes per task for classification; outputs per task for regression.
        task_names: one name per task; a single-task datamodule has one.
        target_vocab_size: vocabulary of the target side for seq2seq (0 = same as inputs).
        target_len: target sequence length for seq2seq.
        pad_id: padding token id, or -1 when batches are never padded.
        padded_inputs: whether input batches may hold `pad_id`. False for packed text and
            generated tasks, where it pads only labels and missing RETRO neighbours: models
            then build no padding masks, so attention keeps its fused causal kernel (a
            (B, T, T) mask of all False made it 1.5× slower on CPU at T 2048).
        bos_id: id that starts a target sequence (seq2seq decoders, generation).
        eos_id: id that ends a document, or -1.
        retrieval_neighbours: neighbours per chunk that batches carry (RETRO), 0 for none.
        retrieval_chunk: tokens per retrieval chunk.
        retrieval_neighbour_len: tokens per retrieved neighbour (chunk + continuation).
    """

    kind: Kind
    vocab_size: int = 0
    seq_len: int = 0
    num_features: int = 0
    num_classes: int = 0
    task_names: tuple[str, ...] = ("main",)
    target_vocab_size: int = 0
    target_len: int = 0
    pad_id: int = -1
    padded_inputs: bool = True
    bos_id: int = -1
    eos_id: int = -1
    retrieval_neighbours: int = 0
    retrieval_chunk: int = 64
    retrieval_neighbour_len: int = 128
    extras: dict = field(default_factory=dict, hash=False, compare=False)

    @property
    def num_tasks(self) -> int:
        return len(self.task_names)

    @property
    def token_bytes(self) -> list[int] | None:
        """UTF-8 bytes of each token id's text (0 for <eos> and the other specials), which text
        datamodules put in `extras["token_bytes"]`: bits per byte divide the nats of the tokens
        scored by their own bytes. None for data that is not text, and in checkpoints written
        before it (their bits per byte fall back to `bytes_per_token`)."""
        return self.extras.get("token_bytes")

    @property
    def unigram_bits(self) -> list[float] | None:
        """Bits of each token id under the add-one unigram model of the training text, which
        text datamodules put in `extras["unigram_bits"]`: every evaluation scores it on the
        tokens it scores (`<split>/unigram_bpb`), the baseline a model must beat. None for data
        that is not text, and in checkpoints written before it."""
        return self.extras.get("unigram_bits")

    def bytes_per_token(self, split: str, task: int | None = None) -> float | None:
        """UTF-8 bytes per token of text data's whole `split` (of its task `task` where known);
        None for data that is not text. Bits per byte divide by it only without `token_bytes`:
        a subset of the split is scored, whose bytes per token differ with BPE.

        Text datamodules put `{split: ratio}` in `extras["bytes_per_token"]` and, for a
        stream of domains, `{split: [ratio per task]}` in `extras["task_bytes_per_token"]`.
        """
        per_task = self.extras.get("task_bytes_per_token")
        if task is not None and per_task:
            return per_task[split][task]
        overall = self.extras.get("bytes_per_token")
        return overall[split] if overall else None


@dataclass(frozen=True)
class TaskSchedule:
    """Which task a continual stream trains in each epoch: a pure function of the epoch.

    The epoch is Lightning's `trainer.current_epoch`, restored from the checkpoint on resume,
    so a resumed run trains exactly the task the uninterrupted run would (never a counter that
    restarts, like Lightning's `reload_dataloaders_every_n_epochs`). Streams reload their
    training loader every epoch (`trainer_overrides`) and build it from `task_of_epoch`. The
    schedule is saved in continual checkpoints and checked on resume.

    Attributes:
        num_tasks: tasks in the stream.
        epochs_per_task: training epochs spent on each task.
    """

    num_tasks: int
    epochs_per_task: int

    @property
    def max_epochs(self) -> int:
        """Epochs of the whole stream (the Trainer's `max_epochs`)."""
        return self.num_tasks * self.epochs_per_task

    @property
    def trainer_overrides(self) -> dict[str, int]:
        """Trainer arguments a stream needs: its length, and a fresh loader every epoch."""
        return {"max_epochs": self.max_epochs, "reload_dataloaders_every_n_epochs": 1}

    def task_of_epoch(self, epoch: int) -> int:
        """The task trained during `epoch` (clamped to the last task)."""
        return min(epoch // self.epochs_per_task, self.num_tasks - 1)

    def ends_task(self, epoch: int) -> bool:
        """Whether `epoch` is the last epoch of its task."""
        return epoch + 1 >= self.max_epochs or self.task_of_epoch(epoch + 1) != self.task_of_epoch(
            epoch
        )


@runtime_checkable
class ConfiguresTrainer(Protocol):
    """A datamodule that needs Trainer arguments (task streams, curricula); train.py applies
    `trainer_overrides` when it builds the Trainer."""

    @property
    def trainer_overrides(self) -> dict[str, Any]: ...


@runtime_checkable
class TaskStream(ConfiguresTrainer, Protocol):
    """A datamodule presenting a stream of tasks: what continual strategies call.

    Implemented by `advarch.data.stream.TaskStreamMixin` (digits streams, text domains); the
    contract in full is in that module's docstring.

    Attributes:
        schedule: the task of each epoch, a pure function of the (checkpointed) epoch.
        seed: the stream's seed; strategies derive per-task seeds from it.
    """

    schedule: TaskSchedule
    seed: int

    def task_loader(
        self, split: str, task: int, batch_size: int, shuffle: bool, seed: int
    ) -> DataLoader:
        """Batches of task `task`'s `split` set, shuffled reproducibly from `seed` if asked."""
        ...

    def val_dataloader(self) -> list[DataLoader]:
        """One validation loader per task, all tasks (`dataloader_idx` == task id)."""
        ...

    def train_jointly(self, joint: bool) -> None:
        """Serve every training epoch from ALL tasks at once (the joint upper bound) or not."""
        ...


@runtime_checkable
class TokenizedText(Protocol):
    """A text datamodule after setup: `tokenizer` maps text to the token ids of its examples
    and back (`encode`/`decode`); sampling from a trained LM decodes with it."""

    tokenizer: Any


@runtime_checkable
class ServesNeighbours(Protocol):
    """A RETRO datamodule after setup: `retriever.query_neighbours(tokens)` returns the
    retrieval database's neighbours of new text, the same search (and alignment) training used."""

    retriever: Any
