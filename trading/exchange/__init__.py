"""Bitvavo protocol: signing, REST client, asyncio WebSocket client, rate governor, errors."""
