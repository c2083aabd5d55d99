"""Tests of the HTTP service (REST, JSON-RPC, events, security, health)."""
