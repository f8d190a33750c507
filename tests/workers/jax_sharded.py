"""Run native_mfac under jax.jit with the parameters and the ring sharded along d over 4 CPU
devices and unsharded, and print (max relative difference, the collectives XLA compiled for
one update with their element counts) as JSON. Started by tests/test_jax_native.py with
XLA_FLAGS=--xla_force_host_platform_device_count=4 (it must be set before JAX starts). With
the argument "x64": x64 enabled (float32 ring, float64 accumulation) and d wide enough for the
ring's blocked passes (``jax_native._ring_times``)."""

import json
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from rank1inv.adapters.jax_native import NativeMFACState, native_mfac

X64 = sys.argv[1:] == ["x64"]
jax.config.update("jax_enable_x64", X64)
d, m = (40_000, 64) if X64 else (4096, 8)
mesh = Mesh(np.array(jax.devices()[:4]), ("d",))
along_d = NamedSharding(mesh, P("d"))
ring_along_d = NamedSharding(mesh, P(None, "d"))
replicated = NamedSharding(mesh, P())
tx = native_mfac(0.1, ngrads=m, damp=1e-2, momentum=0.5, widen_blocks=not X64)  # False: a sharded ring
G = jnp.asarray(np.random.default_rng(0).standard_normal((3 * m, d)), jnp.float32)


def run(sharded: bool):
    state = tx.init(jnp.zeros(d, jnp.float32))
    update = jax.jit(tx.update)
    if sharded:
        state = NativeMFACState(
            ring=jax.device_put(state.ring, ring_along_d),
            gram=jax.device_put(state.gram, replicated),
            exponents=jax.device_put(state.exponents, replicated),
            count=jax.device_put(state.count, replicated),
            momentum=jax.device_put(state.momentum, along_d),
        )
    out = []
    for g in G:
        g = jax.device_put(g, along_d) if sharded else g
        u, state = update(g, state)
        out.append(np.asarray(u))
    return np.stack(out), update, g, state


a, _, _, _ = run(False)
b, update, g, state = run(True)
hlo = update.lower(g, state).compile().as_text()
collectives = []
for line in hlo.splitlines():
    match = re.search(r"= (.*?) (all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)(-start)?\(", line)
    if match:
        shapes = re.findall(r"\w+\[([\d,]*)\]", match.group(1))
        n = sum(int(np.prod([int(v) for v in shape.split(",") if v])) for shape in shapes)
        collectives.append([match.group(2), n])
print(
    json.dumps(
        {
            "diff": float(np.max(np.abs(a - b)) / np.max(np.abs(a))),
            "collectives": collectives,
            "devices": len(jax.devices()),
            "ring_sharding": str(state.ring.sharding.spec),
        }
    )
)
