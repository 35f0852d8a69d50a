"""/v1/sweeps."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter(prefix="/sweeps", tags=["sweeps"])
