"""Record one routing trace over several questions: one Engine, one RoutingTrace (token_idx continues).

    python bench/record_trace.py MODEL_DIR TRACE.jsonl MAX_TOKENS [CHATS.jsonl]

With CHATS.jsonl (lines of {"messages": [user, ...]}), its user questions replace the built-in ones.
    mixtral-chat bench cache --trace TRACE.jsonl --experts-per-layer 2..7 --policy all
"""

from __future__ import annotations

import json
import sys

import torch

from mixtral_chat.engine.offload import RoutingTrace
from mixtral_chat.engine.options import GenerationConfig, LoadOptions
from mixtral_chat.engine.runtime import Engine

QUESTIONS = [
    "What is a lighthouse?",
    "What is a volcano?",
    "Use 'ephemeral' in a sentence.",
    "What does 'benevolent' mean?",
    "What is a violin?",
    "Define 'harbor'.",
    "What is photosynthesis?",
    "Use 'reluctant' in a sentence.",
    "What is a glacier?",
    "What does 'meticulous' mean?",
    "What is a carpenter?",
    "Use 'abundant' in a sentence.",
]

torch.set_num_threads(1)
model_dir, out_path, max_tokens = sys.argv[1], sys.argv[2], int(sys.argv[3])
if len(sys.argv) > 4:
    with open(sys.argv[4], encoding="utf-8") as chats:
        QUESTIONS = [json.loads(line)["messages"][0]["content"] for line in chats]
engine = Engine.load(model_dir, LoadOptions(device="cpu", dtype="float32"))
with open(out_path, "w", encoding="utf-8") as out:
    trace = RoutingTrace(engine.model, out)
    for question in QUESTIONS:
        stream = engine.chat([{"role": "user", "content": question}], GenerationConfig(max_tokens=max_tokens))
        answer = "".join(stream)
        stats = stream.stats
        print(f"{question!r} -> {answer!r} ({stats.completion_tokens} tokens, {stats.finish_reason})")
print(f"{trace.token_idx} decode tokens traced")
