"""Series: the unit a radiologist reads. Instances are grouped by StudyInstanceUID + SeriesInstanceUID, the frames
of a multi-frame instance are slices of its series, and slices are ordered by position (ImagePositionPatient along
the slice normal, else InstanceNumber). One aggregation rule turns the slices' probabilities into the series'
class, probabilities and key slices, and one refer rule says when a radiologist must read the series first.
The API, the review station, the DICOM node and series-level evaluation all use it.

May import: core, data.
"""
