"""Plain supervised training: the base strategy as it is (one task, no regulariser)."""

from advarch.strategies.base import BaseStrategy


class PlainStrategy(BaseStrategy):
    """Minimise the task loss plus the model's auxiliary loss; nothing else."""
