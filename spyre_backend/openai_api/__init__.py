"""The OpenAI-compatible front: a FastAPI process beside tritonserver that talks to granite_vision over gRPC."""
