"""The misuse catalogue: every way to hold lift wrong, and what lift must say.

Each row performs one misuse and names the exception type(s) lift must raise and the
substrings its message must contain: the key path when a key is involved, and the fix
(the function, transform or option to use instead). Every error is a
:class:`lift.LiftError` and also the builtin its kind calls for: ``TypeError`` for the
wrong kind of object, ``ValueError`` for the wrong structure, ``KeyError`` for a
missing key, ``RuntimeError`` for state used where no frame allows it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import pytest
from jax import lax

import lift

MEAN = "['bn']['mean']"
VAR = "['bn']['var']"
COUNT = "['n']"


def model() -> tuple[dict, dict]:
    """A fresh exported tree: a BatchNorm-like pair of vectors and an int counter."""
    return lift.export_state(
        {
            "bn": {
                "mean": lift.StateEntry(jnp.zeros(3, jnp.float32)),
                "var": lift.StateEntry(jnp.ones(3, jnp.float32)),
            },
            "n": lift.StateEntry(jnp.zeros((), jnp.int32)),
        }
    )


def in_frame(body: Callable[[dict], Any], *args: Any, mutable: bool = True) -> Any:
    """Run ``body(tree, *args)`` inside ``lift.stateful`` over the model's state."""
    tree, state = model()
    return lift.stateful(lambda *a: body(tree, *a), mutable=mutable)(state, *args)


@dataclass(frozen=True)
class Misuse:
    id: str
    perform: Callable[[], Any]
    raises: tuple[type[BaseException], ...]
    says: tuple[str, ...]


CATALOGUE: list[Misuse] = []


def misuse(
    id: str, raises: type | tuple[type, ...], *says: str
) -> Callable[[Callable[[], Any]], Callable[[], Any]]:
    """Register the decorated function as a misuse in the catalogue."""

    def register(perform: Callable[[], Any]) -> Callable[[], Any]:
        kinds = raises if isinstance(raises, tuple) else (raises,)
        CATALOGUE.append(Misuse(id, perform, kinds, says))
        return perform

    return register


# ------------------------------------------------------------------------- trees


@misuse("import-missing-keys", KeyError, MEAN, VAR, COUNT, "export_state")
def _():
    tree, _ = model()
    lift.import_state(tree, {})


@misuse("import-missing-some-keys", KeyError, VAR, "merge_states")
def _():
    tree, state = model()
    lift.import_state(tree, {k: v for k, v in state.items() if k != tree["bn"]["var"]})


@misuse("import-unused-keys-strict", KeyError, "['extra']", "strict=False")
def _():
    tree, state = model()
    _, extra = lift.export_state({"extra": lift.StateEntry(jnp.zeros(1))})
    lift.import_state(tree, lift.merge_states(state, extra))


@misuse("import-state-not-a-dict", TypeError, "export_state")
def _():
    tree, _ = model()
    lift.import_state(tree, None)


@misuse("merge-collision", ValueError, MEAN, "prefix=")
def _():
    _, state = model()
    _, again = model()
    lift.merge_states(state, again)


@misuse("merge-not-a-dict", TypeError, "export_state")
def _():
    _, state = model()
    lift.merge_states(state, [1, 2])


@misuse("export-collides-with-existing-key", ValueError, "['b']", "prefix=")
def _():
    lift.export_state({"a": lift.StateKey("['b']"), "b": lift.StateEntry(jnp.zeros(1))})


@misuse("export-bad-prefix-type", TypeError, "prefix=")
def _():
    lift.export_state({"a": lift.StateEntry(jnp.zeros(1))}, prefix=3)


@misuse("state-entry-nesting", TypeError, "StateEntry(jnp.zeros(3))")
def _():
    lift.StateEntry(lift.StateEntry(jnp.zeros(3)))


@misuse(
    "update-unknown-key-closest-path", KeyError, "['bn']['maen']", MEAN, "merge_states"
)
def _():
    _, state = model()
    lift.update_state(state, {lift.StateKey("['bn']['maen']"): jnp.zeros(3)})


@misuse("update-shape-change", ValueError, MEAN, "reshape")
def _():
    tree, state = model()
    lift.update_state(state, {tree["bn"]["mean"]: jnp.zeros(4)})


@misuse("update-dtype-change", ValueError, MEAN, ".astype(float32)")
def _():
    tree, state = model()
    lift.update_state(state, {tree["bn"]["mean"]: jnp.zeros(3, jnp.int32)})


@misuse("update-structure-change", ValueError, MEAN, "structure")
def _():
    tree, state = model()
    lift.update_state(state, {tree["bn"]["mean"]: (jnp.zeros(3), jnp.zeros(3))})


@misuse("update-mutation-not-a-dict", TypeError, "update_state", "dict")
def _():
    _, state = model()
    lift.update_state(state, [jnp.zeros(3)])


@misuse("filter-bad-type", TypeError, "glob", "predicate")
def _():
    _, state = model()
    lift.filter_state(state, 3)


@misuse("partition-bad-type", TypeError, "glob", "predicate")
def _():
    _, state = model()
    lift.partition_state(state, 1.5)


# ------------------------------------------------------------------------ frames


@misuse("get-outside-frame", lift.FrameError, MEAN, "lift.stateful")
def _():
    tree, _ = model()
    lift.get(tree["bn"]["mean"])


@misuse("set-outside-frame", lift.FrameError, MEAN, "lift.stateful")
def _():
    tree, _ = model()
    lift.set(tree["bn"]["mean"], jnp.ones(3))


@misuse("lower-outside-frame", lift.FrameError, "lift.stateful")
def _():
    lift.lower(lambda state: (None, state))()


@misuse("set-immutable-frame", lift.FrameError, MEAN, "mutable=True")
def _():
    in_frame(lambda t: lift.set(t["bn"]["mean"], jnp.ones(3)), mutable=False)


@misuse("set-wrong-shape", ValueError, MEAN, "reshape")
def _():
    in_frame(lambda t: lift.set(t["bn"]["mean"], jnp.ones((2, 3))))


@misuse("set-wrong-dtype", ValueError, COUNT, ".astype(int32)")
def _():
    in_frame(lambda t: lift.set(t["n"], jnp.ones((), jnp.float32)))


@misuse("set-wrong-structure", ValueError, VAR, "structure")
def _():
    in_frame(lambda t: lift.set(t["bn"]["var"], {"v": jnp.ones(3)}))


@misuse("get-unknown-key-closest-path", KeyError, "['bn']['men']", MEAN, "export_state")
def _():
    in_frame(lambda t: lift.get(lift.StateKey("['bn']['men']")))


@misuse("set-unknown-key-closest-path", KeyError, "['bn']['vars']", VAR)
def _():
    in_frame(lambda t: lift.set(lift.StateKey("['bn']['vars']"), jnp.ones(3)))


@misuse("get-with-state-entry", TypeError, "StateEntry", "export_state")
def _():
    entry = lift.StateEntry(jnp.zeros(3))
    in_frame(lambda t: lift.get(entry))


@misuse("get-with-non-key", TypeError, "StateKey", "export_state")
def _():
    in_frame(lambda t: lift.get(3))


@misuse("stateful-without-state-dict", TypeError, "export_state")
def _():
    lift.stateful(lambda x: x)(jnp.ones(3))


@misuse("stateful-not-callable", TypeError, "callable")
def _():
    lift.stateful(3)


@misuse("lower-returns-non-pair", ValueError, "(out, state)")
def _():
    in_frame(lambda t: lift.lower(lambda state, x: x)(1.0))


@misuse("lower-adds-key", KeyError, "['new']", "merge_states")
def _():
    def g(state):
        return None, {**state, lift.StateKey("['new']"): jnp.zeros(1)}

    in_frame(lambda t: lift.lower(g)())


@misuse("lower-changes-shape", ValueError, MEAN, "reshape")
def _():
    def g(state):
        return None, {**state, next(k for k in state if k == MEAN): jnp.zeros(5)}

    in_frame(lambda t: lift.lower(g)())


# -------------------------------------------------------------------- transforms


@misuse(
    "vmap-batched-write-to-shared-state",
    ValueError,
    MEAN,
    "axis_name=",
    "lax.pmean",
    "state_axes",
)
def _():
    def body(t, xs):
        lift.vmap(lambda x: lift.set(t["bn"]["mean"], x))(xs)

    in_frame(body, jnp.ones((2, 3)))


@misuse("vmap-state-axes-on-scalar-state", ValueError, COUNT, "state_axes")
def _():
    def body(t, xs):
        return lift.vmap(lambda x: x, state_axes=0)(xs)

    in_frame(body, jnp.ones((3, 3)))


@misuse("vmap-in-axes-length-mismatch", ValueError, "in_axes")
def _():
    in_frame(
        lambda t, x: lift.vmap(lambda a, b: a + b, in_axes=(0,))(x, x), jnp.ones((2, 3))
    )


@misuse("vmap-bad-state-axes-type", TypeError, "state_axes")
def _():
    in_frame(lambda t, x: lift.vmap(lambda a: a, state_axes=[0])(x), jnp.ones((2, 3)))


@misuse("vmap-bad-state-axes-filter", TypeError, "glob", "predicate")
def _():
    in_frame(
        lambda t, x: lift.vmap(lambda a: a, state_axes={3: 0})(x), jnp.ones((2, 3))
    )


@misuse("scan-bad-state-axes-type", TypeError, "state_axes", "lift.scan")
def _():
    in_frame(lambda t: lift.scan(lambda c, x: (c, x), 0.0, jnp.ones(3), state_axes=0))


@misuse("scan-state-axes-on-scalar-state", ValueError, COUNT, "state_axes")
def _():
    in_frame(
        lambda t: lift.scan(
            lambda c, x: (c, x), 0.0, jnp.ones(3), state_axes={t["n"]: 0}
        )
    )


@misuse("grad-wrt-state-dict", TypeError, "state", "lift.stateful")
def _():
    _, state = model()
    lift.grad(lambda s: sum(jnp.sum(v) for v in s.values()))(state)


@misuse("value-and-grad-wrt-state-entries", TypeError, "StateEntry", "export_state")
def _():
    tree = {"w": jnp.ones(3), "bn": lift.StateEntry(jnp.zeros(3))}
    lift.value_and_grad(lambda t: jnp.sum(t["w"]))(tree)


@misuse("jit-static-argnums", TypeError, "static_argnums", "static")
def _():
    lift.jit(lambda x, n: x * n, static_argnums=1)


@misuse("jit-donate-argnums", TypeError, "donate_argnums", "donate_state")
def _():
    lift.jit(lambda x: x, donate_argnums="x")


@misuse("jit-donated-state-reused", ValueError, COUNT, "donate_state")
def _():
    tree, state = model()

    def tick():
        lift.set(tree["n"], lift.get(tree["n"]) + 1)

    step = lift.jit(lift.stateful(tick), donate_state=True)
    step(state)
    step(state)


@misuse("raw-jax-vmap-write", lift.TraceError, MEAN, "lift.vmap")
def _():
    def body(t, xs):
        jax.vmap(lambda x: lift.set(t["bn"]["mean"], x))(xs)

    in_frame(body, jnp.ones((2, 3)))


@misuse("leaked-tracer-written", lift.TraceError, MEAN, "lift.vmap")
def _():
    leaked = []
    jax.jit(lambda x: leaked.append(x) or x)(jnp.ones(3))
    in_frame(lambda t: lift.set(t["bn"]["mean"], leaked[0]))


@misuse("while-cond-writes-state", lift.FrameError, COUNT, "while_loop", "body")
def _():
    def cond(t):
        def test(i):
            lift.set(t["n"], lift.get(t["n"]) + 1)
            return i < 3

        return lift.while_loop(test, lambda i: i + 1, 0)

    in_frame(cond)


@misuse("jit-not-callable", TypeError, "lift.jit", "callable")
def _():
    lift.jit(3)


@misuse("vmap-not-callable", TypeError, "lift.vmap", "callable")
def _():
    lift.vmap("f")


@misuse("cond-branch-not-callable", TypeError, "lift.cond", "callable")
def _():
    in_frame(lambda t: lift.cond(jnp.bool_(True), lambda: 1.0, 2.0))


@misuse("scan-not-callable", TypeError, "lift.scan", "callable")
def _():
    in_frame(lambda t: lift.scan(None, 0.0, jnp.ones(3)))


@misuse("checkpoint-not-callable", TypeError, "lift.checkpoint", "callable")
def _():
    lift.checkpoint([])


# ------------------------------------------------------------------------- tests


@pytest.mark.parametrize("case", CATALOGUE, ids=[m.id for m in CATALOGUE])
def test_misuse_raises_a_helpful_lift_error(case: Misuse) -> None:
    with pytest.raises(lift.LiftError) as info:
        case.perform()
    err = info.value
    assert isinstance(err, case.raises), (
        f"{type(err).__mro__} is not a {case.raises}: {err}"
    )
    message = str(err)
    missing = [s for s in case.says if s not in message]
    assert not missing, f"the message lacks {missing}: {message}"


def test_catalogue_is_large_and_distinct() -> None:
    ids = [m.id for m in CATALOGUE]
    assert len(ids) >= 35
    assert len(set(ids)) == len(ids)
    assert len({m.perform for m in CATALOGUE}) == len(ids)


def test_error_kinds_subclass_the_builtins() -> None:
    assert issubclass(lift.LiftTypeError, TypeError)
    assert issubclass(lift.LiftValueError, ValueError)
    assert issubclass(lift.LiftKeyError, KeyError)
    assert issubclass(lift.FrameError, RuntimeError)
    assert issubclass(lift.TraceError, RuntimeError)
    for kind in (
        lift.LiftTypeError,
        lift.LiftValueError,
        lift.LiftKeyError,
        lift.FrameError,
        lift.TraceError,
    ):
        assert issubclass(kind, lift.LiftError)


def test_closest_suggests_only_a_path_that_is_alike() -> None:
    from lift._errors import closest

    paths = [MEAN, VAR, COUNT]
    assert closest("['bn']['maen']", paths) == f"The closest existing path is {MEAN!r}."
    assert closest("['bn']['vars']", paths) == f"The closest existing path is {VAR!r}."
    # Nothing alike: no suggestion rather than an arbitrary one.
    assert closest("['optimizer']['momentum']", paths) == ""
    assert closest("['zzzzzz']", paths) == ""
    assert closest("['x']", []) == "The state is empty."


def test_unknown_key_with_nothing_alike_names_no_path() -> None:
    _, state = model()
    with pytest.raises(lift.LiftKeyError) as info:
        lift.update_state(state, {lift.StateKey("['optimizer']['momentum']"): 1.0})
    message = str(info.value)
    assert "['optimizer']['momentum']" in message
    assert "closest" not in message
    assert MEAN not in message
    assert COUNT not in message


def test_key_error_message_is_not_quoted() -> None:
    # KeyError's str() quotes its argument; lift's reads as the plain sentence.
    tree, _ = model()
    with pytest.raises(KeyError) as info:
        lift.import_state(tree, {})
    assert str(info.value).startswith("`import_state`")


def test_pmean_write_is_not_a_misuse() -> None:
    # The fix the vmap error suggests works: the reduced value is accepted.
    def body(t, xs):
        lift.vmap(
            lambda x: lift.set(t["bn"]["mean"], lax.pmean(x, "b")), axis_name="b"
        )(xs)

    _, state = in_frame(body, jnp.arange(6.0).reshape(2, 3))
    assert jnp.allclose(state[lift.StateKey(MEAN)], jnp.array([1.5, 2.5, 3.5]))
