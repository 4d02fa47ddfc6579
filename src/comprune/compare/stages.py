"""Recovery stages as rows of a comparison: `METHOD+tune`, `METHOD+distill` (a method or a preset, then the
stages that run after its prune, in order), each pruned with the stages' flags of `comprune prune`."""
from __future__ import annotations

STAGE_FLAGS = {"tune": ["--tune"], "distill": ["--recover", "distill"]}
ROWS = ("comp+tune", "comp-search+tune", "comp-search+distill")


def split_row(name: str) -> tuple[str, list[str]]:
    """(the method or preset, the recovery stages) of a row name."""
    base, *stages = name.split("+")
    return base, stages


def unknown_stages(name: str) -> list[str]:
    return [s for s in split_row(name)[1] if s not in STAGE_FLAGS]


def stage_flags(name: str) -> list[str]:
    return [flag for s in split_row(name)[1] for flag in STAGE_FLAGS[s]]
