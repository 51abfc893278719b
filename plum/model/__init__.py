"""The PLUM language model: config and presets, the Qwen3-MoE-family LM on
``plum_kernels.torch``, Hugging Face checkpoint loading and the SID vocabulary."""
from plumrec.model.config import PRESETS, ModelConfig, preset
from plumrec.model.model import BeamCache, LMOutput, PlumLM, cu_seqlens_from_lengths, positions_from_cu_seqlens
from plumrec.model.vocab import SIDVocab, extend_vocabulary, init_sid_embeddings

__all__ = ["ModelConfig", "PRESETS", "preset", "PlumLM", "LMOutput", "BeamCache", "cu_seqlens_from_lengths",
           "positions_from_cu_seqlens", "SIDVocab", "extend_vocabulary",
           "init_sid_embeddings"]
