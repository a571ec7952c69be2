"""Phase ``transformers``: HF ``generate()`` one request at a time, the baseline everything is compared to."""

from __future__ import annotations

from bench.phases import loadavg
from bench.profiles import Profile
from bench.stats import summarize
from bench.workload import Workload


def run(prof: Profile, workload: Workload) -> dict:
    import torch

    from bench.baselines import TransformersBaseline
    from spyre_backend.device.process import TORCH_DEFAULT_THREADS

    torch.set_num_threads(TORCH_DEFAULT_THREADS)  # every core, whatever an earlier phase set
    baseline = TransformersBaseline(str(prof.checkpoint))
    baseline.run(workload, -1)  # warm: first-call costs are not what is compared
    records = [baseline.run(workload, i) for i in range(prof.transformers_requests)]
    return {**summarize(records), "loadavg": loadavg()}
