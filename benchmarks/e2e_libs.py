"""The ResNet of :mod:`benchmarks.e2e` in Equinox, Flax NNX, Flax Linen, Haiku and Inox.

Each is written with the library's own layers (its convolution, its BatchNorm with
momentum 0.9 and no scale or offset, its dense layer) and state mechanism, and starts
from :func:`benchmarks.e2e.init_params`, copied into its layers. Parameters,
statistics and optimizer state are donated, as in the hand-written step
(``eqx.filter_jit(donate="all")``, ``nnx.jit(donate_argnums=...)``, ``jax.jit``'s
``donate_argnums``), except under ``inox.jit``, which has no such option. Flax (Linen
and NNX) and Haiku compute BatchNorm's variance in one pass; Equinox and Inox in two.
Equinox's BatchNorm (``mode="batch"``) also counts its updates and Haiku's keeps a
zero-debiased average: a little more work per step, and running statistics that differ
from the others' after the first step (the losses do not depend on them).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import optax

from . import e2e
from .e2e import (
    CHANNELS,
    EPS,
    MOMENTUM,
    OPTIMIZER,
    Trainer,
    batches,
    init_params,
    xent,
)

__all__ = ["BUILDERS", "trunk"]


def _kernels() -> list[jax.Array]:
    p = init_params()
    blocks = [
        p[f"block{b}"][c]["kernel"]
        for b in range(e2e.BLOCKS)
        for c in ("conv1", "conv2")
    ]
    return [p["stem"]["kernel"], *blocks]


def _head() -> tuple[jax.Array, jax.Array]:
    head = init_params()["head"]
    return head["w"], head["b"]


def trunk(x: Any, cbn: Callable[[int, Any], Any]) -> Any:
    """The ResNet up to the pooled features; ``cbn(i, h)`` is conv ``i`` + its BN."""
    h = jax.nn.relu(cbn(0, x))
    for b in range(e2e.BLOCKS):  # read at call time: the tests use fewer
        r = jax.nn.relu(cbn(1 + 2 * b, h))
        h = jax.nn.relu(cbn(2 + 2 * b, r) + h)
    return h.mean((1, 2))  # NHWC batches and CHW images alike: the spatial axes


def _split4(_: Any, out: Any) -> tuple[tuple[Any, ...], Any]:
    return out[:3], out[3]


def build_equinox() -> Trainer:
    """``eqx.filter_jit`` (donating) with ``eqx.nn.State``; images vmapped."""
    import equinox as eqx

    kernels, (w, b) = _kernels(), _head()
    key = jax.random.key(0)

    class ResNet(eqx.Module):
        convs: list[eqx.nn.Conv2d]
        bns: list[eqx.nn.BatchNorm]
        head: eqx.nn.Linear

        def __init__(self) -> None:
            self.convs = []
            for k in kernels:
                conv = eqx.nn.Conv2d(
                    k.shape[2], CHANNELS, 3, padding=1, use_bias=False, key=key
                )
                self.convs.append(
                    eqx.tree_at(lambda c: c.weight, conv, k.transpose(3, 2, 0, 1))
                )
            self.bns = [
                eqx.nn.BatchNorm(
                    CHANNELS,
                    "batch",
                    EPS,
                    channelwise_affine=False,
                    momentum=MOMENTUM,
                    mode="batch",
                )
                for _ in kernels
            ]
            head = eqx.nn.Linear(CHANNELS, 10, key=key)
            self.head = eqx.tree_at(lambda h: (h.weight, h.bias), head, (w.T, b))

        def __call__(self, x: Any, state: eqx.nn.State) -> Any:
            box = [state]

            def cbn(i: int, h: Any) -> Any:
                h, box[0] = self.bns[i](self.convs[i](h), box[0])
                return h

            return self.head(trunk(x, cbn)), box[0]

    model, state = eqx.nn.make_with_state(ResNet)()
    opt_state = OPTIMIZER.init(eqx.filter(model, eqx.is_inexact_array))

    @eqx.filter_jit(donate="all")
    def step(model: Any, state: Any, opt_state: Any, x: Any, y: Any) -> Any:
        def loss(model: Any) -> Any:
            batched = jax.vmap(
                model, axis_name="batch", in_axes=(0, None), out_axes=(0, None)
            )
            logits, new = batched(x, state)
            return xent(logits, y), new

        (value, new), grads = eqx.filter_value_and_grad(loss, has_aux=True)(model)
        params = eqx.filter(model, eqx.is_inexact_array)
        updates, opt_state = OPTIMIZER.update(grads, opt_state, params)
        return eqx.apply_updates(model, updates), new, opt_state, value

    return Trainer(step, (model, state, opt_state), _split4, batches(layout="NCHW"))


def _nnx_model() -> Any:
    from flax import nnx

    kernels, (w, b) = _kernels(), _head()

    class ResNet(nnx.Module):
        def __init__(self) -> None:
            rngs = nnx.Rngs(0)
            convs = []
            for k in kernels:
                conv = nnx.Conv(
                    k.shape[2],
                    CHANNELS,
                    (3, 3),
                    use_bias=False,
                    padding="SAME",
                    rngs=rngs,
                )
                conv.kernel = nnx.Param(k)
                convs.append(conv)
            self.convs = nnx.List(convs)
            self.bns = nnx.List(
                [
                    nnx.BatchNorm(
                        CHANNELS,
                        momentum=MOMENTUM,
                        epsilon=EPS,
                        use_scale=False,
                        use_bias=False,
                        rngs=rngs,
                    )
                    for _ in kernels
                ]
            )
            self.head = nnx.Linear(CHANNELS, 10, rngs=rngs)
            self.head.kernel, self.head.bias = nnx.Param(w), nnx.Param(b)

        def __call__(self, x: Any) -> Any:
            return self.head(trunk(x, lambda i, h: self.bns[i](self.convs[i](h))))

    return ResNet()


def build_nnx() -> Trainer:
    """``nnx.jit`` (donating) with ``nnx.Optimizer``; statistics mutated in place."""
    from flax import nnx

    model = _nnx_model()
    optimizer = nnx.Optimizer(model, OPTIMIZER, wrt=nnx.Param)

    @nnx.jit(donate_argnums=(0, 1))
    def step(model: Any, optimizer: Any, x: Any, y: Any) -> Any:
        value, grads = nnx.value_and_grad(lambda m: xent(m(x), y))(model)
        optimizer.update(model, grads)
        return value

    return Trainer(step, (model, optimizer), lambda carry, out: (carry, out), batches())


def build_nnx_split() -> Trainer:
    """NNX the functional way: ``nnx.split``/``nnx.merge`` around ``jax.jit``."""
    from flax import nnx

    graphdef, params, stats = nnx.split(_nnx_model(), nnx.Param, nnx.BatchStat)

    @functools.partial(jax.jit, donate_argnums=(0, 1, 2))
    def step(params: Any, stats: Any, opt_state: Any, x: Any, y: Any) -> Any:
        model = nnx.merge(graphdef, params, stats)
        value, grads = nnx.value_and_grad(lambda m: xent(m(x), y))(model)
        updates, opt_state = OPTIMIZER.update(grads, opt_state, params)
        stats = nnx.state(model, nnx.BatchStat)
        return optax.apply_updates(params, updates), stats, opt_state, value

    carry = (params, stats, OPTIMIZER.init(params))
    return Trainer(step, carry, _split4, batches())


def build_linen() -> Trainer:
    """Flax Linen: ``apply(..., mutable=["batch_stats"])`` under a donating jit."""
    import flax.linen as nn
    import jax.numpy as jnp

    class ResNet(nn.Module):
        @nn.compact
        def __call__(self, x: Any) -> Any:
            def cbn(i: int, h: Any) -> Any:
                h = nn.Conv(
                    CHANNELS, (3, 3), use_bias=False, padding="SAME", name=f"conv{i}"
                )(h)
                bn = nn.BatchNorm(
                    use_running_average=False,
                    momentum=MOMENTUM,
                    epsilon=EPS,
                    use_scale=False,
                    use_bias=False,
                    name=f"bn{i}",
                )
                return bn(h)

            return nn.Dense(10, name="head")(trunk(x, cbn))

    module = ResNet()
    kernels, (w, b) = _kernels(), _head()
    params: dict[str, Any] = {f"conv{i}": {"kernel": k} for i, k in enumerate(kernels)}
    params["head"] = {"kernel": w, "bias": b}
    stats = {
        f"bn{i}": {"mean": jnp.zeros(CHANNELS), "var": jnp.ones(CHANNELS)}
        for i in range(len(kernels))
    }

    @functools.partial(jax.jit, donate_argnums=(0, 1, 2))
    def step(params: Any, stats: Any, opt_state: Any, x: Any, y: Any) -> Any:
        def loss(params: Any) -> Any:
            variables = {"params": params, "batch_stats": stats}
            logits, updated = module.apply(variables, x, mutable=["batch_stats"])
            return xent(logits, y), updated["batch_stats"]

        (value, stats), grads = jax.value_and_grad(loss, has_aux=True)(params)
        updates, opt_state = OPTIMIZER.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), stats, opt_state, value

    return Trainer(step, (params, stats, OPTIMIZER.init(params)), _split4, batches())


def build_haiku() -> Trainer:
    """Haiku: ``hk.transform_with_state`` under ``jax.jit`` (donating)."""
    import haiku as hk

    def forward(x: Any) -> Any:
        def cbn(i: int, h: Any) -> Any:
            h = hk.Conv2D(
                CHANNELS, 3, with_bias=False, padding="SAME", name=f"conv{i}"
            )(h)
            bn = hk.BatchNorm(False, False, MOMENTUM, eps=EPS, name=f"bn{i}")
            return bn(h, is_training=True)

        return hk.Linear(10, name="head")(trunk(x, cbn))

    model = hk.without_apply_rng(hk.transform_with_state(forward))
    _, state = model.init(jax.random.key(0), batches()[0][0])
    kernels, (w, b) = _kernels(), _head()
    params: dict[str, Any] = {f"conv{i}": {"w": k} for i, k in enumerate(kernels)}
    params["head"] = {"w": w, "b": b}

    @functools.partial(jax.jit, donate_argnums=(0, 1, 2))
    def step(params: Any, state: Any, opt_state: Any, x: Any, y: Any) -> Any:
        def loss(params: Any) -> Any:
            logits, state_out = model.apply(params, state, x)
            return xent(logits, y), state_out

        (value, state), grads = jax.value_and_grad(loss, has_aux=True)(params)
        updates, opt_state = OPTIMIZER.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), state, opt_state, value

    return Trainer(step, (params, state, OPTIMIZER.init(params)), _split4, batches())


def _inox_model() -> Any:
    import inox.nn as nn

    kernels, (w, b) = _kernels(), _head()
    key = jax.random.key(0)

    class ResNet(nn.Module):
        def __init__(self) -> None:
            self.convs = []
            for k in kernels:
                conv = nn.Conv(
                    k.shape[2], CHANNELS, [3, 3], bias=False, padding=1, key=key
                )
                conv.kernel = nn.Parameter(k)
                self.convs.append(conv)
            self.bns = [
                nn.BatchNorm(CHANNELS, epsilon=EPS, momentum=MOMENTUM) for _ in kernels
            ]
            self.head = nn.Linear(CHANNELS, 10, key=key)
            self.head.weight, self.head.bias = nn.Parameter(w), nn.Parameter(b)

        def __call__(self, x: Any, state: dict) -> Any:
            box = [state]

            def cbn(i: int, h: Any) -> Any:
                h, box[0] = self.bns[i](self.convs[i](h), box[0])
                return h

            return self.head(trunk(x, cbn)), box[0]

    return nn.export_state(ResNet())


def _inox_step(static: Any) -> Callable[..., Any]:
    def step(
        params: Any, others: Any, state: Any, opt_state: Any, x: Any, y: Any
    ) -> Any:
        def loss(params: Any) -> Any:
            return xent_state(static(params, others)(x, state), y)

        (value, state), grads = jax.value_and_grad(loss, has_aux=True)(params)
        updates, opt_state = OPTIMIZER.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), state, opt_state, value

    return step


def xent_state(out: tuple[Any, Any], y: Any) -> tuple[Any, Any]:
    """The loss of ``(logits, state)`` and the state, for ``has_aux``."""
    return xent(out[0], y), out[1]


def build_inox() -> Trainer:
    """``inox.jit`` over the whole module (its arrays traced, the rest static)."""
    import inox
    import inox.nn as nn

    model, state = _inox_model()
    _, params, _ = model.partition(nn.Parameter)

    @inox.jit
    def step(model: Any, state: Any, opt_state: Any, x: Any, y: Any) -> Any:
        static, params, others = model.partition(nn.Parameter)
        params, state, opt_state, value = _inox_step(static)(
            params, others, state, opt_state, x, y
        )
        return static(params, others), state, opt_state, value

    return Trainer(step, (model, state, OPTIMIZER.init(params)), _split4, batches())


def build_inox_split() -> Trainer:
    """Inox the functional way: ``model.partition`` around ``jax.jit`` (donating)."""
    import inox.nn as nn

    model, state = _inox_model()
    static, params, others = model.partition(nn.Parameter)
    inner = jax.jit(_inox_step(static), donate_argnums=(0, 2, 3))

    def step(params: Any, state: Any, opt_state: Any, x: Any, y: Any) -> Any:
        return inner(params, others, state, opt_state, x, y)

    return Trainer(step, (params, state, OPTIMIZER.init(params)), _split4, batches())


# name -> (module it needs, one-pass variance, builder)
BUILDERS: dict[str, tuple[str, bool, Callable[[], Trainer]]] = {
    "eqx.filter_jit": ("equinox", False, build_equinox),
    "inox.jit": ("inox", False, build_inox),
    "inox partition + jax.jit": ("inox", False, build_inox_split),
    "nnx.jit": ("flax.nnx", True, build_nnx),
    "nnx split/merge + jax.jit": ("flax.nnx", True, build_nnx_split),
    "flax linen + jax.jit": ("flax.linen", True, build_linen),
    "haiku + jax.jit": ("haiku", True, build_haiku),
}
