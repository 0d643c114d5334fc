"""Layer 1: flat buffers — the shared parameters in one storage, the per-task gradients in one K × N buffer."""

from .parameters import FlatParameters
from .task_gradients import TaskGradients

__all__ = ["FlatParameters", "TaskGradients"]
