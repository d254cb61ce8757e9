"""FaceID: train face verification on your own photos and serve it."""

__version__ = "0.1.0"
