"""The wire protocol's version number.

One number covers the topic root (``fedvlm/v1/...``), the chunk header, the signed
envelope and the control messages, so a client and a hub either speak the same protocol
or find out at the first byte. Bump it only for a change an older peer would misread;
adding an optional JSON field is not such a change (readers ignore unknown fields).
"""

from __future__ import annotations

PROTOCOL_VERSION = 1
