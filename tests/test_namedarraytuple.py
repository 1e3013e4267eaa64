import multiprocessing as mp
import pickle

import numpy as np
import pytest
import torch

from common.namedarraytuple import (
    buffer_from_example,
    buffer_leaves,
    buffer_map_named,
    buffer_to,
    namedarraytuple,
    numpify_buffer,
    runtime_namedarraytuple,
    torchify_buffer,
)

Point = namedarraytuple("Point", ["x", "y"])
Outer = namedarraytuple("Outer", ["obs", "info", "nothing"])


def make_outer(T=5, B=3):
    return Outer(
        obs=np.arange(T * B * 2, dtype=np.float32).reshape(T, B, 2),
        info=Point(x=np.arange(T * B).reshape(T, B), y=torch.arange(T * B, dtype=torch.float64).reshape(T, B)),
        nothing=None,
    )


def test_indexing_applies_to_every_field_and_keeps_type():
    outer = make_outer()
    step = outer[2]
    assert type(step) is Outer and type(step.info) is Point
    np.testing.assert_array_equal(step.obs, outer.obs[2])
    np.testing.assert_array_equal(step.info.x, outer.info.x[2])
    assert torch.equal(step.info.y, outer.info.y[2])
    assert step.nothing is None
    column = outer[1:4, 0]
    assert column.obs.shape == (3, 2) and column.info.x.shape == (3,) and column.info.y.shape == (3,)


def test_setitem_copies_field_by_field_from_same_fields():
    outer = make_outer()
    src = Outer(obs=np.full((3, 2), -1.0, np.float32), info=Point(x=np.array([7, 8, 9]), y=torch.ones(3)), nothing=None)
    outer[4] = src
    np.testing.assert_array_equal(outer.obs[4], src.obs)
    np.testing.assert_array_equal(outer.info.x[4], [7, 8, 9])
    assert torch.equal(outer.info.y[4], torch.ones(3, dtype=torch.float64))
    np.testing.assert_array_equal(outer.obs[3], np.arange(18, 24, dtype=np.float32).reshape(3, 2))


def test_setitem_broadcasts_a_value_into_every_field():
    outer = make_outer()
    outer[:, 1] = 0
    assert (outer.obs[:, 1] == 0).all() and (outer.info.x[:, 1] == 0).all() and (outer.info.y[:, 1] == 0).all()
    assert (outer.obs[:, 0] != 0).any()


def test_none_fields_stay_none():
    p = Point(x=np.zeros(3), y=None)
    p[0] = 5.0
    assert p.y is None and p[1:].y is None and p.x[0] == 5.0


def test_error_inside_a_field_names_the_field():
    p = Point(x=np.zeros(4), y=np.zeros(2))
    with pytest.raises(IndexError, match="'y'"):
        p[3]
    with pytest.raises(ValueError, match="'x'"):
        p[0] = Point(x=np.zeros(5), y=0.0)


def test_pickle_roundtrip_of_instances_and_class():
    outer = make_outer()
    restored = pickle.loads(pickle.dumps(outer))
    assert type(restored) is Outer and type(restored.info) is Point
    np.testing.assert_array_equal(restored.obs, outer.obs)
    assert pickle.loads(pickle.dumps(Point)) is Point


def _child_writes(shared, queue):
    view = numpify_buffer(shared)
    view[1] = Point(x=np.full(3, 4.0, np.float32), y=np.full(3, 2, np.int64))
    queue.put((type(shared).__name__, Point(x=np.ones(1), y=None)))


def test_shared_buffer_and_namedarraytuple_cross_a_spawn_boundary():
    example = Point(x=np.zeros(3, np.float32), y=np.zeros(3, np.int64))
    shared = buffer_from_example(example, (2,), share_memory=True)
    assert isinstance(shared.x, torch.Tensor) and shared.x.is_shared() and shared.x.shape == (2, 3)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child_writes, args=(shared, queue))
    proc.start()
    name, sent = queue.get(timeout=60)
    proc.join(timeout=60)
    assert proc.exitcode == 0 and name == "Point" and type(sent) is Point and sent.y is None
    assert (shared.x[1] == 4.0).all() and (shared.y[1] == 2).all() and (shared.x[0] == 0).all()


def test_buffer_from_example_shapes_dtypes_and_conversions():
    example = Outer(obs=np.zeros((4, 84), np.uint8), info=Point(x=np.float32(0), y=torch.zeros(2)), nothing=None)
    buf = buffer_from_example(example, (7, 3))
    assert buf.obs.shape == (7, 3, 4, 84) and buf.obs.dtype == np.uint8
    assert buf.info.x.shape == (7, 3) and buf.info.x.dtype == np.float32
    assert isinstance(buf.info.y, torch.Tensor) and buf.info.y.shape == (7, 3, 2)
    assert buf.nothing is None
    as_torch = torchify_buffer(buf)
    as_torch.obs[0, 0, 0, 0] = 9  # zero copy: the numpy buffer sees it
    assert buf.obs[0, 0, 0, 0] == 9
    back = numpify_buffer(as_torch)
    back.info.x[1, 1] = 3.5
    assert as_torch.info.x[1, 1] == 3.5
    moved = buffer_to(buf, "cpu")
    assert isinstance(moved.obs, torch.Tensor) and moved.obs.dtype == torch.uint8


def test_buffer_leaves_lists_non_none_leaves_in_field_order():
    outer = make_outer()
    leaves = buffer_leaves(outer)
    assert len(leaves) == 3
    assert all(leaf is field for leaf, field in zip(leaves, [outer.obs, outer.info.x, outer.info.y]))
    assert buffer_leaves(outer.obs)[0] is outer.obs and buffer_leaves(None) == []


def _child_reads_runtime(shared, queue):
    queue.put((type(shared).__name__, shared._fields, shared.inner._fields, float(shared.inner.b[1])))
    shared.a[0] = 5.0


def test_runtime_classes_are_cached_and_cross_a_spawn_boundary():
    """A process that never made the class (no module-level name to find it by) still loads its instances."""
    Inner = runtime_namedarraytuple("Runtime", ["b"])
    assert runtime_namedarraytuple("Runtime", ["b"]) is Inner
    Runtime = runtime_namedarraytuple("Runtime", ["a", "inner"])
    example = Runtime(a=np.zeros(2, np.float32), inner=Inner(b=np.zeros((), np.int64)))
    shared = buffer_from_example(example, (3,), share_memory=True)
    shared.inner.b[1] = 7
    restored = pickle.loads(pickle.dumps(shared))
    assert type(restored) is Runtime and type(restored.inner) is Inner
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child_reads_runtime, args=(shared, queue))
    proc.start()
    reply = queue.get(timeout=60)
    proc.join(timeout=60)
    assert proc.exitcode == 0 and reply == ("Runtime", ("a", "inner"), ("b",), 7.0)
    assert (shared.a[0] == 5.0).all()  # the child wrote the same shared memory


def test_buffer_map_named_passes_each_leaf_its_path():
    outer = make_outer()
    paths = []
    mapped = buffer_map_named(lambda path, leaf: paths.append(path) or path, outer, "root")
    assert paths == ["root/obs", "root/info/x", "root/info/y"]
    assert type(mapped) is Outer and mapped.info.y == "root/info/y" and mapped.nothing is None
    assert buffer_map_named(lambda path, leaf: path, outer.obs, "root") == "root"
