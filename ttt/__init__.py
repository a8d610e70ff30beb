"""Test-time training: long documents become per-session fast weights on a frozen LM.

import ttt
engine = ttt.load_engine()                 # the embedded SmolLM2-135M-Instruct
session = engine.create_session()
session.ingest(open("book.txt").read())    # score-then-train, chunk by chunk
print(session.generate([{"role": "user", "content": "Who is the hero?"}]).text)
session.save("sessions/alice")
same = engine.load_session("sessions/alice")
"""

from .answers import Generation
from .config import FastWeightConfig, IngestConfig, SessionConfig
from .engine import Engine, load_engine
from .generate import SamplingParams, TokenStream
from .ingest import ChunkReport
from .session import Session

__all__ = [
    "ChunkReport",
    "Engine",
    "FastWeightConfig",
    "Generation",
    "IngestConfig",
    "SamplingParams",
    "Session",
    "SessionConfig",
    "TokenStream",
    "load_engine",
]
