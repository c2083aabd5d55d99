"""The HTTP service: REST, JSON-RPC 2.0, live events, health and metrics over one Conveyor app.

``create_app(app)`` returns a FastAPI application; ``conveyor serve`` runs it under uvicorn.
Needs the ``server`` extra (``pip install 'conveyor[server]'``).
"""

from __future__ import annotations

from conveyor.service.app import create_app
from conveyor.service.operations import OPERATIONS, ServiceSettings

__all__ = ["OPERATIONS", "ServiceSettings", "create_app"]
