import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bilevel import hparams as H

SPECS = {
    "log": H.log(1e-3),
    "log_both": H.log(0.5, 1e-2, 10.0),
    "log_lower": H.log(2.0, 1.0),
    "log_upper": H.log(2.0, None, 5.0),
    "unit": H.unit(jnp.full(3, 0.1)),
    "unit_scaled": H.unit(0.3, 0.2, 0.9),
    "bounded": H.bounded(3.0, 1.0, 4.0),
    "bounded_lower": H.bounded(3.0, 1.0, None),
    "bounded_upper": H.bounded(3.0, None, 4.0),
    "real": H.real(jnp.array([-2.0, 5.0])),
}


def test_init_then_constrain_round_trips_initial_values():
    u = H.init(SPECS)
    values = H.constrain(SPECS, u)
    for name, spec in SPECS.items():
        np.testing.assert_allclose(values[name], spec.value, rtol=1e-5, err_msg=name)
        assert values[name].shape == spec.shape


@pytest.mark.parametrize("name", sorted(SPECS))
def test_values_respect_bounds_for_any_unconstrained_value(name):
    spec = SPECS[name]
    u = jnp.linspace(-30.0, 30.0, 101).reshape((101,) + (1,) * len(spec.shape))
    v = jax.vmap(spec.constrain)(jnp.broadcast_to(u, (101, *spec.shape)))
    assert bool(jnp.all(jnp.isfinite(v)))
    if spec.lower is not None:
        assert bool(jnp.all(v >= spec.lower))
    if spec.upper is not None:
        assert bool(jnp.all(v <= spec.upper))
    if spec.kind == "log":
        assert bool(jnp.all(v > 0))
    # Monotone increasing in u.
    assert bool(jnp.all(jnp.diff(v, axis=0) >= 0))


@pytest.mark.parametrize("name", sorted(SPECS))
def test_unconstrain_inverts_constrain(name):
    with jax.enable_x64(True):
        spec = SPECS[name]
        u = jnp.full(spec.shape, 0.37, jnp.float64)
        np.testing.assert_allclose(spec.unconstrain(spec.constrain(u)), u, rtol=1e-9, atol=1e-12)


def test_space_is_any_pytree_and_vmap_over_populations():
    space = {"layers": [H.log(1e-3), H.log(1e-2)], "dropout": H.unit(0.1)}
    u = H.init(space)
    pop = jax.tree.map(lambda x: jnp.stack([x, x + 1.0]), u)
    values = jax.vmap(lambda u: H.constrain(space, u))(pop)
    assert values["layers"][0].shape == (2,)
    np.testing.assert_allclose(values["layers"][0][1], 1e-3 * np.e, rtol=1e-5)
    back = H.unconstrain(space, {"layers": [1e-3, 1e-2], "dropout": 0.1})
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5), back, u)


def test_constrain_is_differentiable_and_jittable():
    g = jax.jit(jax.grad(lambda u: H.constrain({"w": H.log(1.0)}, {"w": u})["w"]))(0.0)
    np.testing.assert_allclose(g, 1.0, rtol=1e-6)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: H.log(-1.0), "> 0"),
        (lambda: H.log(0.5, lower=-1.0), "> 0"),
        (lambda: H.unit(1.5), "below upper"),
        (lambda: H.unit(0.0), "above lower"),
        (lambda: H.bounded(1.0, 2.0, 1.0), "lower must be < upper"),
        (lambda: H.log(float("nan")), "finite"),
        (lambda: H.real(jnp.array([1.0, jnp.inf])), "finite"),
        (lambda: H.bounded(1.0, 0.0, float("inf")), "finite or None"),
        (lambda: H.log(jnp.array([1e-3, -1e-3])), "> 0"),
    ],
)
def test_invalid_specs_raise(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_space_errors_name_the_entry():
    with pytest.raises(TypeError, match=r"hparams\['wd'\]"):
        H.init({"wd": 0.1})
    space = {"wd": H.log(jnp.full(3, 1e-3))}
    with pytest.raises(ValueError, match=r"hparams\['wd'\] has shape"):
        H.constrain(space, {"wd": jnp.zeros(2)})
    with pytest.raises(ValueError, match="does not match the space"):
        H.constrain(space, {"decay": jnp.zeros(3)})
    with pytest.raises(ValueError, match="empty"):
        H.init({})


def test_init_works_inside_jit():
    space = {"wd": H.log(1e-3), "p": H.unit(jnp.full(2, 0.3))}
    inside = jax.jit(lambda: H.init(space))()
    outside = H.init(space)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), inside, outside)


def test_spec_with_a_non_numeric_init_or_bound_is_a_clear_type_error():
    with pytest.raises(TypeError, match=r"init must be a real number.*'abc'"):
        H.log("abc")
    with pytest.raises(TypeError, match="lower must be a real number or None"):
        H.log(0.1, "x")


# ----------------------------------------------------------------------------- discrete specs


def test_choice_and_integer_hold_their_options_and_initial_value():
    width = H.choice([16, 32, 64], init=32)
    assert width.kind == "choice" and width.num_options == 3 and width.shape == ()
    assert width.dtype == np.int32 and int(width.value) == 32
    rate = H.choice([0.1, 0.5])
    assert rate.dtype == np.float32 and float(rate.value) == pytest.approx(0.1)
    depth = H.integer(2, 6)
    assert depth.num_options == 5 and int(depth.value) == 2 and depth.dtype == np.int32
    assert int(H.integer(-3, 3, init=-1).value) == -1
    assert repr(width) == "choice([16, 32, 64], init=32)"
    assert repr(depth) == "integer(2, 6, init=2)"


def test_discrete_index_and_decode_round_trip():
    for spec, values in ((H.choice([16, 32, 64]), [64, 16, 32]), (H.integer(-2, 5), [-2, 0, 5])):
        idx = spec.index(np.asarray(values))
        np.testing.assert_array_equal(jax.jit(spec.decode)(jnp.asarray(idx)), values)
    with pytest.raises(ValueError, match="not one of the choices"):
        H.choice([1, 2]).index(3)
    with pytest.raises(ValueError, match="not an integer in the range"):
        H.integer(0, 3).index(4)
    with pytest.raises(ValueError, match="not an integer in the range"):
        H.integer(0, 3).index(1.5)


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda: H.choice([]), ValueError, "non-empty 1-D"),
        (lambda: H.choice([[1, 2]]), ValueError, "non-empty 1-D"),
        (lambda: H.choice([1, 1, 2]), ValueError, "distinct"),
        (lambda: H.choice([1.0, float("nan")]), ValueError, "finite"),
        (lambda: H.choice(["adam", "sgd"]), TypeError, r"real numbers.*jax.lax.switch"),
        (lambda: H.choice([1, 2], init=3), ValueError, "not one of the choices"),
        (lambda: H.integer(3, 1), ValueError, "lower=3 must be <= upper=1"),
        (lambda: H.integer(0.5, 2), TypeError, "lower must be a Python or NumPy int"),
        (lambda: H.integer(True, 2), TypeError, "lower must be a Python or NumPy int"),
        (lambda: H.integer(0, 2, init=5), ValueError, "not an integer in the range"),
        (lambda: H.integer(0, 2**40), ValueError, "does not fit int32"),
    ],
)
def test_invalid_discrete_specs_raise(make, error, match):
    with pytest.raises(error, match=match):
        make()


@pytest.mark.parametrize("fn", [H.init, lambda s: H.constrain(s, {"wd": 0.0, "k": 0})])
def test_gradient_functions_refuse_discrete_specs_naming_them(fn):
    space = {"wd": H.log(0.1), "k": H.integer(1, 4)}
    with pytest.raises(
        ValueError, match=r"hparams\['k'\] is a discrete hyperparameter.*bilevel.pbt"
    ):
        fn(space)
