"""The web process: REST API, live WebSocket feed and the GUI (run as `python -m web`)."""
