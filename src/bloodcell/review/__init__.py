"""A lab's review of its samples: cells kept in a database, corrected by a person, counted, signed off, exported."""

from bloodcell.review.counting import REVIEW_LABELS, count
from bloodcell.review.records import Conflict, NotFound, ReviewError, StoreDamaged, StoreFull
from bloodcell.review.store import ReviewStore

__all__ = ["REVIEW_LABELS", "Conflict", "NotFound", "ReviewError", "ReviewStore", "StoreDamaged", "StoreFull", "count"]
