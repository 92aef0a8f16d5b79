"""The RetNet model: configuration, modeling and the pure retention functions."""

from .configuration_retnet import RetNetConfig
from .modeling_retnet import RetNetForCausalLM, RetNetModel, RetNetState
from .retention import (
    retention,
    retention_chunkwise,
    retention_naive,
    retention_parallel,
    retention_recurrent,
)

__all__ = [
    "RetNetConfig",
    "RetNetModel",
    "RetNetForCausalLM",
    "RetNetState",
    "retention",
    "retention_naive",
    "retention_parallel",
    "retention_chunkwise",
    "retention_recurrent",
]
