"""Group ZCA whitening over the global batch: DBN and Shuffled-DBN (seed 000, Def. 3–5).

Paper → code:
- ZCA (Def. 4): Y = Q Λ^{-1/2} Qᵀ X̂ with Σ = X̂ X̂ᵀ / N = Q Λ Qᵀ   → ``inv_sqrt_psd`` + ``_whiten``
  (Σ is divided by N so the output covariance is I, i.e. each dimension has unit variance like BN).
- DBN (Def. 3): split the D dims into groups of G, whiten each group  → :class:`DBN`
  (when G does not divide D the last group is smaller; a group never exceeds D).
- Shuffled-DBN (Def. 5): Y = P⁻¹(DBN_G(P(X))), fresh permutation each step → :class:`ShuffledDBN`
  (P is drawn from (seed, step), so every rank draws the same one without communicating).
- Rank bound (§3.4.3): rank(X̂) ≤ N − 1, so a group needs N − 1 ≥ G; violated → ``ValueError``.

Distributed: the mean and the group covariances are summed across ranks (``all_reduce_sum``, D + D·G
floats), so the layer gives the same output and gradients on W ranks × B as on 1 rank × W·B.

Backward stability: ``inv_sqrt_psd`` differentiates Σ^{-1/2} with the divided differences of
f(λ) = λ^{-1/2} in closed form, K_ij = −1 / (s_i s_j (s_i + s_j)) with s = √λ, which never divides by
λ_i − λ_j (autograd through ``eigh`` does, and returns inf for repeated eigenvalues). Eigenvalues are
floored at ``eps``. ``method="newton_schulz"`` instead runs coupled Newton–Schulz iterations (as in
IterNorm), which are only approximately white after few steps but use matmuls alone.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import torch
from torch import nn
from torch.distributed import ProcessGroup

from largessl.distributed.collectives import all_reduce_sum, get_world_size
from largessl.nn.host_sync import to_device

log = logging.getLogger(__name__)

WhiteningMethod = Literal["eigh", "newton_schulz"]


class _InvSqrtPSD(torch.autograd.Function):
    """Σ^{-1/2} of a batch of symmetric PSD matrices, with a backward that stays finite for repeated eigenvalues."""

    @staticmethod
    def forward(ctx: Any, sigma: torch.Tensor, floor: float, rel_noise: float) -> torch.Tensor:
        lam, q = torch.linalg.eigh(sigma)
        # Eigenvalues are resolved only to about G·ε·λ_max (ε of the precision Σ was computed or stored
        # in); below that they are round-off, possibly negative, and whitening them would multiply noise
        # by up to 1/√floor. Floor them at that level.
        noise = lam.amax(-1, keepdim=True).clamp_min(0) * (sigma.shape[-1] * rel_noise)
        s = torch.maximum(lam, noise.clamp_min(floor)).sqrt()
        ctx.save_for_backward(q, s)
        return (q / s.unsqueeze(-2)) @ q.mT

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        q, s = ctx.saved_tensors
        # Daleckii–Krein: dF = Q (K ∘ Qᵀ dΣ Q) Qᵀ with K the divided differences of λ^{-1/2}.
        k = -1.0 / (s.unsqueeze(-1) * s.unsqueeze(-2) * (s.unsqueeze(-1) + s.unsqueeze(-2)))
        g = 0.5 * (grad + grad.mT)  # Σ is symmetric: only the symmetric part of the gradient is meaningful
        return q @ (k * (q.mT @ g @ q)) @ q.mT, None, None


def inv_sqrt_psd(sigma: torch.Tensor, eps: float = 0.0, source_dtype: torch.dtype | None = None) -> torch.Tensor:
    """(Σ + eps·I)^{-1/2} for symmetric PSD ``sigma`` (..., G, G) by eigendecomposition, stable backward.

    ``source_dtype``: the precision Σ was computed or stored in (default ``sigma.dtype``); eigenvalues
    below G·ε·λ_max of that precision are round-off and are floored there.
    """
    eye = torch.eye(sigma.shape[-1], dtype=sigma.dtype, device=sigma.device)
    # The floor guards round-off (tiny negative eigenvalues) even when eps = 0.
    floor = max(eps, torch.finfo(sigma.dtype).tiny ** 0.5)
    rel_noise = torch.finfo(source_dtype or sigma.dtype).eps
    return _InvSqrtPSD.apply(sigma + eps * eye, floor, rel_noise)


def inv_sqrt_newton_schulz(sigma: torch.Tensor, eps: float = 0.0, iters: int = 5) -> torch.Tensor:
    """Approximate (Σ + eps·I)^{-1/2} by ``iters`` coupled Newton–Schulz steps; plain autograd, matmuls only."""
    g = sigma.shape[-1]
    eye = torch.eye(g, dtype=sigma.dtype, device=sigma.device).expand_as(sigma)
    sigma = sigma + eps * eye
    trace = torch.diagonal(sigma, dim1=-2, dim2=-1).sum(-1, keepdim=True).unsqueeze(-1)
    # Σ/tr(Σ) has eigenvalues in (0, 1], where the iteration converges. The coupled form (Y → Σ^{1/2},
    # Z → Σ^{-1/2}) is used because the single-sequence IterNorm update amplifies round-off and diverges
    # after a few dozen steps.
    y, z = sigma / trace, eye
    for _ in range(iters):
        t = 0.5 * (3.0 * eye - z @ y)
        y, z = y @ t, t @ z
    return z / trace.sqrt()


def _group_layout(num_features: int, group_size: int) -> tuple[int, int, int]:
    """(G, number of full groups H, size of the smaller last group r) for D features."""
    g = min(group_size, num_features)
    return g, num_features // g, num_features % g


class DBN(nn.Module):
    """Decorrelated batch norm: ZCA-whiten groups of G dimensions over the global batch (seed 000 Def. 3).

    Args:
        num_features: feature dimension D.
        group_size: G; 0 = half the global batch, fixed at the first training batch (seed 000 §4.1).
        eps: added to each group covariance before Σ^{-1/2} (and the eigenvalue floor).
        momentum: running mean / covariance momentum (eval uses them).
        method: ``eigh`` (exact ZCA) or ``newton_schulz`` (iterative, approximate).
        ns_iters: Newton–Schulz iterations.
        group: process group of the statistics (``None`` = default group).
    """

    def __init__(self, num_features: int, group_size: int = 0, eps: float = 1e-5, momentum: float = 0.1,
                 method: WhiteningMethod = "eigh", ns_iters: int = 5, group: ProcessGroup | None = None) -> None:
        super().__init__()
        if num_features < 1:
            raise ValueError(f"DBN needs num_features >= 1 (got {num_features})")
        if group_size < 0:
            raise ValueError(f"DBN group_size must be >= 1, or 0 for half the global batch (got {group_size})")
        if eps < 0:
            raise ValueError(f"DBN eps must be >= 0 (got {eps})")
        if method not in ("eigh", "newton_schulz"):
            raise ValueError(f"DBN method must be 'eigh' or 'newton_schulz' (got {method!r})")
        if ns_iters < 1:
            raise ValueError(f"DBN ns_iters must be >= 1 (got {ns_iters})")
        self.num_features = num_features
        self.requested_group_size = group_size
        self.eps = eps
        self.momentum = momentum
        self.method = method
        self.ns_iters = ns_iters
        self.group = group
        self.register_buffer("running_mean", torch.zeros(num_features))
        # The covariance buffers are sized once G is known; with group_size=0 that is the first batch
        # (resize_ keeps the tensor objects, so DDP's buffer references stay valid).
        self.register_buffer("group_size", torch.tensor(0, dtype=torch.long))
        self._g = 0
        """G as a Python int, kept equal to the ``group_size`` buffer (the buffer is for checkpoints): reading
        the buffer with ``int()`` in forward would make the host wait for the GPU three times per call."""
        self.register_buffer("running_cov", torch.zeros(0))
        self.register_buffer("running_cov_tail", torch.zeros(0))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))
        if group_size > 0:
            self._materialise(group_size)

    # -- shape bookkeeping ----------------------------------------------------------------------

    def _materialise(self, group_size: int) -> None:
        g, h, r = _group_layout(self.num_features, group_size)
        self.group_size.fill_(g)
        self._g = g
        self.running_cov.resize_(h, g, g).copy_(torch.eye(g).expand(h, g, g))
        self.running_cov_tail.resize_(r, r).copy_(torch.eye(r))

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        stored = state_dict.get(prefix + "group_size")
        if stored is not None and int(stored) > 0 and int(stored) != int(self.group_size):
            if int(self.group_size) > 0:
                raise ValueError(
                    f"checkpoint DBN group size {int(stored)} differs from this model's {int(self.group_size)}; "
                    "use the same method.group_size and global batch size as the checkpoint"
                )
            self._materialise(int(stored))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._g = int(self.group_size)  # load time, not per step: the one read of the buffer

    def resolved_group_size(self, global_batch: int) -> int:
        """The effective G for a global batch of ``global_batch`` samples (≤ D)."""
        g = self._g
        if g == 0:
            g = self.requested_group_size or max(1, global_batch // 2)
        return min(g, self.num_features)

    # -- forward ----------------------------------------------------------------------------------

    def _whiten_matrix(self, cov: torch.Tensor, source_dtype: torch.dtype) -> torch.Tensor:
        if self.method == "newton_schulz":
            return inv_sqrt_newton_schulz(cov, self.eps, self.ns_iters)
        try:
            return inv_sqrt_psd(cov, self.eps, source_dtype)
        except torch.linalg.LinAlgError as e:  # NaN/Inf input: a diverged run, not a broken environment
            raise FloatingPointError(
                f"{type(self).__name__}: eigendecomposition of the group covariance failed; its input holds "
                f"NaN/Inf ({e})"
            ) from None

    def _whiten(self, xc: torch.Tensor, cov_full: torch.Tensor, cov_tail: torch.Tensor,
                source_dtype: torch.dtype) -> torch.Tensor:
        """Apply the per-group Σ^{-1/2} to centred ``xc`` (N, D); Σ came from ``source_dtype`` data."""
        h, g = cov_full.shape[0], self._g
        n = xc.shape[0]
        parts = []
        if h:
            full = xc[:, : h * g].reshape(n, h, g)
            parts.append(torch.einsum("nhg,hgk->nhk", full, self._whiten_matrix(cov_full, source_dtype)).reshape(n, h * g))
        if cov_tail.numel():
            parts.append(xc[:, h * g:] @ self._whiten_matrix(cov_tail, source_dtype))
        return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]

    def _local_group_cov(self, xc: torch.Tensor) -> torch.Tensor:
        """Unnormalised group covariances of this rank's rows, packed flat (full groups, then the tail)."""
        h, g = self.running_cov.shape[0], self._g
        n = xc.shape[0]
        parts = []
        if h:
            full = xc[:, : h * g].reshape(n, h, g)
            parts.append(torch.einsum("nhg,nhk->hgk", full, full).reshape(-1))
        tail = xc[:, h * g:]
        if tail.shape[1]:
            parts.append((tail.T @ tail).reshape(-1))
        return torch.cat(parts)

    def _unpack(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h, g = self.running_cov.shape[0], self._g
        r = self.running_cov_tail.shape[0]
        return flat[: h * g * g].reshape(h, g, g), flat[h * g * g:].reshape(r, r)

    def forward(self, x: torch.Tensor, perm: torch.Tensor | None = None) -> torch.Tensor:
        """Whiten (N, D) with global-batch statistics (training) or running ones (eval); ``perm`` permutes dims first."""
        if x.dim() != 2 or x.shape[1] != self.num_features:
            raise ValueError(f"{type(self).__name__}({self.num_features}) expects (N, {self.num_features}), "
                             f"got {tuple(x.shape)}")
        in_dtype = x.dtype
        # Whiten in float64: eigh has no half-precision kernels, and in fp32 the covariance of a trained
        # projector is ill-conditioned enough (λ_min/λ_max < 1e-7) that round-off eigenvalues get whitened
        # into outputs with std ~1e4 (digits repro, 000-table1 DBN, diverged at step ~40 in fp32). The
        # (N, D) input and the G×G matrices are small next to the backbone.
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = x.double()
            y = self._forward_train(x, perm) if self.training else self._forward_eval(x)
        return y if in_dtype == torch.float64 else y.to(torch.float32)

    def _forward_train(self, x: torch.Tensor, perm: torch.Tensor | None) -> torch.Tensor:
        n_global = x.shape[0] * get_world_size(self.group)  # per-rank batches are equal by construction
        if self._g == 0:
            self._materialise(self.resolved_group_size(n_global))
            log.info("%s group size resolved to %d (half the global batch %d)", type(self).__name__,
                     self._g, n_global)
        g = self._g
        if n_global - 1 < g:
            raise ValueError(
                f"{type(self).__name__} group size G={g} needs a global batch of at least G+1={g + 1} samples "
                f"(rank bound N−1 ≥ G) but got {n_global}; lower method.group_size or raise train.global_batch_size"
            )
        n_local = x.new_full((1,), x.shape[0])
        packed = all_reduce_sum(torch.cat([x.sum(0), n_local]), self.group)
        n = packed[-1]
        mean = packed[:-1] / n
        xc = x - mean
        xp = xc if perm is None else xc[:, perm]
        cov = all_reduce_sum(self._local_group_cov(xp), self.group) / n
        cov_full, cov_tail = self._unpack(cov)
        y = self._whiten(xp, cov_full, cov_tail, torch.float64)
        if perm is not None:
            y = y[:, torch.argsort(perm)]
        with torch.no_grad():
            self.num_batches_tracked += 1
            self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), self.momentum)
            if perm is None:
                canon = cov.detach()
            else:
                # Running statistics describe the fixed (unpermuted) grouping used in eval; this costs one
                # extra O(N·D·G) product and a D·G-float all-reduce per step.
                canon = all_reduce_sum(self._local_group_cov(xc.detach()), self.group) / n
            canon = canon * (n / (n - 1))  # unbiased, like BatchNorm's running variance
            c_full, c_tail = self._unpack(canon.to(self.running_cov.dtype))
            self.running_cov.lerp_(c_full, self.momentum)
            self.running_cov_tail.lerp_(c_tail, self.momentum)
        return y

    def _forward_eval(self, x: torch.Tensor) -> torch.Tensor:
        if self._g == 0:
            raise RuntimeError(f"{type(self).__name__} has no running statistics yet: run a training batch or "
                               "load a checkpoint before eval")
        xc = x - self.running_mean.to(x.dtype)
        return self._whiten(xc, self.running_cov.to(x.dtype), self.running_cov_tail.to(x.dtype), self.running_cov.dtype)

    def extra_repr(self) -> str:
        g = self._g or f"auto({self.requested_group_size or 'N/2'})"
        return f"{self.num_features}, group_size={g}, eps={self.eps}, method={self.method}"


def permutation_for_step(num_features: int, seed: int, step: int) -> torch.Tensor:
    """The permutation of ``num_features`` dims for (seed, step): the same on every rank, new every step."""
    gen = torch.Generator().manual_seed((int(seed) * 0x9E3779B1 + int(step)) % (2**63))
    return torch.randperm(num_features, generator=gen)


class ShuffledDBN(DBN):
    """DBN on a random permutation of the dimensions, drawn afresh each step (seed 000 Def. 5).

    ``forward(x, step)`` draws P from (``seed``, ``step``), so every rank (and a resumed run) uses the
    same P at the same step. Without a step it falls back to the layer's own batch counter (also
    identical on every rank and saved in checkpoints). Eval whitens the fixed, unpermuted grouping.
    """

    def __init__(self, num_features: int, group_size: int = 0, eps: float = 1e-5, momentum: float = 0.1,
                 method: WhiteningMethod = "eigh", ns_iters: int = 5, seed: int = 0,
                 group: ProcessGroup | None = None) -> None:
        super().__init__(num_features, group_size, eps, momentum, method, ns_iters, group)
        self.seed = seed

    def forward(self, x: torch.Tensor, step: int | None = None) -> torch.Tensor:  # type: ignore[override]
        """Permute, whiten in groups, un-permute (training); plain DBN with running statistics in eval."""
        if not self.training:
            return super().forward(x)
        s = int(self.num_batches_tracked) if step is None else step
        # Drawn on the host (the same P on every device type, rank and resume), copied from pinned memory
        # without blocking the host (a pageable copy would wait for the GPU).
        perm = to_device(permutation_for_step(self.num_features, self.seed, s), x.device)
        return super().forward(x, perm)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", seed={self.seed}"
