"""Does a folder of cells mix labs? Read from the background colour of each image, as `bloodcell adapt` warns.

Adapting on two labs at once re-estimates statistics that fit neither; bloodcell.infer.adapt warns of it.
"""

from __future__ import annotations

import numpy as np

# Mixed labs, from the background colour (see background_colours and mixed_labs).
BACKGROUND_BRIGHTEST = 0.05  # the brightest 5 % of a cell image's pixels are background, whatever the cell
# Two groups whose centres lie this many within-group (robust) sds apart. Measured with the bundled model's input
# (80 px): single sources reach 3.1-4.9 (PBC classes, Raabin, BCCD, Tecom's yellow-background part), mixes of two or
# three of them 9.0-257; 7 sits between. (Splitting one normal spread in two gives about 2.9.)
LAB_GAP_SD = 7.0
MIN_LAB_SHARE = 0.10  # the smaller group holds at least this share of the images (a few odd images are not a lab)
MIN_LAB_GAP = 10.0  # grey levels (0-255): closer backgrounds are one lab whatever their spread


def background_colours(images: np.ndarray) -> np.ndarray:
    """(N, 3) float: per image, the mean colour of its brightest BACKGROUND_BRIGHTEST of pixels (by R + G + B).

    A single-cell image is mostly smear background around one cell, and its brightest pixels are that background:
    the lamp, camera and stain of the lab show there, not the cell's class.
    """
    n = len(images)
    pixels = np.asarray(images).reshape(n, -1, 3)
    k = max(1, int(np.ceil(BACKGROUND_BRIGHTEST * pixels.shape[1])))
    brightness = pixels.astype(np.int32).sum(axis=2)
    brightest = np.argpartition(-brightness, k - 1, axis=1)[:, :k]
    return np.take_along_axis(pixels, brightest[:, :, None], axis=1).astype(np.float64).mean(axis=1)


def mixed_labs(colours: np.ndarray) -> tuple[int, int, str, str] | None:
    """(size of each group, their colours) when the background colours form two well-separated groups, else None.

    Two-means on the colours, started from the two extremes along their main axis (deterministic). The groups count
    as two labs when (a) their centres lie more than LAB_GAP_SD within-group spreads apart, the spread measured
    along the line joining the centres as 1.4826 x the median absolute deviation from each group's median (a sd
    that a few odd images do not inflate, so a third lab in the folder does not hide the split); (b) the smaller
    group holds at least MIN_LAB_SHARE of the images, so a few odd images are not a lab (3 % of PBC's own cells
    have a lavender background, 37 grey levels from the rest); and (c) the centres are at least MIN_LAB_GAP grey
    levels apart, so a lab whose backgrounds barely vary is not split over a shade. A model that white-balances its
    input has the cast removed before it sees the cells; this looks at the images as the model gets them.
    """
    x = np.asarray(colours, dtype=np.float64)
    if len(x) < 4:
        return None
    centred = x - x.mean(axis=0)
    axis = np.linalg.svd(centred, full_matrices=False)[2][0]
    proj = centred @ axis
    centres = np.stack([x[proj.argmin()], x[proj.argmax()]])
    assign = np.full(len(x), -1)
    for _ in range(100):
        new = ((x[:, None, :] - centres[None]) ** 2).sum(axis=2).argmin(axis=1)
        if (new == assign).all():
            break
        assign = new
        if assign.min() == assign.max():  # everything in one group: one lab
            return None
        centres = np.stack([x[assign == g].mean(axis=0) for g in (0, 1)])
    gap = float(np.linalg.norm(centres[1] - centres[0]))
    sizes = np.bincount(assign, minlength=2)
    if gap < MIN_LAB_GAP or sizes.min() < MIN_LAB_SHARE * len(x):
        return None
    along = x @ ((centres[1] - centres[0]) / gap)
    medians = np.array([np.median(along[assign == g]) for g in (0, 1)])
    spread = 1.4826 * float(np.median(np.abs(along - medians[assign])))
    if gap <= LAB_GAP_SD * spread:
        return None
    rgb = lambda c: "RGB " + " ".join(str(int(round(v))) for v in c)  # noqa: E731
    return int(sizes[0]), int(sizes[1]), rgb(centres[0]), rgb(centres[1])
