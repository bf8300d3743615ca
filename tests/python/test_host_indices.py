"""The host copies of spatial_shapes and level_start_index (torch/host_indices.cpp). For CUDA
tensors the op reads them from a cache keyed by the tensor and its version counter, so that a call
neither waits for the stream nor breaks a CUDA graph capture. The cache is what could go wrong
there (a stale copy gives wrong results, silently), so its rules are tested here on CPU tensors
through msda's test hook, torch.ops.msda._host_indices_cached, which caches whatever the device;
tests/python/test_cuda.py checks the op itself on a GPU (no sync per call, capture, in-place
changes honoured).
"""
import gc

import torch

import msda  # noqa: F401  (loads the op library)
from conftest import make_problem, run_op

cached = torch.ops.msda._host_indices_cached


def test_second_call_hits_and_returns_the_values():
    t = torch.tensor([[3, 4], [2, 5]])
    first, hit = cached(t)
    assert not hit
    again, hit = cached(t)
    assert hit
    assert again.dtype == torch.int64 and again.device.type == "cpu" and again.is_contiguous()
    assert again.tolist() == [[3, 4], [2, 5]]


def test_an_in_place_write_is_seen():
    t = torch.tensor([[3, 4], [2, 5]])
    cached(t)
    t[0, 0] = 8  # bumps t's version counter
    host, hit = cached(t)
    assert not hit and host.tolist() == [[8, 4], [2, 5]]
    t.copy_(torch.tensor([[1, 1], [6, 6]]))
    host, hit = cached(t)
    assert not hit and host.tolist() == [[1, 1], [6, 6]]
    with torch.no_grad():
        t.add_(1)
    host, hit = cached(t)
    assert not hit and host.tolist() == [[2, 2], [7, 7]]


def test_another_storage_under_the_same_tensor_is_seen():
    """`t.data = other` keeps t's TensorImpl and version counter but swaps its storage (and a
    caching allocator may put the new one at the old address)."""
    t = torch.tensor([[3, 4], [2, 5]])
    cached(t)
    t.data = torch.tensor([[7, 7], [1, 1]])
    host, hit = cached(t)
    assert not hit and host.tolist() == [[7, 7], [1, 1]]


def test_a_write_through_a_view_is_seen():
    base = torch.tensor([[3, 4], [2, 5]])
    cached(base)
    base[1].fill_(9)  # a view shares its base's version counter
    host, hit = cached(base)
    assert not hit and host.tolist() == [[3, 4], [9, 9]]


def test_the_copy_is_not_an_alias():
    """The cache keeps its own copy: writing the tensor afterwards cannot change a kept copy that
    a call is still reading."""
    t = torch.tensor([0, 12], dtype=torch.int64)
    host, _ = cached(t)
    t[1] = 99
    assert host.tolist() == [0, 12]


def test_distinct_tensors_with_equal_values_and_views_are_distinct_entries():
    a = torch.tensor([0, 12, 22])
    b = a.clone()
    cached(a)
    _, hit = cached(b)
    assert not hit
    tail = a[1:]  # another TensorImpl over the same storage, another offset
    host, hit = cached(tail)
    assert not hit and host.tolist() == [12, 22]


def test_a_freed_tensor_is_never_mistaken_for_a_new_one():
    """A new tensor may get the freed one's memory; the entry holds the old TensorImpl weakly, so
    its address cannot be reused while the entry lives, and an expired entry never matches."""
    for i in range(50):
        t = torch.tensor([i, i + 1])
        host, hit = cached(t)
        assert not hit and host.tolist() == [i, i + 1]
        del t
        gc.collect()


def test_int32_comes_back_as_int64():
    host, _ = cached(torch.tensor([[3, 4]], dtype=torch.int32))
    assert host.dtype == torch.int64 and host.tolist() == [[3, 4]]


def test_inference_tensors_are_copied_every_time():
    """They have no version counter, so no entry could tell a changed one from the same."""
    with torch.inference_mode():
        t = torch.tensor([[3, 4]])
        cached(t)
        t[0, 0] = 5
        host, hit = cached(t)
    assert not hit and host.tolist() == [[5, 4]]


def test_many_tensors_stay_bounded_and_correct():
    kept = [torch.tensor([i]) for i in range(40)]
    for t in kept:
        cached(t)
    for i, t in enumerate(kept):
        host, _ = cached(t)
        assert host.tolist() == [i]


def test_the_op_follows_spatial_shapes_changed_in_place():
    """The op's own path: shapes rewritten in place between calls (same total S) give the output
    of a fresh tensor with the new shapes, not the first call's."""
    prob = make_problem(n=1, q=6, m=2, d=4, shapes=[(3, 4), (2, 5)], p=2, seed=3)
    first, _ = run_op(prob)
    prob["spatial_shapes"][0] = torch.tensor([4, 3])
    second, _ = run_op(prob)
    fresh, _ = run_op(dict(prob, spatial_shapes=torch.tensor([[4, 3], [2, 5]])))
    assert torch.equal(second, fresh)
    assert not torch.equal(second, first)
