"""Regularised ZCA whitening with the numerics of MTT's reference code.

MTT whitens with kornia's ``ZCAWhitening(eps=0.1, compute_inv=True)`` fitted on the training
images as ``ToTensor`` gives them (pixels in [0, 1], no mean/std normalisation). kornia's formula
(``zca_mean`` with its defaults, unbiased=True), for N images flattened to D values X:

    mu = mean of X,   Sigma = (X - mu)^T (X - mu) / (N - 1)   (unbiased),   Sigma = U diag(S) U^T
    whiten(x)   = (x - mu) W         W    = U diag(1 / sqrt(S + eps)) U^T
    unwhiten(z) = z W^-1 + mu        W^-1 = U diag(sqrt(S + eps)) U^T

eps regularises: the whitened training covariance is W Sigma W = Sigma (Sigma + eps I)^-1
= I - eps (Sigma + eps I)^-1, the identity only along directions whose variance S >> eps. On
pixels eps = 0.1 keeps W's condition number sqrt((S_max + eps) / eps) small (under 44 for
32 x 32 x 3 images, whose variances sum to ~190), so float32 storage loses nothing that matters.

The transform is held as (mu, U, sqrt(S + eps)): both directions are then exact, and it costs
one D x D matrix, not two (W and W^-1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

DEFAULT_EPS = 0.1  # MTT's reference value, for pixels in [0, 1]
FIT_CHUNK = 4096  # images per covariance update: bounds the float64 copy to 4096 x D
APPLY_CHUNK = 8192  # images per whiten/unwhiten product: bounds the temporaries

# Names of the transform's tensors where a synthetic set stores them.
TENSOR_NAMES = ("zca_mean", "zca_basis", "zca_scale")


@dataclass(frozen=True)
class ZCA:
    """A fitted transform for images of one shape; `whiten` and `unwhiten` invert each other."""

    mean: torch.Tensor  # D
    basis: torch.Tensor  # D x D, eigenvectors of the covariance in columns (U)
    scale: torch.Tensor  # D, sqrt(S + eps): the regularised std along each eigenvector
    eps: float

    @classmethod
    def fit(cls, images: torch.Tensor, eps: float = DEFAULT_EPS) -> ZCA:
        """Fit on `images` (N x ...), in float64; the result is stored in float32."""
        flat = images.detach().reshape(len(images), -1)
        n, dim = flat.shape
        if n < 2:
            raise ValueError(f"ZCA needs at least 2 images to fit, got {n}")
        mean = flat.sum(0, dtype=torch.float64) / n
        cov = torch.zeros(dim, dim, dtype=torch.float64, device=flat.device)
        for part in flat.split(FIT_CHUNK):  # one float64 chunk at a time, not all N images
            centred = part.double() - mean
            cov.addmm_(centred.T, centred)
        cov /= n - 1
        variances, basis = torch.linalg.eigh(cov)
        # Sigma is positive semi-definite; round-off can leave eigenvalues of -1e-17.
        scale = (variances.clamp_min(0) + eps).sqrt()
        return cls(mean.float(), basis.float(), scale.float(), float(eps))

    @property
    def dim(self) -> int:
        return len(self.mean)

    def whiten(self, images: torch.Tensor) -> torch.Tensor:
        """(x - mu) W, for images of the fitted shape (any leading count)."""

        def product(x: torch.Tensor) -> torch.Tensor:
            basis = self.basis.to(x)
            return ((x - self.mean.to(x)) @ basis / self.scale.to(x)) @ basis.T

        return self._apply(images, product)

    def unwhiten(self, images: torch.Tensor) -> torch.Tensor:
        """z W^-1 + mu: whitened images back to the space the transform was fitted in."""

        def product(z: torch.Tensor) -> torch.Tensor:
            basis = self.basis.to(z)
            return (z @ basis * self.scale.to(z)) @ basis.T + self.mean.to(z)

        return self._apply(images, product)

    def _apply(self, images: torch.Tensor, product) -> torch.Tensor:
        flat = images.reshape(len(images), -1)
        if flat.shape[1] != self.dim:
            raise ValueError(f"ZCA was fitted on {self.dim} values per image, got "
                             f"{list(images.shape[1:])}")
        # Chunks bound the temporaries (CIFAR's train split is 553 MB in float32).
        return torch.cat([product(part) for part in flat.split(APPLY_CHUNK)]).reshape(images.shape)

    # --- storage (a synthetic set's safetensors file) -------------------------------------

    def tensors(self) -> dict[str, torch.Tensor]:
        values = (self.mean, self.basis, self.scale)
        return {name: t.detach().cpu().contiguous() for name, t in zip(TENSOR_NAMES, values)}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], eps: float) -> ZCA:
        """The transform `tensors()` stored; ValueError if its tensors do not fit together."""
        mean, basis, scale = (tensors[name] for name in TENSOR_NAMES)
        dim = mean.numel()
        if mean.dim() != 1 or list(basis.shape) != [dim, dim] or list(scale.shape) != [dim]:
            raise ValueError(f"ZCA tensors must be D, D x D and D; got {list(mean.shape)}, "
                             f"{list(basis.shape)} and {list(scale.shape)}")
        if not all(torch.isfinite(t).all() for t in (mean, basis, scale)):
            raise ValueError("ZCA tensors hold NaN or infinite values")
        if not (scale > 0).all():
            raise ValueError("ZCA scales must be positive")
        return cls(mean, basis, scale, float(eps))

    def describe(self) -> dict:
        """What a manifest records about the transform (its tensors hold the rest)."""
        return {"eps": self.eps, "dim": self.dim,
                "formula": "kornia ZCAWhitening (unbiased covariance, 1 / sqrt(S + eps))"}


__all__ = ["DEFAULT_EPS", "TENSOR_NAMES", "ZCA"]
