"""The teacher ensemble: each teacher sees its own view of the same crops."""
from __future__ import annotations

import contextlib

import torch

from ..common.crop_loader import View
from ..common.faults import fault_point
from ..common.models import Teacher
from ..common.targets import ensemble_probs


class Ensemble:
    """Teachers in eval mode on one device; views are deduplicated across teachers."""

    def __init__(self, teachers: list[Teacher], device: torch.device, temperature: float = 1.0):
        self.teachers, self.device, self.temperature = teachers, device, temperature
        self.views: list[View] = []
        self.view_of: list[int] = []
        for t in teachers:
            view = View(t.res, tuple(t.mean), tuple(t.std))
            if view not in self.views:
                self.views.append(view)
            self.view_of.append(self.views.index(view))
            t.model.to(device).eval()
            if device.type == "cuda":
                t.model.to(memory_format=torch.channels_last)

    def _autocast(self):
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    @torch.no_grad()
    def logits(self, views: list[torch.Tensor]) -> list[torch.Tensor]:
        """Each teacher's logits on its view, fp32."""
        out = []
        with self._autocast():
            for t, v in zip(self.teachers, self.view_of):
                x = views[v].to(self.device, non_blocking=True)
                if self.device.type == "cuda":
                    x = x.contiguous(memory_format=torch.channels_last)
                out.append(t.model(x).float())
                fault_point("forward")   # between one teacher's forward and the next's
        return out

    @torch.no_grad()
    def probs(self, views: list[torch.Tensor]) -> torch.Tensor:
        """Weighted mean of the teachers' softmax(logits / T)."""
        return ensemble_probs(self.logits(views), [t.weight for t in self.teachers], self.temperature)
