"""One contract every tuner passes: resume bit-identical, no retrace, vmap equals a loop,
non-finite steps skipped and counted, state finite.

Cases: ``BilevelOptimizer`` with every method, and ``stn.Trainer`` with both variants. A new tuner
adds a case (``make``, ``init``, ``batches``, ``poison``) and passes the same tests.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import bilevel
import solvers
from bilevel import hparams as H
from bilevel import stn

D, N = 6, 48


def _data(seed=0):
    rs = np.random.RandomState(seed)
    X = jnp.asarray(rs.randn(N, D), jnp.float32)
    y = X @ jnp.linspace(-1.0, 1.0, D) + 0.3 * jnp.asarray(rs.randn(N), jnp.float32)
    return (X[:32], y[:32]), (X[32:], y[32:])


@dataclasses.dataclass
class Case:
    make: Callable  # () -> tuner
    init: Callable  # (tuner, hparams or None) -> state
    batches: Callable  # (tuner, state) -> (inner, outer)
    poison: Callable  # (inner batches) -> inner batches with one non-finite batch
    population: Callable  # (tuner) -> stacked unconstrained hparams for 3 members

    @functools.cached_property
    def shared(self):
        """``(tuner, jax.jit(tuner.step))``, made once per case: each ``jax.jit`` of a fresh bound
        method traces and compiles the step again, so the tests that need *a* tuner share one."""
        tuner = self.make()
        return tuner, jax.jit(tuner.step)


def _bilevel_case(method) -> Case:
    train, val = _data()

    def inner(w, h, b):
        return jnp.mean((b[0] @ w - b[1]) ** 2) + h["wd"] * jnp.sum(w**2)

    def outer(w, h, b):
        return jnp.mean((b[0] @ w - b[1]) ** 2)

    def make():
        return bilevel.BilevelOptimizer(
            inner,
            outer,
            inner_optimizer=optax.adam(0.05, eps_root=1e-12),
            outer_optimizer=optax.adam(0.05),
            space={"wd": H.log(0.1)},
            method=method,
            inner_steps=4,
        )

    return Case(
        make=make,
        init=lambda t, u=None: t.init(jnp.zeros(D), u, key=jax.random.key(3)),
        batches=lambda t, s: t.sample_batches(s, train, val, 8),
        poison=lambda b: (b[0].at[1].set(jnp.nan), b[1]),
        population=lambda t: {"wd": jnp.log(jnp.asarray([0.01, 0.1, 1.0]))},
    )


class _Net(nnx.Module):
    def __init__(self, rngs):
        self.layer = stn.StnLinear(D, 1, 1, rngs=rngs)

    def __call__(self, x, hnet):
        return self.layer(x, hnet)[:, 0]


def _stn_case(method) -> Case:
    train, val = _data()

    def inner(model, h, b, key):
        del key
        err = jnp.mean((model(b[0], h.hnet) - b[1]) ** 2)
        return err + jnp.mean(h["wd"]) * stn.effective_l2(model, h.hnet).mean()

    def outer(model, h, b):
        return jnp.mean((model(b[0], h.hnet) - b[1]) ** 2)

    def make():
        return stn.Trainer(
            _Net(nnx.Rngs(0)),
            inner,
            outer,
            space={"wd": H.log(0.1)},
            inner_optimizer=optax.adam(0.02),
            outer_optimizer=optax.adam(0.02),
            method=method,
            inner_steps=3,
            outer_steps=1,
        )

    return Case(
        make=make,
        init=lambda t, u=None: t.init(hparams=u, key=jax.random.key(3)),
        batches=lambda t, s: t.sample_batches(s, train, val, 8),
        poison=lambda b: (b[0].at[1].set(jnp.nan), b[1]),
        population=lambda t: {"wd": jnp.log(jnp.asarray([0.01, 0.1, 1.0]))},
    )


CASES = {
    "implicit-cg": lambda: _bilevel_case(solvers.Implicit(linear_solver=solvers.cg(maxiter=10))),
    "soba": lambda: _bilevel_case(
        solvers.Implicit(linear_solver=solvers.neumann(steps=1, scale=0.1))
    ),
    "truncated": lambda: _bilevel_case(solvers.Truncated(steps=2)),
    "unrolled-checkpointed": lambda: _bilevel_case(solvers.Unrolled(checkpoint_every=2)),
    "forward": lambda: _bilevel_case(bilevel.Forward(decay=0.9)),
    "borep": lambda: _bilevel_case(bilevel.BOREP(adjoint_lr=0.05, period=2)),
    "stn": lambda: _stn_case(stn.STN()),
    "delta-stn": lambda: _stn_case(stn.DeltaSTN(linearize=True)),
}


def _run(case, tuner, state, steps, step=None):
    step = jax.jit(tuner.step) if step is None else step
    metrics = None
    for _ in range(steps):
        state, metrics = step(state, *case.batches(tuner, state))
    return state, metrics


def _assert_finite(state):
    for leaf in jax.tree.leaves(state):
        if jnp.issubdtype(jnp.result_type(leaf), jnp.inexact):
            assert bool(jnp.all(jnp.isfinite(leaf)))


@pytest.fixture(params=list(CASES), scope="module")
def case(request):
    return CASES[request.param]()


def test_resume_is_bit_identical(case, tmp_path):
    tuner, step = case.shared
    straight, _ = _run(case, tuner, case.init(tuner), 4, step)
    half, _ = _run(case, tuner, case.init(tuner), 2, step)
    bilevel.save_checkpoint(tmp_path, half, int(half.step))
    restored, _ = bilevel.restore_checkpoint(tmp_path, like=case.init(tuner))
    resumed, _ = _run(case, case.make(), restored, 2)  # a fresh tuner, its own jit
    for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed), strict=True):
        if jnp.issubdtype(a.dtype, jax.dtypes.prng_key):
            a, b = jax.random.key_data(a), jax.random.key_data(b)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_no_retrace_on_the_second_jitted_call(case):
    tuner = case.make()
    state = case.init(tuner)
    step = jax.jit(chex.assert_max_traces(tuner.step, n=1))
    state, _ = step(state, *case.batches(tuner, state))
    state, _ = step(state, *case.batches(tuner, state))
    chex.clear_trace_counter()


def test_vmap_over_a_population_equals_a_loop(case):
    tuner, step = case.shared
    population = case.population(tuner)
    probe = case.init(tuner)
    batches = case.batches(tuner, probe)
    states = jax.vmap(lambda u: case.init(tuner, u))(population)
    vstates, vmetrics = jax.jit(jax.vmap(tuner.step, in_axes=(0, None, None)))(states, *batches)
    for i in range(3):
        member = case.init(tuner, jax.tree.map(lambda a, i=i: a[i], population))
        s, m = step(member, *batches)
        np.testing.assert_allclose(
            np.asarray(m["outer_loss"]), np.asarray(vmetrics["outer_loss"][i]), rtol=2e-5
        )
        for a, b in zip(jax.tree.leaves(s.hparams), jax.tree.leaves(vstates.hparams), strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b[i]), rtol=2e-5, atol=1e-7)


def test_nonfinite_steps_are_skipped_and_counted_and_state_stays_finite(case):
    tuner, step = case.shared
    state = case.init(tuner)
    inner, outer = case.batches(tuner, state)
    state, metrics = step(state, case.poison(inner), outer)
    assert int(metrics["inner_skipped"]) == 1
    # Reverse mode through the skipped step (Unrolled) has no finite hypergradient: that outer
    # step is skipped too, and says so.
    assert int(metrics["skipped"]) in (0, 1)
    assert (int(metrics["skipped"]) == 1) == (int(metrics["status"]) == solvers.Status.NONFINITE)
    _assert_finite(state)
    for name in ("inner_loss", "outer_loss", "hypergrad", "hypergrad_norm", "hparams", "status"):
        assert name in metrics, name
    state, metrics = _run(case, tuner, state, 3, step)
    assert int(metrics["inner_skipped"]) == 1
    _assert_finite(state)
