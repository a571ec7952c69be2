"""A tiny, trained Granite Vision (LLaVA-Next) checkpoint built from synthetic data.

`synthetic` draws the images and writes the questions/answers; `build_checkpoint` builds the
tokenizer, processor and model, trains it and saves it in the published granite-vision layout.
"""
