"""A site process for the crash test: runs the real ClientApp train handler for some rounds.

    python tests/privacy_site_worker.py WORK_DIR ROUND [ROUND ...]

Each round trains the weights in ``WORK_DIR/global.safetensors`` (written by the test, then by
this process after every round it completes) and prints ``round N done`` or ``round N declined``.
The site's node config puts its ledger in ``WORK_DIR/site``; the run config comes from
``WORK_DIR/run_config.json``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from clients import app as client_app
from fedgov import messages
from fedgov.records import load_safetensors, save_safetensors


def main() -> None:
    work = Path(sys.argv[1])
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 7
    run_config = json.loads((work / "run_config.json").read_text())
    node_config = {
        "partition-id": 0,
        "num-partitions": 3,
        "site-dir": str(work / "site"),
        "epsilon-cap": 1000.0,
    }
    context = Context(
        run_id=77, node_id=7, node_config=node_config, state=RecordDict(), run_config=run_config
    )
    for server_round in map(int, sys.argv[2:]):
        weights = load_safetensors(work / "global.safetensors")
        arrays = ArrayRecord({name: torch.from_numpy(array) for name, array in weights.items()})
        content = RecordDict(
            {"config": ConfigRecord({"server-round": server_round}), "arrays": arrays}
        )
        message = Message(content, dst_node_id=7, message_type=MessageType.TRAIN)
        message.metadata.__dict__["_message_id"] = f"m-{server_round}"
        print(f"round {server_round} training", flush=True)
        reply = client_app.train(message, context)
        if messages.decline_reason(reply) is not None:
            print(f"round {server_round} declined", flush=True)
            continue
        save_safetensors(work / "global.safetensors", reply.content.array_records["arrays"])
        print(f"round {server_round} done", flush=True)


if __name__ == "__main__":
    main()
