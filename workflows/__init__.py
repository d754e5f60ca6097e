"""Nipype workflows of qsmprep: wiring only (no numerics, no path surgery)."""
