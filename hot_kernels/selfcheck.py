"""Correctness self-check behind ``hot-kernels check``: each op of one backend against the
reference backend on fresh random inputs (masks, a forced center, duplicated frames).

Values are compared with a tolerance; selections exactly, or, where they differ, by the
reference's float64 scores of the two picks (a differing pick is accepted only at a near-tie).
This is a quick smoke test for a user's machine; tests/ holds the full suite.
"""
from __future__ import annotations

import torch

from . import _dispatch, functional as hk, reference as R


def _inputs(device, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 37, 24, generator=g, dtype=torch.float64)
    x[:, 1] = x[:, 0]  # an exact tie, as edge-padded clips make
    mask = torch.rand(3, 37, generator=g) > 0.3
    mask[:, 0] = True
    return x.to(device, dtype), mask.to(device)


def _same_selection(x, got, want, **kw) -> str | None:
    if torch.equal(got.cpu(), want.cpu()):
        return None
    # Scores of the reference (float64) for both picks; a near-tie leaves them equal.
    x64 = x.double().cpu()
    log_rho = R.knn_density(x64, kw.get("k", 2), kw.get("token_mask"), log=True)
    delta, _ = R.dpc_delta(x64, log_rho, kw.get("token_mask"))
    score = delta * log_rho.exp()
    a = score.gather(1, got.cpu()).sort(-1).values
    b = score.gather(1, want.cpu()).sort(-1).values
    if torch.allclose(a, b, rtol=1e-3, atol=1e-6):
        return None
    return f"selection differs beyond a near-tie: got {got.tolist()}, reference {want.tolist()}"


def _close(name, got, want, rtol, atol) -> str | None:
    if got.shape != want.shape:
        return f"{name}: shape {tuple(got.shape)} != reference {tuple(want.shape)}"
    if torch.allclose(got.double().cpu(), want.double().cpu(), rtol=rtol, atol=atol, equal_nan=True):
        return None
    err = (got.double().cpu() - want.double().cpu()).abs().max().item()
    return f"{name}: max abs error {err:.3g} > tolerance (rtol {rtol}, atol {atol})"


def _cases(backend, device, dtype, seed):
    x, mask = _inputs(device, dtype, seed)
    mask_cpu = mask.cpu()
    tol = dict(rtol=1e-4, atol=1e-5) if dtype != torch.float64 else dict(rtol=1e-9, atol=1e-10)
    b = dict(backend=backend)
    xr = x.double().cpu()

    def pairwise():
        xg = x.clone().requires_grad_()
        got = hk.pairwise_distance(xg, **b)
        got.sum().backward()
        xw = xr.clone().requires_grad_()
        want = R.pairwise_distance(xw)
        want.sum().backward()
        return _close("distance", got, want, **tol) or _close("gradient", xg.grad, xw.grad, rtol=1e-3, atol=1e-4)

    def density():
        return _close("density", hk.knn_density(x, 3, mask, **b), R.knn_density(xr, 3, mask_cpu), **tol)

    def delta():
        log_rho = R.knn_density(xr, 2, log=True)
        got, _ = hk.dpc_delta(x, log_rho.to(device, torch.float64 if dtype == torch.float64 else torch.float32), **b)
        want, _ = R.dpc_delta(xr, log_rho)
        return _close("delta", got, want, **tol)

    def topf():
        # In the check's dtype (the GPU backends take no float64 scores); a permutation of distinct
        # values, so the pick has no ties.
        score = (torch.stack([torch.randperm(37) for _ in range(3)]).to(dtype) - 18) / 4
        got = hk.topf_select(score.to(device), 9, exclude=4, **b)
        want = R.topf_select(score, 9, exclude=4)
        return None if torch.equal(got.cpu(), want) else f"topf_select: got {got.tolist()}, reference {want.tolist()}"

    def dpc():
        for k, use_mask, center in ((2, False, None), (3, True, None), (2, False, 18)):
            m_dev, m_cpu = (mask, mask_cpu) if use_mask else (None, None)
            got = hk.dpc_knn(x, 12, k, m_dev, center, **b)
            want = R.dpc_knn(xr, 12, k, m_cpu, center)
            why = _same_selection(x, got, want, k=k, token_mask=m_cpu)
            if why:
                return f"dpc_knn(k={k}, mask={use_mask}, center={center}): {why}"
        return None

    def tra():
        g = torch.Generator().manual_seed(seed + 1)
        C, H = 16, 2
        q = torch.randn(1, 7, C, generator=g, dtype=torch.float64)
        xs = torch.randn(4, 5, C, generator=g, dtype=torch.float64)
        ws = [torch.randn(C, C, generator=g, dtype=torch.float64) / 4 for _ in range(4)]
        bo = torch.randn(C, generator=g, dtype=torch.float64)
        leaves = [t.clone().to(device, dtype).requires_grad_() for t in (q, xs, *ws, bo)]
        got = hk.token_recovering_attention(leaves[0], leaves[1], leaves[2], None, leaves[3], None, leaves[4], None,
                                            leaves[5], leaves[6], H, **b)
        got.square().sum().backward()
        ref_leaves = [t.clone().requires_grad_() for t in (q, xs, *ws, bo)]
        want = R.token_recovering_attention(ref_leaves[0], ref_leaves[1], ref_leaves[2], None, ref_leaves[3], None,
                                            ref_leaves[4], None, ref_leaves[5], ref_leaves[6], H)
        want.square().sum().backward()
        why = _close("output", got, want, **tol)
        for i, (a, w) in enumerate(zip(leaves, ref_leaves)):
            why = why or _close(f"gradient {i}", a.grad, w.grad, rtol=1e-3, atol=1e-4)
        return why

    def interp():
        index = R.dpc_knn(xr, 9, 2)  # ascending kept frames of the 37
        kept = xr.gather(1, index[:, :, None].expand(-1, -1, xr.shape[2]))
        leaf = kept.to(device, dtype).clone().requires_grad_()
        got = hk.token_recovering_interpolation(leaf, index.to(device), 37, **b)
        got.square().sum().backward()
        ref = kept.detach().clone().requires_grad_()
        want = R.token_recovering_interpolation(ref, index, 37)
        want.square().sum().backward()
        return _close("output", got, want, **tol) or _close("gradient", leaf.grad, ref.grad, rtol=1e-3, atol=1e-4)

    def merge():
        index, assignment = R.dpc_knn(xr, 9, 2, return_assignment=True)
        w = torch.rand(3, 37, generator=torch.Generator().manual_seed(seed + 2), dtype=torch.float64) + 0.1
        leaves = [xr.to(device, dtype).clone().requires_grad_(), w.to(device, dtype).clone().requires_grad_()]
        got = hk.merge_tokens(leaves[0], index.to(device), assignment.to(device), leaves[1], **b)
        got.square().sum().backward()
        refs = [xr.detach().clone().requires_grad_(), w.clone().requires_grad_()]
        want = R.merge_tokens(refs[0], index, assignment, refs[1])
        want.square().sum().backward()
        return (_close("output", got, want, **tol) or _close("gradient x", leaves[0].grad, refs[0].grad, 1e-3, 1e-4)
                or _close("gradient weight", leaves[1].grad, refs[1].grad, 1e-3, 1e-4))

    return [("pairwise_distance", pairwise), ("knn_density", density), ("dpc_delta", delta),
            ("topf_select", topf), ("dpc_knn", dpc), ("token_recovering_attention", tra),
            ("token_recovering_interpolation", interp), ("merge_tokens", merge)]


def run(backend: str, device: torch.device, seed: int = 0):
    """Yield (op, None if it matches the reference | "skip: reason" | what differs)."""
    dtype = torch.float64 if _dispatch.refusal(backend, "dpc_knn", device, torch.float64) is None else torch.float32
    for op, case in _cases(backend, device, dtype, seed):
        why = _dispatch.refusal(backend, op, device, dtype)
        if why is not None:
            yield op, f"skip: {why}"
            continue
        try:
            yield op, case()
        except Exception as e:  # noqa: BLE001 - a self-check reports, it does not stop
            yield op, f"raised {type(e).__name__}: {e}"
