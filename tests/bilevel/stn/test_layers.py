import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.test_util import check_grads

from bilevel import stn


def _randomize_response(layer, seed=0):
    """Nonzero V and b_r, so the response part matters."""
    k1, k2 = jax.random.split(jax.random.key(seed))
    layer.hnet_kernel[...] = jax.random.normal(k1, layer.hnet_kernel[...].shape)
    if layer.use_bias:
        layer.response_bias[...] = jax.random.normal(k2, layer.response_bias[...].shape)
        layer.bias[...] = jax.random.normal(k2, layer.bias[...].shape) + 1.0
    return layer


@pytest.mark.parametrize("use_bias", [True, False])
@pytest.mark.parametrize("per_example", [True, False])
def test_linear_with_zero_v_equals_nnx_linear(use_bias, per_example):
    layer = stn.StnLinear(5, 3, 2, use_bias=use_bias, rngs=nnx.Rngs(0))
    _randomize_response(layer)
    layer.hnet_kernel[...] = jnp.zeros_like(layer.hnet_kernel[...])
    base = nnx.Linear(5, 3, use_bias=use_bias, rngs=nnx.Rngs(1))
    base.kernel[...] = layer.kernel[...]
    if use_bias:
        base.bias[...] = layer.bias[...]
    x = jax.random.normal(jax.random.key(1), (4, 5))
    hnet = jax.random.normal(jax.random.key(2), (4, 2) if per_example else (2,))
    np.testing.assert_allclose(layer(x, hnet), base(x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"strides": 2, "padding": "VALID"},
        {"kernel_dilation": 2, "use_bias": False},
        {"padding": 1},
    ],
)
def test_conv_with_zero_v_equals_nnx_conv(kw):
    layer = stn.StnConv(2, 4, (3, 3), 3, rngs=nnx.Rngs(0), **kw)
    _randomize_response(layer)
    layer.hnet_kernel[...] = jnp.zeros_like(layer.hnet_kernel[...])
    base = nnx.Conv(2, 4, (3, 3), rngs=nnx.Rngs(1), **kw)
    base.kernel[...] = layer.kernel[...]
    if layer.use_bias:
        base.bias[...] = layer.bias[...]
    x = jax.random.normal(jax.random.key(1), (3, 9, 9, 2))
    for hnet in (jnp.ones((3, 3)), jnp.ones(3)):
        np.testing.assert_allclose(layer(x, hnet), base(x), rtol=1e-5, atol=1e-5)


def test_fresh_layer_equals_base_layer():
    # V starts at zero: a new STN layer computes its base layer's function.
    layer = stn.StnLinear(3, 2, 1, rngs=nnx.Rngs(0))
    x = jnp.ones((2, 3))
    np.testing.assert_allclose(layer(x, jnp.full((2, 1), 7.0)), x @ layer.kernel[...], rtol=1e-6)


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_per_example_hnet_equals_loop(kind):
    if kind == "linear":
        layer = stn.StnLinear(4, 3, 2, rngs=nnx.Rngs(0))
        x = jax.random.normal(jax.random.key(1), (5, 4))
    else:
        layer = stn.StnConv(2, 3, 3, 2, rngs=nnx.Rngs(0))
        x = jax.random.normal(jax.random.key(1), (5, 6, 6, 2))
    _randomize_response(layer)
    hnet = jax.random.normal(jax.random.key(2), (5, 2))
    y = layer(x, hnet)
    loop = jnp.stack([layer(x[i : i + 1], hnet[i])[0] for i in range(5)])
    np.testing.assert_allclose(y, loop, rtol=1e-5, atol=1e-5)
    # Shared hnet equals a per-example hnet with identical rows.
    np.testing.assert_allclose(
        layer(x, hnet[0]), layer(x, jnp.tile(hnet[:1], (5, 1))), rtol=1e-5, atol=1e-5
    )


def test_effective_weights_reproduce_the_layer():
    layer = _randomize_response(stn.StnLinear(4, 3, 2, rngs=nnx.Rngs(0)))
    x = jax.random.normal(jax.random.key(1), (6, 4))
    hnet = jax.random.normal(jax.random.key(2), (6, 2))
    kernel, bias = layer.effective_kernel(hnet), layer.effective_bias(hnet)
    assert kernel.shape == (6, 4, 3) and bias.shape == (6, 3)
    np.testing.assert_allclose(
        jnp.einsum("bi,bio->bo", x, kernel) + bias, layer(x, hnet), rtol=1e-5, atol=1e-5
    )
    np.testing.assert_allclose(layer.effective_l2(hnet), jnp.sum(kernel**2, axis=(1, 2)), rtol=1e-5)
    np.testing.assert_allclose(
        layer.effective_l2(hnet, include_bias=True),
        jnp.sum(kernel**2, axis=(1, 2)) + jnp.sum(bias**2, axis=1),
        rtol=1e-5,
    )
    assert layer.effective_kernel(hnet[0]).shape == (4, 3)
    assert layer.effective_l2(hnet[0]).shape == ()


def test_conv_effective_kernel_and_model_l2():
    class Net(nnx.Module):
        def __init__(self, *, rngs):
            self.conv = stn.StnConv(1, 2, 3, 1, rngs=rngs)
            self.fc = stn.StnLinear(8, 2, 1, rngs=rngs)

    net = Net(rngs=nnx.Rngs(0))
    _randomize_response(net.conv)
    _randomize_response(net.fc, 1)
    hnet = jnp.array([[0.3], [-1.0]])
    k = net.conv.effective_kernel(hnet)
    assert k.shape == (2, 3, 3, 1, 2)
    expected = jnp.sum(k**2, axis=(1, 2, 3, 4)) + jnp.sum(
        net.fc.effective_kernel(hnet) ** 2, axis=(1, 2)
    )
    np.testing.assert_allclose(stn.effective_l2(net, hnet), expected, rtol=1e-5)
    assert [p for p, _ in stn.stn_layers(net)] == [("conv",), ("fc",)]


def test_gradients_wrt_inputs_and_hnet():
    with jax.enable_x64(True):
        layer = stn.StnLinear(3, 2, 2, param_dtype=jnp.float64, rngs=nnx.Rngs(0))
        _randomize_response(layer)
        x = jax.random.normal(jax.random.key(1), (4, 3), jnp.float64)
        hnet = jax.random.normal(jax.random.key(2), (4, 2), jnp.float64)
        check_grads(lambda a, h: layer(a, h), (x, hnet), order=1, modes=("fwd", "rev"))


def test_parameter_kinds_and_filters():
    layer = stn.StnLinear(3, 2, 1, rngs=nnx.Rngs(0))
    response = nnx.state(layer, stn.ResponseParam)
    general = nnx.state(layer, nnx.All(nnx.Param, nnx.Not(stn.ResponseParam)))
    assert set(response.keys()) == {"response_kernel", "response_bias", "hnet_kernel"}
    assert set(general.keys()) == {"kernel", "bias"}
    assert issubclass(stn.ResponseParam, nnx.Param)
    # nnx.Optimizer(wrt=nnx.Param) trains the response weights too.
    opt = nnx.Optimizer(layer, optax.sgd(0.1), wrt=nnx.Param)
    x, h = jnp.ones((2, 3)), jnp.ones((2, 1))
    before = jax.tree.map(jnp.copy, nnx.state(layer, stn.ResponseParam))
    grads = nnx.grad(lambda m: jnp.sum(m(x, h) ** 2))(layer)
    opt.update(layer, grads)
    after = nnx.state(layer, stn.ResponseParam)
    assert not np.allclose(before["hnet_kernel"][...], after["hnet_kernel"][...])


def test_bad_input_errors():
    with pytest.raises(ValueError, match="num_hparams"):
        stn.StnLinear(3, 2, 0, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="in_features"):
        stn.StnLinear(0, 2, 1, rngs=nnx.Rngs(0))
    with pytest.raises(TypeError):
        stn.StnLinear(3, 2, 1, nnx.Rngs(0))  # rngs is keyword-only
    with pytest.raises(ValueError, match="strides"):
        stn.StnConv(1, 2, 3, 1, strides=(1, 1, 1), rngs=nnx.Rngs(0))
    layer = stn.StnLinear(3, 2, 2, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="hnet must have shape"):
        layer(jnp.ones((4, 3)), jnp.ones((4, 3)))
    with pytest.raises(ValueError, match="hnet must have shape"):
        layer(jnp.ones((4, 3)), jnp.ones((4, 2, 1)))
    with pytest.raises(ValueError, match="batch size"):
        layer(jnp.ones((4, 3)), jnp.ones((5, 2)))
    with pytest.raises(ValueError, match="input must have shape"):
        layer(jnp.ones((4, 5)), jnp.ones(2))
    conv = stn.StnConv(1, 2, 3, 1, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="input must have shape"):
        conv(jnp.ones((4, 8, 8)), jnp.ones(1))


def test_mip_encoding_has_constant_norm():
    x = jnp.array([[0.0, 0.3, 0.9], [1.0, 0.5, 0.2]])
    e = stn.mip_encoding(x)
    assert e.shape == (2, 6)
    norms = e[:, :3] ** 2 + e[:, 3:] ** 2
    np.testing.assert_allclose(norms, 1.0, rtol=1e-6)
    np.testing.assert_allclose(e[0, 0], 1.0)
    np.testing.assert_allclose(e[1, 3], 1.0)
