"""The tiny PLUM LM, SFT data and training config that the training tests share, and a torchrun launcher."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from plumrec.model import ModelConfig, PlumLM, SIDVocab
from plumrec.train import SFTDataset, TrainConfig


def tiny_lm_and_data(seed=0, dropout=0.0, sizes=(8, 4), hidden=32, dtype=torch.float32):
    """A two-layer (dense, MoE) LM of width ``hidden`` and 16 SFT histories over 20 items whose SIDs use the
    codebooks ``sizes`` (so ``sizes`` sets the vocabulary)."""
    rng = np.random.default_rng(seed)
    codes = np.stack([rng.integers(0, v, 20) for v in sizes], 1)
    vocab = SIDVocab(0, sizes)
    seqs = [rng.integers(0, 20, rng.integers(3, 8)).astype(np.int64) for _ in range(16)]
    data = SFTDataset(seqs, vocab.sid_to_tokens(codes), vocab)
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=vocab.size, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, head_dim=16, intermediate_size=32, moe_intermediate_size=16,
                      num_experts=4, num_experts_per_tok=2, mlp_only_layers=(0,), hidden_dropout=dropout)
    return PlumLM(cfg).to(dtype), data


def tiny_train_config(**kw) -> TrainConfig:
    """Six logged steps of 96 tokens, warm-up 2, seed 5; ``kw`` replaces fields."""
    return TrainConfig(**{**dict(steps=6, lr=3e-3, warmup_steps=2, max_tokens=96, log_every=1, progress=False,
                                 seed=5), **kw})


def run_torchrun(script: str, nproc: int = 2, timeout: int = 300):
    """Run the python file ``script`` under ``torchrun --standalone`` with ``nproc`` CPU processes (one thread
    each, the repository on ``PYTHONPATH``); the ``subprocess.CompletedProcess`` (text output captured)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                           str(nproc), str(script)], capture_output=True, text=True, env=env, timeout=timeout)
