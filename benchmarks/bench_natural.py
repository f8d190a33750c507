"""One exact natural-gradient step from layer factors against per-sample gradients.

``python -m benchmarks --natural`` (needs torch): an MLP of about 10⁷ parameters, a batch of
B = 128, F̂ = (1/B)·Σ g_ig_iᵀ of per-sample gradients (true Fisher labels drawn from the model),
and one step (λI + F̂)⁻¹g computed two ways, each in its own child process so that peak memory
is measured cleanly (peak resident memory minus that after building the model and data):

- factored: ``rank1inv.adapters.natural.linear_factors`` (one forward and backward pass) and
  ``StaticInverse`` of the resulting ``FactoredGradients``;
- per-sample: ``torch.func`` (vmap of grad, in chunks of 16) materialising the B×d gradients,
  then ``StaticInverse`` of that array.

The two directions are compared (relative difference) to show they are the same step.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

from rank1inv.examples import progress

ROOT = Path(__file__).resolve().parents[1]  # the checkout: the child scripts import benchmarks

CHILD = """
import json, resource, sys, time
import numpy as np, torch
from rank1inv import StaticInverse
from rank1inv.adapters import natural, torch as ta
torch.manual_seed(0)
sizes = {sizes}
layers = []
for a, b in zip(sizes[:-1], sizes[1:]):
    layers += [torch.nn.Linear(a, b), torch.nn.Tanh()]
net = torch.nn.Sequential(*layers[:-1])
x = torch.randn({batch}, sizes[0])
y = torch.randint(0, sizes[-1], ({batch},))
torch.nn.functional.cross_entropy(net(x), y).backward()
g = torch.cat([p.grad.reshape(-1) for p in net.parameters()]).detach()
d = g.numel()
gen = torch.Generator().manual_seed(1)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
if "{method}" == "factored":
    G = natural.linear_factors(net, x, fisher="true", generator=gen)
else:
    from benchmarks.bench_laplace import per_sample_gradients
    with torch.no_grad():
        labels = torch.multinomial(torch.softmax(net(x), 1), 1, generator=gen)[:, 0]
    G = per_sample_gradients(net, x, labels, chunk_size=16)
t_grads = time.perf_counter() - t0
op = StaticInverse(G, {damp}, scale=1.0 / {batch})
step = op @ ta.to_array(g)
t_total = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
np.save(sys.argv[1], np.asarray(step[:: max(1, d // 100000)], dtype=np.float64))
print(json.dumps(dict(d=d, seconds=t_total, gradient_seconds=t_grads, extra_mib=(peak - base) / 1024)))
"""

SIZES = (1024, 2560, 2560, 10)  # 9.2·10⁶ parameters


def run(batch: int = 128, damp: float = 1e-3, sizes=SIZES) -> str:
    import os
    import tempfile

    import numpy as np

    results, steps = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for method in progress.track(("factored", "per-sample"), "natural-gradient step (a child process each)"):
            code = textwrap.dedent(CHILD).format(sizes=list(sizes), batch=batch, damp=damp, method=method)
            path = os.path.join(tmp, f"{method}.npy")
            out = subprocess.run([sys.executable, "-c", code, path], capture_output=True, text=True, timeout=1800,
                                 cwd=ROOT)  # fmt: skip
            if out.returncode:
                results[method] = dict(error=out.stderr.strip().splitlines()[-1][:200])
                continue
            results[method] = json.loads(out.stdout.strip().splitlines()[-1])
            steps[method] = np.load(path)
    f, p = results.get("factored", {}), results.get("per-sample", {})
    lines = [
        f"MLP {list(sizes)}, d = {f.get('d', p.get('d'))}, B = {batch}, λ = {damp}, one exact natural-gradient step",
        "",
        "| method | time (s) | of which gradients (s) | extra peak memory (MiB) |",
        "|---|---|---|---|",
    ]
    for name, r in (("layer factors + StaticInverse", f), ("torch.func per-sample + StaticInverse", p)):
        if "error" in r:
            lines.append(f"| {name} | failed: {r['error']} | | |")
        else:
            lines.append(f"| {name} | {r['seconds']:.2f} | {r['gradient_seconds']:.2f} | {r['extra_mib']:.0f} |")
    if "seconds" in f and "seconds" in p:
        diff = float(np.max(np.abs(steps["factored"] - steps["per-sample"])) / np.max(np.abs(steps["per-sample"])))
        speed, memory = p["seconds"] / f["seconds"], p["extra_mib"] / max(f["extra_mib"], 1)
        lines += [
            "",
            f"speed-up {speed:.1f}×, memory ratio {memory:.0f}×; the two steps differ by {diff:.1e} relative "
            "(float32 per-sample gradients against exact products)",
        ]
    return "\n".join(lines)
