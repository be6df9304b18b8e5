"""A lab's review of its samples: cells kept in a database, corrected by a person, counted, signed off, exported."""

from bloodcell.review.counting import REVIEW_LABELS, count
from bloodcell.review.store import Conflict, NotFound, ReviewError, ReviewStore, StoreDamaged, StoreFull

__all__ = ["REVIEW_LABELS", "Conflict", "NotFound", "ReviewError", "ReviewStore", "StoreDamaged", "StoreFull", "count"]
