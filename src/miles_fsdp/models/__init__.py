"""Model code: architecture (Transformer, its MTP draft), HF config (ModelArgs), HF checkpoint I/O."""

from miles_fsdp.models.args import ConfigError, ModelArgs, RopeArgs
from miles_fsdp.models.hf_io import CheckpointError, load_hf, load_model, save_hf
from miles_fsdp.models.mtp import MTPLayer
from miles_fsdp.models.transformer import TRAIN_PAGE_SIZE, Transformer, packed_inputs

__all__ = [
    "CheckpointError", "ConfigError", "MTPLayer", "ModelArgs", "RopeArgs", "TRAIN_PAGE_SIZE", "Transformer",
    "load_hf", "load_model", "packed_inputs", "save_hf",
]
