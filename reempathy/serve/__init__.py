"""``reempathy serve``: every strategy behind a realtime speech websocket, with continuous batching.

Where things are decided:

- ``config.py``: the serve config (``[serve]`` limits, the models a session may pick).
- ``scheduler.py``: the one thread that owns the model; rows join and leave the batch at step boundaries.
- ``stream.py``: one response as a row; its tokens cross into the event loop; speech is made off it.
- ``realtime.py``: the OpenAI Realtime events of one websocket session (and the reflection extension).
- ``chat.py``: ``/v1/chat/completions`` and ``/v1/models``.
- ``app.py``: routes, API key, origin check, readiness, the page (``static/``).
- ``server.py``: the shared state (backbone, scheduler, speech parts, limits); ``audio.py``: PCM on the wire.
- ``cli.py``: the command and its uvicorn settings.

Layers: this package uses the runner, config, decoding, backbones and speech; nothing below imports it.
"""
