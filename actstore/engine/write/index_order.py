"""The order of a key-index run: key prefixes ascending, equal prefixes in row order (FORMAT.md §6)."""

from __future__ import annotations

import numpy as np

__all__ = ["stable_order"]


def stable_order(prefixes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(order, prefixes[order])``: the order that sorts ``prefixes`` ascending, equal prefixes kept in
    their input order (FORMAT.md §6).

    numpy sorts 64-bit integers with a vectorised sort about 4× faster than its argsort (1.4 million:
    10 ms against 38 ms here) and 13× faster than its stable argsort.  So each prefix's high bits and its
    position are packed into one ``uint64`` (the position in the low ``b`` bits, ``b`` enough for
    ``len(prefixes)``) and that is sorted: positions come out sorted by the high bits, ties in input
    order.  Only prefixes that share their high bits (a few pairs among random keys; all of them when
    keys differ only in their low bits) may still be out of order among themselves: they are sorted
    again by (prefix, position), in the places they hold, which are theirs since the high bits order
    the groups.  Where most share them, numpy's argsorts are quicker.
    """
    n = len(prefixes)
    if n < 2:
        return np.zeros(n, np.intp), prefixes.copy()
    low = np.uint64((1 << (n - 1).bit_length()) - 1)
    # (Few arrays, each written in place where it can be: at commit they are fresh pages, which cost more
    # to fault in than to fill.)
    order = np.arange(n, dtype=np.int64)
    packed = prefixes & ~low
    packed |= order.view(np.uint64)
    packed.sort()
    np.bitwise_and(packed, low, out=order.view(np.uint64))
    ordered = prefixes[order]
    packed &= ~low  # the high bits of each, in sorted order
    tie = packed[1:] == packed[:-1]
    if bool(tie.any()):
        shared = np.flatnonzero(np.concatenate(([False], tie)) | np.concatenate((tie, [False])))
        if len(shared) > n // 8:
            order = np.argsort(prefixes)
            ordered = prefixes[order]
            if bool((ordered[1:] == ordered[:-1]).any()):
                order = np.argsort(prefixes, kind="stable")
                ordered = prefixes[order]
            return order, ordered
        again = np.lexsort((order[shared], ordered[shared]))
        order[shared] = order[shared][again]
        ordered[shared] = ordered[shared][again]
    return order, ordered
