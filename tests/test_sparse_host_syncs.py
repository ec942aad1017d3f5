"""Host synchronisation points: the counter counts exactly what it should, and a sparse
training step stays within the goal (issue 19.6): per micro-batch, one host wait per
adapted layer in forward (the selection's; none with --sparse_prefetch) plus one for
the token mask, none in backward."""

from __future__ import annotations

import threading
from contextlib import nullcontext

import pytest
import torch
from conftest import tiny_backward, tiny_sparse_engine

from meft_ds.sparse.staging import StagingPool
from meft_ds.sparse.sync_count import DeviceEvent, HostSyncCounter

SPARSE = "meft_ds/sparse/"


def _kinds(counter: HostSyncCounter, phase: str = "forward") -> dict[str, int]:
    return {kind: n for (p, kind), n in counter.counts.items() if p == phase and n}


@pytest.mark.unit
def test_scalar_reads_and_data_dependent_shapes_of_device_tensors_are_counted_exactly():
    x = torch.randn(5, 3)
    host = torch.randn(5, 3)
    with HostSyncCounter().mark_device(x) as counter:
        for _ in range(3):
            x.sum().item()
        bool(x[0, 0] > 0)
        int(x.argmax())
        (x > 0).nonzero()
        x[x > 0]  # boolean-mask indexing
        torch.unique(x)
        host.sum().item()  # host data: free
        host.nonzero()
        x.topk(2, dim=1)  # static shape: free
    assert _kinds(counter) == {"scalar": 5, "dynamic": 3}


@pytest.mark.unit
def test_blocking_device_to_host_copies_are_counted_and_async_staged_ones_are_not():
    x = torch.randn(4, 3)
    pool = StagingPool(pinned=False)
    staged = pool.take(x.numel() * 4)[: x.numel() * 4].view(torch.float32).view(4, 3)
    pageable = torch.empty(4, 3)
    with HostSyncCounter().mark_device(x) as counter:
        h = x.to("cpu")  # a no-op here, a blocking copy on a GPU: counted the same
        x.cpu()
        x.tolist()
        pageable.copy_(x)
        pageable.copy_(x, non_blocking=True)  # pageable memory: CUDA copies it blocking
        staged.copy_(x, non_blocking=True)  # pinned staging: asynchronous
        h.sum().item()  # the copy is host data
        staged.sum().item()
        x.to(torch.float64).sum()  # a dtype change stays on the device
    assert _kinds(counter) == {"d2h": 5, "async_d2h": 1}
    assert torch.equal(h, x)


@pytest.mark.unit
def test_device_is_decided_by_provenance_factories_and_transfers():
    x = torch.randn(4)
    with HostSyncCounter().mark_device(x) as counter:
        torch.zeros(3, device=x.device).sum().item()  # made on the device
        torch.zeros(3).sum().item()  # made on the host
        torch.arange(3).to(x.device).sum().item()  # sent to the device
        x.new_ones(2).sum().item()
        (torch.ones(4) * x).sum().item()  # computed from device data
    assert _kinds(counter) == {"scalar": 4}


class _ReadsInBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, grad):
        grad.to("cpu")
        grad.sum().item()
        return grad * 2


@pytest.mark.unit
def test_backward_is_a_phase_of_its_own_and_waits_count_on_the_counted_thread_only():
    x = torch.randn(4, requires_grad=True)
    event = DeviceEvent(x.device).record()
    with HostSyncCounter().mark_device(x) as counter:
        loss = _ReadsInBackward.apply(x).sum()
        event.synchronize()
        worker = threading.Thread(target=lambda: (event.synchronize(), x.sum().item()))
        worker.start()
        worker.join()  # another thread's waits and reads do not hold the compute stream
        with counter.phase("step"):
            x.detach().sum().item()
        loss.backward()
    assert _kinds(counter) == {"wait": 1}
    assert _kinds(counter, "backward") == {"d2h": 1, "scalar": 1}
    assert _kinds(counter, "step") == {"scalar": 1}
    assert torch.Tensor.to.__name__ == "to"
    assert not isinstance(torch.Tensor.to, type(lambda: 0))  # unpatched after exit


# --- a sparse training step under a real DeepSpeed engine -----------------------------
def _engine(values: dict):
    return tiny_sparse_engine(values)


def _train(method, engine, steps: int, counters: list | None = None,
           host_mask: bool = False) -> None:
    """``steps`` optimizer steps of two padded micro-batches each; ``counters``: count
    each step's sync points into a new counter appended there. ``host_mask``: the batch's
    host copy is given first, as the launcher's trainer does (``Method.before_forward``)."""
    gen = torch.Generator().manual_seed(3)
    for _ in range(steps):
        counter = HostSyncCounter().mark_device(engine.module)
        with counter if counters is not None else nullcontext():
            for _ in range(2):
                ids = torch.randint(0, 128, (2, 12), generator=gen)
                mask = torch.ones_like(ids)
                mask[1, 9:] = 0
                if host_mask:  # the host's copy: the batch before it went to the device
                    method.before_forward({"input_ids": ids.clone(), "attention_mask":
                                           mask.clone()})
                counter.mark_device(ids, mask)
                tiny_backward(method, engine, ids, mask)
                lr = engine.get_lr()[0]
                with counter.phase("step"):
                    engine.step()
            with counter.phase("step"):
                method.after_engine_step(lr, 1.0)
        if counters is not None:
            counters.append(counter)


@pytest.mark.unit
@pytest.mark.parametrize("host_mask", [False, True], ids=["device_mask", "host_mask"])
@pytest.mark.parametrize("values", [
    {}, {"sparse_prefetch": True}, {"sparse_eager_update": True},
    {"sparse_cache_rows": 16},
], ids=["default", "prefetch", "eager", "cache"])
def test_a_sparse_training_step_stays_within_the_goal_counts(values, host_mask):
    method, engine = _engine(values)
    counters: list[HostSyncCounter] = []
    _train(method, engine, steps=3, counters=counters, host_mask=host_mask)  # cache: step 2
    layers, micro_batches = len(method.adapters), 2
    selection = 0 if values.get("sparse_prefetch") else layers  # one wait per layer
    mask = 0 if host_mask else 1  # the mask's copy back, once per micro-batch
    for counter in counters[1:]:
        assert counter.total("forward", where=SPARSE) == micro_batches * (selection + mask), \
            counter.sites
        assert counter.total("backward", where=SPARSE) == 0, counter.sites
        # the row gradients went to the host, asynchronously
        assert counter.total("backward", ("async_d2h",), where=SPARSE) > 0
    assert counters[-1].total("forward", ("wait",), where=SPARSE) == micro_batches * (
        selection + mask)


@pytest.mark.unit
@pytest.mark.parametrize("eager", [False, True])
def test_row_gradients_received_on_a_thread_train_as_received_inline(eager):
    """The CUDA path hands each row gradient to the receiver thread (the eager update
    waits for its layer's); forced here on the CPU, the store ends bit-identical to
    inline receipt."""
    stores = []
    for threaded in (False, True):
        method, engine = _engine({"sparse_eager_update": eager})
        method.runtime.transfer.receive_async = threaded
        _train(method, engine, steps=3)
        stores.append(method.runtime.store.state_dict()["layers"])
        assert method.runtime.transfer.staging.pool(torch.device("cpu")).allocated_bytes > 0
    for layer, state in stores[0].items():
        for name, tensor in state.items():
            assert torch.equal(tensor, stores[1][layer][name]), (layer, name)


@pytest.mark.unit
def test_staging_buffers_are_reused_once_their_copy_has_passed():
    pool = StagingPool(pinned=False)
    first = pool.take(5000)
    assert first.numel() == 8192  # a power of two: working sets vary in size
    pending = DeviceEvent(torch.device("cpu"))
    pool.give(first, after=pending)
    assert pool.take(3000).data_ptr() == first.data_ptr()  # CPU events pass when recorded
    second = pool.take(3000)
    assert second.data_ptr() != first.data_ptr()  # the first is still taken
