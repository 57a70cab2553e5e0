"""What a run is asked to do: the dataset's particulars and the command-line options.

Kept free of heavy imports so the command line answers fast (usage errors, missing weights).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class DatasetSpec:
    """What is particular to one dataset's entry script."""

    name: str                      # loader name: pacemaker | orthonet | aptos
    title: str                     # for humans
    qwk: bool = False              # APTOS: quadratic weighted kappa
    manufacturer: bool = False     # Pacemaker: manufacturer-level top-1


@dataclass
class RunOptions:
    """Everything a run needs besides the config dict (set from the command line)."""

    model: str
    image_path: str | None
    out: Path
    manifest: str | None = None
    weights: str | None = None
    neurons: str | None = None
    detect_path: str | None = None
    reference_probes: str | None = None
    no_cache: bool = False
    cache_dir: Path | None = None
    strict: bool = False
    demo: bool = False
    command_line: list[str] = field(default_factory=list)
