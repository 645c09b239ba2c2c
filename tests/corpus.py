"""A corpus of hand-built state trees covering every kind of pytree node.

Each case builds a fresh tree and writes out, by hand, the JAX key path of every
``StateEntry`` occurrence (in flatten order) and the key ``export_state`` must give it.
They differ only for shared entries, whose later occurrences reuse the first key.

Cases built from Equinox or Inox models are left out of ``CORPUS`` (so out of every
parametrization over it) when that library is not installed. ``CASES`` names every
case; building one whose library is missing skips the test, or fails it when
``LIFT_REQUIRE_EXTRAS`` is set.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import importlib.util
import os
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import pytest

from lift import StateEntry, StateKey
from lift.testing import Box, Pair, Record


def has(module: str) -> bool:
    """Whether the optional library ``module`` can be imported."""
    return importlib.util.find_spec(module) is not None


def require(module: str, what: str = "this test") -> None:
    """Skip the running test unless ``module`` is installed (fail if required)."""
    if has(module):
        return
    reason = f"{what} needs {module}, an optional extra that is not installed"
    if os.environ.get("LIFT_REQUIRE_EXTRAS"):
        pytest.fail(f"{reason}, and LIFT_REQUIRE_EXTRAS is set")
    pytest.skip(reason)


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    make: Callable[[], Any]
    paths: tuple[str, ...]
    keys: tuple[str, ...] | None = None
    # True when the tree holds StateKeys before export (it cannot round-trip alone).
    has_keys: bool = False
    # The optional library the tree is built from, if any.
    needs: str | None = None

    def build(self) -> Any:
        """A fresh tree; skips the test when the library it needs is missing."""
        if self.needs is not None:
            require(self.needs, f"corpus case {self.name!r}")
        return self.make()

    @property
    def expected_keys(self) -> tuple[str, ...]:
        return self.paths if self.keys is None else self.keys

    def __repr__(self) -> str:
        return self.name


def is_entry(x: Any) -> bool:
    return isinstance(x, StateEntry)


def is_key(x: Any) -> bool:
    return isinstance(x, StateKey)


def entry_paths(tree: Any) -> list[str]:
    """JAX's ``keystr`` of every StateEntry occurrence, in flatten order."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_entry)
    return [jax.tree_util.keystr(p) for p, leaf in flat if is_entry(leaf)]


def keys_in(tree: Any) -> list[StateKey]:
    return [x for x in jax.tree_util.tree_leaves(tree, is_leaf=is_key) if is_key(x)]


def sharing(objs: list[Any], by: Callable[[Any], Any] = id) -> list[int]:
    """For each object, the index of its first occurrence (by identity, or ``by``)."""
    first: dict[Any, int] = {}
    return [first.setdefault(by(o), i) for i, o in enumerate(objs)]


def is_entry_or_key(x: Any) -> bool:
    return isinstance(x, (StateEntry, StateKey))


def entry_objects(tree: Any) -> list[StateEntry]:
    """Every StateEntry occurrence, in flatten order (shared ones repeated)."""
    return [x for x in jax.tree_util.tree_leaves(tree, is_leaf=is_entry) if is_entry(x)]


def assert_identical(a: Any, b: Any) -> None:
    """Same structure, the very same leaf and entry-value objects, same sharing."""
    la, da = jax.tree_util.tree_flatten(a, is_leaf=is_entry)
    lb, db = jax.tree_util.tree_flatten(b, is_leaf=is_entry)
    assert da == db, f"structures differ:\n{da}\n{db}"
    for i, (x, y) in enumerate(zip(la, lb, strict=True)):
        assert type(x) is type(y), f"leaf {i}: {type(x).__name__} vs {type(y).__name__}"
        if is_entry(x):
            assert x.value is y.value, f"leaf {i}: entry values are different objects"
        else:
            assert x is y, f"leaf {i}: {x!r} is not {y!r}"
    ea = [x for x in la if is_entry(x)]
    eb = [x for x in lb if is_entry(x)]
    assert sharing(ea) == sharing(eb), "shared entries are not shared alike"


# --------------------------------------------------------------------------- nodes


class Keyed:
    """A custom node registered with key paths: ``.a`` and ``['b']``."""

    def __init__(self, a: Any, b: Any) -> None:
        self.a, self.b = a, b


jax.tree_util.register_pytree_with_keys(
    Keyed,
    lambda k: (
        ((jax.tree_util.GetAttrKey("a"), k.a), (jax.tree_util.DictKey("b"), k.b)),
        None,
    ),
    lambda _, children: Keyed(*children),
    lambda k: ((k.a, k.b), None),
)


class Opt(NamedTuple):
    count: Any
    mu: Any
    nu: Any


class Swapped(NamedTuple):
    """A namedtuple with its own registration, which JAX honours over the default."""

    a: Any
    b: Any


jax.tree_util.register_pytree_with_keys(
    Swapped,
    lambda p: (
        ((jax.tree_util.GetAttrKey("b"), p.b), (jax.tree_util.GetAttrKey("a"), p.a)),
        None,
    ),
    lambda _, children: Swapped(children[1], children[0]),
    lambda p: ((p.b, p.a), None),
)


def E(n: int = 2, dtype: str = "float32") -> StateEntry:
    return StateEntry(jnp.zeros((n,), dtype))


def W() -> jax.Array:
    return jnp.ones((2, 2))


@functools.cache
def equinox_classes() -> tuple[type, type, type]:
    # Cached: the same classes each time, so two builds have equal tree structures.
    import equinox as eqx

    class BN(eqx.Module):
        mean: Any
        var: Any

    class Block(eqx.Module):
        linear: Any
        bn: Any

    class Model(eqx.Module):
        layers: list
        step: Any
        name: str = eqx.field(static=True, default="model")

    return BN, Block, Model


def equinox_model() -> Any:
    import equinox as eqx

    bn_cls, block_cls, model_cls = equinox_classes()
    keys = jax.random.split(jax.random.key(0), 2)
    layers = [block_cls(eqx.nn.Linear(2, 2, key=k), bn_cls(E(), E())) for k in keys]
    return model_cls(layers, StateEntry(jnp.zeros((), "int32")))


def equinox_shared() -> Any:
    bn_cls, _, model_cls = equinox_classes()
    entry = E()
    return model_cls([bn_cls(entry, E()), bn_cls(entry, None)], None)


@functools.cache
def inox_classes() -> tuple[type, type]:
    import inox.nn

    class Norm(inox.nn.Module):
        def __init__(self) -> None:
            self.stats = StateEntry((jnp.zeros(2), jnp.ones(2)))
            self.scale = jnp.ones(2)

    class Net(inox.nn.Module):
        def __init__(self) -> None:
            self.norms = [Norm(), Norm()]
            self.count = StateEntry(jnp.zeros((), "int32"))

    return Norm, Net


def inox_net() -> Any:
    return inox_classes()[1]()


def inox_norm() -> Any:
    return inox_classes()[0]()


# --------------------------------------------------------------------------- cases


def _shared_dict() -> Any:
    e = E()
    return {"a": e, "b": e}


def _shared_list_dict() -> Any:
    e = E()
    return [e, {"x": e}, E()]


def _shared_three() -> Any:
    e, f = E(), E(3)
    return {"enc": [e, f], "dec": Pair(f, e), "tie": Record(e, None)}


def _shared_box() -> Any:
    e = E()
    return Box(e, Box(e))


def _shared_value() -> Any:
    # Two entries holding one array are two pieces of state: not shared.
    value = jnp.zeros(2)
    return [StateEntry(value), StateEntry(value)]


def _case(name: str, build: Callable[[], Any], *paths: str, **kw: Any) -> Case:
    return Case(name, build, tuple(paths), **kw)


BASE: list[Case] = [
    _case("root_entry", lambda: E(), ""),
    _case(
        "root_entry_tuple_value", lambda: StateEntry((jnp.zeros(2), jnp.ones(1))), ""
    ),
    _case("root_entry_scalar", lambda: StateEntry(0), ""),
    _case("dict_one", lambda: {"a": E()}, "['a']"),
    _case("dict_sorted", lambda: {"b": E(), "a": E()}, "['a']", "['b']"),
    _case(
        "dict_nested",
        lambda: {"w": W(), "bn": {"mean": E(), "var": E()}},
        "['bn']['mean']",
        "['bn']['var']",
    ),
    _case("dict_int_keys", lambda: {10: E(), 1: E(), 0: E()}, "[0]", "[1]", "[10]"),
    _case(
        "dict_int_keys_nested",
        lambda: {"layers": {1: {"s": E()}, 0: {"s": E(), "w": W()}}},
        "['layers'][0]['s']",
        "['layers'][1]['s']",
    ),
    _case(
        "dict_odd_str_keys",
        lambda: {"it's": E(), 'a"b': E(), "x.y": E(), "": E()},
        "['']",
        "['a\"b']",
        '["it\'s"]',
        "['x.y']",
    ),
    _case(
        "ordered_dict",
        lambda: collections.OrderedDict([("b", E()), ("a", E())]),
        "['b']",
        "['a']",
    ),
    _case(
        "defaultdict",
        lambda: collections.defaultdict(list, {"b": E(), "a": E()}),
        "['a']",
        "['b']",
    ),
    _case("list", lambda: [E(), W(), E()], "[0]", "[2]"),
    _case("tuple", lambda: (W(), E()), "[1]"),
    _case("nested_lists", lambda: [[E()], [[E()]]], "[0][0]", "[1][0][0]"),
    _case(
        "list_of_dicts",
        lambda: [{"x": E()}, {"x": E(), "y": W()}],
        "[0]['x']",
        "[1]['x']",
    ),
    _case("namedtuple", lambda: Pair(E(), E()), ".first", ".second"),
    _case(
        "namedtuple_nested",
        lambda: {"opt": Pair((E(),), {"m": E()})},
        "['opt'].first[0]",
        "['opt'].second['m']",
    ),
    _case(
        "namedtuple_three_fields",
        lambda: Opt(E(1, "int32"), {"w": E()}, {"w": E()}),
        ".count",
        ".mu['w']",
        ".nu['w']",
    ),
    _case(
        "namedtuple_registered_reordered",
        lambda: Swapped(E(1), {"x": E()}),
        ".b['x']",
        ".a",
    ),
    _case("none_in_dict", lambda: {"a": None, "b": E()}, "['b']"),
    _case("none_in_list", lambda: [None, E(), None], "[1]"),
    _case("root_none", lambda: None),
    _case("dataclass", lambda: Record(E(), W(), tag="t"), ".x"),
    _case(
        "dataclass_nested",
        lambda: Record(Record(E(), E()), [E()]),
        ".x.x",
        ".x.y",
        ".y[0]",
    ),
    _case(
        "custom_keyless",
        lambda: Box(E(), W(), E()),
        "[<flat index 0>]",
        "[<flat index 2>]",
    ),
    _case(
        "custom_keyless_nested",
        lambda: {"box": Box({"a": E()}, Box(E()))},
        "['box'][<flat index 0>]['a']",
        "['box'][<flat index 1>][<flat index 0>]",
    ),
    _case("custom_with_keys", lambda: Keyed(E(), E()), ".a", "['b']"),
    _case(
        "custom_with_keys_nested",
        lambda: [Keyed({"s": E()}, Keyed(None, E()))],
        "[0].a['s']",
        "[0]['b']['b']",
    ),
    _case(
        "entry_value_dict",
        lambda: {"stats": StateEntry({"mean": jnp.zeros(2), "var": jnp.ones(2)})},
        "['stats']",
    ),
    _case(
        "entry_value_namedtuple",
        lambda: [StateEntry(Pair(jnp.zeros(2), jnp.ones(2)))],
        "[0]",
    ),
    _case(
        "deep",
        lambda: {"a": [({"b": (E(),)},)]},
        "['a'][0][0]['b'][0]",
    ),
    _case(
        "mixed_nodes",
        lambda: Record(Pair(Box(E()), None), {3: [E()]}),
        ".x.first[<flat index 0>]",
        ".y[3][0]",
    ),
    _case(
        "many_layers",
        lambda: {"layers": [{"bn": {"mean": E(), "var": E()}} for _ in range(3)]},
        *[f"['layers'][{i}]['bn']['{n}']" for i in range(3) for n in ("mean", "var")],
    ),
    _case(
        "shared_two_places",
        _shared_dict,
        "['a']",
        "['b']",
        keys=("['a']", "['a']"),
    ),
    _case(
        "shared_list_dict",
        _shared_list_dict,
        "[0]",
        "[1]['x']",
        "[2]",
        keys=("[0]", "[0]", "[2]"),
    ),
    _case(
        "shared_three_nodes",
        _shared_three,
        "['dec'].first",
        "['dec'].second",
        "['enc'][0]",
        "['enc'][1]",
        "['tie'].x",
        keys=(
            "['dec'].first",
            "['dec'].second",
            "['dec'].second",
            "['dec'].first",
            "['dec'].second",
        ),
    ),
    _case(
        "shared_in_box",
        _shared_box,
        "[<flat index 0>]",
        "[<flat index 1>][<flat index 0>]",
        keys=("[<flat index 0>]", "[<flat index 0>]"),
    ),
    _case("same_value_two_entries", _shared_value, "[0]", "[1]"),
    _case(
        "existing_key",
        lambda: {"old": StateKey("['old']"), "new": E()},
        "['new']",
        has_keys=True,
    ),
    _case(
        "existing_key_elsewhere",
        lambda: [StateKey("encoder['w']"), {"x": E()}, StateKey("encoder['w']")],
        "[1]['x']",
        has_keys=True,
    ),
    _case("only_existing_keys", lambda: {"k": StateKey("k")}, has_keys=True),
    _case("empty_dict", lambda: {}),
    _case("empty_list", lambda: []),
    _case("empty_tuple", lambda: ()),
    _case(
        "empty_containers",
        lambda: {"a": {}, "b": [], "c": (), "d": E(), "e": Box(), "f": None},
        "['d']",
    ),
    _case("no_entries", lambda: {"w": W(), "b": [W(), None]}),
]

EQUINOX: list[Case] = [
    _case(
        "equinox_model",
        equinox_model,
        ".layers[0].bn.mean",
        ".layers[0].bn.var",
        ".layers[1].bn.mean",
        ".layers[1].bn.var",
        ".step",
        needs="equinox",
    ),
    _case(
        "equinox_shared",
        equinox_shared,
        ".layers[0].mean",
        ".layers[0].var",
        ".layers[1].mean",
        keys=(".layers[0].mean", ".layers[0].var", ".layers[0].mean"),
        needs="equinox",
    ),
]

INOX: list[Case] = [
    _case(
        "inox_net",
        inox_net,
        ".count",
        ".norms[0].stats",
        ".norms[1].stats",
        needs="inox",
    ),
    _case("inox_norm", inox_norm, ".stats", needs="inox"),
    _case("inox_in_dict", lambda: {"net": inox_norm()}, "['net'].stats", needs="inox"),
]

# Every case, by name, whether or not its library is installed.
CASES: dict[str, Case] = {case.name: case for case in [*BASE, *EQUINOX, *INOX]}
# The cases this environment can build.
CORPUS: list[Case] = [
    case for case in CASES.values() if case.needs is None or has(case.needs)
]
# Cases whose tree holds no StateKey before export: they round-trip on their own.
ROUND_TRIP: list[Case] = [case for case in CORPUS if not case.has_keys]
