"""The FastAPI facade: REST under ``/v1``, SSE job progress; talks to Temporal with the client."""
