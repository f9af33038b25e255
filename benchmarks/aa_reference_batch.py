"""The reference AutoAttack's own spread: pyautoattack run directly on the first N digits
test points of the quickstart's LWM-99 model (or --model) at several (batch size, seed)
pairs, e.g. at advprune's batch in eval_throughput.py and at one batch with other seeds.
Prints one line per run: batch, seed, robust accuracy, robust points, seconds.

    python benchmarks/aa_reference_batch.py --n 360 --runs 180:0,360:1,360:2,360:3
"""

import argparse
import time
from fractions import Fraction

import torch
from pyautoattack import AutoAttack

from advprune.checkpoint import load_checkpoint
from advprune.data import load_dataset

p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
p.add_argument("--n", type=int, default=64)
p.add_argument("--runs", default="32:0,64:1,64:2", help="batch:seed pairs, comma-separated")
p.add_argument("--model", default="quickstart_out/lwm-99/model.safetensors")
args = p.parse_args()
test = load_dataset("digits").test
x = torch.stack([test[i][0] for i in range(args.n)])
y = torch.tensor([int(test[i][1]) for i in range(args.n)])
m, _ = load_checkpoint(args.model)
m.eval()
for item in args.runs.split(","):
    bs, seed = (int(v) for v in item.split(":"))
    aa = AutoAttack(
        m, norm="Linf", eps=float(Fraction(3, 16)), version="standard", seed=seed, device="cpu"
    )
    aa.verbose = False
    t0 = time.perf_counter()
    xa = aa.run_standard_evaluation(x, y, batch_size=bs)
    seconds = time.perf_counter() - t0
    xa = xa[0] if isinstance(xa, tuple) else xa
    with torch.no_grad():
        robust = (m(xa).argmax(1) == y).float()
    print(bs, seed, f"{100 * float(robust.mean()):.2f} %", int(robust.sum()), f"{seconds:.1f} s",
          flush=True)  # fmt: skip
