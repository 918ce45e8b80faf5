"""The method protocol's contract: every method, every setting, every caller.

Each setting changes the result where it should and matches an independent computation; the
one-shot ``hypergradient`` equals what ``BilevelOptimizer.step`` applies from the same state; a new
method is one subclass that every caller accepts.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bilevel
import solvers
from bilevel import hparams as H
from tests.bilevel.test_bilevel import ETA, full_batches, inner_loss, outer_loss, ridge_problem

METHODS = {
    "implicit": solvers.Implicit(linear_solver=solvers.cg(tol=1e-12, maxiter=200)),
    "truncated": solvers.Truncated(steps=3),
    "unrolled": solvers.Unrolled(),
    "forward": solvers.Forward(),
}


def test_forward_is_one_object_in_both_packages():
    assert bilevel.Forward is solvers.Forward


def decayed_tangent_reference(w0, lam, X, y, Xv, yv, n_steps, decay, z0=None):
    """Explicit Python loop: Z_{t+1} = d_w Phi (decay Z_t) + d_lam Phi, g = Z^T grad_w L_V."""

    def phi(w, lam):
        return w - ETA * jax.grad(inner_loss)(w, {"lam": lam}, (X, y))

    w, z = w0, jnp.zeros_like(w0) if z0 is None else z0
    for _ in range(n_steps):
        w_next, z = jax.jvp(phi, (w, lam), (decay * z, jnp.ones_like(lam)))
        w = w_next
    g_w = jax.grad(outer_loss)(w, None, (Xv, yv))
    return jnp.vdot(z, g_w), w, z


@pytest.mark.parametrize("decay", [1.0, 0.5])
def test_forward_decay_matches_explicit_decayed_tangents_one_shot(decay):
    with jax.enable_x64(True):
        X, y, Xv, yv = ridge_problem()
        lam = jnp.asarray(0.3)
        g = bilevel.hypergradient(
            inner_loss,
            outer_loss,
            jnp.zeros(X.shape[1]),
            {"lam": lam},
            full_batches(X, y, 10),
            (Xv, yv),
            method=bilevel.Forward(decay=decay),
            inner_optimizer=optax.sgd(ETA),
        )
        want, _, _ = decayed_tangent_reference(jnp.zeros(X.shape[1]), lam, X, y, Xv, yv, 10, decay)
        np.testing.assert_allclose(g["lam"], want, rtol=1e-10)


def test_forward_decay_changes_the_result_and_is_honoured_online():
    with jax.enable_x64(True):
        X, y, Xv, yv = ridge_problem()
        one_shot = {
            d: bilevel.hypergradient(
                inner_loss,
                outer_loss,
                jnp.zeros(X.shape[1]),
                {"lam": jnp.asarray(0.3)},
                full_batches(X, y, 10),
                (Xv, yv),
                method=bilevel.Forward(decay=d),
                inner_optimizer=optax.sgd(ETA),
            )["lam"]
            for d in (1.0, 0.5)
        }
        assert abs(one_shot[1.0] - one_shot[0.5]) > 1e-3 * abs(one_shot[1.0])
        # Online: tangents are carried (decayed) across outer steps. h = u (a real space).
        opt = bilevel.BilevelOptimizer(
            inner_loss,
            outer_loss,
            inner_optimizer=optax.sgd(ETA),
            outer_optimizer=optax.sgd(0.0),
            space={"lam": H.real(0.3)},
            method=bilevel.Forward(decay=0.5),
            inner_steps=6,
        )
        state = opt.init(jnp.zeros(X.shape[1]))
        for _ in range(2):
            state, metrics = opt.step(state, full_batches(X, y, 6), (Xv, yv))
        want, _, _ = decayed_tangent_reference(
            jnp.zeros(X.shape[1]), jnp.asarray(0.3), X, y, Xv, yv, 12, 0.5
        )
        np.testing.assert_allclose(metrics["hypergrad"]["lam"], want, rtol=1e-10)


def _compile(fn, *args):
    """``jax.jit(fn)`` compiled once for ``args``: it is run, and its memory read, from there."""
    return jax.jit(fn).lower(*args).compile()


def _temp_bytes(compiled):
    return compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize(
    "make",
    [
        lambda k: solvers.Unrolled(checkpoint_every=k),
        lambda k: solvers.Truncated(steps=48, checkpoint_every=k),
    ],
    ids=["unrolled", "truncated"],
)
def test_checkpoint_every_equals_plain_and_saves_memory_online_and_in_argmin(make):
    with jax.enable_x64(True):
        rs = np.random.RandomState(0)
        d, n = 300, 64
        X = jnp.asarray(rs.randn(40, d) / np.sqrt(d))
        y = jnp.asarray(rs.randn(40))
        # One batch shared by every step (leading axis 1): the carried state, not copies of the
        # batches, is what checkpointing saves.
        batches = full_batches(X, y, 1)
        results, temps = {}, {}
        for k in (None, 8):
            opt = bilevel.BilevelOptimizer(
                inner_loss,
                outer_loss,
                inner_optimizer=optax.adam(0.01, eps_root=1e-12),
                outer_optimizer=optax.sgd(0.0),
                space={"lam": H.log(0.1)},
                method=make(k),
                inner_steps=n,
            )
            state = opt.init(jnp.zeros(d))
            step = _compile(opt.step, state, batches, (X, y))
            _, metrics = step(state, batches, (X, y))
            results[k] = metrics["hypergrad"]["lam"]
            temps[k] = _temp_bytes(step)
        np.testing.assert_allclose(results[8], results[None], rtol=1e-10)
        assert temps[8] < 0.6 * temps[None], temps

        # The same setting under argmin.
        def val(lam, k):
            w = solvers.argmin(
                lambda w, lam: inner_loss(w, {"lam": lam}, (X, y)),
                jnp.zeros(d),
                lam,
                optimizer=optax.sgd(0.1),
                steps=n,
                adjoint=make(k),
            )
            return outer_loss(w, None, (X, y))

        grads, temps = {}, {}
        for k in (None, 8):
            grad = _compile(jax.grad(lambda lam, k=k: val(lam, k)), 0.1)
            grads[k], temps[k] = grad(0.1), _temp_bytes(grad)
        np.testing.assert_allclose(grads[8], grads[None], rtol=1e-10)
        assert temps[8] < 0.6 * temps[None], temps


@pytest.mark.parametrize("name", list(METHODS))
def test_one_shot_hypergradient_equals_the_online_step(name):
    method = METHODS[name]
    with jax.enable_x64(True):
        X, y, Xv, yv = ridge_problem()
        rs = np.random.RandomState(1)
        idx = rs.randint(0, X.shape[0], size=(5, 30))
        batches = (X[idx], y[idx])
        opt = bilevel.BilevelOptimizer(
            inner_loss,
            outer_loss,
            inner_optimizer=optax.adam(0.05, eps_root=1e-12),
            outer_optimizer=optax.sgd(0.0),
            space={"lam": H.real(0.2)},  # u = h: both gradients are w.r.t. the same variable
            method=method,
            inner_steps=5,
        )
        state = opt.init(jnp.asarray(rs.randn(X.shape[1])))
        # Move away from the initial state first, so the state is not special.
        state, _ = opt.step(state, batches, (Xv, yv))
        if isinstance(method, solvers.Forward):
            # The one-shot Forward starts from zero tangents: compare from a fresh tangent.
            state = state._replace(method_state=opt.init(state.params).method_state)
        _, metrics = opt.step(state, batches, (Xv, yv))
        g, info = bilevel.hypergradient(
            inner_loss,
            outer_loss,
            state.params,
            opt.hparams(state),
            batches,
            (Xv, yv),
            method=method,
            inner_optimizer=optax.adam(0.05, eps_root=1e-12),
            inner_state=state.inner_state,
            return_info=True,
        )
        np.testing.assert_allclose(g["lam"], metrics["hypergrad"]["lam"], rtol=1e-9)
        assert int(info.status) == int(metrics["status"]) == solvers.Status.SUCCESS


def test_settings_change_the_result_where_they_should():
    with jax.enable_x64(True):
        X, y, Xv, yv = ridge_problem()

        @functools.cache  # Unrolled() is the reference twice
        def g(method):  # jitted: one compile per method, not many small eager ones
            return jax.jit(
                lambda w0, h, batches, val: bilevel.hypergradient(
                    inner_loss,
                    outer_loss,
                    w0,
                    h,
                    batches,
                    val,
                    method=method,
                    inner_optimizer=optax.sgd(ETA),
                )["lam"]
            )(jnp.zeros(X.shape[1]), {"lam": jnp.asarray(0.3)}, full_batches(X, y, 8), (Xv, yv))

        pairs = [
            (solvers.Truncated(steps=2), solvers.Truncated(steps=6)),
            (solvers.Forward(decay=1.0), solvers.Forward(decay=0.7)),
            (
                solvers.Implicit(linear_solver=solvers.cg(maxiter=1)),
                solvers.Implicit(linear_solver=solvers.cg(maxiter=50, tol=1e-12)),
            ),
        ]
        for a, b in pairs:
            ga, gb = g(a), g(b)
            assert abs(ga - gb) > 1e-4 * abs(gb), (a, b, ga, gb)
        # Truncated(steps=n) is Unrolled; memory settings leave the value unchanged.
        np.testing.assert_allclose(g(solvers.Truncated(steps=8)), g(solvers.Unrolled()), rtol=1e-12)
        np.testing.assert_allclose(
            g(solvers.Unrolled(checkpoint_every=3)), g(solvers.Unrolled()), rtol=1e-12
        )


@dataclasses.dataclass(frozen=True, kw_only=True)
class FirstOrder(solvers.AbstractMethod):
    """A new method in a few lines: ignore the response of w (the DARTS first-order guess)."""

    differentiates_steps = False

    def solve(self, loop, carry, theta):
        carry, outs = loop.run(carry, jax.lax.stop_gradient(theta), 0, loop.num_steps)
        return jax.lax.stop_gradient(carry), outs

    def hypergradient(self, loop, carry, theta, outer, memory=None):
        carry, outs = self.solve(loop, carry, theta)
        (value, aux), g = jax.value_and_grad(
            lambda th: outer(loop.params(carry), th), has_aux=True
        )(theta)
        zero = jnp.zeros(())
        return solvers.Hypergradient(
            carry, outs, value, aux, g, (), jnp.int32(0), zero, jnp.int32(0), ()
        )


def test_a_new_method_is_one_class_that_every_caller_accepts():
    X, y, Xv, yv = ridge_problem(np.float32)

    def outer_with_penalty(w, h, batch):
        return outer_loss(w, h, batch) + 0.1 * h["lam"] ** 2

    g = bilevel.hypergradient(
        inner_loss,
        outer_with_penalty,
        jnp.zeros(X.shape[1]),
        {"lam": 0.5},
        (X, y),
        (Xv, yv),
        method=FirstOrder(),
    )
    np.testing.assert_allclose(g["lam"], 0.1, rtol=1e-5)  # only the direct term 2 * 0.1 * 0.5
    opt = bilevel.BilevelOptimizer(
        inner_loss,
        outer_with_penalty,
        inner_optimizer=optax.sgd(ETA),
        outer_optimizer=optax.sgd(0.1),
        space={"lam": H.real(0.5)},
        method=FirstOrder(),
        inner_steps=3,
    )
    state, _metrics = opt.step(opt.init(jnp.zeros(X.shape[1])), full_batches(X, y, 3), (Xv, yv))
    np.testing.assert_allclose(opt.hparams(state)["lam"], 0.5 - 0.1 * 0.1, rtol=1e-5)
    w = solvers.argmin(
        lambda w, lam: inner_loss(w, {"lam": lam}, (X, y)),
        jnp.zeros(X.shape[1]),
        0.5,
        optimizer=optax.sgd(ETA),
        steps=5,
        adjoint=FirstOrder(),
    )
    assert w.shape == (X.shape[1],)


def test_callers_do_not_dispatch_on_method_types():
    import inspect

    from bilevel import _bilevel
    from solvers import _argmin

    for module in (_bilevel, _argmin):
        source = inspect.getsource(module)
        for name in ("Implicit", "Unrolled", "Truncated", "Forward"):
            assert f"isinstance(method, solvers.{name}" not in source
            assert f"isinstance(adjoint, {name}" not in source
