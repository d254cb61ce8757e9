"""FaceID's REST service: a thin FastAPI layer over the faceid core (see docs/SERVICE.md)."""
