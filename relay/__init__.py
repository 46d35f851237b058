"""Relay for the Backpack.tf events feed.

Backpack.tf allows one websocket connection per IP address. The relay holds that
connection and forwards every frame, byte for byte, to any number of local
websocket clients.
"""

__version__ = "0.1.0"
