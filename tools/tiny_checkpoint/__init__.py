"""A tiny, trained Granite Vision (LLaVA-Next) checkpoint built from synthetic data, and random
real-size ones.

    python -m tools.tiny_checkpoint --out DIR                                  # trained, tiny
    python -m tools.tiny_checkpoint.random_checkpoint [--preset NAME] --out DIR   # random weights

`synthetic` draws the images and writes the questions/answers; `tokenizer` and `model` define the
tokenizer, processor and shapes; `batches` tokenizes conversations as served; `train` trains,
`verify` evaluates and checks the saved folder, `save` writes it in the published granite-vision
layout with its README; `cli` runs the whole build; `random_checkpoint` builds untrained ones.
"""
