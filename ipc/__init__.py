"""What the daemon's processes agree on: config, states, messages, job store, control socket.

Nothing here imports supervisor.py, workers/, web/, gevent or bottle.
"""
