"""What an agent left retained on its broker, remembered across restarts.

A reload empties the retained topics its new config no longer uses (`Agent.retract_retained`);
a restart knows only the new config, and Home Assistant would keep the old device, dead, beside
the new one. So the topics an agent keeps retained (discovery, state, stats) are written to a file
in the state directory systemd gives the service (`$STATE_DIRECTORY`, /var/lib/emotion-agent),
one file per config file (and `--topic-prefix`), and the next start empties what the last one left
there and will not overwrite itself. A record written on another host (an SD card image cloned
to a second device) or for another broker is not acted on: those topics may be another agent's.
Without a state directory nothing is remembered.

Topics handed out for emptying stay in the record until a run ends with everything delivered
(`settled`): a crash or an unreachable broker means they are emptied again at the next start.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
from pathlib import Path

from agent.topics import publishable

logger = logging.getLogger(__name__)


def record_path(state_directory: str | None, config_path: str | None, topic_prefix: str | None = None) -> Path | None:
    """Where the record of the agent started with `config_path` (and `--topic-prefix`, which tells
    two agents with one config apart) lives, or None without a state directory. systemd separates
    several state directories with colons; the first is the service's own."""
    first = (state_directory or "").split(":")[0]
    if not first:
        return None
    key = json.dumps([os.path.abspath(config_path) if config_path else None, topic_prefix])
    return Path(first) / f"retained-{hashlib.sha256(key.encode('utf-8', 'surrogateescape')).hexdigest()[:16]}.json"


class RetainedRecord:
    """The record file at `path` (None: remembers nothing). Problems with the file are warnings:
    the agent runs on without it."""

    def __init__(self, path: Path | None):
        self._path = path
        self._broker: str | None = None
        self._current: set[str] = set()  # what the running agent keeps retained
        self._warned = False

    def _load(self) -> tuple[str, str, set[str]] | None:
        try:
            data = json.loads(self._path.read_text(encoding="utf-8"))
            host, broker, topics = data["host"], data["broker"], data["topics"]
            if not (isinstance(host, str) and isinstance(broker, str) and isinstance(topics, list)
                    and all(isinstance(t, str) for t in topics)):
                raise ValueError("unexpected contents")
            # A topic no publish can take (edited by hand, or a damaged file) is skipped: handed
            # on, it failed every start, as the record keeps what it hands out.
            usable = {t for t in topics if publishable(t)}
            if len(usable) < len(topics):
                logger.warning("%s: skipping %d topic(s) that cannot be published to", self._path,
                               len(topics) - len(usable))
            return host, broker, usable
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            logger.warning("%s: cannot use the record of retained topics (%s); starting a new one",
                           self._path, getattr(exc, "strerror", None) or exc)
            return None

    def _save(self, broker: str, topics: set[str]) -> None:
        temporary = self._path.with_suffix(".tmp")
        try:
            record = {"host": socket.gethostname(), "broker": broker, "topics": sorted(topics)}
            temporary.write_text(json.dumps(record), encoding="utf-8")
            os.replace(temporary, self._path)  # never a half-written record
        except OSError as exc:
            if not self._warned:  # once: it is retried at every reload and stop
                logger.warning("%s: cannot save the record of retained topics: %s", self._path,
                               exc.strerror or exc)
                self._warned = True

    def begin(self, broker: str, topics: set[str]) -> set[str]:
        """Records `topics` as kept retained on `broker`; returns those the record held for that
        broker which `topics` do not cover: the caller empties them. They stay recorded until
        `settled`."""
        if self._path is None:
            return set()
        stale = set()
        if (previous := self._load()) is not None:
            written_on, written_for, recorded = previous
            if written_on != socket.gethostname():
                logger.info("%s was written on host %s: its topics are left alone", self._path, written_on)
            elif written_for == broker:
                stale = recorded - topics
        self._broker, self._current = broker, set(topics)
        self._save(broker, topics | stale)
        return stale

    def settled(self) -> None:
        """Everything was delivered: the emptied topics need not be remembered."""
        if self._path is not None and self._broker is not None:
            self._save(self._broker, self._current)
