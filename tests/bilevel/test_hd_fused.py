"""hd_adam / heavy-ball hd_sgd without a stored direction, and the one-step-lagged rule."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bilevel
import solvers
from tests.bilevel.test_hd import CASES, make_tx, np_hd, run_jax

# ----------------------------------------------------------------------------- state size


def _param_sized(state, params):
    """Leaves of ``state`` shaped like a parameter leaf: (count, bytes per parameter)."""
    shapes = {tuple(p.shape) for p in jax.tree.leaves(params)}
    n = sum(p.size for p in jax.tree.leaves(params))
    leaves = [x for x in jax.tree.leaves(state) if tuple(np.shape(x)) in shapes and x.ndim > 0]
    return len(leaves) / len(jax.tree.leaves(params)), sum(x.nbytes for x in leaves) / n


@pytest.mark.parametrize(
    ("tx", "base", "arrays"),
    [
        (lambda: bilevel.hd_adam(1e-3), lambda: optax.adam(1e-3), 2),
        (lambda: bilevel.hd_adam(1e-3, lagged=True), lambda: optax.adam(1e-3), 2),
        (lambda: bilevel.hd_adam(1e-3, 1e-7), lambda: optax.adam(1e-3), 2),
        (lambda: bilevel.hd_sgd(1e-2, momentum=0.9), lambda: optax.sgd(1e-2, 0.9), 1),
        # plain SGD and Nesterov need g_{t-1}: one stored array more than the base
        (lambda: bilevel.hd_sgd(1e-2), lambda: optax.sgd(1e-2), 1),
        (
            lambda: bilevel.hd_sgd(1e-2, momentum=0.9, nesterov=True),
            lambda: optax.sgd(1e-2, 0.9, nesterov=True),
            2,
        ),
        (lambda: bilevel.hd_adam(1e-3, nesterov=True), lambda: optax.nadam(1e-3), 3),
    ],
    ids=["adam", "adam_lagged", "adam_additive", "momentum", "sgd", "nesterov", "nadam"],
)
def test_state_arrays_per_parameter(tx, base, arrays):
    params = {"w": jnp.ones((5, 3)), "b": jnp.ones(3)}
    arrays_hd, bytes_hd = _param_sized(tx().init(params), params)
    arrays_base, _ = _param_sized(base().init(params), params)
    assert arrays_hd == arrays
    assert bytes_hd == 4 * arrays
    if tx().init(params).prev_direction is None:
        assert arrays_hd == arrays_base  # Adam's two moments, SGD's one trace: nothing more


# ----------------------------------------------------------------------------- equivalences


def _mlp_problem(dtype):
    rng = np.random.RandomState(0)
    x = jnp.asarray(rng.randn(128, 20), dtype)
    y = jnp.asarray(rng.randint(0, 5, 128))
    k1, k2 = jax.random.split(jax.random.key(1))
    params = {
        "l1": {"w": jax.random.normal(k1, (20, 32), dtype) * 0.3, "b": jnp.zeros(32, dtype)},
        "l2": {"w": jax.random.normal(k2, (32, 5), dtype) * 0.3, "b": jnp.zeros(5, dtype)},
    }

    def loss(p):
        h = jax.nn.relu(x @ p["l1"]["w"] + p["l1"]["b"])
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(h @ p["l2"]["w"], y))

    return params, loss


def _run_mlp(tx, steps=50, dtype=jnp.float32):
    params, loss = _mlp_problem(dtype)

    def step(carry, _):
        p, s = carry
        updates, s = tx.update(jax.grad(loss)(p), s, p)
        return (optax.apply_updates(p, updates), s), jax.tree.leaves(s.learning_rate)

    (p, s), lrs = jax.jit(lambda c: jax.lax.scan(step, c, length=steps))((params, tx.init(params)))
    return p, s, np.stack([np.asarray(a) for a in lrs], -1)


@pytest.mark.parametrize("per_leaf", [False, True], ids=["global", "per_leaf"])
@pytest.mark.parametrize(
    ("specific", "generic"),
    [
        (
            lambda **kw: bilevel.hd_adam(1e-3, **kw),
            lambda **kw: bilevel.hypergradient_lr(
                optax.scale_by_adam(), 1e-3, bilevel.DEFAULT_HYPER_LR, True, **kw
            ),
        ),
        (
            lambda **kw: bilevel.hd_adam(3e-3, 1e-4, b1=0.8, eps=1e-6, eps_root=1e-10, **kw),
            lambda **kw: bilevel.hypergradient_lr(
                optax.scale_by_adam(b1=0.8, eps=1e-6, eps_root=1e-10), 3e-3, 1e-4, **kw
            ),
        ),
        (
            lambda **kw: bilevel.hd_sgd(1e-2, momentum=0.9, **kw),
            lambda **kw: bilevel.hypergradient_lr(
                optax.trace(0.9), 1e-2, bilevel.DEFAULT_HYPER_LR, True, **kw
            ),
        ),
    ],
    ids=["adam_default", "adam_additive_eps_root", "momentum_default"],
)
def test_recomputed_direction_matches_stored_direction_float32(specific, generic, per_leaf):
    """50 float32 steps of a 2-layer MLP: the specialized transforms (no stored d_{t-1})
    against the generic wrapper that stores it, to float32 round-off."""
    p_s, s_s, lr_s = _run_mlp(specific(per_leaf=per_leaf))
    p_g, s_g, lr_g = _run_mlp(generic(per_leaf=per_leaf))
    assert s_s.prev_direction is None and s_g.prev_direction is not None
    assert np.max(np.abs(lr_g[-1] / lr_g[0] - 1)) > 0.05  # the rate moved
    np.testing.assert_allclose(lr_s, lr_g, rtol=2e-5)
    for a, b in zip(jax.tree.leaves(p_s), jax.tree.leaves(p_g), strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6)
    for a, b in zip(
        jax.tree.leaves(s_s.inner_state), jax.tree.leaves(s_g.inner_state), strict=True
    ):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6)


def test_recomputed_direction_under_inject_hyperparams_and_traced_b1():
    """b1, b2, eps traced (inject_hyperparams): the recomputation uses the same values."""
    with jax.enable_x64(True):
        direct = bilevel.hd_adam(0.01, b1=0.8, b2=0.95)
        injected = optax.inject_hyperparams(bilevel.hd_adam)(learning_rate=0.01, b1=0.8, b2=0.95)
        lr_d, traj_d, _ = run_jax(direct, steps=60)
        lr_i, traj_i, _ = run_jax(injected, steps=60, read=lambda st: st.inner_state)
    np.testing.assert_allclose(lr_i, lr_d, rtol=1e-12)
    np.testing.assert_allclose(traj_i, traj_d, rtol=1e-12, atol=1e-15)


def test_mu_dtype_reads_the_rounded_moment():
    """mu_dtype=bfloat16: d_{t-1} from the stored (rounded) moment; dtypes stay put."""
    tx = bilevel.hd_adam(1e-3, mu_dtype=jnp.bfloat16)
    _p, s, lr = _run_mlp(tx)
    assert all(m.dtype == jnp.bfloat16 for m in jax.tree.leaves(s.inner_state.mu))
    assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(s.inner_state.nu))
    _, _, lr_ref = _run_mlp(bilevel.hd_adam(1e-3))
    np.testing.assert_allclose(lr, lr_ref, rtol=2e-2)  # bfloat16 round-off of m only
    assert int(s.skipped) == 0


def test_gradient_through_the_first_steps_is_finite():
    """d_0 = 0 without a 0/0 inside (jnp.where would leak NaN into jax.grad otherwise)."""
    params, loss = _mlp_problem(jnp.float32)

    def unrolled(scale):
        tx = bilevel.hd_adam(1e-2, eps_root=1e-12)
        p, s = params, tx.init(params)
        for _ in range(3):
            updates, s = tx.update(jax.grad(loss)(p), s, p)
            p = jax.tree.map(lambda a, u: a + scale * u, p, updates)
        return loss(p)

    g = jax.jit(jax.grad(unrolled))(1.0)
    assert np.isfinite(float(g)) and float(g) != 0


# ----------------------------------------------------------------------------- lagged rule


@pytest.mark.parametrize("per_leaf", [False, True], ids=["global", "per_leaf"])
@pytest.mark.parametrize("multiplicative", [False, True], ids=["additive", "multiplicative"])
@pytest.mark.parametrize("method", ["adam", "momentum"])
def test_lagged_trajectory_matches_numpy(method, multiplicative, per_leaf):
    lr0, beta = CASES[(method, multiplicative)]
    ref_lr, ref_params = np_hd(
        method, lr0, beta, multiplicative=multiplicative, per_leaf=per_leaf, lagged=True
    )
    exact_lr, _ = np_hd(method, lr0, beta, multiplicative=multiplicative, per_leaf=per_leaf)
    assert np.max(np.abs(ref_lr / lr0 - 1)) > 0.1  # the rate moves
    assert np.max(np.abs(ref_lr - exact_lr)) > 1e-3 * lr0  # and differs from the exact rule
    # the lag: the lagged rate of step t+1 is the exact rule's update applied to the lagged
    # rate of step t with the signal of step t.
    with jax.enable_x64(True):
        tx = make_tx(
            method, lr0, beta, multiplicative=multiplicative, per_leaf=per_leaf, lagged=True
        )
        lrs, traj, state = run_jax(tx)
    assert state.pending is not None and state.prev_direction is None
    np.testing.assert_allclose(lrs, ref_lr, rtol=1e-7, atol=1e-10)
    np.testing.assert_allclose(traj, ref_params, rtol=1e-7, atol=1e-10)


def test_lagged_validation_gradient_mode_matches_numpy():
    lr0, beta = CASES[("adam", False)]
    ref_lr, ref_params = np_hd("adam", lr0, beta, validation=True, lagged=True)
    with jax.enable_x64(True):
        lrs, traj, _ = run_jax(make_tx("adam", lr0, beta, lagged=True), validation=True)
    np.testing.assert_allclose(lrs, ref_lr, rtol=1e-7, atol=1e-10)
    np.testing.assert_allclose(traj, ref_params, rtol=1e-7, atol=1e-10)


def test_lagged_follows_a_schedule_like_the_exact_rule():
    schedule = optax.linear_schedule(0.05, 0.01, 40)
    with jax.enable_x64(True):
        _, traj, state = run_jax(bilevel.hd_adam(schedule, 0.0, lagged=True), steps=40)
        _, traj_base, _ = run_jax(optax.adam(schedule), steps=40)
    np.testing.assert_allclose(traj, traj_base, rtol=1e-10, atol=1e-14)
    assert float(state.learning_rate) == pytest.approx(float(schedule(39)), rel=1e-6)


def _bad_step(tx, grads_bad):
    params = {"a": jnp.array([0.5, 2.0, -1.0]), "b": jnp.array([-1.0])}
    grads = lambda p: jax.tree.map(lambda x: 2 * (x - 1.0), p)
    state = tx.init(params)
    update = jax.jit(tx.update)
    for _ in range(3):
        updates, state = update(grads(params), state, params)
        params = optax.apply_updates(params, updates)
    before = state
    bad = grads_bad(grads(params))
    updates, after = update(bad, state, params)
    return before, after, updates, bad


def test_lagged_all_nan_step_is_the_exact_rules_skip():
    for lagged in (False, True):
        before, after, updates, _ = _bad_step(
            bilevel.hd_adam(0.1, lagged=lagged),
            lambda g: jax.tree.map(lambda x: jnp.full_like(x, jnp.nan), g),
        )
        jax.tree.map(lambda u: np.testing.assert_array_equal(u, 0), updates)
        strip = lambda st: st._replace(count=0, skipped=0)
        jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), strip(after), strip(before))
        assert int(after.skipped) == 1


def test_lagged_partial_nan_skips_those_entries_only():
    """Per-entry test in the single pass: finite entries step, the bad one keeps its moments;
    the rate, pending signal and Adam's count are kept and the step is counted as skipped."""
    before, after, updates, _bad = _bad_step(
        bilevel.hd_adam(0.1, lagged=True), lambda g: {**g, "a": g["a"].at[1].set(jnp.inf)}
    )
    assert float(updates["a"][1]) == 0 and np.all(np.asarray(updates["a"])[[0, 2]] != 0)
    assert float(updates["b"][0]) != 0
    mu, mu0 = after.inner_state.mu, before.inner_state.mu
    assert float(mu["a"][1]) == float(mu0["a"][1])
    assert float(mu["a"][0]) != float(mu0["a"][0])
    assert float(after.learning_rate) == float(before.learning_rate)
    assert float(after.pending) == float(before.pending)
    assert int(after.inner_state.count) == int(before.inner_state.count)
    assert int(after.skipped) == 1
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(after))


def test_lagged_goes_through_solvers_guard(monkeypatch):
    calls = []
    original = solvers.guard

    def spy(old, new, skipped, **kw):
        calls.append(kw)
        return original(old, new, skipped, **kw)

    monkeypatch.setattr(solvers, "guard", spy)
    tx = bilevel.hd_adam(1e-2, lagged=True)
    params = jnp.ones(3)
    tx.update(params, tx.init(params), params)
    assert len(calls) == 1 and calls[0].get("finite") is not None


@pytest.mark.parametrize(
    "factory",
    [
        lambda: bilevel.hd_adam(1e-3, nesterov=True, lagged=True),
        lambda: bilevel.hd_sgd(1e-3, lagged=True),
        lambda: bilevel.hd_sgd(1e-3, momentum=0.9, nesterov=True, lagged=True),
    ],
    ids=["nadam", "sgd", "nesterov"],
)
def test_lagged_needs_a_recomputable_direction(factory):
    with pytest.raises(ValueError, match="lagged"):
        factory()


def test_lagged_converges_like_the_contract_problems():
    final = jnp.array([1.0, -1.0, 1.0])
    objective = lambda p: jnp.sum((p - final) ** 2)
    for tx in (bilevel.hd_adam(1e-2, lagged=True), bilevel.hd_sgd(1e-3, momentum=0.9, lagged=True)):
        params, state = jnp.array([-1.0, 10.0, 1.0]), None
        state = tx.init(params)

        def step(carry, _, tx=tx):
            p, s = carry
            updates, s = tx.update(jax.grad(objective)(p), s, p)
            return (optax.apply_updates(p, updates), s), None

        (params, state), _ = jax.jit(lambda c, step=step: jax.lax.scan(step, c, length=3000))(
            (params, state)
        )
        np.testing.assert_allclose(params, final, atol=3e-2)
        assert int(state.skipped) == 0


@pytest.mark.parametrize(
    "factory",
    [
        lambda: bilevel.hd_adam(1e-3),
        lambda: bilevel.hd_adam(1e-3, lagged=True),
        lambda: bilevel.hd_sgd(1e-3, momentum=0.9),
    ],
    ids=["adam", "adam_lagged", "momentum"],
)
def test_donated_step_updates_the_state_in_place(factory):
    # The reductions read the old moments and the update overwrites them: XLA must order the
    # two instead of copying the old moments (a copy per moment and step was what made the
    # lagged rule 2.5x Adam on a 10M-parameter MLP). No parameter-sized state buffer is copied.
    # (Heavy ball's lagged rule still copies its trace: its per-entry check is the new trace
    # itself, recomputed from the old one in the parameters' pass.)
    tx = factory()
    params = {"w": jnp.ones((64, 32)), "b": jnp.ones(32)}
    state = tx.init(params)

    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    text = jax.jit(step, donate_argnums=(0, 1)).lower(params, state, params).compile().as_text()
    entry = text[text.index("ENTRY") :]
    copies = [line for line in entry.splitlines() if " copy(%state" in line or " copy(%s" in line]
    state_copies = [line for line in copies if "f32[64,32]" in line or "f32[32]" in line]
    assert state_copies == []
