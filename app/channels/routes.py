"""Placeholder router; issue 3 fills it in."""

from fastapi import APIRouter

router = APIRouter(tags=["channels"])
