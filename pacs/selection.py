"""Which received series the node reads, and what it never reads: its own output.

A series is read when its Modality is one of `pacs.select.modalities`, its ImageType names no localizer or scout,
it is not derived (ImageType DERIVED or SECONDARY, or a secondary capture) unless asked, and its SeriesDescription
matches the configured patterns; once complete it also needs `pacs.select.min_slices` slices. Every series left out
gets one audit row with the reason.

The node's own results (its SRs, Key Object Selections and secondary captures, routed back by a PACS rule) are
recognised by the marks it writes into each of them (its Manufacturer and result series numbers) and by their SOP
Instance UIDs in its spool, and are taken (so the sender sees success) but never read again.
"""
from __future__ import annotations

import re
from collections.abc import Callable

from pydicom.dataset import Dataset

from core.config import PacsSelectSection
from pacs.report import KO_SERIES_NUMBER, MANUFACTURER, SC_SERIES_NUMBER, SR_SERIES_NUMBER

SECONDARY_CAPTURE_PREFIX = "1.2.840.10008.5.1.4.1.1.7"  # every secondary-capture SOP class starts with it
OWN_SERIES_NUMBERS = (SR_SERIES_NUMBER, SC_SERIES_NUMBER, KO_SERIES_NUMBER)


def _words(value) -> list[str]:
    """The values of a multi-valued attribute such as ImageType, upper case."""
    if value is None:
        return []
    if isinstance(value, str):
        value = value.split("\\")
    return [str(v).strip().upper() for v in value]


def is_own_output(ds: Dataset, known: Callable[[str], bool] | None = None) -> bool:
    """A result this node (or another toolkit node) made: its Manufacturer and one of its result series numbers,
    or a SOP Instance UID the spool knows as its own."""
    try:
        number = int(ds.get("SeriesNumber", 0) or 0)
    except (TypeError, ValueError):
        number = 0
    if str(ds.get("Manufacturer", "")).strip() == MANUFACTURER and number in OWN_SERIES_NUMBERS:
        return True
    return known is not None and known(str(ds.get("SOPInstanceUID", "")))


def skip_reason(ds: Dataset, select: PacsSelectSection) -> str | None:
    """Why the instance's series is not read (None: it is), from its header."""
    modality = str(ds.get("Modality", "")).strip().upper()
    if modality not in {m.upper() for m in select.modalities}:
        return f"modality {modality or 'missing'} (pacs.select.modalities: {', '.join(select.modalities)})"
    image_type = _words(ds.get("ImageType"))
    localizer = sorted(set(image_type) & {t.upper() for t in select.skip_image_types})
    if localizer:
        return f"ImageType {localizer[0]} (pacs.select.skip_image_types)"
    if select.skip_derived:
        if str(ds.get("SOPClassUID", "")).startswith(SECONDARY_CAPTURE_PREFIX):
            return "a secondary capture (pacs.select.skip_derived)"
        derived = sorted(set(image_type[:2]) & {"DERIVED", "SECONDARY"})
        if derived:
            return f"ImageType {derived[0]}: a derived series (pacs.select.skip_derived)"
    description = str(ds.get("SeriesDescription", ""))
    if select.descriptions and not any(re.search(p, description, re.IGNORECASE) for p in select.descriptions):
        return f"SeriesDescription {description!r} matches none of pacs.select.descriptions"
    for pattern in select.skip_descriptions:
        if re.search(pattern, description, re.IGNORECASE):
            return f"SeriesDescription {description!r} matches {pattern!r} (pacs.select.skip_descriptions)"
    return None


def too_few_slices(n_slices: int, select: PacsSelectSection) -> str | None:
    if n_slices < select.min_slices:
        return f"{n_slices} slice(s), fewer than pacs.select.min_slices ({select.min_slices})"
    return None
