"""Sub-pixel decoding of per-landmark maps (heatmaps, probabilities) into coordinates, 2D and 3D.

Input maps are tensors ``(..., N, *size)`` whose spatial axes are ``(x, y[, z])`` (the layout of
the image tensors), output coordinates are continuous indices ``(..., N, D)`` in the same order
(index 0 = centre of the first pixel), with a confidence ``(..., N)`` (the map's maximum).

Decoders (``decode_maps(method=...)``):
- ``"argmax"``: the integer peak (the seed's decoder: quantisation error up to half a pixel per axis).
- ``"centroid"``: weighted centroid of ``max(m - t, 0)`` in a window of ``radius`` pixels around the
  peak, with ``t = threshold * peak`` (``threshold`` relative; 0 = plain local centroid), the window
  re-centred on the centroid a few times (mean shift). For thresholded probability masks
  (dilation-erosion) this is the centre of the confident blob.
- ``"soft_argmax"``: local soft-argmax, ``softmax(beta * m / peak)``-weighted mean over the same window.
- ``"quadratic"``: argmax refined per axis by a parabola through the log of the peak and its two
  neighbours (exact for a sampled Gaussian; the DARK/"Taylor" refinement of heatmap regression).
Windows are clipped at the image border (pixels outside do not count).
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch

DECODERS: tuple[str, ...] = ("argmax", "centroid", "soft_argmax", "quadratic")


def _flatten(maps: torch.Tensor, spatial_dims: int) -> tuple[torch.Tensor, tuple[int, ...], tuple[int, ...]]:
    lead = tuple(maps.shape[:-spatial_dims])
    size = tuple(maps.shape[-spatial_dims:])
    return maps.reshape(-1, int(torch.tensor(size).prod())), lead, size


def _unravel(flat_index: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Flat indices (M,) of row-major ``size`` -> integer coordinates (M, D)."""
    coords = []
    rem = flat_index
    for n in reversed(size):
        coords.append(rem % n)
        rem = torch.div(rem, n, rounding_mode="floor")
    return torch.stack(coords[::-1], dim=-1)


def _strides(size: Sequence[int], device: torch.device) -> torch.Tensor:
    s = [1]
    for n in reversed(size[1:]):
        s.append(s[-1] * int(n))
    return torch.tensor(s[::-1], device=device)


def argmax_coords(maps: torch.Tensor, spatial_dims: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer peak coordinates ``(..., N, D)`` (float) and peak values ``(..., N)``."""
    flat, lead, size = _flatten(maps, spatial_dims)
    val, idx = flat.max(dim=1)
    coords = _unravel(idx, size).to(maps.dtype if maps.is_floating_point() else torch.float32)
    return coords.reshape(*lead, spatial_dims), val.reshape(lead)


def _window(maps: torch.Tensor, spatial_dims: int, radius: int, centre: torch.Tensor | None = None
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, tuple[int, ...]]:
    """Values (M, K), absolute coordinates (M, K, D), inside mask (M, K), peak values (M,) of the
    ``(2r+1)^D`` window around each map's argmax (or around integer ``centre`` (M, D) when given)."""
    flat, lead, size = _flatten(maps, spatial_dims)
    peak_val, idx = flat.max(dim=1)
    peak = _unravel(idx, size) if centre is None else centre.long()  # (M, D)
    r = int(radius)
    offsets = torch.tensor(list(itertools.product(range(-r, r + 1), repeat=spatial_dims)), device=maps.device)
    pos = peak[:, None, :] + offsets[None]  # (M, K, D)
    sz = torch.tensor(size, device=maps.device)
    inside = ((pos >= 0) & (pos < sz)).all(-1)
    lin = (pos.clamp(min=torch.zeros_like(sz), max=sz - 1) * _strides(size, maps.device)).sum(-1)
    vals = torch.gather(flat, 1, lin)
    return vals, pos.to(flat.dtype), inside, peak_val, lead


def gaussian_decoder_kwargs(decoder: str, sigma_px: float, kwargs: dict | None = None) -> dict:
    """``kwargs`` for decoding Gaussian heatmaps of ``sigma_px``: the plain centroid's window reaches 3 sigma unless a
    radius is given (a 3-px window cuts a wide Gaussian's tails unevenly and pulls the point toward the pixel centre;
    tests/test_decoding.py measures it)."""
    out = dict(kwargs or {})
    if decoder == "centroid" and not out.get("threshold") and "radius" not in out:
        out["radius"] = max(3, math.ceil(3.0 * float(sigma_px)))
    return out


def local_centroid(maps: torch.Tensor, spatial_dims: int, radius: int = 3, threshold: float = 0.0,
                   iterations: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted centroid of ``max(m - threshold * peak, 0)`` in the window around the peak.

    The window starts at the argmax and is re-centred on the rounded centroid ``iterations`` times
    (mean shift), so a flat-topped blob (a predicted mask, whose argmax may sit on its rim) is
    still covered symmetrically. Falls back to the integer peak where all weights vanish. The plain centroid
    (``threshold`` 0, of a smooth map) keeps only the pixels whose mirror image about the window's centre is in the
    image too: at the border a Gaussian cut on one side would pull it inward.
    """
    flat, lead, size = _flatten(maps, spatial_dims)
    sz = torch.tensor(size, device=maps.device)
    centre = None
    coords = None
    for _ in range(max(1, int(iterations) + 1)):
        vals, pos, inside, peak_val, _ = _window(maps, spatial_dims, radius, centre)
        mid = pos[:, (pos.shape[1] - 1) // 2]
        if not threshold:
            mirror = 2 * mid[:, None, :] - pos
            inside = inside & ((mirror >= 0) & (mirror < sz)).all(-1)
        w = torch.clamp(vals - threshold * peak_val[:, None], min=0.0) * inside
        total = w.sum(1, keepdim=True)
        coords = torch.where(total > 0, (w[..., None] * pos).sum(1) / total.clamp_min(1e-12), mid)
        new_centre = torch.round(coords).long()
        if centre is not None and torch.equal(new_centre, centre):
            break
        centre = new_centre
    assert coords is not None  # the loop runs at least once
    return coords.reshape(*lead, spatial_dims), peak_val.reshape(lead)


def local_soft_argmax(maps: torch.Tensor, spatial_dims: int, radius: int = 3, beta: float = 10.0
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """``softmax(beta * m / peak)``-weighted mean position in the window around the peak.

    Normalising by the peak makes ``beta`` scale-free: the background then weighs ``exp(-beta)``
    relative to the peak. ``beta`` 10 with Gaussians of sigma 2-3 px is accurate to < 0.02 px (a little less at sigma 1.5).
    """
    vals, pos, inside, peak_val, lead = _window(maps, spatial_dims, radius)
    scale = torch.where(peak_val.abs() > 1e-12, peak_val.abs(), torch.ones_like(peak_val))
    logits = (beta * vals / scale[:, None]).masked_fill(~inside, float("-inf"))
    w = torch.softmax(logits, dim=1)
    coords = (w[..., None] * pos).sum(1)
    return coords.reshape(*lead, spatial_dims), peak_val.reshape(lead)


def quadratic_refine(maps: torch.Tensor, spatial_dims: int, eps: float = 1e-8, max_shift: float = 0.5
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Argmax refined per axis by a parabola through ``log m`` at the peak and its two neighbours.

    For a sampled Gaussian the log is an exact parabola, so the refined peak is exact. The shift is
    clipped to ``max_shift`` px (the true maximum is within half a pixel of a strict discrete peak);
    border peaks and non-positive values keep the integer coordinate.
    """
    vals, pos, inside, peak_val, lead = _window(maps, spatial_dims, 1)
    k = vals.shape[1]
    centre_k = (k - 1) // 2
    coords = pos[:, centre_k].clone()
    stride = [3 ** (spatial_dims - 1 - a) for a in range(spatial_dims)]
    c = vals[:, centre_k]
    for a in range(spatial_dims):
        lo, hi = vals[:, centre_k - stride[a]], vals[:, centre_k + stride[a]]
        ok = inside[:, centre_k - stride[a]] & inside[:, centre_k + stride[a]] & (lo > eps) & (hi > eps) & (c > eps)
        llo, lc, lhi = (torch.log(v.clamp_min(eps)) for v in (lo, c, hi))
        denom = llo - 2 * lc + lhi
        shift = torch.where(ok & (denom < -eps), 0.5 * (llo - lhi) / torch.where(denom < -eps, denom, -torch.ones_like(denom)),
                            torch.zeros_like(denom))
        coords[:, a] = coords[:, a] + shift.clamp(-max_shift, max_shift)
    return coords.reshape(*lead, spatial_dims), peak_val.reshape(lead)


SPREAD_RADIUS: dict[int, int] = {2: 6, 3: 4}  # window (px) of map_spread per dimension


def map_spread(maps: torch.Tensor, spatial_dims: int, coords: torch.Tensor, radius: int | None = None
               ) -> torch.Tensor:
    """How widely each map spreads around its decoded point: the per-axis standard deviation ``(..., N, D)``
    (px of the map's grid) of the map's positive part in a ``(2r+1)^D`` window around ``coords``
    ``(..., N, D)`` (map index), about ``coords``. A sharp peak gives ~its width, a flat or shifted map up to
    ~r/sqrt(3); NaN where the window holds no positive value. Uncertainty for adaptive prediction regions
    (:mod:`lmlib.evaluation.conformal`)."""
    maps = maps.detach().float()
    r = int(radius if radius is not None else SPREAD_RADIUS.get(spatial_dims, 4))
    c = coords.detach().float().reshape(-1, spatial_dims).to(maps.device)
    vals, pos, inside, _, lead = _window(maps, spatial_dims, r, centre=torch.round(c))
    w = torch.where(inside, vals.clamp_min(0.0), torch.zeros_like(vals))  # (M, K)
    total = w.sum(1, keepdim=True)
    var = (w[..., None] * (pos - c[:, None, :]) ** 2).sum(1) / total.clamp_min(1e-12)
    std = torch.where(total > 0, var.sqrt(), torch.full_like(var, float("nan")))
    return std.reshape(*lead, spatial_dims)


def decode_maps(maps: torch.Tensor, spatial_dims: int, method: str = "quadratic", radius: int = 3,
                threshold: float = 0.0, beta: float = 10.0, iterations: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode maps ``(..., N, *size)`` -> (coordinates ``(..., N, D)`` float index, confidence ``(..., N)``)."""
    maps = maps.detach().float()
    if method == "argmax":
        return argmax_coords(maps, spatial_dims)
    if method == "centroid":
        return local_centroid(maps, spatial_dims, radius, threshold, iterations)
    if method == "soft_argmax":
        return local_soft_argmax(maps, spatial_dims, radius, beta)
    if method == "quadratic":
        return quadratic_refine(maps, spatial_dims)
    raise ValueError(f"unknown decoder {method!r}; choose from {DECODERS}")
