"""The generated part of each ``config.pbtxt``: its ``input``/``output`` blocks and, for the ensemble,
its steps' maps, all from ``schema``.

    python -m spyre_backend.protocol.pbtxt --write   # rewrite the generated parts
    python -m spyre_backend.protocol.pbtxt --check   # exit 1 if a config.pbtxt differs from the schema

The part lies between the ``BEGIN`` and ``END`` comments; the rest of a file (name, backend,
instance_group, parameters that differ from config.py's defaults...) is written by hand.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from spyre_backend import MODEL_REPOSITORY
from spyre_backend.config import EngineLimits
from spyre_backend.protocol.schema import ENSEMBLE, ENSEMBLE_STEPS, MODELS, Tensor

BEGIN = "# generated from spyre_backend/protocol: python -m spyre_backend.protocol.pbtxt --write"
END = "# end of the generated part"


def entry(tensor: Tensor) -> str:
    data_type = "TYPE_STRING" if tensor.data_type == "BYTES" else f"TYPE_{tensor.data_type}"
    optional = " optional: true" if tensor.optional else ""
    return f'{{ name: "{tensor.name}" data_type: {data_type} dims: [ {", ".join(map(str, tensor.dims))} ]{optional} }}'


def tensor_block(section: str, tensors: list[Tensor]) -> list[str]:
    return [f"{section} [", ",\n".join(f"  {entry(t)}" for t in tensors), "]"]


def ensemble_steps() -> list[str]:
    """Each step reads an ensemble input by its own name and an earlier step's output by the name
    with a leading "_"; it writes an ensemble output by its own name, anything else with the "_"."""
    given = {t.name for t in MODELS[ENSEMBLE].inputs}
    final = {t.name for t in MODELS[ENSEMBLE].outputs}
    made: set[str] = set()
    steps = []
    for model in ENSEMBLE_STEPS:
        maps = []
        for t in MODELS[model].inputs:
            if t.name in given or t.name in made:
                source = t.name if t.name in given else f"_{t.name}"
                maps.append(f'      input_map {{ key: "{t.name}" value: "{source}" }}')
            elif not t.optional:
                raise ValueError(f"ensemble step {model}: neither an ensemble input nor an earlier step gives {t.name!r}")
        for t in MODELS[model].outputs:
            target = t.name if t.name in final else f"_{t.name}"
            made.add(t.name)
            maps.append(f'      output_map {{ key: "{t.name}" value: "{target}" }}')
        steps.append("\n".join(["    {", f'      model_name: "{model}"', "      model_version: -1", *maps, "    }"]))
    return ["ensemble_scheduling {", "  step [", ",\n".join(steps), "  ]", "}"]


def sequence_batching() -> list[str]:
    """granite_llm's sequences: Triton keeps as many as the engine keeps sessions, idle as long."""
    limits = EngineLimits()
    return ["sequence_batching {", f"  oldest {{ max_candidate_sequences: {limits.max_sessions} }}",
            f"  max_sequence_idle_microseconds: {limits.session_ttl_s * 10**6}", "}"]


def generated(model: str) -> str:
    lines = sequence_batching() if model == "granite_llm" else []
    lines += tensor_block("input", MODELS[model].inputs) + tensor_block("output", MODELS[model].outputs)
    if model == ENSEMBLE:
        lines += ensemble_steps()
    return "\n".join([BEGIN, *lines, END])


def rewritten(text: str, model: str) -> str:
    """``text`` (a config.pbtxt) with its generated part made anew."""
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        raise ValueError(f"{model}/config.pbtxt has no generated part (a {BEGIN!r} line ... a {END!r} line)")
    return text[:start] + generated(model) + text[end + len(END):]


def config_path(model: str, repository: Path = MODEL_REPOSITORY) -> Path:
    return repository / model / "config.pbtxt"


def stale(repository: Path = MODEL_REPOSITORY) -> list[str]:
    """The models whose config.pbtxt differs from the schema."""
    return [m for m in MODELS if (text := config_path(m, repository).read_text()) != rewritten(text, m)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--write", action="store_true", help="rewrite the generated parts")
    action.add_argument("--check", action="store_true", help="exit 1 if a config.pbtxt differs from the schema")
    args = parser.parse_args(argv)
    for model in stale():
        path = config_path(model)
        if args.write:
            path.write_text(rewritten(path.read_text(), model))
        print(f"{'rewrote' if args.write else 'differs from the schema:'} {path}")
    return 1 if args.check and stale() else 0


if __name__ == "__main__":
    sys.exit(main())
