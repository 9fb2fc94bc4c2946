"""rtgate edge gateway: WebSocket termination, auth, rooms, fan-out."""
