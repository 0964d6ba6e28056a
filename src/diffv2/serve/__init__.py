"""``diffv2 serve``: an OpenAI-compatible HTTP server with continuous batching on the fast decode path.

Layers: :mod:`.scheduler` (continuous batching over :class:`~diffv2.generate.RowDecoder`, one thread owning the
model), :mod:`diffv2.generate.text` (tokenizers, chat prompts, incremental detokenization and stop strings, shared with
``diffv2 generate``), :mod:`.protocol`
(the request bodies), :mod:`.outputs` (response bodies), :mod:`.metrics` (Prometheus), :mod:`.app` (FastAPI),
:mod:`.runner` (uvicorn). Needs the ``serve`` extra (fastapi, uvicorn, pydantic, prometheus-client).
"""

from ..generate.text import TextCodec, TextStream, plain_chat_text
from .app import create_app
from .metrics import ServerMetrics
from .runner import BackgroundServer, bind_socket, run_forever
from .scheduler import QueueFull, Scheduler, SchedulerDown
from .sequence import SamplingParams, SchedulerEvent, Sequence, TokenInfo

__all__ = [
    "BackgroundServer",
    "QueueFull",
    "SamplingParams",
    "Scheduler",
    "SchedulerDown",
    "SchedulerEvent",
    "Sequence",
    "ServerMetrics",
    "TextCodec",
    "TextStream",
    "TokenInfo",
    "bind_socket",
    "create_app",
    "plain_chat_text",
    "run_forever",
]
