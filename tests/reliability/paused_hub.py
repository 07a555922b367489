"""``fedvlm-hub`` that freezes at one checkpoint of a round, so a fault test can SIGKILL it
at exactly that point: ``python paused_hub.py POINT start --federation ...``.

POINT is one of ``HubService``'s checkpoints (``aggregating``, ``publishing``); the hub
prints ``paused at POINT`` when it gets there and then never moves again.
"""

from __future__ import annotations

import sys
import time

from fedvlm.hub import cli, service


def freeze_at(point: str):
    def on_checkpoint(reached: str) -> None:
        if reached == point:
            print(f"paused at {point}", flush=True)
            while True:
                time.sleep(3600)

    return on_checkpoint


def main(argv: list[str]) -> int:
    point, hub_argv = argv[0], argv[1:]

    class PausingHubService(service.HubService):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, on_checkpoint=freeze_at(point), **kwargs)

    service.HubService = PausingHubService  # what `fedvlm-hub start` builds
    return cli.main(hub_argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
