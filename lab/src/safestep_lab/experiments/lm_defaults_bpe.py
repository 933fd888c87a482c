"""Issue 19, lm-defaults-bpe: the candidate defaults on the BPE GPT (V = 8192, d = 128), cut to fit 2 cores.

The protocol and bars of ``lm_defaults`` with its ``BPE`` configuration: 5 seeds, constant LR 1e-3 / 3e-3 / 1e-2,
100 steps, the ×1000 spike (steps 40–59) at the tuned LR and 3× it; plain AdamW, today's default and R_w on 1/8
of the rows.
"""
from __future__ import annotations

from dataclasses import replace

from ..report import ExperimentResult
from . import Experiment, RunOptions
from .lm_common import LMSetup
from .lm_defaults import BPE, QUICK, run as run_protocol

__all__ = ["EXPERIMENT", "QUICK_BPE", "run"]

QUICK_BPE = replace(QUICK, calm_methods=("plain", "ss-default"), ghost_lrs=(), spike_methods=("plain", "ss-default"),
                    cosine_methods=(), trap_methods=(), series_lrs=(),
                    setup=LMSetup(tokenizer="bpe", preset="bpe", batch_size=2, seq_len=32, val_windows=4))


def run(options: RunOptions) -> ExperimentResult:
    """``lm_defaults.run`` on the BPE GPT (the quick variant: 12 steps, 1 seed, 2 methods)."""
    return run_protocol(options, BPE, QUICK_BPE)


EXPERIMENT = Experiment(
    name="lm-defaults-bpe", paper_ref="issue 19: SafeStep's defaults on language models (BPE GPT)",
    summary="the default vs R_w on 1/8 of the rows vs AdamW on the BPE GPT: 5 seeds × 3 LRs and the ×1000 spike",
    full_time="≈ 35 min wall, 2 workers on a 2-core machine (75 runs of 100 steps)",
    quick_time="≈ 20 s once the BPE tokenizer is cached (its first training takes minutes)", run=run)
