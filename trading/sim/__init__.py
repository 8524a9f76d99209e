"""A local Bitvavo-compatible exchange: REST + WebSocket on one port, driven by the matching engine.

Run `python -m trading.sim --port 0`; see docs/simulator.md for flags, defaults and the fault API.
"""
