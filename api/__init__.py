"""The REST API (FastAPI). Routes validate, call a service function and return a schema."""
