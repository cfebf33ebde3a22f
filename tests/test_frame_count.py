"""data.images.frame_count: the one reading of a DICOM's NumberOfFrames, for every stage that counts frames."""
from __future__ import annotations

import warnings

import pytest
from pydicom.dataset import Dataset
from pydicom.valuerep import IS

from data.images import frame_count


def header(value=None, present: bool = True) -> Dataset:
    ds = Dataset()
    if present:
        with warnings.catch_warnings():  # pydicom warns on an invalid IS value; the file may still carry one
            warnings.simplefilter("ignore")
            ds.add_new(0x00280008, "IS", value)
    return ds


@pytest.mark.parametrize("ds, frames", [
    (header(present=False), 1),  # a single-frame image has no NumberOfFrames
    (header(None), 1),  # present but empty
    (header(""), 1),
    (header(0), 1),  # 0 frames read as one, as every stage always did
    (header("3"), 3),
    (header(IS("12")), 12),
    (header(10 ** 12), 10 ** 12),  # huge: counted as written; images.max_frames refuses it later
])
def test_frame_count_reads_odd_values(ds, frames):
    assert frame_count(ds) == frames


def test_frame_count_refuses_a_value_that_is_no_number():
    with pytest.raises((ValueError, TypeError)):
        frame_count(header("three"))
