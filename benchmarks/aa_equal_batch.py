"""pyautoattack directly and advprune's AutoAttack entry at the same batch size (32) on the
first 64 digits test points of the quickstart's dense model: where advprune's time goes.

    python benchmarks/aa_equal_batch.py   # needs quickstart_out/dense (make quickstart)
"""

import time
from fractions import Fraction

import torch
from pyautoattack import AutoAttack

from advprune.checkpoint import load_checkpoint
from advprune.data import load_dataset
from advprune.evaluation import evaluate

test = load_dataset("digits").test
x = torch.stack([test[i][0] for i in range(64)])
y = torch.tensor([int(test[i][1]) for i in range(64)])
m, _ = load_checkpoint("quickstart_out/dense/model.safetensors")
m.eval()
aa = AutoAttack(
    m, norm="Linf", eps=float(Fraction(3, 16)), version="standard", seed=0, device="cpu"
)
aa.verbose = False
t = time.perf_counter()
aa.run_standard_evaluation(x, y, batch_size=32)
print("reference bs32", round(time.perf_counter() - t, 1))
t = time.perf_counter()
r = evaluate(m, (x, y), eps="3/16", attacks="autoattack", batch_size=32, seed=0, progress=False)
print(
    "advprune bs32",
    round(time.perf_counter() - t, 1),
    "attack entry",
    round(r.entry("autoattack").seconds, 1),
)
