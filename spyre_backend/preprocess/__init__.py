"""Request preprocessing: image decoding, chat template, tokenization, ``<image>`` expansion."""
