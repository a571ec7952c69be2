"""The vision encoder's serving side: crops in static tower batches, features cached per image.

What the tower is and how an image's features are packed is the architecture's, in ``spyre_backend.models``.
"""
