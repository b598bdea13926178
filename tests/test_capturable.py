"""capturable=True: lr and step live on the device and step() makes no host sync."""

from __future__ import annotations

import contextlib

import pytest
import torch

from conftest import gpu
from triton_adadelta import Adadelta

# Every way a tensor's value can reach the host.
_HOST_READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy")


@contextlib.contextmanager
def no_host_reads(monkeypatch):
    """Fail on any read of a tensor's value by the host inside the block."""
    reads: list[str] = []
    with monkeypatch.context() as patch:
        for name in _HOST_READS:
            original = getattr(torch.Tensor, name)

            def reading(self, *args, _name=name, _original=original, **kwargs):
                reads.append(_name)
                return _original(self, *args, **kwargs)

            patch.setattr(torch.Tensor, name, reading)
        yield reads


@pytest.mark.parametrize("with_scaler", [False, True])
def test_capturable_step_reads_no_tensor_on_the_host(cpu_path, monkeypatch, with_scaler):
    param = torch.nn.Parameter(torch.randn(1000))
    optimizer = Adadelta([param], lr=torch.tensor(0.5), capturable=True, weight_decay=0.01)
    param.grad = torch.randn(1000)
    optimizer.step()  # the first step packs the buffers
    if with_scaler:
        optimizer.grad_scale = torch.tensor(4.0)
        optimizer.found_inf = torch.tensor(0.0)
    before = param.detach().clone()
    with no_host_reads(monkeypatch) as reads:
        optimizer.step()
    assert reads == [], f"step() read tensors on the host: {reads}"
    assert not torch.equal(param.detach(), before)
    assert optimizer.state[param]["step"].device == param.device
    assert float(optimizer.state[param]["step"]) == 2.0


def test_capturable_found_inf_skips_without_a_host_read(cpu_path, monkeypatch):
    param = torch.nn.Parameter(torch.randn(1000))
    optimizer = Adadelta([param], capturable=True)
    param.grad = torch.randn(1000)
    optimizer.step()
    before = param.detach().clone(), {k: v.clone() for k, v in optimizer.state[param].items()}
    optimizer.found_inf = torch.tensor(1.0)
    param.grad[3] = float("inf")
    with no_host_reads(monkeypatch) as reads:
        optimizer.step()
    assert reads == []
    assert torch.equal(param.detach(), before[0])
    for key, value in before[1].items():
        assert torch.equal(optimizer.state[param][key], value), key


def test_the_host_read_detector_detects(cpu_path, monkeypatch):
    """The detector above can fail: a non-capturable float lr from a tensor is read."""
    with no_host_reads(monkeypatch) as reads:
        float(torch.tensor(1.0))
    assert reads


def capture_step(optimizer: Adadelta) -> torch.cuda.CUDAGraph:
    """One ``step()`` captured in a CUDA graph, after a warm-up step on a side stream (as graphs require)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        optimizer.step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        optimizer.step()
    return graph


@gpu
def test_cuda_graph_capture_and_replay_matches_eager():
    torch.manual_seed(0)
    device = torch.device("cuda")
    params = [torch.nn.Parameter(torch.randn(n, device=device)) for n in (1000, 4097, 33)]
    eager_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    grads = [[torch.randn_like(p) for p in params] for _ in range(5)]
    optimizer = Adadelta(params, lr=torch.tensor(0.5, device=device), capturable=True)
    eager = Adadelta(eager_params, lr=0.5)
    for p, g in zip(params, grads[0]):
        p.grad = g.clone()
    optimizer.step()  # packs the buffers and compiles/tunes outside the capture
    for p, g in zip(params, grads[0]):
        p.grad.copy_(g)
    graph = capture_step(optimizer)
    for p, g in zip(eager_params, grads[0]):
        p.grad = g.clone()
    # Two steps ran: the first and the warm-up. Work issued while capturing does not run.
    for _ in range(2):
        eager.step()
    for step_grads in grads[1:]:
        for p, g in zip(params, step_grads):
            p.grad.copy_(g)
        graph.replay()
        for p, g in zip(eager_params, step_grads):
            p.grad = g.clone()
        eager.step()
    torch.cuda.synchronize()
    for a, b in zip(params, eager_params):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
