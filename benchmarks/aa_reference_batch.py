"""The reference AutoAttack's own spread: pyautoattack run directly on the first 64 digits
test points of the quickstart's LWM-99 model at batch 32 (advprune's batch in
eval_throughput.py) and at batch 64 with other seeds.

    python benchmarks/aa_reference_batch.py   # needs quickstart_out/lwm-99 (make quickstart)
"""

from fractions import Fraction

import torch
from pyautoattack import AutoAttack

from advprune.checkpoint import load_checkpoint
from advprune.data import load_dataset

test = load_dataset("digits").test
x = torch.stack([test[i][0] for i in range(64)])
y = torch.tensor([int(test[i][1]) for i in range(64)])
m, _ = load_checkpoint("quickstart_out/lwm-99/model.safetensors")
m.eval()
for bs, seed in [(32, 0), (64, 1), (64, 2)]:
    aa = AutoAttack(
        m, norm="Linf", eps=float(Fraction(3, 16)), version="standard", seed=seed, device="cpu"
    )
    aa.verbose = False
    xa = aa.run_standard_evaluation(x, y, batch_size=bs)
    xa = xa[0] if isinstance(xa, tuple) else xa
    with torch.no_grad():
        print(bs, seed, float((m(xa).argmax(1) == y).float().mean()))
