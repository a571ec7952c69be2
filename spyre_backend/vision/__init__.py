"""The vision side: SigLIP tower + multi-layer projector, anyres packing with image_newline."""
