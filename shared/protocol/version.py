"""The wire protocol's version numbers.

``PROTOCOL_VERSION`` covers the chunk header, the signed envelope and the control
messages, so a client and a hub either speak the same protocol or find out at the first
byte (``unsupported_version``). Bump it only for a change an older peer would misread;
adding an optional JSON field is not such a change (readers ignore unknown fields).

``TOPIC_TREE_VERSION`` is the ``v1`` in ``fedvlm/v1/...``. It changes only when the topic
tree does: while it stays, peers of different protocol versions still meet on the same
topics, and the older one is told to upgrade instead of hearing nothing.

History:

- 1: the first protocol.
- 2: the envelope's MAC is HMAC-SHA256 over the SHA-256 of the signed part, and chunks
  before the last may leave the payload digest zero, so a sender hashes and publishes
  in one pass and the first chunk leaves before the last byte is hashed.
- 3: the hub state no longer lists the selected clients (it carries ``selected_count``);
  each selected device learns it was picked from its own retained ``Selection`` message
  on ``clients/<id>/selection``, so a round's control traffic stays O(1) per device and
  there is no limit on how many devices a round selects. An ``Ack`` refusing an update
  for load (``overloaded``) says when to retry (``retry_after_s``).
"""

from __future__ import annotations

PROTOCOL_VERSION = 3
TOPIC_TREE_VERSION = 1
