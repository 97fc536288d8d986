"""The student's resolution per epoch: fixed, or progressive resizing as FFCV trains ResNets.

FFCV's recipe (ffcv-imagenet's ``get_resolution``): low resolution in the early epochs, where
cheap steps cost little accuracy, then a linear ramp to the final resolution, which the last
epochs train at. Here the ramp's points are rounded down to multiples of ``--res-step`` (FFCV:
32, i.e. whole feature-map cells of a stride-32 network). The resolution of epoch e is a pure
function of e and the flags, so ``--resume`` (which restarts at an epoch boundary) continues at
the resolution the uninterrupted run would have used. Validation and checkpoints use the final
resolution (trainer.py says why).
"""
from __future__ import annotations

from dataclasses import dataclass

from ..common.errors import MealV2Error

DEFAULT_STEP = 32


@dataclass(frozen=True)
class ResSchedule:
    final: int                    # --res (with --labels: the store's unless given)
    min_res: int | None = None    # --min-res; None: every epoch at ``final``
    ramp_start: int = 0           # --ramp-start: the last epoch at min_res
    ramp_end: int = 0             # --ramp-end: the first epoch at the final res
    step: int = DEFAULT_STEP      # --res-step

    @property
    def progressive(self) -> bool:
        return self.min_res is not None

    def at(self, epoch: int) -> int:
        """The student's resolution in epoch ``epoch`` (0-based)."""
        if self.min_res is None or epoch >= self.ramp_end:
            return self.final
        if epoch <= self.ramp_start:
            return self.min_res
        span = self.ramp_end - self.ramp_start   # integer arithmetic: no float rounding at the steps
        linear = (self.min_res * span + (self.final - self.min_res) * (epoch - self.ramp_start)) // span
        return min(self.final, max(self.min_res, linear // self.step * self.step))

    def describe(self, epochs: int) -> str:
        """Runs of equal resolution, e.g. 'epochs 0-3: 128 px, 4: 160 px, 5-9: 224 px'."""
        runs: list[list[int]] = []   # [first epoch, last epoch, res]
        for e in range(epochs):
            res = self.at(e)
            if runs and runs[-1][2] == res:
                runs[-1][1] = e
            else:
                runs.append([e, e, res])
        parts = [f"{a}{f'-{b}' if b > a else ''}: {r} px" for a, b, r in runs]
        return ("epochs " if runs[0][1] > runs[0][0] else "epoch ") + ", ".join(parts)

    def pixel_fraction(self, epochs: int) -> float:
        """Pixels rendered over ``epochs`` epochs relative to a run at the final res throughout."""
        return sum(self.at(e) ** 2 for e in range(epochs)) / (epochs * self.final ** 2)


def res_schedule(final: int, epochs: int, min_res: int | None = None, ramp_start: int | None = None,
                 ramp_end: int | None = None, step: int | None = None, final_flag: str = "--res") -> ResSchedule:
    """The validated schedule; an error names the flag, its value and what was expected.
    ``final_flag`` says where the final resolution came from (for the messages)."""
    ramp = {"--ramp-start": ramp_start, "--ramp-end": ramp_end, "--res-step": step}
    if min_res is None:
        given = [f"{flag} {value}" for flag, value in ramp.items() if value is not None]
        if given:
            raise MealV2Error(f"{given[0]} shapes a progressive resolution schedule, which needs --min-res PX "
                              f"(the first epochs' resolution); add it or leave {given[0].split()[0]} out")
        return ResSchedule(final)
    if ramp_start is None or ramp_end is None:
        raise MealV2Error(f"--min-res {min_res} needs --ramp-start E (the last epoch at {min_res} px) and "
                          f"--ramp-end E (the first epoch at the final {final} px), epochs counted from 0")
    step = DEFAULT_STEP if step is None else step
    if min_res < 1 or step < 1:
        bad = ("--min-res", min_res) if min_res < 1 else ("--res-step", step)
        raise MealV2Error(f"{bad[0]} {bad[1]}: expected a positive pixel count")
    if min_res > final:
        raise MealV2Error(f"--min-res {min_res} is above the final resolution {final} px ({final_flag}); "
                          f"expected --min-res <= {final}")
    if ramp_start < 0:
        raise MealV2Error(f"--ramp-start {ramp_start}: expected an epoch >= 0")
    if ramp_start > ramp_end:
        raise MealV2Error(f"--ramp-start {ramp_start} is after --ramp-end {ramp_end}; expected "
                          f"0 <= --ramp-start <= --ramp-end <= --epochs {epochs}")
    if ramp_end > epochs:
        raise MealV2Error(f"--ramp-end {ramp_end} is beyond --epochs {epochs}; expected "
                          f"0 <= --ramp-start <= --ramp-end <= --epochs {epochs}")
    return ResSchedule(final, min_res, ramp_start, ramp_end, step)
