"""Stable ids for face boxes across frames. Pure: fed with (now, boxes), no clock, no images.

Each track remembers its last box and a constant-velocity estimate of its centre. A frame's boxes
are matched to the tracks' *predicted* boxes by a minimum-cost assignment (overlap plus centre
distance), so two faces that cross keep their ids: where they meet, each prediction already points
past the other face. A track unseen for up to `max_gap_s` keeps its id (an occlusion, a missed
detection); after that it is lost, and a face coming back gets a new id.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Sequence

from agent.config import TrackingConfig
from agent.types import Box

# A pair that may not be matched costs this much: the assignment first maximises the number of
# allowed matches, then minimises their total cost.
_FORBIDDEN = 1e6
# The centre-distance gate grows by this many face sizes per second unseen (up to twice its base).
_REACH_PER_S = 2.0


@dataclass(frozen=True, slots=True)
class TrackingStep:
    """What one frame did to the tracks."""

    ids: tuple[int, ...]       # the track id of each box, in the order the boxes were given
    new: tuple[int, ...]       # ids first seen in this frame
    coasting: tuple[int, ...]  # open tracks not seen in this frame (unseen for at most max_gap_s)
    lost: tuple[int, ...]      # tracks unseen for more than max_gap_s, dropped in this frame


@dataclass(slots=True)
class _Track:
    track_id: int
    box: Box
    last_seen: float
    velocity: tuple[float, float] | None = None  # centre velocity, pixels per second; None until seen twice

    def predicted(self, now: float, horizon_s: float) -> Box:
        if self.velocity is None:
            return self.box
        dt = min(max(0.0, now - self.last_seen), horizon_s)
        return replace(self.box, x=self.box.x + self.velocity[0] * dt, y=self.box.y + self.velocity[1] * dt)


def center_distance(a: Box, b: Box) -> float:
    """Distance between the centres, in units of the boxes' mean size (sqrt of area)."""
    (ax, ay), (bx, by) = a.center, b.center
    size = (math.sqrt(a.area) + math.sqrt(b.area)) / 2
    return math.hypot(ax - bx, ay - by) / size if size > 0 else math.inf


def min_cost_assignment(cost: Sequence[Sequence[float]]) -> list[tuple[int, int]]:
    """The (row, column) pairs of a minimum-cost assignment of a rectangular matrix (Hungarian method).

    Every row is assigned when rows <= columns, every column otherwise. O(n^2 m): fine for the
    handful to few dozen faces of a frame, and no scipy on the device.
    """
    rows = [list(map(float, r)) for r in cost]
    if not rows or not rows[0]:
        return []
    transposed = len(rows) > len(rows[0])
    if transposed:
        rows = [list(c) for c in zip(*rows)]
    n, m = len(rows), len(rows[0])
    inf = math.inf
    # Potentials u (rows) and v (columns); p[j] is the row assigned to column j (1-based, 0 = none).
    u, v, p, way = [0.0] * (n + 1), [0.0] * (m + 1), [0] * (m + 1), [0] * (m + 1)
    for i in range(1, n + 1):
        p[0], j0 = i, 0
        minv, used = [inf] * (m + 1), [False] * (m + 1)
        while True:
            used[j0] = True
            i0, delta, j1 = p[j0], inf, 0
            row = rows[i0 - 1]
            for j in range(1, m + 1):
                if not used[j]:
                    cur = row[j - 1] - u[i0] - v[j]
                    if cur < minv[j]:
                        minv[j], way[j] = cur, j0
                    if minv[j] < delta:
                        delta, j1 = minv[j], j
            for j in range(m + 1):
                if used[j]:
                    u[p[j]] += delta
                    v[j] -= delta
                else:
                    minv[j] -= delta
            j0 = j1
            if p[j0] == 0:
                break
        while j0:  # flip the augmenting path
            j1 = way[j0]
            p[j0] = p[j1]
            j0 = j1
    pairs = [(p[j] - 1, j - 1) for j in range(1, m + 1) if p[j]]
    if transposed:
        pairs = [(c, r) for r, c in pairs]
    return sorted(pairs)


class BoxTracker:
    """Assigns a stable id to each face box, frame after frame."""

    def __init__(self, settings: TrackingConfig = TrackingConfig(), *, max_center_distance: float = 0.5,
                 max_size_ratio: float = 1.4, velocity_window_s: float = 0.25, first_id: int = 1):
        """
        settings: the config's `tracking` section. Its max_gap_s: a track unseen for longer than this
            is lost. Its min_iou: a box matches a track if it overlaps the track's predicted box at
            least this much...
        max_center_distance: ...or if their centres are this close, in box sizes (detector jitter on small faces;
            more for a track unseen for a while, up to twice this).
        max_size_ratio: ...and if its size (sqrt of area) is within this factor of the track's, allowing
            twice that per second unseen. Between two frames a face hardly changes size; a box 1.5x
            larger or smaller at the same place is another face (a scene cut, someone passing in front).
        velocity_window_s: time constant of the velocity estimate's moving average.
        first_id: the id of the first new track (a reloaded pipeline goes on from the last one's next_id).
        """
        self.max_gap_s = settings.max_gap_s
        self.min_iou = settings.min_iou
        self.max_center_distance = max_center_distance
        self.max_size_ratio = max_size_ratio
        self.velocity_window_s = velocity_window_s
        self._tracks: dict[int, _Track] = {}
        self._next_id = first_id
        self._last_update: float | None = None

    @property
    def next_id(self) -> int:
        """The id the next new track gets."""
        return self._next_id

    @property
    def open_ids(self) -> tuple[int, ...]:
        return tuple(self._tracks)

    def update(self, now: float, boxes: Sequence[Box]) -> TrackingStep:
        # A track unseen for longer than the gap is lost if a frame came and went without it. One
        # seen in the previous frame is not: at a frame rate slower than the gap (camera.max_fps: 1,
        # a snapshot URL) it gets this frame to be matched in, and is lost only if it misses it.
        previous = self._last_update
        overdue = [t for t in self._tracks.values() if now - t.last_seen > self.max_gap_s]
        lost = [t.track_id for t in overdue if previous is None or t.last_seen < previous]
        for track_id in lost:
            del self._tracks[track_id]
        self._last_update = now
        tracks = list(self._tracks.values())
        ids: list[int | None] = [None] * len(boxes)
        for ti, bi in self._match(now, tracks, boxes):
            ids[bi] = tracks[ti].track_id
            self._observe(tracks[ti], now, boxes[bi])
        for track in overdue:
            if track.track_id in self._tracks and track.last_seen < now:
                del self._tracks[track.track_id]
                lost.append(track.track_id)
        new = []
        for bi, box in enumerate(boxes):
            if ids[bi] is None:
                track = _Track(self._next_id, box, now)
                self._next_id += 1
                self._tracks[track.track_id] = track
                ids[bi] = track.track_id
                new.append(track.track_id)
        seen = set(ids)
        coasting = tuple(t for t in self._tracks if t not in seen)
        return TrackingStep(ids=tuple(ids), new=tuple(new), coasting=coasting, lost=tuple(lost))

    def expire(self, now: float, unseen_s: float | None = None) -> tuple[int, ...]:
        """Drops every track unseen for longer than `unseen_s` (the gap) at `now`, with no frame to
        match it in (the camera is gone); returns their ids. `update` would give each one more frame."""
        limit = self.max_gap_s if unseen_s is None else unseen_s
        lost = tuple(t.track_id for t in self._tracks.values() if now - t.last_seen > limit)
        for track_id in lost:
            del self._tracks[track_id]
        return lost

    def close(self) -> tuple[int, ...]:
        """Drops every open track; returns their ids."""
        ids = tuple(self._tracks)
        self._tracks.clear()
        return ids

    def _match(self, now: float, tracks: list[_Track], boxes: Sequence[Box]) -> list[tuple[int, int]]:
        if not tracks or not boxes:
            return []
        cost = []
        for track in tracks:
            predicted = track.predicted(now, self.max_gap_s)
            # A prediction is less sure the longer the track has gone unseen: where two tracks want the
            # same box (one face hidden behind the other), the one seen last gets it.
            unseen = max(0.0, now - track.last_seen)
            staleness = min(1.0, unseen / self.max_gap_s) if self.max_gap_s > 0 else 0.0
            max_ratio = self.max_size_ratio * 2.0 ** min(unseen, self.max_gap_s)
            # How far a face may have gone since: further at a low frame rate, but never more than a
            # face size (people stand closer than that in a crowd).
            max_distance = min(self.max_center_distance + _REACH_PER_S * unseen, 2 * self.max_center_distance)
            # Matched against both the predicted and the last box: the prediction follows a steady walk
            # (and keeps crossing faces apart), the last box holds when the velocity is only jitter.
            references = (predicted, track.box) if predicted != track.box else (predicted,)
            row = []
            for box in boxes:
                costs = [self._cost(ref, box, max_ratio, max_distance) for ref in references]
                row.append(min(costs) + staleness if min(costs) < _FORBIDDEN else _FORBIDDEN)
            cost.append(row)
        return [(ti, bi) for ti, bi in min_cost_assignment(cost) if cost[ti][bi] < _FORBIDDEN]

    def _cost(self, reference: Box, box: Box, max_ratio: float, max_distance: float) -> float:
        iou = reference.iou(box)
        dist = center_distance(reference, box)
        if (iou >= self.min_iou or dist <= max_distance) and _similar_size(reference, box, max_ratio):
            return (1.0 - iou) + dist
        return _FORBIDDEN

    def _observe(self, track: _Track, now: float, box: Box) -> None:
        dt = now - track.last_seen
        if dt > 0:
            (x0, y0), (x1, y1) = track.box.center, box.center
            measured = ((x1 - x0) / dt, (y1 - y0) / dt)
            if track.velocity is None:
                track.velocity = measured  # a fast walker must be followed from its second frame on
            else:
                # Weighted by elapsed time, so the estimate means the same at 5 and 30 frames/s.
                w = 1.0 - math.exp(-dt / self.velocity_window_s)
                vx, vy = track.velocity
                track.velocity = (vx + w * (measured[0] - vx), vy + w * (measured[1] - vy))
        track.box = box
        track.last_seen = now


def _similar_size(a: Box, b: Box, max_ratio: float) -> bool:
    sa, sb = math.sqrt(a.area), math.sqrt(b.area)
    return sa > 0 and sb > 0 and max(sa, sb) / min(sa, sb) <= max_ratio
