"""``fedvlm-edge train`` / ``join``: the flags that say which of ``--data`` a device trains on, and the loading.

A device may hold its own files, or read shared shards (all of RLAIF-V, say) and take its
own non-IID share of them (``--share K/N --partition ...``, the split ``fedvlm simulate``
draws for the same ``--data-seed``); only the rows it keeps have their images read.
"""

from __future__ import annotations

import argparse
import sys

from fedvlm.shared.usage_error import UsageError


def add_data_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-examples", type=int, metavar="N",
                        help="train on at most N records of --data, drawn with --data-seed (default: all)")
    parser.add_argument("--share", metavar="K/N", help="take share K (0 to N-1) of --data split into N clients by "
                        "--partition, as `fedvlm simulate` splits it (default: all of --data)")
    parser.add_argument("--partition", default="origin_dataset", help="how --share splits --data: origin_dataset, "
                        "model, feedback_model, type, iid or dirichlet:ALPHA[:KEY] (default: origin_dataset)")
    parser.add_argument("--data-seed", type=int, default=0, help="seed of --max-examples and --share (default: 0)")
    parser.add_argument("--skip-bad", action="store_true",
                        help="skip bad records (unreadable image, empty chosen, missing rejected under DPO, set by "
                             "--objective or, for join, by the hub; broken origin_split) and count them per reason, "
                             "instead of failing at the first")


def load_device_records(args: argparse.Namespace):
    """The records ``--data`` and the data flags select (a :class:`~fedvlm.edge.data.LoadedRecords`)."""
    from fedvlm.edge.data import PartitionSpec, load_client_share, load_records

    if args.max_examples is not None and args.max_examples < 1:
        raise UsageError(f"--max-examples must be at least 1, got {args.max_examples}")
    # Preference objectives train on (chosen, rejected): a row without ``rejected`` is bad for them.
    require_rejected = getattr(args, "objective", "sft") == "dpo"
    if args.share is None:
        loaded = load_records(args.data, skip_bad=args.skip_bad, require_rejected=require_rejected,
                              max_examples=args.max_examples, seed=args.data_seed)
    else:
        client, clients = _parse_share(args.share)
        loaded = load_client_share(args.data, client, clients, PartitionSpec.parse(args.partition),
                                   seed=args.data_seed, max_per_client=args.max_examples, skip_bad=args.skip_bad,
                                   require_rejected=require_rejected)
    if loaded.skipped:
        reasons = ", ".join(f"{count} {reason}" for reason, count in loaded.skipped_by_reason.items())
        print(f"skipped {loaded.skipped} bad record(s) of --data (--skip-bad): {reasons}", file=sys.stderr)
    return loaded


def _parse_share(text: str) -> tuple[int, int]:
    client, slash, clients = text.partition("/")
    try:
        k, n = int(client), int(clients)
    except ValueError:
        raise UsageError(f"bad --share {text!r}: write K/N, e.g. 2/8 for the third of eight clients' shares") from None
    if not slash or n < 2 or not 0 <= k < n:
        raise UsageError(f"bad --share {text!r}: write K/N with N at least 2 and K from 0 to N-1")
    return k, n
