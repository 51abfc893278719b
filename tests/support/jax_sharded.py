"""The JAX ops under ``shard_map`` on a mesh of CPU devices, against the same ops unsharded.

Run as a script in a fresh process (``run_sharded``): the host platform's device count is fixed
when jax initialises its backend, so ``XLA_FLAGS=--xla_force_host_platform_device_count=N`` must be
set before that, which a pytest worker that already ran jax cannot do. The script prints one line
``REPORT{json}``: for every check, the largest absolute difference from the unsharded result and
the tolerance it must stay under.

- ``history_attention``, data parallel: each device holds whole sequences (its slice of the packed
  tokens and its own ``cu_seqlens``, starting at 0); forward output, log-sum-exp and the gradients
  of q, k, v against one unsharded call on the whole batch.
- ``grouped_matmul``, expert parallel: each device holds the weights of ``E / N`` experts and the
  rows routed to them (padded to a common row count; rows past its group sizes are ignored);
  forward and the gradients of x and w against one unsharded call over all experts.
"""
from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys

import numpy as np

NUM_DEVICES = 4
AXIS = "d"


def run_sharded(impls: tuple[str, ...], timeout: float = 600) -> dict:
    """Run this file in a fresh Python with ``NUM_DEVICES`` host devices; returns its report."""
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={NUM_DEVICES}"])
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), *impls], env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("REPORT")][-1]
    return json.loads(line[len("REPORT"):])


def shard_map(f, mesh, in_specs, out_specs):
    """``jax.shard_map`` where the installed jax has it, else ``jax.experimental.shard_map``;
    the replication / varying-axes check off (Pallas calls do not declare it)."""
    import jax

    if hasattr(jax, "shard_map"):
        fn = jax.shard_map
    else:
        from jax.experimental.shard_map import shard_map as fn
    params = inspect.signature(fn).parameters
    check = {"check_vma": False} if "check_vma" in params else {"check_rep": False}
    return fn(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, **check)


def _diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def check_attention(impl: str, rng: np.random.Generator) -> dict:
    """Data-parallel ``history_attention``: forward, lse and gradients, sharded vs unsharded."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh
    from jax.sharding import PartitionSpec as P

    import plum_kernels.jax as KJ

    n, per_dev, Hq, Hkv, D = NUM_DEVICES, 96, 4, 2, 64
    local_cu = []
    for _ in range(n):  # three sequences per device, random lengths summing to per_dev
        cuts = np.sort(rng.choice(np.arange(1, per_dev), 2, replace=False))
        local_cu.append(np.concatenate([[0], cuts, [per_dev]]).astype(np.int32))
    global_cu = np.concatenate([local_cu[0]] + [c[1:] + i * per_dev for i, c in enumerate(local_cu) if i])
    max_seqlen = int(np.diff(global_cu).max())
    T = n * per_dev
    q = jnp.asarray(rng.standard_normal((T, Hq, D)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((T, Hkv, D)), jnp.float32) for _ in range(2))
    ct = jnp.asarray(rng.standard_normal((T, Hq, D)), jnp.float32)
    mesh = Mesh(np.array(jax.devices()[:n]), (AXIS,))

    def local(q, k, v, cu):
        return KJ.history_attention(q, k, v, cu, max_seqlen, return_lse=True, impl=impl)

    sharded = shard_map(local, mesh, in_specs=(P(AXIS), P(AXIS), P(AXIS), P(AXIS)),
                        out_specs=(P(AXIS), P(None, AXIS)))
    cu_sharded = jnp.asarray(np.concatenate(local_cu))
    cu_global = jnp.asarray(global_cu)

    def loss_sharded(q, k, v):
        return jnp.sum(sharded(q, k, v, cu_sharded)[0] * ct)

    def loss_global(q, k, v):
        return jnp.sum(KJ.history_attention(q, k, v, cu_global, max_seqlen, impl=impl) * ct)

    out_s, lse_s = jax.jit(sharded)(q, k, v, cu_sharded)
    out_g, lse_g = KJ.history_attention(q, k, v, cu_global, max_seqlen, return_lse=True, impl=impl)
    grads_s = jax.jit(jax.grad(loss_sharded, argnums=(0, 1, 2)))(q, k, v)
    grads_g = jax.grad(loss_global, argnums=(0, 1, 2))(q, k, v)
    report = {"out": _diff(out_s, out_g), "lse": _diff(lse_s, lse_g)}
    report.update({f"d{name}": _diff(a, b) for name, a, b in zip("qkv", grads_s, grads_g)})
    report["tol"] = 1e-4
    return report


def check_grouped_matmul(impl: str, rng: np.random.Generator) -> dict:
    """Expert-parallel ``grouped_matmul``: forward and gradients, sharded vs unsharded."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh
    from jax.sharding import PartitionSpec as P

    import plum_kernels.jax as KJ

    n, E, rows, K, N = NUM_DEVICES, 8, 128, 128, 128
    per = E // n
    sizes = []
    for _ in range(n):  # rows of each device's experts: random, up to `rows` (the rest is padding)
        used = int(rng.integers(rows // 2, rows + 1))
        cut = int(rng.integers(0, used + 1))
        sizes.append(np.array([cut, used - cut] if per == 2 else np.diff(np.linspace(0, used, per + 1).astype(int)),
                              np.int32))
    x = jnp.asarray(rng.standard_normal((n * rows, K)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((E, K, N)) / np.sqrt(K), jnp.float32)
    ct = jnp.asarray(rng.standard_normal((n * rows, N)), jnp.float32)
    valid = np.concatenate([np.arange(rows) < s.sum() for s in sizes])
    mask = jnp.asarray(valid)[:, None]
    mesh = Mesh(np.array(jax.devices()[:n]), (AXIS,))

    def local(x, w, gs):
        return KJ.grouped_matmul(x, w, gs, impl=impl)

    sharded = shard_map(local, mesh, in_specs=(P(AXIS), P(AXIS), P(AXIS)), out_specs=P(AXIS))
    gs_sharded = jnp.asarray(np.concatenate(sizes))
    rows_g = np.flatnonzero(valid)

    def loss_sharded(x, w):
        return jnp.sum(jnp.where(mask, sharded(x, w, gs_sharded) * ct, 0.0))

    def loss_global(x, w):
        return jnp.sum(KJ.grouped_matmul(x[rows_g], w, gs_sharded, impl=impl) * ct[rows_g])

    y_s = jax.jit(sharded)(x, w, gs_sharded)
    y_g = KJ.grouped_matmul(x[rows_g], w, gs_sharded, impl=impl)
    dx_s, dw_s = jax.jit(jax.grad(loss_sharded, argnums=(0, 1)))(x, w)
    dx_g, dw_g = jax.grad(loss_global, argnums=(0, 1))(x, w)
    # dx_g is zero on the padding rows, which feed no output
    return {"out": _diff(np.asarray(y_s)[rows_g], y_g), "dx": _diff(dx_s, dx_g), "dw": _diff(dw_s, dw_g), "tol": 1e-3}


def main(impls: list[str]) -> dict:
    import jax

    assert len(jax.devices()) >= NUM_DEVICES, f"{len(jax.devices())} devices: XLA_FLAGS not applied"
    rng = np.random.default_rng(0)
    report = {"devices": len(jax.devices()), "jax": jax.__version__}
    for impl in impls:
        report[f"attention/{impl}"] = check_attention(impl, rng)
        report[f"grouped_matmul/{impl}"] = check_grouped_matmul(impl, rng)
    return report


if __name__ == "__main__":
    print("REPORT" + json.dumps(main(sys.argv[1:] or ["reference"])))
