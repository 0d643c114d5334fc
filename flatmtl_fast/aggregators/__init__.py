"""Layer 4: aggregators (one class per method) and the API they share."""

from .base import Aggregator, GramianAggregator

__all__ = ["Aggregator", "GramianAggregator"]
