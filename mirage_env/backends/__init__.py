"""World models behind one small protocol (see base.py)."""

from .base import LatentSpec, Segment, SegmentRequest, WorldModel

__all__ = ["LatentSpec", "Segment", "SegmentRequest", "WorldModel"]
