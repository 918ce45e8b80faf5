"""Batches of tasks (meta-learning): ``jax.vmap`` over tasks through ``argmin`` and ``custom_root``.

The problem is iMAML's (Rajeswaran et al., NeurIPS 2019) on a tiny tanh network and sinusoid
tasks: each task adapts the meta-parameters ``theta`` by solving

    phi*(theta) = argmin_phi L_support(phi) + (lam / 2) ||phi - theta||^2

and the meta-loss is the mean query loss at ``phi*`` over the tasks. MAML differentiates through
a few gradient steps started at ``theta`` instead (``Unrolled``: derivatives w.r.t. the starting
point).
"""

from __future__ import annotations

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

import solvers
from tests._docs_examples import run_example
from tests.solvers.problems import both_modes

ROOT = Path(__file__).resolve().parents[2]
# XLA's fast-compile options on CPU (programs compile several times faster, run slower; the
# numbers agree to rounding): the looped references compile eight copies of a solver.
FAST = {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}
jit = functools.partial(jax.jit, compiler_options=FAST if jax.default_backend() == "cpu" else {})
N_TASKS = 8
HIDDEN = 4
LAM = 1.0  # proximal strength of iMAML's inner problem
LR = 0.2  # inner SGD step (below 2 / the largest curvature of the proximal problems here)
PROX_STEPS = 500  # the proximal problems converge to float64 round-off (rate ~ 1 - LR * LAM / 3)
MAML_STEPS = 5


def init_mlp(key, dtype=jnp.float32):
    k1, k2, k3 = jax.random.split(key, 3)
    return {
        "w1": jax.random.normal(k1, (1, HIDDEN), dtype),
        "b1": 0.5 * jax.random.normal(k2, (HIDDEN,), dtype),
        "w2": 0.5 * jax.random.normal(k3, (HIDDEN, 1), dtype),
        "b2": jnp.zeros((1,), dtype),
    }


def predict(p, x):
    return (jnp.tanh(x[:, None] @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"])[:, 0]


def task_loss(p, x, y):
    return 0.5 * jnp.mean((predict(p, x) - y) ** 2)


def proximal_loss(phi, theta, x, y):
    pairs = zip(jax.tree.leaves(phi), jax.tree.leaves(theta), strict=True)
    sq = sum(jnp.sum((a - b) ** 2) for a, b in pairs)
    return task_loss(phi, x, y) + 0.5 * LAM * sq


def make_tasks(seed=0, n_tasks=N_TASKS, shots=6, dtype=np.float32):
    """Sinusoid tasks ``y = A sin(x - phase)``: support and query sets, stacked over tasks."""
    rs = np.random.RandomState(seed)
    amp = rs.uniform(0.2, 1.5, (n_tasks, 1))
    phase = rs.uniform(0.0, np.pi, (n_tasks, 1))
    xs, xq = rs.uniform(-3, 3, (2, n_tasks, shots))
    data = (xs, amp * np.sin(xs - phase), xq, amp * np.sin(xq - phase))
    return tuple(jnp.asarray(a, dtype) for a in data)


def _cg(theta):
    """CG to float64 round-off, or to a tolerance float32 reaches."""
    f64 = jax.tree.leaves(theta)[0].dtype == jnp.float64
    return solvers.cg(tol=1e-10 if f64 else 1e-5)


def _implicit(theta, x, y):
    return solvers.argmin(
        proximal_loss, theta, theta, x, y, optimizer=optax.sgd(LR), steps=PROX_STEPS,
        adjoint=solvers.Implicit(linear_solver=_cg(theta)),
    )  # fmt: skip


def _unrolled(theta, x, y):
    # MAML: theta is only the starting point; Unrolled differentiates through it.
    return solvers.argmin(
        task_loss, theta, x, y, optimizer=optax.sgd(LR), steps=MAML_STEPS,
        adjoint=solvers.Unrolled(),
    )  # fmt: skip


def _truncated(theta, x, y):
    return solvers.argmin(
        proximal_loss, theta, theta, x, y, optimizer=optax.sgd(LR), steps=MAML_STEPS,
        adjoint=solvers.Truncated(steps=3),
    )  # fmt: skip


def _gradient_descent(phi0, theta, x, y):
    step = lambda _, p: jax.tree.map(
        lambda a, g: a - LR * g, p, jax.grad(proximal_loss)(p, theta, x, y)
    )
    return jax.lax.fori_loop(0, PROX_STEPS, step, phi0)


def _custom_root(theta, x, y):
    solver = solvers.custom_root(jax.grad(proximal_loss), _cg(theta), symmetric=True)
    return solver(_gradient_descent)(theta, theta, x, y)


ADAPT = {
    "implicit": _implicit,
    "unrolled": _unrolled,
    "truncated": _truncated,
    "custom_root": _custom_root,
}


def meta_loss_vmap(adapt):
    def meta(theta, xs, ys, xq, yq):
        phis = jax.vmap(adapt, in_axes=(None, 0, 0))(theta, xs, ys)
        return jnp.mean(jax.vmap(task_loss)(phis, xq, yq))

    return meta


def meta_loss_loop(adapt):
    def meta(theta, xs, ys, xq, yq):
        losses = [task_loss(adapt(theta, xs[i], ys[i]), xq[i], yq[i]) for i in range(len(xs))]
        return jnp.mean(jnp.stack(losses))

    return meta


def _close(a, b, rtol, atol):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


@pytest.mark.parametrize("name", sorted(ADAPT))
def test_vmap_over_tasks_equals_a_loop(name):
    """The solutions and the meta-gradient of a vmapped batch of 8 tasks equal a Python loop."""
    adapt = ADAPT[name]
    theta = init_mlp(jax.random.key(0))
    data = make_tasks()

    def batched(theta, xs, ys, xq, yq):
        phis = jax.vmap(adapt, in_axes=(None, 0, 0))(theta, xs, ys)
        return jnp.mean(jax.vmap(task_loss)(phis, xq, yq)), phis

    def one_task(theta, x, y, xq, yq):
        phi = adapt(theta, x, y)
        return task_loss(phi, xq, yq), phi

    (loss, phis), g_vmap = jit(jax.value_and_grad(batched, has_aux=True))(theta, *data)
    # The loop: one task at a time through the same compiled program (a Python loop inside one
    # jit would compile eight copies of the solver), then the mean over the tasks.
    one = jit(jax.value_and_grad(one_task, has_aux=True))
    looped = [one(theta, *(a[i] for a in data)) for i in range(N_TASKS)]
    loss_loop = jnp.mean(jnp.stack([loss_i for (loss_i, _), _ in looped]))
    phis_loop = jax.tree.map(lambda *a: jnp.stack(a), *[phi for (_, phi), _ in looped])
    g_loop = jax.tree.map(lambda *a: jnp.mean(jnp.stack(a), 0), *[g for _, g in looped])
    assert jax.tree.leaves(phis)[0].shape[0] == N_TASKS
    _close(phis, phis_loop, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(loss, loss_loop, rtol=1e-6)
    _close(g_vmap, g_loop, rtol=1e-4, atol=1e-6)
    # Adaptation moved every task away from theta, and the meta-gradient is not zero (the
    # comparison is not of unchanged inputs).
    moved = jax.vmap(lambda p: ravel_pytree(p)[0])(phis) - ravel_pytree(theta)[0]
    assert np.all(np.linalg.norm(np.asarray(moved), axis=1) > 1e-2)
    assert np.linalg.norm(ravel_pytree(g_vmap)[0]) > 1e-3


def test_unrolled_differentiates_the_starting_point():
    """MAML's derivative: ``d w_n / d w_0`` through the steps for Unrolled (both modes); held
    constant by Truncated; none under Implicit (the solution does not depend on it)."""
    f = lambda w, a: jnp.sum((w - a) ** 2)  # SGD: w_{t+1} - a = (1 - 2 lr) (w_t - a)
    lr, steps = 0.1, 3

    def run(adjoint):
        return lambda w0: solvers.argmin(
            f, w0, 1.0, optimizer=optax.sgd(lr), steps=steps, adjoint=adjoint
        ).sum()

    w0 = jnp.zeros(2)
    want = np.full(2, (1 - 2 * lr) ** steps)
    for adjoint in (solvers.Unrolled(), solvers.Unrolled(checkpoint_every=2), solvers.Forward()):
        rev, fwd = both_modes(run(adjoint))(w0)
        np.testing.assert_allclose(rev, want, rtol=1e-6)
        np.testing.assert_allclose(fwd, want, rtol=1e-6)
    for adjoint in (solvers.Truncated(steps=2), solvers.Truncated(steps=3), solvers.Implicit()):
        np.testing.assert_array_equal(jax.jit(jax.grad(run(adjoint)))(w0), np.zeros(2))


def test_vmap_with_per_task_initialization_and_forward_mode():
    """Batched ``init_params`` and batched meta-parameters, and jacfwd through the vmap."""
    data = make_tasks(seed=1)
    thetas = jax.vmap(init_mlp)(jax.random.split(jax.random.key(1), N_TASKS))

    def per_task(theta, xs, ys, xq, yq):
        return task_loss(_implicit(theta, xs, ys), xq, yq)

    g_vmap = jit(jax.vmap(jax.grad(per_task)))(thetas, *data)
    one = jit(jax.grad(per_task))
    for i in (0, 3, N_TASKS - 1):  # a few tasks: the 8-task loop is the test above
        g = one(jax.tree.map(lambda a, i=i: a[i], thetas), *(a[i] for a in data))
        _close(jax.tree.map(lambda a, i=i: a[i], g_vmap), g, rtol=1e-4, atol=1e-6)

    theta = jax.tree.map(lambda a: a[0], thetas)
    meta = meta_loss_vmap(_implicit)
    flat, unravel = ravel_pytree(theta)
    fwd = jit(jax.jacfwd(lambda f: meta(unravel(f), *data)))(flat)
    rev = ravel_pytree(jit(jax.grad(meta))(theta, *data))[0]
    np.testing.assert_allclose(fwd, rev, rtol=1e-4, atol=1e-6)


def test_vmap_with_early_stopping_keeps_each_task_own_steps():
    """With ``tol`` each task stops at its own step; the batched run reports and returns that."""
    theta = init_mlp(jax.random.key(2))
    xs, ys, _, _ = make_tasks(seed=2)

    def adapt(theta, x, y):
        return solvers.argmin(
            proximal_loss, theta, theta, x, y, optimizer=optax.sgd(0.05), steps=400, tol=1e-3,
            return_info=True,
        )  # fmt: skip

    phis, info = jit(jax.vmap(adapt, in_axes=(None, 0, 0)))(theta, xs, ys)
    assert info.steps.shape == info.status.shape == (N_TASKS,)
    assert np.all(np.asarray(info.status) == solvers.Status.SUCCESS)
    assert np.all(np.asarray(info.grad_norm) <= 1e-3)
    assert len(set(np.asarray(info.steps).tolist())) > 1  # the tasks did stop at different steps
    for i in range(N_TASKS):
        phi, one = jit(adapt)(theta, xs[i], ys[i])
        assert int(one.steps) == int(info.steps[i])
        _close(jax.tree.map(lambda a, i=i: a[i], phis), phi, rtol=1e-5, atol=1e-6)


# Each method's meta-gradient is the derivative of its own meta-loss: finite differences of the
# same function (converged proximal problem for the implicit ones, the 5-step map for MAML).
@pytest.mark.parametrize("name", ["implicit", "unrolled", "custom_root"])
def test_meta_gradient_matches_central_finite_differences(name):
    with jax.enable_x64(True):
        theta = init_mlp(jax.random.key(3), jnp.float64)
        data = make_tasks(seed=3, n_tasks=3, dtype=np.float64)
        flat, unravel = ravel_pytree(theta)
        meta = meta_loss_vmap(ADAPT[name])
        f = jit(lambda v: meta(unravel(v), *data))
        grad = np.asarray(ravel_pytree(jit(jax.grad(meta))(theta, *data))[0])
        eps = 1e-5
        eye = np.eye(flat.size)
        fd = np.array(
            [(float(f(flat + eps * e)) - float(f(flat - eps * e))) / (2 * eps) for e in eye]
        )
        assert np.linalg.norm(grad) > 1e-3
        assert np.linalg.norm(grad - fd) <= 1e-6 * np.linalg.norm(fd)


def test_implicit_meta_gradient_is_the_imaml_formula():
    r"""``g = mean_i (I + H_i / lam)^{-1} grad L_query_i(phi_i*)`` with dense Hessians."""
    with jax.enable_x64(True):
        theta = init_mlp(jax.random.key(4), jnp.float64)
        xs, ys, xq, yq = make_tasks(seed=4, n_tasks=3, dtype=np.float64)
        grad = ravel_pytree(jit(jax.grad(meta_loss_vmap(_implicit)))(theta, xs, ys, xq, yq))[0]
        phis = jit(jax.vmap(_implicit, in_axes=(None, 0, 0)))(theta, xs, ys)
        unravel = ravel_pytree(theta)[1]

        @jit  # once for the three tasks
        def hess_and_query_grad(phi, x, y, xq, yq):
            hess = jax.hessian(lambda v: task_loss(unravel(v), x, y))(phi)
            return hess, jax.grad(lambda v: task_loss(unravel(v), xq, yq))(phi)

        want = []
        for i in range(3):
            phi = ravel_pytree(jax.tree.map(lambda a, i=i: a[i], phis))[0]
            hess, g_query = hess_and_query_grad(phi, xs[i], ys[i], xq[i], yq[i])
            want.append(np.linalg.solve(np.eye(phi.size) + np.asarray(hess) / LAM, g_query))
        np.testing.assert_allclose(grad, np.mean(want, axis=0), rtol=1e-8, atol=1e-12)


def test_meta_gradient_does_not_retrace_across_calls():
    traces = []

    @jit
    def meta_step(theta, xs, ys, xq, yq):
        traces.append(None)
        meta = lambda th: (meta_loss_vmap(_implicit)(th, xs, ys, xq, yq)
                           + meta_loss_vmap(_unrolled)(th, xs, ys, xq, yq))  # fmt: skip
        loss, g = jax.value_and_grad(meta)(theta)
        return loss, jax.tree.map(lambda a, b: a - 0.1 * b, theta, g)

    theta = init_mlp(jax.random.key(5))
    losses = []
    for seed in range(3):
        loss, theta = meta_step(theta, *make_tasks(seed=10 + seed))
        losses.append(float(loss))
    assert len(traces) == 1
    assert all(np.isfinite(losses)) and len(set(losses)) == 3


def test_the_docs_example_runs():
    """The runnable example of ``docs/tasks.md`` (between its snippet markers) prints a result."""
    out = run_example("tasks.md", "tasks", max_lines=29, xla_defaults=False)
    assert "nan" not in out.lower(), out
