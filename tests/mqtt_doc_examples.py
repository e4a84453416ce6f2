"""The example payloads of docs/mqtt.md, made by the real code: one face at 10 frames/s, neutral
for 1.5 s, then smiling for 3 s, then gone, through the real face tracker and smoother (default
settings) and the payload builders, in the order the agent's loop calls them.

`tests/test_payloads.py` checks that the docs show exactly these payloads, values included.
After changing the smoothing defaults or a payload, rewrite the docs' examples with

    python tests/mqtt_doc_examples.py --write
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agent import payloads  # noqa: E402
from agent.events import EmotionChanged, FaceAppeared, FaceLost  # noqa: E402
from agent.faces import FaceStateTracker  # noqa: E402
from agent.types import EMOTION_LABELS, Box, Detection, EmotionScores, FaceObservation  # noqa: E402

DOC = ROOT / "docs" / "mqtt.md"
WALL_START = dt.datetime(2026, 1, 1, 8, 0, tzinfo=dt.timezone.utc).timestamp()
FRAME_S = 0.1
NEUTRAL_UNTIL, SMILE_UNTIL, END = 1.5, 4.5, 6.1
BOX = Box(212.3, 96.4, 118.0, 118.2)
# Example markers whose payloads this scenario does not make (numbers measured at run time).
NOT_GENERATED = {"stats"}


def _scores(**named: float) -> EmotionScores:
    rest = (1 - sum(named.values())) / (len(EMOTION_LABELS) - len(named))
    return EmotionScores(tuple(named.get(label, rest) for label in EMOTION_LABELS))


NEUTRAL = _scores(neutral=0.78)
SMILE = _scores(happy=0.8, neutral=0.08)


def scenario_payloads() -> dict[str, dict]:
    """Marker name -> payload, for every example the docs show."""
    tracker = FaceStateTracker()
    window = payloads.SummaryWindow(started=0.0)
    examples: dict[str, dict] = {}
    last_key = None
    steps = round(END / FRAME_S)
    for step in range(steps + 1):
        now = round(step * FRAME_S, 3)
        scores = NEUTRAL if now < NEUTRAL_UNTIL else SMILE
        seen = [FaceObservation(Detection(BOX, 0.9), scores)] if now < SMILE_UNTIL else []
        faces, events = tracker.update(now, seen)
        window.add_frame(now, faces, events)
        wall = WALL_START + now
        for event in events:
            payload = payloads.event_payload(event, wall)
            if isinstance(event, FaceAppeared):
                examples["face_appeared"] = payload
            elif isinstance(event, EmotionChanged):
                examples["emotion_changed" if event.previous else "emotion_changed_first"] = payload
            elif isinstance(event, FaceLost):
                examples["face_lost"] = payload
        key = payloads.state_key(faces)
        if key != last_key:
            state = payloads.state_payload(faces, wall)
            examples["state" if faces else "state_empty"] = state
            last_key = key
    examples["summary"] = window.payload(now, [], WALL_START + now)
    examples["state_paused"] = payloads.paused_state_payload(WALL_START + 60)  # switched off a minute in
    return examples


def _compact_numbers(text: str) -> str:
    return re.sub(r"\[([^\[\]]*)\]", lambda m: "[" + ", ".join(p.strip() for p in m.group(1).split(",")) + "]"
                  if re.fullmatch(r"[-\d.,\s]+", m.group(1)) else m.group(0), text)


def render(payload: dict) -> str:
    return _compact_numbers(json.dumps(payload, indent=2, ensure_ascii=False))


def rewrite_docs(text: str, examples: dict[str, dict]) -> str:
    def replace(match: re.Match) -> str:
        name = match.group(1)
        if name not in examples:
            return match.group(0)
        return f"<!-- example: {name} -->\n```json\n{render(examples[name])}\n```"
    return re.sub(r"<!-- example: (\S+) -->\s*```json\n.*?```", replace, text, flags=re.S)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="rewrite the examples in docs/mqtt.md")
    args = parser.parse_args(argv)
    examples = scenario_payloads()
    if args.write:
        DOC.write_text(rewrite_docs(DOC.read_text(encoding="utf-8"), examples), encoding="utf-8")
        print(f"rewrote {len(examples)} examples in {DOC}")
    else:
        for name, payload in examples.items():
            print(f"--- {name}\n{render(payload)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
