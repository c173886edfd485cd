"""Canonical radiographic view codes and how they are read from DICOM attributes.

Veterinary archives record the projection inconsistently: a proper ViewPosition, a coded
ViewCodeSequence, or only free text in SeriesDescription / ProtocolName ("THX R LAT", "V/D
abdomen"). Everything downstream (multi-view pairing, per-view evaluation) needs one small
vocabulary, so every spelling is mapped here and nowhere else.
"""
import re
from typing import Iterable

VIEW_CODES = ("LL", "RL", "VD", "DV", "OTHER", "UNKNOWN")

# Coded projections: (coding scheme, code value) -> view. SCT codes from DICOM CID 4010 (DX View)
# and CID 7484 (veterinary projections); SRT codes are the retired SNOMED-RT spellings of CID 4010.
# Human AP/PA are the ventro-dorsal/dorso-ventral projections of a quadruped on its back/belly.
CODED_VIEWS: dict[tuple[str, str], str] = {
    ("SCT", "399173006"): "LL",
    ("SCT", "399198007"): "RL",
    ("SCT", "442441009"): "VD",
    ("SCT", "441672003"): "DV",
    ("SCT", "399348003"): "VD",
    ("SCT", "272479007"): "DV",
    ("SRT", "R-10236"): "LL",
    ("SRT", "R-10232"): "RL",
    ("SRT", "R-10206"): "VD",
    ("SRT", "R-10214"): "DV",
}

# The code each canonical view is written with (used by the phantom writer).
VIEW_CODE_ITEMS: dict[str, tuple[str, str, str]] = {
    "LL": ("SCT", "399173006", "left lateral"),
    "RL": ("SCT", "399198007", "right lateral"),
    "VD": ("SCT", "442441009", "Ventro-dorsal"),
    "DV": ("SCT", "441672003", "Dorso-ventral"),
}

_LEFT = r"(?:L|LT|LEFT)"
_RIGHT = r"(?:R|RT|RIGHT)"
_LAT = r"(?:LAT|LATERAL|LATERALE|LATERO)"
_SEP = r"[\s_\-/.]*"

# Ordered: sided laterals before ventro-dorsal forms, so "LEFT LATERAL VD-PREP" style text is not
# read as VD first. Each pattern is matched on upper-cased text with word boundaries.
_TEXT_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (view, re.compile(pattern))
    for view, pattern in (
        ("LL", rf"\b(?:LL|LLD|LLAT|{_LEFT}{_SEP}{_LAT}|{_LAT}{_SEP}{_LEFT})\b"),
        ("RL", rf"\b(?:RL|RLD|RLAT|{_RIGHT}{_SEP}{_LAT}|{_LAT}{_SEP}{_RIGHT})\b"),
        ("VD", rf"\b(?:VD|V{_SEP}D|VENTRO{_SEP}DORSAL|AP|A{_SEP}P|ANTERO{_SEP}POSTERIOR)\b"),
        ("DV", rf"\b(?:DV|D{_SEP}V|DORSO{_SEP}VENTRAL|PA|P{_SEP}A|POSTERO{_SEP}ANTERIOR)\b"),
    )
)


def view_from_text(text: str) -> str | None:
    """The sided view a free-text label names, or None when it names none (e.g. bare "LAT")."""
    upper = text.upper()
    for view, pattern in _TEXT_PATTERNS:
        if pattern.search(upper):
            return view
    return None


def view_from_code(scheme: str, value: str, meaning: str) -> str | None:
    """A coded view; unknown codes fall back to their CodeMeaning text."""
    coded = CODED_VIEWS.get((scheme.strip().upper(), value.strip()))
    return coded if coded is not None else view_from_text(meaning)


def derive_view(
    view_position: str,
    codes: Iterable[tuple[str, str, str]],
    descriptions: Iterable[str],
) -> str:
    """Combine the sources in priority order: the first definite answer wins.

    A source that is present but says nothing usable (an unsided "LAT", a site-specific label)
    does not stop the search, because a later source often carries the side; only when no source
    is definite does the image become OTHER (something was recorded) or UNKNOWN (nothing was).
    """
    present = False
    if view_position.strip():
        present = True
        found = view_from_text(view_position)
        if found:
            return found
    for scheme, value, meaning in codes:
        present = True
        found = view_from_code(scheme, value, meaning)
        if found:
            return found
    for text in descriptions:
        if text.strip():
            present = True
            found = view_from_text(text)
            if found:
                return found
    return "OTHER" if present else "UNKNOWN"
