"""How much each checkpoint's run does: requests per concurrency level, new tokens per request."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from spyre_backend import DEFAULT_CHECKPOINT, PROJECT_ROOT

# outside checkpoints/ (which the Docker image copies), in the uncommitted results/ folder
MID_CHECKPOINT = PROJECT_ROOT / "results" / "checkpoints" / "random-mid"


@dataclass(frozen=True)
class Profile:
    """How much to run for one checkpoint. Requests per level: max(min_requests, rounds x level)."""

    checkpoint: Path
    max_tokens: int
    min_requests: int
    rounds: int
    transformers_requests: int
    ensemble_levels: tuple[int, ...] | None  # None: every level
    roofline: bool

    def requests(self, level: int) -> int:
        return max(self.min_requests, self.rounds * level)


PROFILES = {
    # tiny: cheap, so enough requests for stable percentiles
    "tiny": Profile(DEFAULT_CHECKPOINT, max_tokens=64, min_requests=16, rounds=4, transformers_requests=16,
                    ensemble_levels=None, roofline=False),
    # mid: a 1.4k-token image prompt costs seconds of vision and prefill on 2 cores, and decode
    # steps of 16 long sequences are slow: one round per level, 16 new tokens
    "mid": Profile(MID_CHECKPOINT, max_tokens=16, min_requests=3, rounds=1, transformers_requests=2,
                   ensemble_levels=(1,), roofline=True),
}


def profile_for(name: str, args) -> Profile:
    """The checkpoint's profile with the command line's --mid-checkpoint, --quick, --requests and --max-tokens."""
    prof = PROFILES[name]
    if name == "mid":
        prof = replace(prof, checkpoint=args.mid_checkpoint)
    if args.quick:
        prof = replace(prof, min_requests=4, rounds=2, transformers_requests=2)
    if args.requests:
        prof = replace(prof, min_requests=args.requests, rounds=0,
                       transformers_requests=min(prof.transformers_requests, args.requests))
    if args.max_tokens:
        prof = replace(prof, max_tokens=args.max_tokens)
    return prof
