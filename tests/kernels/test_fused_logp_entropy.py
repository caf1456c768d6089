"""The fused log-prob/entropy kernels against the fp64 PyTorch reference: values, gradients, edge rows,
registration (opcheck) and torch.compile. On a CPU the Triton kernels run under TRITON_INTERPRET=1 (set in
conftest), so vocabularies stay small; the GPU test (bf16, V = 151936) is skipped without CUDA."""

from __future__ import annotations

import os

import pytest
import torch

from eagrl.errors import EAGRLInputError
from eagrl.kernels import (
    resolve_backend,
    token_logp_entropy,
    token_logp_entropy_backward_reference,
    token_logp_entropy_reference,
    triton_runs_on,
)

pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, both where() branches
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_kernels = pytest.mark.skipif(not triton_runs_on(DEVICE), reason="Triton cannot run here (no CUDA, TRITON_INTERPRET unset)")
TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 2e-5, torch.float16: 2e-5}  # vs fp64 of the same rounded inputs


def _logits(rows: int, vocab: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    z = torch.randn(rows, vocab, generator=generator) * 4
    z[1, 7] = 60.0  # a peaked row
    z[2, 100:] = float("-inf")  # a row with most of the vocabulary masked
    z[3] = float("-inf")  # a fully masked row
    return z.to(dtype).to(DEVICE)


def _ids(rows: int, vocab: int) -> torch.Tensor:
    ids = torch.randint(0, vocab, (rows,), generator=torch.Generator().manual_seed(1))
    ids[1], ids[2] = 7, 3  # the peaked token; a live token of the masked row
    return ids.to(DEVICE)


@needs_kernels
@pytest.mark.parametrize("vocab", [1000, 5003])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_forward_and_backward_match_fp64_reference(vocab, dtype, temperature):
    rows = 6
    z = _logits(rows, vocab, dtype)
    ids = _ids(rows, vocab)
    mine = z.clone().requires_grad_()
    logp, entropy, lse = token_logp_entropy(mine, ids, temperature, backend="triton")
    oracle = z.double().clone().requires_grad_()
    ref_logp, ref_entropy, ref_lse = token_logp_entropy_reference(oracle, ids, temperature)
    tol = TOLERANCE[dtype] * max(1.0, float(ref_lse.detach()[torch.isfinite(ref_lse)].abs().max()))
    for got, want in ((logp, ref_logp), (entropy, ref_entropy), (lse, ref_lse)):
        assert got.dtype == torch.float32
        assert torch.equal(torch.isfinite(got), torch.isfinite(want))
        assert torch.allclose(got.double(), want, atol=tol, rtol=0, equal_nan=False)
    assert float(logp[3].detach()) == 0.0 and float(entropy[3].detach()) == 0.0 and float(lse[3]) == float("-inf")  # fully masked row
    assert float(entropy[1]) < 1e-3  # peaked row: ~zero entropy, not a cancellation error

    g_logp = torch.randn(rows, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    g_entropy = torch.randn(rows, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    g_lse = torch.randn(rows, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    (logp * g_logp + entropy * g_entropy + torch.where(torch.isfinite(lse), lse, 0) * g_lse).sum().backward()
    (ref_logp * g_logp.double() + ref_entropy * g_entropy.double() + torch.where(torch.isfinite(ref_lse), ref_lse, 0) * g_lse.double()).sum().backward()
    assert mine.grad.dtype == dtype and torch.isfinite(mine.grad).all()
    assert torch.allclose(mine.grad.double(), oracle.grad, atol=5e-3 if dtype != torch.float32 else 1e-5, rtol=1e-2 if dtype != torch.float32 else 1e-4)
    assert not mine.grad[3].any()  # a fully masked row gets no gradient


def test_reference_backward_formula_equals_autograd():
    rows, vocab = 5, 257
    z = _logits(rows, vocab, torch.float64).cpu()
    ids = _ids(rows, vocab).cpu()
    leaf = z.clone().requires_grad_()
    logp, entropy, lse = token_logp_entropy_reference(leaf, ids, 0.8)
    grads = [torch.randn(rows, dtype=torch.float64, generator=torch.Generator().manual_seed(k)) for k in range(3)]
    (logp * grads[0] + entropy * grads[1] + torch.where(torch.isfinite(lse), lse, 0) * grads[2]).sum().backward()
    formula = token_logp_entropy_backward_reference(z, ids, lse.detach(), entropy.detach(), *grads, temperature=0.8)
    assert torch.allclose(formula, leaf.grad, atol=1e-10)
    assert torch.isfinite(leaf.grad).all()


def test_reference_entropy_is_the_textbook_one():
    z = torch.randn(4, 50, dtype=torch.float64)
    _, entropy, _ = token_logp_entropy_reference(z, torch.zeros(4, dtype=torch.long), 1.3)
    p = torch.softmax(z / 1.3, -1)
    assert torch.allclose(entropy, -(p * p.log()).sum(-1))


@needs_kernels
def test_opcheck_of_the_registered_op():
    from eagrl.kernels.ops import _fused

    z = _logits(4, 1000, torch.float32).requires_grad_()
    torch.library.opcheck(_fused, (z, _ids(4, 1000), 0.9))


@needs_kernels
@pytest.mark.slow
def test_loss_compiles_fullgraph_with_no_graph_break():
    import torch._dynamo

    from eagrl.rl.grpo import policy_loss

    n, vocab = 6, 1000
    z = _logits(n, vocab, torch.float32)
    z[3] = torch.randn(vocab)  # no dead row in a loss
    args = (
        z.requires_grad_(),
        _ids(n, vocab),
        None,
        torch.randn(n, device=DEVICE),
        torch.full((n,), 1 / n, device=DEVICE),
        torch.full((n,), 0.3, device=DEVICE),
        None,
        0.2,
        0.0,
        0.9,
        "triton",
    )
    explained = torch._dynamo.explain(policy_loss)(*args)
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    torch._dynamo.reset()
    loss = torch.compile(policy_loss, fullgraph=True, dynamic=True)(*args)[0]
    loss.backward()
    eager = z.detach().clone().requires_grad_()
    policy_loss(eager, *args[1:])[0].backward()
    assert torch.allclose(z.grad, eager.grad, atol=1e-6)


def test_backend_switch(monkeypatch):
    assert resolve_backend("torch", "cpu") == "torch"
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert resolve_backend("auto", "cpu") == "torch"
    with pytest.raises(EAGRLInputError, match="backend 'triton' cannot run here"):
        resolve_backend("triton", "cpu")
    with pytest.raises(EAGRLInputError, match="one of auto, triton, torch"):
        resolve_backend("cuda", "cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_backend("auto", "cpu") == ("triton" if triton_runs_on("cpu") else "torch")


def test_torch_backend_is_the_reference_and_differentiable():
    z = torch.randn(3, 40, requires_grad=True)
    ids = torch.tensor([0, 5, 39])
    logp, entropy, _ = token_logp_entropy(z, ids, 1.0, backend="torch")
    (logp.sum() + entropy.sum()).backward()
    assert torch.allclose(logp, torch.log_softmax(z, -1)[torch.arange(3), ids])
    assert torch.isfinite(z.grad).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_bf16_at_qwen_vocabulary_on_gpu():
    rows, vocab = 64, 151936  # 151936 mod 1024 = 384: the tail is masked
    z = (torch.randn(rows, vocab, device="cuda") * 3).to(torch.bfloat16).requires_grad_()
    ids = torch.randint(0, vocab, (rows,), device="cuda")
    logp, entropy, lse = token_logp_entropy(z, ids, 1.0, backend="triton")
    ref = token_logp_entropy_reference(z.detach().double(), ids, 1.0)
    for got, want in zip((logp, entropy, lse), ref):
        assert torch.allclose(got.double(), want, atol=1e-3)
    g = torch.randn(rows, device="cuda")
    (logp * g + entropy).sum().backward()
    oracle = z.detach().double().requires_grad_()
    r = token_logp_entropy_reference(oracle, ids, 1.0)
    (r[0] * g.double() + r[1]).sum().backward()
    assert torch.allclose(z.grad.double(), oracle.grad, atol=2e-3, rtol=2e-2)
    assert os.environ.get("TRITON_INTERPRET") != "1"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_every_dtype_at_qwen_vocabulary_on_gpu(dtype):
    rows, vocab = 48, 151936
    z = (torch.randn(rows, vocab, device="cuda") * 3).to(dtype)
    ids = torch.randint(0, vocab, (rows,), device="cuda")
    logp, entropy, lse = token_logp_entropy(z, ids, 0.9, backend="triton")
    for got, want in zip((logp, entropy, lse), token_logp_entropy_reference(z.double(), ids, 0.9)):
        assert torch.allclose(got.double(), want, atol=1e-3), dtype


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_properties(0).total_memory < 40 * 2**30, reason="needs a CUDA GPU with 40 GiB")
def test_more_than_two_to_the_31_logits_on_gpu():
    """N·V > 2^31 (int64 row offsets): the last rows must be right, checked against the reference row by row."""
    vocab = 151936
    rows = 2**31 // vocab + 64  # 14198 rows: 2.16e9 bf16 logits (4.3 GB)
    z = torch.randn(rows, vocab, device="cuda", dtype=torch.bfloat16)
    ids = torch.randint(0, vocab, (rows,), device="cuda")
    logp, entropy, _ = token_logp_entropy(z, ids, 1.0, backend="triton")
    tail = slice(rows - 64, rows)
    want = token_logp_entropy_reference(z[tail].double(), ids[tail], 1.0)
    assert torch.allclose(logp[tail].double(), want[0], atol=1e-3) and torch.allclose(entropy[tail].double(), want[1], atol=1e-3)
