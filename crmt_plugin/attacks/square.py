"""Square: a gradient-free random-search attack (Andriushchenko et al., 2020), l2 and linf, on any
subset of modalities with joint or per-modality budgets; respects ``bounds`` (no [0, 1] assumption).
"""

from __future__ import annotations

import functools
import math
from typing import Dict, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from ..errors import CRMTError
from .balls import bcast
from .base import Attack, AttackBatch, BoundValue, Budget, Group, ModelCall

__all__ = ["Square"]


def _grid_shape(x: Tensor) -> Tuple[int, int, int]:
    """A sample's shape as (C, H, W): images as they are, (H, W) as one channel, vectors as (1, 1, d)."""
    shape = tuple(x.shape[1:])
    if len(shape) == 0:
        return 1, 1, 1
    if len(shape) == 1:
        return 1, 1, shape[0]
    if len(shape) == 2:
        return 1, shape[0], shape[1]
    return math.prod(shape[:-2]), shape[-2], shape[-1]


def _rectangles(h: int, w: int) -> Tensor:
    """Square's concentric-rectangle pattern of shape (h, w), unit l2 norm."""
    delta = torch.zeros(h, w, dtype=torch.float64)
    xc, yc = h // 2 + 1, w // 2 + 1
    c0, c1 = xc - 1, yc - 1
    for counter in range(max(xc, yc)):
        rows = slice(max(c0, 0), min(c0 + 2 * counter + 1, h))
        delta[rows, max(c1, 0):min(c1 + 2 * counter + 1, w)] += 1.0 / (counter + 1) ** 2
        c0 -= 1
        c1 -= 1
    return delta / delta.pow(2).sum().sqrt()


@functools.lru_cache(maxsize=256)
def _eta(h: int, w: int, flip: bool) -> Tensor:
    """The l2 window pattern (h, w): two opposite-signed halves of concentric rectangles, unit norm."""
    if h >= 2 and (w < 2 or not flip or h != w):
        delta = torch.cat([_rectangles(h // 2, w), -_rectangles(h - h // 2, w)], dim=0)
    elif w >= 2:
        delta = torch.cat([_rectangles(h, w // 2), -_rectangles(h, w - w // 2)], dim=1)
    else:
        delta = torch.ones(h, w, dtype=torch.float64)
    return delta / delta.pow(2).sum().sqrt()


def _fraction(p_init: float, i: int, queries: int) -> float:
    """The fraction of coordinates a window covers at iteration ``i`` (Square's halving schedule,
    rescaled to 10,000 queries as in the reference implementation)."""
    it = int(i / queries * 10000)
    for limit, div in ((10, 1), (50, 2), (200, 4), (500, 8), (1000, 16), (2000, 32), (4000, 64), (6000, 128),
                       (8000, 256)):
        if it <= limit:
            return p_init / div
    return p_init / 512


class Square(Attack):
    """Square attack: random search with square (rectangular) windows, no gradients.

    Each iteration changes one window per budget group (in one modality of the group, drawn with
    probability proportional to its size) and keeps the change for every sample whose CW margin
    ``max_{k != y} z_k - z_y`` grew; a sample stops changing once misclassified. l2: the window
    carries Square's concentric-rectangle pattern and the group's perturbation is rescaled to the
    full budget; linf: the window is set to ``+-eps`` per channel. Every candidate is projected into
    ``bounds`` (the model never sees an invalid input). Modalities of any shape: a sample is viewed
    as (C, H, W) - images as they are, (H, W) as one channel, vectors (d,) as (1, 1, d).

    Example::

        adv = Square(2.0, norm="l2", queries=1000, bounds={"image": (-0.43, 2.81)})(model, inputs, y)

    >>> Square(1.0, queries=500).cost
    {'forward': 501, 'forward_backward': 0}

    Args (besides those of :class:`~crmt_plugin.attacks.base.Attack`):
        queries: iterations; each is one forward pass of the batch.
        p_init: initial fraction of a modality's coordinates per window (0.8, as torchattacks),
            halved on Square's schedule.

    Cost per call: at most ``queries + 1`` forward passes per sample, no backward: each query
    evaluates only the samples not yet misclassified (a fooled sample keeps its input; the others
    search exactly as they would in the whole batch). Needs class labels ``y``.
    """

    name = "Square"

    def __init__(
        self,
        eps: Budget,
        norm: str = "l2",
        queries: int = 1000,
        modalities: Optional[Union[str, Sequence[str]]] = None,
        bounds: Optional[Mapping[str, Tuple[BoundValue, BoundValue]]] = None,
        generator: Optional[torch.Generator] = None,
        *,
        p_init: float = 0.8,
        eval_mode: bool = True,
        call: Optional[ModelCall] = None,
    ) -> None:
        super().__init__(eps, norm=norm, modalities=modalities, bounds=bounds, generator=generator,
                         eval_mode=eval_mode, call=call)
        if not isinstance(queries, int) or isinstance(queries, bool) or queries < 1:
            raise CRMTError(f"Square: queries must be a positive int, found {queries!r}")
        if not (isinstance(p_init, (int, float)) and 0 < p_init <= 1):
            raise CRMTError(f"Square: p_init must be in (0, 1], found {p_init!r}")
        if self.norm not in ("l2", "linf"):
            raise CRMTError(f"Square supports norm 'l2' and 'linf', found {self.norm!r}")
        self.queries = queries
        self.p_init = float(p_init)
        self._config.update(queries=queries, p_init=p_init)

    @property
    def cost(self) -> Dict[str, int]:
        return {"forward": self.queries + 1, "forward_backward": 0}

    # -- randomness ---------------------------------------------------------------------------------

    def _randint(self, high: int) -> int:
        """Uniform in [0, high] (inclusive)."""
        gen = self.generator
        device = gen.device if gen is not None else torch.device("cpu")
        return int(torch.randint(0, high + 1, (1,), generator=gen, device=device).item())

    def _window(self, p: float, h: int, w: int, least: int) -> Tuple[int, int]:
        area = max(p * h * w, 1.0)
        hs = min(h, max(int(round(math.sqrt(area))), min(least, h)))
        ws = min(w, max(int(round(area / hs)), min(least, w)))
        return hs, ws

    def _pick(self, group: Group, batch: AttackBatch) -> str:
        sizes = [batch.xs[n][0].numel() if batch.batch else 1 for n in group.names]
        if len(sizes) == 1:
            return group.names[0]
        gen = self.generator
        device = gen.device if gen is not None else torch.device("cpu")
        weights = torch.tensor(sizes, dtype=torch.float64, device=device)
        return group.names[int(torch.multinomial(weights, 1, generator=gen).item())]

    # -- the attack ---------------------------------------------------------------------------------

    def _rescale(self, batch: AttackBatch, deltas: Dict[str, Tensor]) -> Dict[str, Tensor]:
        """l2: each group's perturbation scaled to the full budget (zero stays zero)."""
        out = dict(deltas)
        for g in batch.groups:
            parts = [deltas[n] for n in g.names]
            norm = g.ball.size(parts)
            scale = torch.where(norm > 0, g.eps.to(norm) / norm.clamp_min(1e-30), torch.zeros_like(norm))
            for n in g.names:
                out[n] = deltas[n] * bcast(scale, deltas[n])
        return out

    def _init(self, batch: AttackBatch) -> Dict[str, Tensor]:
        noise = batch.noise(self.generator)
        deltas: Dict[str, Tensor] = {}
        for g in batch.groups:
            for n in g.names:
                x = batch.xs[n]
                c, h, w = _grid_shape(x)
                if self.norm == "linf":  # vertical stripes of +-eps
                    signs = noise(torch.empty(x.shape[0], c, 1, w, device=x.device), "sign")
                    d = signs.expand(x.shape[0], c, h, w) * bcast(g.eps, signs)
                else:  # tiles of the rectangle pattern with random signs
                    th, tw = max(h // 5, 1), max(w // 5, 1)
                    acc = torch.promote_types(x.dtype, torch.float32)
                    d = torch.zeros(x.shape[0], c, h, w, device=x.device, dtype=acc)
                    for vh in range(0, h - th + 1, th):
                        for vw in range(0, w - tw + 1, tw):
                            pattern = _eta(th, tw, False).to(d)
                            signs = noise(torch.empty(x.shape[0], c, 1, 1, device=x.device), "sign").to(d)
                            d[:, :, vh:vh + th, vw:vw + tw] += pattern * signs
                deltas[n] = d.reshape(x.shape).to(x.dtype)
        if self.norm == "l2":
            deltas = self._rescale(batch, deltas)
        return batch.project(deltas)

    def _propose(self, batch: AttackBatch, deltas: Dict[str, Tensor], i: int) -> Dict[str, Tensor]:
        noise = batch.noise(self.generator)
        p = _fraction(self.p_init, i, self.queries)
        out = dict(deltas)
        for g in batch.groups:
            n = self._pick(g, batch)
            x = batch.xs[n]
            c, h, w = _grid_shape(x)
            d = deltas[n].reshape(x.shape[0], c, h, w).clone()
            if self.norm == "linf":
                hs, ws = self._window(p, h, w, 1)
                vh, vw = self._randint(h - hs), self._randint(w - ws)
                signs = noise(torch.empty(x.shape[0], c, 1, 1, device=x.device), "sign").to(d)
                d[:, :, vh:vh + hs, vw:vw + ws] = signs * bcast(g.eps, d)
            else:
                hs, ws = self._window(p, h, w, 3)
                vh, vw = self._randint(h - hs), self._randint(w - ws)
                vh2, vw2 = self._randint(h - hs), self._randint(w - ws)
                acc = torch.promote_types(d.dtype, torch.float32)
                d = d.to(acc)
                window = d[:, :, vh:vh + hs, vw:vw + ws]
                norm_window = window.pow(2).sum(dim=(-2, -1), keepdim=True).sqrt()
                group_norm = g.ball.size([deltas[m] for m in g.names]).to(acc)
                mask = torch.zeros(h, w, dtype=torch.bool, device=d.device)
                mask[vh:vh + hs, vw:vw + ws] = True
                mask[vh2:vh2 + hs, vw2:vw2 + ws] = True
                norm_windows = (d * mask).reshape(d.shape[0], -1).pow(2).sum(dim=1).sqrt()
                pattern = _eta(hs, ws, self._randint(1) == 1).to(d)
                signs = noise(torch.empty(x.shape[0], c, 1, 1, device=x.device), "sign").to(d)
                new = pattern * signs + window / (1e-12 + norm_window)
                free = (g.eps.to(acc).pow(2) - group_norm.pow(2)).clamp_min(0) / c + norm_windows.pow(2)
                new = new / (1e-12 + new.pow(2).sum(dim=(-2, -1), keepdim=True).sqrt()) * bcast(free.sqrt(), new)
                d[:, :, vh2:vh2 + hs, vw2:vw2 + ws] = 0.0
                d[:, :, vh:vh + hs, vw:vw + ws] = new
            out[n] = d.reshape(x.shape).to(x.dtype)
        if self.norm == "l2":
            out = self._rescale(batch, out)
        return batch.project(out)

    def run(self, batch: AttackBatch) -> Dict[str, Tensor]:
        if batch.labels is None:
            raise CRMTError("Square needs class labels (B,) as y")
        best = self._init(batch)
        wrong, margin = batch.wrong_and_margin(batch.logits(best))
        assert margin is not None
        # only the samples still standing are queried: a fooled sample never changes again, and the
        # noise of a sub-batch is that of the whole batch (AttackBatch.noise), so each sample's
        # search is the one it would have in the whole batch
        active = (~wrong).nonzero().squeeze(1)
        work = batch.subset(active) if active.numel() < batch.batch else batch
        current = {n: d[active] for n, d in best.items()}
        standing_margin = margin[active]
        for i in range(self.queries):
            if active.numel() == 0:
                break
            candidate = self._propose(work, current, i)
            new_wrong, new_margin = work.wrong_and_margin(work.logits(candidate))
            assert new_margin is not None
            accept = new_wrong | (new_margin > standing_margin)
            current = {n: torch.where(bcast(accept, current[n]).bool(), candidate[n], current[n]) for n in current}
            standing_margin = torch.where(accept, new_margin, standing_margin)
            fooled = accept & new_wrong
            if bool(fooled.any()):
                for n in best:
                    best[n][active] = current[n]
                keep = ~fooled
                active, standing_margin = active[keep], standing_margin[keep]
                current = {n: d[keep] for n, d in current.items()}
                work = work.subset(keep.nonzero().squeeze(1))
        for n in best:
            best[n][active] = current[n]
        return best
