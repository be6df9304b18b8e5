"""What bloodcell's models are for, said once: the README, the web page, every report and every model card use it."""

INTENDED_USE = (
    "Research and decision support for people who read blood smears: it sorts images of single peripheral blood "
    "cells into classes and says which answers need a person's review. It is not a diagnosis and not a medical "
    "device; every result it gives is to be checked by a qualified person, and it says nothing about cells unlike "
    "those it was trained on."
)

# one line for reports, where the full paragraph would crowd the figures
REPORT_NOTE = "Intended use: research and decision support, not a diagnosis; a qualified person checks every result."
