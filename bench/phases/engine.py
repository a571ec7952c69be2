"""Phase ``engine``: the spyre_backend engine called in-process (no Triton), with the server's settings.
The ``roofline`` phase runs on the same engine, idle, before the load."""

from __future__ import annotations

from pathlib import Path

from bench.loadgen import EngineTarget, closed_loop
from bench.phases import log, loadavg, roofline
from bench.profiles import Profile
from bench.stats import summarize
from bench.workload import Workload
from spyre_backend import MODEL_REPOSITORY


def serving_config(model: str, checkpoint: Path):
    """A Triton model's config.pbtxt parameters (and SPYRE_* overrides, as the server applies them),
    so the in-process engine runs with the server's settings."""
    from spyre_backend.config import ServingConfig

    return ServingConfig.from_pbtxt(MODEL_REPOSITORY / model / "config.pbtxt", checkpoint=str(checkpoint))


def run(prof: Profile, workload: Workload, levels: list[int], machine: dict, with_roofline: bool,
        with_load: bool) -> tuple[dict, dict | None]:
    """The load at each concurrency level (``with_load``), and the roofline phase's result (``with_roofline``)."""
    from spyre_backend.device import plan_for
    from spyre_backend.preprocess.processor import Preprocessor
    from spyre_backend.serving.llm_service import LLMService
    from spyre_backend.vision.encoder import VisionEncoder

    service = LLMService(serving_config("granite_llm", prof.checkpoint))  # warms up like the Triton model
    try:
        pre = Preprocessor(str(prof.checkpoint))
        # no encoder cache here (the Triton model attaches one, where it has one; it is off there too)
        device = serving_config("vision_encoder", prof.checkpoint).device
        encoder = VisionEncoder(str(prof.checkpoint), plan_for(device, str(prof.checkpoint)))
        roof = roofline.run(service, pre, encoder, prof, workload, levels, machine) if with_roofline else None
        results = {}
        if with_load:
            target = EngineTarget(service, pre, encoder, workload)
            closed_loop(target.send, 1, 1)  # warm: also compiles the vision tower for this image size
            service.seal_compiled()  # as the Triton stubs do
            for level in levels:
                log(f"engine in-process: concurrency {level}, {prof.requests(level)} requests")
                records = closed_loop(target.send, prof.requests(level), level)
                results[level] = {**summarize(records), "loadavg": loadavg()}
        return results, roof
    finally:
        service.seal_compiled(False)  # the next checkpoint compiles its own graphs
        service.shutdown()
